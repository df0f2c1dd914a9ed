"""vlp: CLIP-style image-text pretraining (shards -> DeepSpeed training with exact gradient caching -> eval)."""

__version__ = "0.1.0"
