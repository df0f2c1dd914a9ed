"""vlp's launch files (SLURM, torchrun, DeepSpeed, accelerate), shipped as package data `vlp.launch`."""
