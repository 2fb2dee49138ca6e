"""Grid families the solver rounds onto, and ``GridSpec``: which one a linear is solved on.

    GridSpec ──family(mse)──► GridFamily: fit(columns, col_weight) → Grid(scale, zero)
                                          quantize(w, scale, zero) → codes
                                          dequantize(codes, scale, zero) → ŵ

Families: uniform integers (``uniform.py``: GPTQ, compressed-tensors), 16-value codebooks times
an absmax (``codebook.py``: bitsandbytes NF4/FP4), GGML block types (``ggml.py``: GGUF). An output
format says which spec each linear gets (``formats``); the solver only sees the spec.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptq.core.grids.codebook import TABLES, CodebookFamily
from gptq.core.grids.ggml import TYPES, ggml_family
from gptq.core.grids.uniform import UniformFamily


@dataclass(frozen=True)
class GridSpec:
    """The grid one linear is solved on.

    kind:         "int" (uniform integers), a codebook ("nf4", "fp4") or a GGML type ("q4_0", "q4_k", ...).
    bits, group_size, sym: as in ``QuantConfig`` (fixed by the kind for codebooks and GGML types).
    min_zero:     the lowest zero code the storage can hold (GPTQ v1 stores zero − 1: 1 when asymmetric).
    double_quant: codebooks: the absmax values stored as 8-bit codes (bitsandbytes' double quantization).
    scale_dtype:  the dtype uniform scales are rounded to, as the storage keeps them.
    """

    kind: str = "int"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    min_zero: int = 0
    double_quant: bool = False
    scale_dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        if self.kind not in ("int", *TABLES, *TYPES):
            raise ValueError(f"unknown grid kind {self.kind!r}")

    @staticmethod
    def ggml(name: str) -> "GridSpec":
        t = TYPES[name]
        return GridSpec(name, t.bits, t.group, True)

    @property
    def rows_independent(self) -> bool:
        """Whether rows can be split, stacked, batched or permuted after the solve: not when the
        grids' own storage spans the rows (double-quantized absmax blocks)."""
        return not self.double_quant

    def family(self, mse: bool):
        if self.kind == "int":
            return UniformFamily(self.bits, self.sym, mse, self.min_zero, self.scale_dtype)
        if self.kind in TABLES:
            return CodebookFamily(self.kind, mse, self.double_quant)
        return ggml_family(self.kind, mse)
