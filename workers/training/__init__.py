"""Training: the per-worker loop on Ray Train + DeepSpeed, its checkpoints and data positions, and the
in-process loop the tuner uses."""
