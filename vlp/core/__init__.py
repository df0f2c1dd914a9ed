"""The layer below everything: errors, config schemas, atomic writes, fetching, image decoding, distributed helpers, models, weights, the synthetic world."""
