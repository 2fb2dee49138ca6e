"""Running packed weights: quantized linears, their kernels, loading checkpoints."""
