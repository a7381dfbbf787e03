"""comet1m service."""
