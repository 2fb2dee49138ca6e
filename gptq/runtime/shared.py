"""What the quantized layers of one model share at run time: scratch buffers for long prompts,
and values computed once per input (the act-order gather of q/k/v, the fused siblings' outputs)."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch


class SharedBuffers:
    """One scratch tensor per (shape, dtype), shared by every layer of a model: the cpu backend
    dequantizes a layer into it for a long prompt, then the next layer reuses it. ``fill`` skips
    the work when the buffer still holds what the same owner put there last (e.g. the output
    head, whose shape no other layer has)."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._owners: dict[tuple, int | None] = {}

    def get(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        key = (shape, dtype)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(shape, dtype=dtype)
        return self._buffers[key]

    def fill(self, shape: tuple[int, ...], dtype: torch.dtype, owner: object,
             write: Callable[[torch.Tensor], object]) -> torch.Tensor:
        """The buffer for (shape, dtype) holding ``owner``'s content; ``write(buf)`` runs only when
        another owner (or none) filled it last. Owners' content must not change (loaded weights)."""
        key = (shape, dtype)
        buf = self.get(shape, dtype)
        if self._owners.get(key) != id(owner):
            self._owners[key] = None
            write(buf)
            self._owners[key] = id(owner)
        return buf


def scratch(buffers: SharedBuffers | None, shape: tuple[int, ...], dtype: torch.dtype, owner: object,
            write: Callable[[torch.Tensor], object]) -> torch.Tensor:
    """``buffers.fill(...)``, or a fresh tensor written now where there are no shared buffers (a
    layer prepared on its own, outside ``load``)."""
    if buffers is not None:
        return buffers.fill(shape, dtype, owner, write)
    buf = torch.empty(shape, dtype=dtype)
    write(buf)
    return buf


class InputCache:
    """A value computed from one input tensor, reused while the same tensor object (unchanged)
    comes back: q/k/v (up/gate) are called one after another with the module input itself. The
    input is held by a weak reference: once it is freed the entry can never match again, even if
    a new tensor takes its memory (a data_ptr key could), and the input is not kept alive."""

    def __init__(self):
        self._ref: weakref.ref | None = None
        self._version = -1
        self._value = None

    @property
    def input(self) -> torch.Tensor | None:
        """The input the cached value was computed from, while it is alive."""
        return None if self._ref is None else self._ref()

    def __call__(self, x: torch.Tensor, compute: Callable[[], object]):
        if self._ref is None or self._ref() is not x or x._version != self._version:
            self._value = compute()
            self._ref, self._version = weakref.ref(x), x._version
        return self._value


class PermutedInput:
    """The activations permuted into g_idx order, shared by the linears that read the same
    input with the same permutation (q/k/v, up/gate): the gather runs once per input."""

    def __init__(self, perm: torch.Tensor):
        self.perm = perm
        self.cache = InputCache()

    def __call__(self, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """x: the module input (the cache key); x2: its [M, in] view to permute."""
        return self.cache(x, lambda: x2.index_select(-1, self.perm))
