"""The training loop, its loss, checkpoints, metrics and memory accounting."""
