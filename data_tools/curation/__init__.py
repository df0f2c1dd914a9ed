"""Curation: embed every sample of a shard set, then keep only the pairs that pass the filters."""
