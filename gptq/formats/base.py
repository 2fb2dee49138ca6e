"""The interface every output format implements, and what they share.

    QuantConfig.format ──formats.get──► Format ──bind(model)──► Format for this model
        grid(name)          → GridSpec the solver rounds that linear onto
        pack(result, bias)  → Stored: the tensors one solved linear becomes (``.tensors(prefix)``)
        quantization_config → config.json's block (None: the format writes its own metadata)
        finish(stage, out)  → the final output from the staged checkpoint (GGUF: one .gguf file)

The loop and the solver never import a format: the pipeline hands the loop ``fmt.grid`` and
packs the solve results it returns with ``fmt.pack``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from gptq.core.config import ConfigError, QuantConfig
from gptq.core.grids import GridSpec
from gptq.io.modules import get_module, in_features
from gptq.models.architectures import for_config


class Stored(Protocol):
    """One solved linear as a format stores it."""

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]: ...


class Format:
    """Defaults shared by the formats: every linear on the config's uniform grid, a checkpoint
    directory that is final as written, no model restriction."""

    name = ""
    staged = False  # True: the checkpoint directory is a stage that ``finish`` turns into the output
    mixture_of_experts = True  # whether routed experts can be stored

    def __init__(self, config: QuantConfig):
        self.config = config
        self.warnings: list[str] = []  # what the user should know (printed once, as one line each)

    def check(self) -> None:
        """Refuse settings this format cannot store (ConfigError naming the setting and the fix)."""

    def bind(self, model: torch.nn.Module, model_dir: Path | None = None) -> "Format":
        """This format for one model (its per-linear plan, dtype, refusals); the model may be a
        skeleton on the meta device. Refuses a model the format cannot store, before any work."""
        arch = for_config(model.config)
        if arch.experts is not None and not self.mixture_of_experts:
            raise ConfigError(f"the model is a mixture-of-experts model ({model.config.model_type}): --format "
                              f"{self.name} cannot store routed experts; use --format gptq, compressed-tensors or "
                              "gguf:TYPE")
        return self

    def grid(self, name: str) -> GridSpec:
        return self.config.grid()

    def pack(self, result, bias: torch.Tensor | None) -> Stored:
        raise NotImplementedError

    def pack_block(self, block: torch.nn.Module, prefix: str, results: dict) -> dict[str, Stored]:
        """{linear name: stored} for one block's solve results ({full name: SolveResult}; the
        block's modules, under ``prefix``, hold their final biases)."""
        out = {}
        for full, r in results.items():
            bias = getattr(get_module(block, full[len(prefix) + 1:]), "bias", None)
            out[full] = self.pack(r, None if bias is None else bias.detach().to("cpu", copy=True))
        return out

    def quantization_config(self) -> dict | None:
        raise NotImplementedError

    def default_out(self, model: str) -> str:
        c = self.config
        return f"{model.rstrip('/')}-{self.name}-{c.bits}bit-g{c.group_size}"

    def finish(self, stage: Path, out: Path, source: Path, overwrite: bool) -> Path:
        return stage

    def summary(self, out: Path) -> str:
        """What the command prints about the written output."""
        return ""


def linear_inputs(model: torch.nn.Module) -> dict[str, int]:
    """{linear name: input size} of every linear the loop quantizes."""
    arch = for_config(model.config)
    blocks = get_module(model, arch.blocks)
    return {f"{arch.blocks}.{i}.{n}": in_features(get_module(b, n)) for i, b in enumerate(blocks)
            for n in arch.block_linears(b)}


def indivisible(model: torch.nn.Module, group_size: int) -> list[int]:
    """The linears' input sizes that ``group_size`` does not divide."""
    if group_size == -1:
        return []
    return sorted({n for n in linear_inputs(model).values() if n % group_size})
