"""Layer 5: where models and text come from (hub, folders, GGUF, checkpoints; calibration and evaluation data)."""
