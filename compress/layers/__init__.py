"""Layer 3: the compressed layer types (QuantLinear, OWQLinear, SparseLinear, W8A8Linear, NF4), each with its save/load description."""
