"""``QuantLinear``: a linear layer that keeps GPTQ's packed tensors and multiplies with them.

Backends (``prepare(backend)`` builds one, ``layer.backend``; ``load`` chooses automatically):
  torch   the reference: dequantize to fp32 on every call, then matmul. Any bits, any g_idx.
  triton  fused dequant-matmul on CUDA (gptq/kernels/triton_dequant.py); 2/4/8 bits.
  cpu     4-bit: torch's packed-int4 CPU matmul (bf16 scales and offsets; CPUs with fast bf16),
          or our AVX2 kernel (kernels/cpu_int4.c; CPUs without fast bf16, fp32 activations).
          Either releases the GPTQ-layout qweight, qzeros and scales (left as shape-only meta
          tensors); long prompts dequantize into a buffer shared by the model's layers.
  dense   keeps a dequantized copy in the activation dtype (asked for explicitly, or on CPU for
          2/3/8 bits where no packed CPU kernel exists).

The backends' classes and state are in ``backends`` (torch, triton, dense) and ``cpu_backends``
(both cpu kernels, fused siblings); this module picks one per layer and wires a model's layers
together (``share_permutations``, ``fuse_siblings``). Act-order checkpoints (non-monotonic g_idx)
are served by the fast backends by sorting the input rows by group once at prepare time and
permuting the activations on each call.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from gptq.io.modules import get_module
from gptq.models.architectures import UnsupportedModelError, for_config
from gptq.runtime.backends import BACKENDS, Backend, DenseBackend, TorchBackend, TritonBackend, sorted_layout
from gptq.runtime.cpu_backends import (
    DEQUANT_MIN_ROWS,
    INT4_CPU_GROUPS,
    ROWS64_MAX_ROWS,
    FusedSiblings,
    Int4PackBackend,
    Rows64Backend,
    build_cpu,
)
from gptq.runtime.head import HEAD_DENSE_ROWS, HalfEmbedding, HalfHead, half_head_for_cpu
from gptq.runtime.kernels.cpu_int4 import MAX_OUTPUTS
from gptq.runtime.shared import InputCache, PermutedInput, SharedBuffers

__all__ = ["BACKENDS", "DEQUANT_MIN_ROWS", "HEAD_DENSE_ROWS", "INT4_CPU_GROUPS", "ROWS64_MAX_ROWS", "Backend",
           "FusedSiblings", "HalfEmbedding", "HalfHead", "InputCache", "Int4PackBackend", "PermutedInput",
           "QuantLinear", "Rows64Backend", "SharedBuffers", "fuse_siblings", "half_head_for_cpu",
           "share_permutations"]


class QuantLinear(nn.Module):
    """GPTQ's packed tensors as buffers (qweight, qzeros, scales, g_idx, bias) and the backend
    that multiplies with them (``backend``: the reference until ``prepare`` picks another)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
                 checkpoint_format: str = "gptq"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.checkpoint_format = bits, group_size, checkpoint_format
        ng = 1 if group_size == -1 else math.ceil(in_features / group_size)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(ng, out_features * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(ng, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)
        self.backend: Backend = TorchBackend()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, backend={self.backend.name}")

    @property
    def zero_offset(self) -> int:
        """What the stored zero points lack: 1 for checkpoint_format "gptq" (v1 stores zero − 1)."""
        return 1 if self.checkpoint_format == "gptq" else 0

    def prepare(self, backend: str, dtype: torch.dtype = torch.float32, cpu_kernel: str = "auto") -> str:
        """Build what ``backend`` needs; returns the backend actually used (with a warning if
        the requested one cannot serve this layer). cpu_kernel: see ``cpu_backends.build_cpu``."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        if self.qweight.is_meta:
            raise RuntimeError("this layer was prepared for the cpu backend, which releases the GPTQ-layout "
                               "tensors; load the checkpoint again to use another backend")
        self.backend = self._build(backend, dtype, cpu_kernel)
        if self.backend.owns_codes:
            self._release_gptq_tensors()
        return self.backend.name

    def _build(self, backend: str, dtype: torch.dtype, cpu_kernel: str) -> Backend:
        layout = sorted_layout(self)
        if backend in ("triton", "cpu") and layout is None:
            warnings.warn(f"{backend} backend needs equal-size groups in g_idx; using torch for this layer")
            return TorchBackend()
        if backend == "cpu":  # dense for 2/3/8 bits, and for groups neither cpu kernel serves
            built = build_cpu(self, *layout, cpu_kernel) if self.bits == 4 else None
            return DenseBackend.build(self, dtype) if built is None else built
        if backend == "triton":
            built = TritonBackend.build(self, *layout)
            if built is not None:
                return built
            warnings.warn(f"triton backend handles 2/4/8 bits with group size a multiple of 16; "
                          f"using torch for this {self.bits}-bit layer")
            return TorchBackend()
        return DenseBackend.build(self, dtype) if backend == "dense" else TorchBackend()

    def _release_gptq_tensors(self) -> None:
        # the backend now holds the same codes: release the GPTQ-layout copies (they stay on
        # disk) so the layer is resident at ~28 % of its bf16 size instead of ~55 %
        for name in ("qweight", "qzeros", "scales"):
            t = getattr(self, name)
            setattr(self, name, torch.empty(t.shape, dtype=t.dtype, device="meta"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend(self, x)


def share_permutations(layers: list[QuantLinear]) -> None:
    """Give layers whose act-order permutations are equal one ``PermutedInput``, and every layer
    the model's ``SharedBuffers``."""
    shared: dict[tuple, PermutedInput] = {}
    buffers = SharedBuffers()
    for layer in layers:
        b = layer.backend
        b.buffers = buffers
        if b.perm is None:
            continue
        key = (b.perm.numel(), b.perm.device, b.perm.cpu().numpy().tobytes())
        if key not in shared:
            shared[key] = PermutedInput(b.perm)
        b.permute = shared[key]


def _fusable(layers: list[nn.Module]) -> bool:
    if not 2 <= len(layers) <= MAX_OUTPUTS or not all(
            isinstance(m, QuantLinear) and isinstance(m.backend, Rows64Backend) for m in layers):
        return False
    first = layers[0].backend
    return all(first.fuses_with(m.backend) for m in layers)


def fuse_siblings(model: nn.Module) -> int:
    """Fuse the AVX2-kernel linears that share an input, per the model's architecture (its
    ``sequential`` groups); returns how many groups were fused. Unknown families: none."""
    try:
        arch = for_config(model.config)
    except (UnsupportedModelError, AttributeError):
        return 0
    try:
        blocks = get_module(model, arch.blocks)
    except AttributeError:
        return 0
    fused = 0
    for block in blocks:
        for group in arch.sequential:
            if arch.routed(group):
                continue
            try:
                layers = [get_module(block, name) for name in group]
            except AttributeError:
                continue
            if _fusable(layers):
                FusedSiblings([m.backend for m in layers])
                fused += 1
    return fused
