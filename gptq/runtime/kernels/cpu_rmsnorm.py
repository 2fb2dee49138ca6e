"""RMSNorm in one C call (``cpu_rmsnorm.c``) for models decoding with the AVX2 kernels.

``replace_rms_norms(model)`` swaps each norm module that computes Llama's RMSNorm in fp32 (checked
on a probe input, not trusted from its class name: Gemma's ``1 + w`` variant, for one, fails the
check and stays) for ``RMSNormRows``, which calls the C kernel on fp32 inputs and the original
module on anything else.
"""

from __future__ import annotations

import torch
from torch import nn

from gptq.runtime.kernels.cpu_build import available, function


def _rows(fn, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    fn(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // weight.shape[0], weight.shape[0], eps,
       torch.get_num_threads())
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight ⊙ x / sqrt(mean(x², -1) + eps), x [..., D] fp32, weight [D] fp32."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: fp32 x [..., D] and weight [D] expected; got {x.dtype} {tuple(x.shape)}, "
                         f"{weight.dtype} {tuple(weight.shape)}")
    return _rows(function("gptq_rms_norm"), x, weight.contiguous(), eps)


class RMSNormRows(nn.Module):
    """A model's RMSNorm computed by ``cpu_rmsnorm.c`` for fp32 inputs (the original module for
    others). Holds the original's weight parameter itself, so the model's parameter names stay."""

    def __init__(self, original: nn.Module, eps: float):
        super().__init__()
        self.weight = original.weight
        self.eps = eps
        self._original = (original,)  # a tuple: not registered as a submodule
        self._fn = function("gptq_rms_norm")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype != torch.float32 or w.dtype != torch.float32 or x.shape[-1] != w.shape[0]:
            return self._original[0](x)
        return _rows(self._fn, x, w, self.eps)


def _eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _computes_rms_norm(module: nn.Module, eps: float) -> bool:
    """Whether ``module`` gives weight ⊙ x / sqrt(mean(x²) + eps) on a probe (fp32, to 1e-5)."""
    D = module.weight.shape[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, D, generator=g) * torch.tensor([1e-2, 1.0, 30.0])[:, None]
    w = module.weight.detach().float()
    expected = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    try:
        with torch.no_grad():
            got = module(x)
    except Exception:  # noqa: BLE001 - a module that cannot take [3, D] is not one to replace
        return False
    return isinstance(got, torch.Tensor) and got.shape == x.shape and torch.allclose(got.float(), expected,
                                                                                     rtol=1e-5, atol=1e-6)


def replace_rms_norms(model: nn.Module) -> int:
    """Swap every fp32 RMSNorm of ``model`` that passes the probe for ``RMSNormRows``; returns how
    many (0 where the C kernels are unavailable)."""
    if not available():
        return 0
    swaps = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (not type(module).__name__.endswith("RMSNorm") or not isinstance(weight, torch.Tensor)
                or weight.dim() != 1 or weight.dtype != torch.float32 or weight.is_meta):
            continue
        eps = _eps(module)
        if eps is not None and _computes_rms_norm(module, eps):
            swaps.append((name, RMSNormRows(module, eps)))
    for name, new in swaps:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return len(swaps)
