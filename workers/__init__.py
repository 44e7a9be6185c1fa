"""What runs on Ray Train workers: models, losses, the training loop, DeepSpeed set-up."""
