"""gptq: offline GPTQ post-training quantization for Hugging Face causal language models.

    from gptq import QuantConfig, quantize_model, save_checkpoint, load

The layers, bottom to top (each imports only from below; docs/design.md):
    core (config, Hessian, solver, grids) · io (modules, safetensors) → models (families as data)
    → formats (GPTQ, bitsandbytes, GGUF, compressed-tensors) → pipeline (the block loop, streaming)
    → runtime (quantized linears, kernels, loading) → the commands (quantize, eval, generate, inspect)
"""

import os
import sys

# OpenMP (libgomp, torch's CPU thread pool) lets a thread that waits at a barrier spin for 300,000
# iterations before it sleeps. The GPTQ column loop and decoding run thousands of small parallel
# operations, so when another process holds a core, the spinning thread burns the time slice its
# partner needs and a run on a shared 2-core machine took 14x as long instead of 2x (docs/results.md,
# "A busy machine"). Passive waiting fixes that at a small cost when the machine is quiet. libgomp
# reads this once, when torch loads it, so it is set before torch is imported, and never over the
# user's own OpenMP settings.
if "torch" not in sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys():
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

from gptq.core.config import CalibConfig, ConfigError, QuantConfig
from gptq.core.solver import round_to_nearest, solve
from gptq.formats.checkpoint import save_checkpoint
from gptq.io.safetensors_io import CheckpointError
from gptq.pipeline.run import quantize_model
from gptq.runtime.load import load, load_any

__all__ = ["CalibConfig", "CheckpointError", "ConfigError", "QuantConfig", "load", "load_any", "quantize_model",
           "round_to_nearest", "save_checkpoint", "solve"]
__version__ = "0.1.0"
