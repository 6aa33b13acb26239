"""Family layer: quantization helpers shared by several methods (smoothing)."""
