"""Frozen configuration objects. Validated once, passed explicitly, never mutated."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from gptq.core.grids import GridSpec

SUPPORTED_BITS = (2, 3, 4, 8)
# the order in which the solver visits input columns, and whether that shows in g_idx:
#   none         input order; g_idx = k // group
#   static       descending diag(H), grids fixed from the unquantized W first; g_idx = k // group
#   group-aware  groups by importance, columns by diag(H) inside each group; grids from the
#                error-updated columns as each group comes up; g_idx = k // group (the default)
#   dynamic      descending diag(H) across groups; grids as groups of the *solve* order come up,
#                so g_idx is a permutation (desc_act: true; vLLM >= 0.32 refuses it)
ACT_ORDERS = ("none", "static", "group-aware", "dynamic")
GROUP_RANKS = ("max", "sum")  # group-aware: a group's importance, from its columns' diag(H)
EXPERT_TOKENS = ("all", "routed")
# rotations folded into the weights before solving (gptq.models.rotation):
#   none      the model as it is
#   hadamard  the residual stream by a seeded randomised Hadamard matrix (norms folded into the linears,
#             a tied head untied) and every attention head's values/outputs by another
#   random    the same with Haar-random orthogonal matrices
#   heads     only the heads' rotation (Hadamard): embeddings, norms and a tied head stay as they are
#   learned   as hadamard, the residual matrix then learned from the calibration data (gptq.core.learned_rotation)
ROTATIONS = ("none", "hadamard", "random", "heads", "learned")
# how a mixed-precision run (a size budget) estimates the error each candidate grid would cause in a
# linear (gptq.pipeline.mix): the output error tr(ΔW H ΔWᵀ) on the full-precision model's inputs of
#   hessian   round-to-nearest onto the candidate (cheap)
#   gptq      the GPTQ solve onto the candidate (one solve per candidate)
# taken as it is, or divided by the energy of the residual stream entering the block ("/residual": later
# RMSNorms divide an error there by that norm), or ("/block") scaled by what the unit's coarsest candidate
# does to the block's output (one more pass of the block per unit) over the output's energy: a reader's
# error reaches the residual stream only through attention or the MLP. The default, gptq/block, is the
# one estimate that allocated well on both SmolLM2 and a larger synthetic model (docs/results.md)
SENSITIVITIES = ("hessian", "gptq", "hessian/residual", "gptq/residual", "hessian/block", "gptq/block")


class ConfigError(ValueError):
    """A setting is out of range; the message names the setting and the allowed values."""


@dataclass(frozen=True)
class QuantConfig:
    """How one weight matrix is quantized.

    bits:            2, 3, 4 or 8.
    group_size:      input columns sharing one (scale, zero) per output row; -1 = whole row.
    sym:             symmetric grid (zero fixed at 2**(bits-1)); asymmetric otherwise. None (the default):
                     by bit width (``sym_at``): symmetric at 4 and 8 bits, asymmetric at 2 and 3.
    act_order:       column order, one of ACT_ORDERS (above). Booleans are accepted for the
                     older API: True = "dynamic" (the paper's desc_act), False = "none".
    group_rank:      group-aware act-order ranks the groups by the largest diag(H) of their columns
                     ("max", GPTQModel's rule) or by its sum over them ("sum"); GROUP_RANKS.
    true_sequential: quantize q/k/v, then o, then up/gate, then down, each on inputs that the
                     already-quantized linears produce.
    damp:            fraction of mean(diag H) added to the diagonal before the Cholesky.
    block_size:      columns per lazy-batch block (speed only; the result does not depend on it).
    mse:             search a shrunk clipping range per grid that minimises H-weighted error.
    sort_channels:   with group-aware or dynamic act-order, reorder the channels the architecture
                     declares free (the MLP's intermediate dimension) by the consumer's diag(H)
                     first, so the down projection gets act-order's column order with g_idx = k // g.
                     Not applied with double_quant (the scale blocks fix the producers' row order).
    format:          the output format, as ``--format`` spells it ("gptq", "gptq_v2", "bnb-nf4",
                     "bnb-fp4+dq", "gguf:q4_k_m", "compressed-tensors"; ``gptq.formats``). It decides
                     the grid each linear is solved on and how the result is stored; the loop and
                     the solver never look inside it.
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
    rotate:          rotate the model before solving, in its weights only (ROTATIONS, above); the checkpoint
                     keeps its architecture. rotate_seed seeds the rotation's signs (or the random matrix).
    rotate_steps:    --rotate learned: the optimizer's steps (gptq.core.learned_rotation).
    max_size:        mixed precision: the bytes the written weight files may take in all (0 = no budget); each
                     group of linears sharing an input gets one of ``candidates`` (gptq.pipeline.mix).
    bits_per_weight: mixed precision: the budget as average bits per quantized weight, scales and zeros
                     included as stored (0 = none; at most one of the two).
    candidates:      the grids a budget chooses between, as the format spells them ("auto": its default set).
    sensitivity:     how the error of each candidate is estimated (SENSITIVITIES, above).
    min_bits:        mixed precision: no linear is stored on a candidate of fewer bits. None ("auto"): the
                     widest width at which a uniform file fits the budget (``core.mix.floor_bits``); 0: none.
    batch_experts:   solve same-shape experts together (one column loop for many experts; speed only,
                     the results agree with one-by-one solves up to float rounding).
    """

    bits: int = 4
    group_size: int = 128
    sym: bool | None = None
    act_order: str = "group-aware"
    true_sequential: bool = True
    damp: float = 0.01
    block_size: int = 128
    mse: bool = True
    sort_channels: bool = True
    format: str = "gptq"
    expert_tokens: str = "all"
    expert_min_tokens: int = 32
    batch_experts: bool = True
    fp_target: float = 0.25
    rotate: str = "none"
    rotate_seed: int = 0
    rotate_steps: int = 400
    max_size: int = 0
    bits_per_weight: float = 0.0
    candidates: str = "auto"
    sensitivity: str = "gptq/block"
    min_bits: int | None = None
    group_rank: str = "max"

    def __post_init__(self) -> None:
        if isinstance(self.act_order, bool):
            object.__setattr__(self, "act_order", "dynamic" if self.act_order else "none")
        if self.act_order not in ACT_ORDERS:
            raise ConfigError(f"act_order={self.act_order!r}; choose one of {ACT_ORDERS}")
        if self.group_rank not in GROUP_RANKS:
            raise ConfigError(f"group_rank={self.group_rank!r}; choose one of {GROUP_RANKS}")
        if self.rotate not in ROTATIONS:
            raise ConfigError(f"rotate={self.rotate!r}; choose one of {ROTATIONS}")
        if self.rotate_steps < 1:
            raise ConfigError(f"--rotate-steps {self.rotate_steps} must be at least 1")
        if self.sensitivity not in SENSITIVITIES:
            raise ConfigError(f"sensitivity={self.sensitivity!r}; choose one of {SENSITIVITIES}")
        if self.max_size < 0 or self.bits_per_weight < 0:
            raise ConfigError("a size budget must be positive (--max-size SIZE or --bits-per-weight B)")
        if self.min_bits is not None and not 0 <= self.min_bits <= 8:
            raise ConfigError(f"--min-bits {self.min_bits}: give a bit width from 0 (no floor) to 8, or auto")
        if self.max_size and self.bits_per_weight:
            raise ConfigError("give one budget: --max-size (bytes of the weight files) or --bits-per-weight "
                              "(average over the quantized linears), not both")
        if self.expert_tokens not in EXPERT_TOKENS:
            raise ConfigError(f"expert_tokens={self.expert_tokens!r}; choose one of {EXPERT_TOKENS}")
        if not 0.0 <= self.fp_target <= 1.0:
            raise ConfigError(f"fp_target={self.fp_target} must be in [0, 1]: the fraction of the full-precision "
                              "correction applied (0.25 as GPTAQ; 0 = plain GPTQ)")
        if self.expert_min_tokens < 0:
            raise ConfigError(f"expert_min_tokens={self.expert_min_tokens} must be 0 or more")
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

    def grid(self) -> GridSpec:
        """The uniform integer grid of these bits, group size and symmetry (a format may give a
        linear another one: ``gptq.formats``)."""
        return GridSpec("int", self.bits, self.group_size, self.sym_at(self.bits))

    def sym_at(self, bits: int) -> bool:
        """Whether a grid of ``bits`` is symmetric: as set, or by bit width. Symmetric at 4 and 8 bits,
        the only grids vLLM's Marlin kernels take (gptq_marlin TYPE_MAP: (4, True), (8, True)); asymmetric
        at 2 and 3 bits, which no Marlin kernel serves either way and where a free zero point lowers the
        error a lot (SmolLM2, 3-bit g64: perplexity 26.07 against 28.00; 2-bit: 68.6 against 1604;
        docs/results.md)."""
        return self.sym if self.sym is not None else bits >= 4

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def mixed(self) -> bool:
        """Whether a size budget chooses each linear's grid (mixed precision)."""
        return bool(self.max_size or self.bits_per_weight)

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
