"""Layer 0: errors, typed options, paths and atomic writes, the generic lazy registry. Imports nothing of compress above it."""
