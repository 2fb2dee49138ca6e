"""The ways a ``QuantLinear`` multiplies: one small class per backend, with typed state.

``QuantLinear.prepare(name)`` builds one of these once (``layer.backend``); every forward is then
``layer.backend(layer, x)``. A backend holds what it built at prepare time (a sorted or repacked
copy of the codes, a dequantized weight, the act-order permutation); the layer's own buffers
(bias, and the GPTQ-layout tensors where a backend reads them) are read from the layer at each
call. Common interface:

    name       what ``prepare`` returns: "torch", "triton", "cpu" or "dense"
    kernel     which kernel serves it (a label for benchmarks)
    owns_codes it keeps its own copy of the codes, so the layer may release the GPTQ-layout tensors
    perm / permute / buffers   the act-order permutation (None: monotonic g_idx), the model's
               shared ``PermutedInput`` for it and the model's ``SharedBuffers`` (set by
               ``share_permutations``; None for a layer prepared on its own)
    __call__(layer, x)  the layer's output; ``product(layer, x, x2)`` is its [M, out] part before bias
    tensors()  the tensors it holds beyond the layer's buffers (for resident-memory counts)

This module has the backends that run on any device (torch, dense) and on CUDA (triton); the
CPU int4 ones are in ``cpu_backends``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

import torch

from gptq.core.pack import dequantize_packed, pack_rows, unpack_qweight
from gptq.runtime.kernels.reference import dequant_matmul_reference
from gptq.runtime.shared import PermutedInput, SharedBuffers, scratch

if TYPE_CHECKING:
    from gptq.runtime.qlinear import QuantLinear

BACKENDS = ("torch", "triton", "cpu", "dense")


def sorted_layout(layer: QuantLinear) -> tuple[torch.Tensor | None, int] | None:
    """(perm or None, uniform group size G) if the layer's groups are contiguous runs of G rows once
    the inputs are sorted by g_idx; None if its g_idx has irregular groups."""
    g = layer.g_idx.long()
    ng = layer.scales.shape[0]
    G = layer.in_features if layer.group_size == -1 else layer.group_size
    counts = torch.bincount(g, minlength=ng).tolist()
    expected = [min(G, layer.in_features - k * G) for k in range(ng)]
    if counts != expected:
        return None
    monotonic = bool((g[1:] >= g[:-1]).all())
    perm = None if monotonic else torch.argsort(g, stable=True)
    return perm, G


@dataclass(eq=False, kw_only=True)
class Backend:
    """What every backend has; subclasses add their state and ``product``."""

    name: ClassVar[str]
    kernel: ClassVar[str]
    owns_codes: ClassVar[bool] = False
    perm: torch.Tensor | None = None
    permute: PermutedInput | None = None
    buffers: SharedBuffers | None = None

    def __call__(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, layer.in_features)  # [M, in]
        y = self.product(layer, x, x2)
        if layer.bias is not None:
            y = y + layer.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], layer.out_features)

    def product(self, layer: QuantLinear, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """x2 ([M, in] view of the module input x) times the weight: [M, out], before the bias."""
        raise NotImplementedError

    def permuted(self, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """x2 ([M, in] view of the module input x) in g_idx order where act-order needs it."""
        if self.perm is None:
            return x2
        return self.permute(x, x2) if self.permute is not None else x2.index_select(-1, self.perm)

    def scratch(self, shape: tuple[int, ...], dtype: torch.dtype, write) -> torch.Tensor:
        """The model's shared buffer of this shape holding this backend's ``write``."""
        return scratch(self.buffers, shape, dtype, self, write)

    def tensors(self) -> list[torch.Tensor]:
        return [v for f in fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)]


@dataclass(eq=False, kw_only=True)
class TorchBackend(Backend):
    """The reference: dequantize the layer's packed tensors to fp32 on every call, then matmul.
    Any bits, any g_idx; what a layer runs before ``prepare``."""

    name = "torch"
    kernel = "reference"

    def __call__(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        return dequant_matmul_reference(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits,
                                        layer.checkpoint_format, layer.bias)


@dataclass(eq=False, kw_only=True)
class DenseBackend(Backend):
    """A dequantized copy of the weight in the activation dtype (asked for explicitly, or on CPU
    for 2/3/8 bits where no packed CPU kernel exists)."""

    name = "dense"
    kernel = "dense"
    weight: torch.Tensor  # [out, in]

    @classmethod
    def build(cls, layer: QuantLinear, dtype: torch.dtype) -> DenseBackend:
        return cls(weight=dequantize_packed(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits,
                                            layer.checkpoint_format).to(dtype))

    def product(self, layer: QuantLinear, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return x2 @ self.weight.to(x.dtype).T


@dataclass(eq=False, kw_only=True)
class TritonBackend(Backend):
    """Fused dequant-matmul on CUDA (kernels/triton_dequant.py); 2/4/8 bits, group size a multiple
    of 16. Act-order: the codes' input rows sorted by group once here (``qweight``), the
    activations permuted on each call; zeros and scales are the layer's own."""

    name = "triton"
    kernel = "triton"
    qweight: torch.Tensor  # the layer's qweight, rows in g_idx order

    @classmethod
    def build(cls, layer: QuantLinear, perm: torch.Tensor | None, G: int) -> TritonBackend | None:
        """None where the kernel cannot serve this layer."""
        if layer.bits not in (2, 4, 8) or (layer.group_size != -1 and G % 16):
            return None
        qweight = layer.qweight
        if perm is not None:
            qweight = pack_rows(unpack_qweight(layer.qweight, layer.bits)[perm], layer.bits)
        return cls(perm=perm, qweight=qweight.to(layer.qweight.device))

    def product(self, layer: QuantLinear, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        # imported here: triton is an optional dependency (CUDA installs); prepare works without it
        from gptq.runtime.kernels.triton_dequant import dequant_matmul

        return dequant_matmul(self.permuted(x, x2), self.qweight, layer.qzeros, layer.scales, layer.group_size,
                              layer.bits, layer.zero_offset)
