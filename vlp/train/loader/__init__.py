"""The training loader: which samples each rank reads (sources, plan), how they are read
(reading), and how they become batches (augment, batches)."""
