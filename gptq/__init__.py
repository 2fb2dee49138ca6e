"""gptq: offline GPTQ post-training quantization for Hugging Face causal language models.

    from gptq import QuantConfig, quantize_model, save_checkpoint, load

The layers, bottom to top (each imports only from below; docs/design.md):
    core (config, Hessian, solver, grids) · io (modules, safetensors) → models (families as data)
    → formats (GPTQ, bitsandbytes, GGUF, compressed-tensors) → pipeline (the block loop, streaming)
    → runtime (quantized linears, kernels, loading) → the commands (quantize, eval, generate, inspect)
"""

import os
import sys

# OpenMP (libgomp, torch's CPU thread pool) lets a thread that waits at a barrier spin 300,000 times
# (milliseconds) before it sleeps. The GPTQ column loop and decoding run thousands of small parallel
# operations, so when another process holds a core, the spinning thread burns the time slice that
# the thread it waits for needs: two quantizations side by side on 2 cores took 5x as long as one
# alone, and decoding beside a busy loop kept a quarter of its speed. Sleeping at once (passive)
# fixes that but costs decoding 45 % on a quiet machine; a short spin of 2,000 keeps both
# (docs/results.md, "A busy machine"). libgomp reads this once, when torch loads it, so it is set
# before torch is imported, and never over the user's own OpenMP settings.
if "torch" not in sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys():
    os.environ["GOMP_SPINCOUNT"] = "2000"


def _return_freed_memory() -> None:
    """glibc's malloc serves a request from its heap unless it is larger than a threshold that
    starts at 128 KiB and rises to every freed mmap'ed block's size (up to 32 MiB). Block weights,
    Hessians and activations are freed and reallocated block after block, so after the first few
    they all land in the heap, whose freed holes stay resident: quantizing an 8-layer, 2048-wide
    model held 0.7-0.8 GiB free inside malloc between blocks (mallinfo2) and peaked at 2.04 GiB RSS;
    with the threshold fixed at 1 MiB, allocations of 1 MiB and more are mapped and returned to the
    system when freed: 0.08 GiB free between blocks, a 1.68 GiB peak, the same time (docs/results.md,
    "Memory"). Only on glibc, and never over the user's own malloc settings."""
    if sys.platform != "linux" or {"MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"} & os.environ.keys():
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (a fixed value also stops its rising)
    except (OSError, AttributeError):  # another C library (musl): nothing to do
        pass


_return_freed_memory()

from gptq.core.config import CalibConfig, ConfigError, QuantConfig
from gptq.core.solver import round_to_nearest, solve
from gptq.formats.checkpoint import save_checkpoint
from gptq.io.safetensors_io import CheckpointError
from gptq.pipeline.run import quantize_model
from gptq.runtime.load import load, load_any

__all__ = ["CalibConfig", "CheckpointError", "ConfigError", "QuantConfig", "load", "load_any", "quantize_model",
           "round_to_nearest", "save_checkpoint", "solve"]
__version__ = "0.1.0"
