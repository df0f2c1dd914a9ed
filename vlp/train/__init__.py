"""The train layer: a DeepSpeed run from shards to checkpoints (trainer, losses, gradient caching,
schedule, checkpoints, export, speed-ups); `vlp.train.loader` reads the shards into batches."""
