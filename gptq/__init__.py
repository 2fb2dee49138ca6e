"""gptq: offline GPTQ post-training quantization for Hugging Face causal language models.

    from gptq import QuantConfig, quantize_model, save_checkpoint, load

The layers, bottom to top (each imports only from below; docs/design.md):
    core (config, Hessian, solver, grids) · io (modules, safetensors) → models (families as data)
    → formats (GPTQ, bitsandbytes, GGUF, compressed-tensors) → pipeline (the block loop, streaming)
    → runtime (quantized linears, kernels, loading) → the commands (quantize, eval, generate, inspect)
"""

from gptq.core.config import CalibConfig, ConfigError, QuantConfig
from gptq.core.solver import round_to_nearest, solve
from gptq.formats.checkpoint import save_checkpoint
from gptq.io.safetensors_io import CheckpointError
from gptq.pipeline.run import quantize_model
from gptq.runtime.load import load, load_any

__all__ = ["CalibConfig", "CheckpointError", "ConfigError", "QuantConfig", "load", "load_any", "quantize_model",
           "round_to_nearest", "save_checkpoint", "solve"]
__version__ = "0.1.0"
