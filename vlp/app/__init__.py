"""The application layer: the one `vlp` command, the demo, launch, and the train-time eval hook."""
