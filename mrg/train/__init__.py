"""Training: the configs and presets, the losses, the stages and their loop, the findings head."""
