"""Family layer: pruning helpers shared by several methods (the pruning base, structured pruning)."""
