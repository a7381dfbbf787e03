"""comet1m admin_api."""
