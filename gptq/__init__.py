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

from gptq.core.config import CalibConfig, ConfigError, QuantConfig
from gptq.core.solver import round_to_nearest, solve
from gptq.formats.checkpoint import save_checkpoint
from gptq.io.safetensors_io import CheckpointError
from gptq.pipeline.run import quantize_model
from gptq.runtime.load import load, load_any

__all__ = ["CalibConfig", "CheckpointError", "ConfigError", "QuantConfig", "load", "load_any", "quantize_model",
           "round_to_nearest", "save_checkpoint", "solve"]
__version__ = "0.1.0"
