"""Frozen configuration objects. Validated once, passed explicitly, never mutated."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
# the order in which the solver visits input columns, and whether that shows in g_idx:
#   none         input order; g_idx = k // group
#   static       descending diag(H), grids fixed from the unquantized W first; g_idx = k // group
#   group-aware  groups by importance, columns by diag(H) inside each group; grids from the
#                error-updated columns as each group comes up; g_idx = k // group (the default)
#   dynamic      descending diag(H) across groups; grids as groups of the *solve* order come up,
#                so g_idx is a permutation (desc_act: true; vLLM >= 0.32 refuses it)
ACT_ORDERS = ("none", "static", "group-aware", "dynamic")
# the grid family: uniform integers (GPTQ checkpoints) or a 16-value codebook times an absmax per
# group (bitsandbytes NF4/FP4, written in the bitsandbytes 4-bit layout: bnb.py)
GGML_GRIDS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k")  # llama.cpp block types: ggml.py
GRIDS = ("int", "nf4", "fp4") + GGML_GRIDS
EXPERT_TOKENS = ("all", "routed")  # which calibration tokens build a routed expert's Hessian
BNB_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


class ConfigError(ValueError):
    """A setting is out of range; the message names the setting and the allowed values."""


@dataclass(frozen=True)
class QuantConfig:
    """How one weight matrix is quantized.

    bits:            2, 3, 4 or 8.
    group_size:      input columns sharing one (scale, zero) per output row; -1 = whole row.
    sym:             symmetric grid (zero fixed at 2**(bits-1)); asymmetric otherwise.
    act_order:       column order, one of ACT_ORDERS (above). Booleans are accepted for the
                     older API: True = "dynamic" (the paper's desc_act), False = "none".
    true_sequential: quantize q/k/v, then o, then up/gate, then down, each on inputs that the
                     already-quantized linears produce.
    damp:            fraction of mean(diag H) added to the diagonal before the Cholesky.
    block_size:      columns per lazy-batch block (speed only; the result does not depend on it).
    mse:             search a shrunk clipping range per grid that minimises H-weighted error.
    sort_channels:   with group-aware or dynamic act-order, reorder the channels the architecture
                     declares free (the MLP's intermediate dimension) by the consumer's diag(H)
                     first, so the down projection gets act-order's column order with g_idx = k // g.
                     Not applied with double_quant (the scale blocks fix the producers' row order).
    grid:            "int" (uniform, the GPTQ format) or "nf4"/"fp4" (bitsandbytes' codebooks; absmax
                     per group of group_size weights; written as a bitsandbytes 4-bit checkpoint).
    double_quant:    codebook grids only: store the absmax values as 8-bit codes in blocks of 256 with
                     a float32 scale each and one offset (bitsandbytes' double quantization); the
                     solver rounds against the absmax as stored.
    checkpoint_format: "gptq" (v1, zeros stored minus one) or "gptq_v2" (zeros as-is).
    expert_tokens:   mixture-of-experts models: "all" sends every calibration token through every routed
                     expert for its Hessian (the block's output still uses the real routing), so no expert
                     is starved; "routed" uses only the tokens the router sends it.
    expert_min_tokens: an expert whose Hessian would rest on fewer rows is solved against the identity
                     Hessian (round-to-nearest on MSE-fitted grids, no error feedback) and named in the report.
    fp_target:       GPTAQ's asymmetric calibration (``solver.solve``): fit each linear to the full-precision
                     model's output rather than to its own on already-quantized inputs, the target
                     shifted by this fraction (α) of the exact correction; 0 = plain GPTQ (0.25, GPTAQ's
                     own choice, took SmolLM2's 4-bit g64 perplexity from 22.82 to 21.29: bench fp-target). Routed experts
                     are solved plainly either way.
    batch_experts:   solve same-shape experts together (one column loop for many experts; speed only,
                     the results agree with one-by-one solves up to float rounding).
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: str = "group-aware"
    true_sequential: bool = True
    damp: float = 0.01
    block_size: int = 128
    mse: bool = True
    checkpoint_format: str = "gptq"
    sort_channels: bool = True
    grid: str = "int"
    double_quant: bool = False
    layer_grids: tuple = ()  # ((linear name, GGML type), ...): per-layer types of a GGUF mix
    gguf: str = ""  # the GGUF file type being written (e.g. "q4_k_m"), "" for safetensors formats
    expert_tokens: str = "all"
    expert_min_tokens: int = 32
    batch_experts: bool = True
    fp_target: float = 0.25

    def __post_init__(self) -> None:
        if isinstance(self.act_order, bool):
            object.__setattr__(self, "act_order", "dynamic" if self.act_order else "none")
        if self.act_order not in ACT_ORDERS:
            raise ConfigError(f"act_order={self.act_order!r}; choose one of {ACT_ORDERS}")
        if self.expert_tokens not in EXPERT_TOKENS:
            raise ConfigError(f"expert_tokens={self.expert_tokens!r}; choose one of {EXPERT_TOKENS}")
        if not 0.0 <= self.fp_target <= 1.0:
            raise ConfigError(f"fp_target={self.fp_target} must be in [0, 1]: the fraction of the full-precision "
                              "correction applied (0.25 as GPTAQ; 0 = plain GPTQ)")
        if self.expert_min_tokens < 0:
            raise ConfigError(f"expert_min_tokens={self.expert_min_tokens} must be 0 or more")
        if self.grid not in GRIDS:
            raise ConfigError(f"grid={self.grid!r}; choose one of {GRIDS}")
        if self.grid in ("nf4", "fp4") and (self.bits != 4 or self.group_size not in BNB_BLOCKSIZES):
            raise ConfigError(f"grid={self.grid!r} is 4-bit with an absmax per block of {BNB_BLOCKSIZES} weights "
                              f"(bitsandbytes' block sizes); got bits={self.bits}, group_size={self.group_size}")
        if self.double_quant and self.grid == "int":
            raise ConfigError("double_quant applies to the codebook grids (nf4, fp4: --format bnb-nf4 / bnb-fp4); the integer grids "
                              "store float16 scales")
        for _, g in self.layer_grids:
            if g not in GGML_GRIDS:
                raise ConfigError(f"layer grid {g!r}; choose one of {GGML_GRIDS}")
        if self.grid in GGML_GRIDS:
            from gptq.core.grids.ggml import TYPES

            t = TYPES[self.grid]
            if (self.bits, self.group_size, self.sym) != (t.bits, t.group, True):
                raise ConfigError(f"grid={self.grid!r} is {t.bits}-bit with groups of {t.group}; got bits={self.bits}, "
                                  f"group_size={self.group_size}")
            if self.act_order not in ("none", "group-aware"):
                raise ConfigError(f"GGUF blocks run along the rows in order: act_order must be none or group-aware, "
                                  f"got {self.act_order!r}")
            return
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"bits={self.bits} is not supported; choose one of {SUPPORTED_BITS}")
        if self.group_size != -1 and self.group_size < 1:
            raise ConfigError(
                f"group_size={self.group_size} is invalid; use a positive number of input "
                "columns per group (32, 64, 128 are common) or -1 for one group per row"
            )
        if not (0.0 <= self.damp < 1.0):
            raise ConfigError(f"damp={self.damp} must be in [0, 1); 0.01 is the usual value")
        if self.block_size < 1:
            raise ConfigError(f"block_size={self.block_size} must be a positive number of columns")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ConfigError(
                f"checkpoint_format={self.checkpoint_format!r}; choose one of {CHECKPOINT_FORMATS}"
            )

    def for_layer(self, name: str) -> "QuantConfig":
        """The config one linear is solved with: this one, or its own GGML type in a GGUF mix."""
        grid = dict(self.layer_grids).get(name)
        if grid is None or grid == self.grid:
            return self
        from gptq.core.grids.ggml import TYPES

        t = TYPES[grid]
        return replace(self, grid=grid, bits=t.bits, group_size=t.group)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def to_quantization_config(self) -> dict:
        """The ``quantization_config`` block of config.json that loaders read."""
        if self.gguf:  # not a safetensors checkpoint: the GGUF file carries its own metadata
            return {"quant_method": "gguf", "file_type": self.gguf}
        if self.grid != "int":  # codebook grids are written in the bitsandbytes 4-bit layout
            from gptq.formats.bnb import quantization_config

            return quantization_config(self.grid, double_quant=self.double_quant)
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            # only the dynamic order leaves a permuted g_idx: every other mode keeps k // group
            "desc_act": self.act_order == "dynamic",
            "sym": self.sym,
            "static_groups": self.act_order == "static",
            "act_order": self.act_order,
            "true_sequential": self.true_sequential,
            "damp_percent": self.damp,
            "checkpoint_format": self.checkpoint_format,
            "lm_head": False,
            "mse": self.mse,
            "sort_channels": self.sort_channels,
        }

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CalibConfig:
    """Which calibration text, how many windows of how many tokens."""

    dataset: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.nsamples < 1:
            raise ConfigError(f"nsamples={self.nsamples} must be at least 1")
        if self.seqlen < 2:
            raise ConfigError(f"seqlen={self.seqlen} must be at least 2 tokens")
