"""Models: the two-tower and fusion encoders and the registry that builds, saves and loads them.
A library: torch and transformers only, no Ray."""
