"""Output formats: how solve results become stored tensors, metadata and files."""
