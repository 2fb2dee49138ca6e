"""Grid families the solver rounds onto: uniform integers, codebooks (NF4/FP4), GGML block types."""
