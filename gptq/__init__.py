"""gptq: offline GPTQ post-training quantization for Hugging Face causal language models.

    from gptq import QuantConfig, quantize_model, save_checkpoint, load

The data's path through the modules:
    calib (text → token windows) → pipeline (block by block) → capture (H per linear)
    → solver.solve (GPTQ) → pack (int32 words) → save (safetensors) → load → qlinear → kernels
"""

from gptq.core.config import CalibConfig, ConfigError, QuantConfig
from gptq.core.solver import round_to_nearest, solve
from gptq.io.checkpoint import save_checkpoint
from gptq.pipeline.loop import quantize_model
from gptq.runtime.load import CheckpointError, load, load_any

__all__ = ["CalibConfig", "CheckpointError", "ConfigError", "QuantConfig", "load", "load_any", "quantize_model",
           "round_to_nearest", "save_checkpoint", "solve"]
__version__ = "0.1.0"
