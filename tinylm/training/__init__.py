"""Training building blocks: configs, objectives, checkpoints, metrics, parallelism."""
