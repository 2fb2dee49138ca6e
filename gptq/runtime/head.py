"""The output head (and its tied embedding) stored once in float16 for CPU inference."""

from __future__ import annotations

import torch
from torch import nn

from gptq.runtime.kernels import cpu_f16
from gptq.runtime.shared import SharedBuffers

HEAD_DENSE_ROWS = 16  # float16 head: below this many rows multiply in fp16, else in the activation dtype


class HalfHead(nn.Module):
    """Output head (and its tied embedding) stored once in float16 for CPU inference. bf16 → fp16
    is exact for weights in the normal range; fp32 → fp16 rounds (relative 2^-11). Decoding
    (fewer than HEAD_DENSE_ROWS rows): on x86 CPUs with AVX2/FMA/F16C our C loop (kernels/cpu_f16.c)
    multiplies the fp16 weights with fp32 activations (no fp16 rounding of x; faster than torch's
    fp16 matmul here: bench cpu-kernel); elsewhere torch's fp16 matmul, about as fast as bf16 where bf16 is
    native and ~6x faster than fp32 where it is not. A long prompt converts the weight into a
    reused buffer of the activation dtype first, because fp16 matmuls of many rows are slow on
    every CPU (bench cpu-kernel). ``f16_matmul``: the C loop, or None where it cannot run."""

    def __init__(self, weight: nn.Parameter, bias: torch.Tensor | None = None,
                 buffers: SharedBuffers | None = None):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.buffers = buffers or SharedBuffers()
        self.f16_matmul = cpu_f16.f16_matmul if cpu_f16.available() else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows < HEAD_DENSE_ROWS and self.f16_matmul is not None and self.weight.dtype == torch.float16:
            y = self.f16_matmul(x, self.weight)
            if self.bias is not None:
                y = y + self.bias.float()
            return y.to(x.dtype)
        if rows < HEAD_DENSE_ROWS:
            b = None if self.bias is None else self.bias.to(torch.float16)
            return nn.functional.linear(x.to(torch.float16), self.weight, b).to(x.dtype)
        w = self.buffers.fill(tuple(self.weight.shape), x.dtype, self, lambda buf: buf.copy_(self.weight))
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


class HalfEmbedding(nn.Embedding):
    def __init__(self, *args, out_dtype: torch.dtype = torch.bfloat16, **kw):
        super().__init__(*args, **kw)
        self.out_dtype = out_dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.out_dtype)


def half_head_for_cpu(model: nn.Module) -> bool:
    """Swap a bf16 or fp32 output head (and the embedding tied to it) for float16 storage; returns
    whether it did (weights outside float16's range, or a non-Linear head, are left alone)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.weight.dtype not in (torch.bfloat16, torch.float32):
        return False
    dtype = head.weight.dtype
    w = head.weight.detach()
    if not torch.isfinite(w.to(torch.float16)).all():
        return False
    half = nn.Parameter(w.to(torch.float16), requires_grad=False)
    emb = model.get_input_embeddings()
    if emb is not None and emb.weight is head.weight:
        new_emb = HalfEmbedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, device="meta",
                                out_dtype=dtype)
        new_emb.weight = half
        model.set_input_embeddings(new_emb)
    model.set_output_embeddings(HalfHead(half, head.bias))
    return True
