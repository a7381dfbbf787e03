"""comet1m loadgen."""
