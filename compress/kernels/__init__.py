"""Layer 1: pure tensor math (integer grids and packing, Hessian and damped Cholesky, the OBS sweep, masks, int8 matmul, losses)."""
