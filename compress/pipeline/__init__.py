"""Layer 6: the Method contract, the sequential engine, RunContext and recipes."""
