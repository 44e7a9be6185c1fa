"""Ray Tune search over the config tree."""
