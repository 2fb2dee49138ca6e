"""Replaying what is already solved: a child module (e.g. ``self_attn``) whose linears are all
quantized produces the same outputs on every later pass over its block, so they are recorded once
and replayed; when a pass captures the last unsolved linear of a child, the child's outputs are
rebuilt from that linear's recorded inputs instead of recomputing the child."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gptq.pipeline.activations import Activations


def replayable_children(arch, solved: set[str]) -> list[str]:
    """Direct children of a block (e.g. ``self_attn``) whose linears are all quantized: their
    output no longer changes, so later passes over the block can replay it instead of recomputing."""
    return [c for c in arch.children() if all(n in solved for n in arch.linears_under(c))]


def closing_linear(arch, solved: set[str], groups) -> tuple[str, str] | None:
    """(child, linear) when this pass captures one linear that is the last unsolved one of a
    child module (e.g. ``self_attn.o_proj``): the child's output can then be rebuilt from the
    linear's recorded inputs once it is quantized, instead of recomputing the whole child."""
    if len(groups) != 1 or len(groups[0]) != 1:
        return None
    name = next(iter(groups[0]))
    child = name.split(".")[0]
    if "." not in name or not all(n in solved for n in arch.linears_under(child) if n != name):
        return None
    return child, name


def rebuild_child_outputs(linear: nn.Module, records, n: int, store: Activations) -> Sequence | None:
    """The closing child's outputs with its last linear now quantized: (linear(x), *rest).
    Only when every recorded output really was that linear's output (checked exactly)."""
    child_outs, io = records
    if len(child_outs) != n or len(io) != n:
        return None
    rebuilt = store.new()
    for out, (x, y) in zip(child_outs, io):
        first, rest = (out[0], tuple(out[1:])) if isinstance(out, tuple) else (out, None)
        if not (isinstance(first, torch.Tensor) and first.shape == y.shape and torch.equal(first, y)):
            return None
        y_q = linear(x)
        rebuilt.append(y_q if rest is None else (y_q, *rest))
    return rebuilt
