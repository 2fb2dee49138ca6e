"""The interface every output format implements, and what they share.

    QuantConfig.format ──formats.get──► Format ──bind(model)──► Format for this model
        grid(name)          → GridSpec the solver rounds that linear onto
        pack(result, bias)  → Stored: the tensors one solved linear becomes (``.tensors(prefix)``)
        quantization_config → config.json's block (None: the format writes its own metadata)
        finish(stage, out)  → the final output from the staged checkpoint (GGUF: one .gguf file)
    and, for a size budget (mixed precision, ``gptq.pipeline.mix``):
        candidates(spec)    → the grids a budget may choose between ("auto": the format's default set)
        linear_bytes(out, in, grid) → the bytes the file stores for one linear on that grid
        allows(grid, in)    → whether a linear with ``in`` inputs can take that grid
        set_plan(plan)      → {linear: GridSpec}: ``grid`` answers from it from then on

The loop and the solver never import a format: the pipeline hands the loop ``fmt.grid`` and
packs the solve results it returns with ``fmt.pack``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Protocol

import torch

from gptq.core.config import ConfigError, QuantConfig
from gptq.core.grids import GridSpec
from gptq.io.modules import get_module, in_features
from gptq.io.safetensors_io import TensorSource, header_bytes
from gptq.models import rotation
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
    mixed_experts = False  # whether a size budget can mix grids in a mixture-of-experts model (one per experts layer)

    def __init__(self, config: QuantConfig):
        self.config = config
        self.warnings: list[str] = []  # what the user should know (printed once, as one line each)
        self.plan: dict[str, GridSpec] = {}  # a budget's per-linear choice (``set_plan``)
        self.mix: dict | None = None  # and its record for the report (``pipeline.mix.Plan.record``)
        self.arch = None  # the model family (``bind``): how the checkpoint names the linears

    def check(self) -> None:
        """Refuse settings this format cannot store (ConfigError naming the setting and the fix)."""

    def bind(self, model: torch.nn.Module, model_dir: Path | None = None) -> Format:
        """This format for one model (its per-linear plan, dtype, refusals); the model may be a
        skeleton on the meta device. Refuses a model the format cannot store, before any work."""
        arch = self.arch = for_config(model.config)
        if arch.experts is not None and not self.mixture_of_experts:
            raise ConfigError(f"the model is a mixture-of-experts model ({model.config.model_type}): --format "
                              f"{self.name} cannot store routed experts; use --format gptq, compressed-tensors or "
                              "gguf:TYPE")
        return self

    def grid(self, name: str) -> GridSpec:
        return self.plan.get(name) or self.config.grid()

    def candidates(self, spec: str) -> list[GridSpec]:
        """The grids a size budget chooses between (``spec``: "auto" or the format's list)."""
        raise ConfigError(f"--format {self.name} cannot store a different grid per linear, so a size budget "
                          "(--max-size / --bits-per-weight) cannot be met by mixing; use --format gptq or gguf, or "
                          "drop the budget")

    def allows(self, grid: GridSpec, inputs: int, auto: bool = False) -> bool:
        """Whether a linear with ``inputs`` input columns can be stored on ``grid`` (``auto``: the
        default candidate set, which also leaves out what the format's fast kernels do not serve)."""
        return True

    def linear_tensors(self, out: int, inputs: int, grid: GridSpec) -> dict[str, tuple[torch.dtype, tuple]]:
        """{suffix: (dtype, shape)} of what the file stores for one linear on ``grid``."""
        raise NotImplementedError

    def linear_bytes(self, out: int, inputs: int, grid: GridSpec) -> int:
        return sum(math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
                   for dtype, shape in self.linear_tensors(out, inputs, grid).values())

    def unit_bytes(self, names, shapes, grid: GridSpec) -> int:
        """The bytes a unit's linears (full ``names``, [out, in] ``shapes``) take on ``grid``."""
        return sum(self.linear_bytes(o, i, grid) for o, i in shapes)

    def fixed_bytes(self, model: torch.nn.Module, source_dir, quantized: set[str], untie_head: bool,
                    extra: dict | None = None, grids: dict | None = None) -> int:
        """The bytes of the weight files that do not depend on the mix (for ``--max-size``): every tensor
        that is not a quantized linear's weight, in the source's dtype as written (the linears' biases in
        float16), a head the rotation unties, and the headers (the linears' tensors as this format names
        them, on a representative grid, or on each linear's own with ``grids`` {linear: GridSpec}: the mix
        changes only the digits of their shapes and offsets, a few bytes, which ``pipeline.mix`` settles
        once the plan is known). One file's headers: a checkpoint split into shards spends a few hundred
        bytes more per shard."""
        arch = for_config(model.config)
        source = TensorSource(source_dir)
        linear_of = {arch.checkpoint_name(f"{n}.weight"): n for n in quantized}
        biases = {arch.checkpoint_name(f"{n}.bias") for n in quantized}
        sample = self.grid(next(iter(quantized)))
        shapes, dtypes, fixed = {}, {}, 0
        for name in source.names():
            shape = source.shape(name)
            if name in linear_of:
                prefix = name.removesuffix(".weight")
                grid = sample if grids is None else grids[linear_of[name]]
                for k, (dt, shp) in self.linear_tensors(shape[0], shape[1], grid).items():
                    shapes[f"{prefix}.{k}"], dtypes[f"{prefix}.{k}"] = shp, dt
                continue
            shapes[name], dtypes[name] = shape, torch.float16 if name in biases else source.dtype(name)
            fixed += math.prod(shape) * torch.tensor([], dtype=dtypes[name]).element_size()
        head, emb = f"{rotation.HEAD}.weight", f"{rotation.EMBED}.weight"  # the names the rotation unties
        if untie_head and head not in shapes:
            shapes[head], dtypes[head] = shapes[emb], dtypes[emb]
            fixed += math.prod(shapes[emb]) * torch.tensor([], dtype=dtypes[emb]).element_size()
        return fixed + header_bytes(shapes, dtypes)

    def set_plan(self, plan: dict[str, GridSpec]) -> None:
        self.plan = dict(plan)

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


def int_candidates(spec: str, bits_allowed: tuple[int, ...], group_size: int, auto) -> list[tuple[int, int]]:
    """(bits, group) pairs of a uniform-grid format's ``--candidates``: "auto" (the format's ``auto`` pairs)
    or BITSgGROUP items ("3g64,4g64,8g128"; a plain BITS takes ``group_size``), duplicates dropped."""
    if spec == "auto":
        return list(auto)
    pairs = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:g(-1|\d+))?\s*", item)
        if not m or int(m.group(1)) not in bits_allowed or (m.group(2) and int(m.group(2)) == 0):
            raise ConfigError(f"--candidates {spec!r}: {item!r} is not BITS or BITSgGROUP with bits in {bits_allowed} "
                              "(e.g. " + ",".join(f"{b}g64" for b in bits_allowed) + ")")
        pairs.append((int(m.group(1)), int(m.group(2) or group_size)))
    return list(dict.fromkeys(pairs))


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
