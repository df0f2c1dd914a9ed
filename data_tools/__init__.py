"""Raw image/alt-text pairs -> webdataset shards, the synthetic generator, and shard checks."""
