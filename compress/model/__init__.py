"""Layer 2: architecture tracing (blocks, linear groups) and module surgery (set_module, per-layer shapes)."""
