"""``gptq.eval``'s parts: per-token scores against a reference and their uncertainties
(``score``), the vocabulary check and the reference's on-disk cache (``reference``)."""
