"""Hessian capture: hooks that accumulate H (and the full-precision cross term) per group of
linears sharing an input, stopping the forward pass once every group has been seen."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from gptq.core.hessian import CrossAccumulator, HessianAccumulator
from gptq.io.modules import StopForward, hooked, in_features


@contextmanager
def hessians(groups: list[dict[str, nn.Module]], stop: bool = True, staged: bool = False,
             reference: dict[str, Sequence[torch.Tensor]] | None = None):
    """Accumulate one H per group of linears that share an input (e.g. q/k/v) from what the
    group's first linear receives, and cut the forward pass short (StopForward) as soon as
    every group has been seen. Yields {linear name: accumulator} (shared within a group).
    ``staged``: each batch's partial is kept for ``distributed.exchange`` instead of summed.
    ``reference`` (full-precision targets): {first linear: what the full-precision model fed it,
    batch by batch} (``fp_stream``); the k-th call of a first linear is batch k, and the
    accumulators then also sum the cross term Σ(x̃ − x)ᵀx (``acc.cross``)."""
    accs: dict[str, HessianAccumulator] = {}
    firsts: dict[str, HessianAccumulator] = {}
    for group in groups:
        first_name, first = next(iter(group.items()))
        acc = HessianAccumulator(in_features(first), first.weight.device, staged)
        if reference is not None:
            acc.cross = CrossAccumulator(acc.columns, acc.device, staged)
        firsts[first_name] = acc
        accs.update({name: acc for name in group})
    pending: set[str] = set(firsts)
    calls = dict.fromkeys(firsts, 0)  # batches seen by each first linear

    def make_hook(name):
        def hook(_module, args):
            firsts[name].add(args[0].detach())
            if reference is not None:
                firsts[name].cross.add(reference[name][calls[name]], args[0].detach())
            calls[name] += 1
            pending.discard(name)
            if stop and not pending:
                pending.update(firsts)
                raise StopForward

        return hook

    with ExitStack() as stack:
        for group in groups:
            name, module = next(iter(group.items()))
            stack.enter_context(hooked(module, make_hook(name), pre=True))
        yield accs
