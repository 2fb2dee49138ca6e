"""Solving the linears of one block: those sharing an input as one stacked matrix (``solve_group``),
shared out between ranks (``solve_distributed``), several groups with their own Hessians as one
batch (``solve_groups``), and the channel sorting that gives a consumer act-order for free
(``sort_channels``). The maths is ``core.solver``; the grids come from the caller (``grids``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from gptq.core.config import QuantConfig
from gptq.core.grids import GridSpec
from gptq.core.solver import SolveResult, concat_rows, solve, solve_batch
from gptq.io.modules import get_module, set_weight_matrix, weight_matrix
from gptq.pipeline.distributed import SINGLE, World, all_gather, broadcast

Grids = Callable[[str], GridSpec]  # linear name → the grid it is solved on


def solve_group(modules: dict[str, nn.Module], H: torch.Tensor, config: QuantConfig, prefix: str,
                world: World = SINGLE, owner: int = 0, C: torch.Tensor | None = None, grids: Grids | None = None):
    """Solve linears that share one input (and so one H) as a single stacked matrix, then split
    the rows back: identical to solving each alone, with one Cholesky and one column loop.
    Linears on different grids (a GGUF type mix), or on grids whose storage spans the rows, are
    stacked only with their own kind. With several ranks (each holding H) the stacked rows are
    shared out (``solve_distributed``). ``C``: the full-precision targets' cross term of that
    input (``solver.solve``), or None. ``grids``: linear name → GridSpec (default: the config's)."""
    grids = grids or (lambda name: config.grid())
    kinds: dict = {}
    for name, module in modules.items():
        kinds.setdefault(grids(f"{prefix}.{name}"), {})[name] = module
    if len(kinds) > 1:
        for grid, group in kinds.items():
            yield from solve_group(group, H, config, prefix, world, owner, C, lambda _n, g=grid: g)
        return
    grid = next(iter(kinds))
    if not grid.rows_independent and len(modules) > 1:  # per-matrix grid storage: no stacking
        for name, module in modules.items():
            yield from solve_group({name: module}, H, config, prefix, world, owner, C, grids)
        return
    Ws = [weight_matrix(m) for m in modules.values()]  # each [out_i, in], the modules' own dtype
    sizes = [W.shape[0] for W in Ws]
    W = torch.cat(Ws) if len(Ws) > 1 else Ws[0]
    del Ws
    t0 = time.perf_counter()
    name = f"{prefix}.{'/'.join(modules)}"
    r = (solve(W, H, config, name, C, grid) if world.single
         else solve_distributed(W, H, config, grid, name, world, owner, C))
    del W
    seconds = (time.perf_counter() - t0) / len(sizes)
    start = 0
    for (name, module), size in zip(modules.items(), sizes):
        yield name, module, r.rows(start, start + size), seconds
        start += size


def solve_distributed(W: torch.Tensor, H: torch.Tensor, config: QuantConfig, grid: GridSpec, name: str,
                       world: World, owner: int, C: torch.Tensor | None = None) -> SolveResult:
    """One solve shared by the ranks. Rows are independent, so with uniform integer grids each rank
    solves a contiguous slice of the rows against the same H (its own Cholesky of it) and the
    slices are gathered: bit-identical to the whole solve where the matrix products give the same
    values for any row count (checked for the CPU's BLAS by the tests). Grids whose state spans the
    rows (double-quantized absmax, GGML types) are solved whole by ``owner`` and broadcast."""
    if grid.kind != "int":
        return broadcast(solve(W, H, config, name, C, grid) if world.rank == owner else None, owner, world)
    bounds = [round(k * W.shape[0] / world.size) for k in range(world.size + 1)]
    mine = solve(W[bounds[world.rank] : bounds[world.rank + 1]], H, config, name, C, grid)
    return concat_rows(all_gather(mine, world))


def solve_groups(groups: list[dict[str, nn.Module]], Hs: list[torch.Tensor], config: QuantConfig, prefix: str,
                 grids: Grids | None = None):
    """Several groups of linears, each with its own H (e.g. one per expert): solved together by
    ``solve_batch`` when their stacked matrices share a shape and a grid and ``config.batch_experts``
    is on, else one by one. Yields (name, module, result, seconds) as ``solve_group`` does."""
    grids = grids or (lambda name: config.grid())
    shapes = {(sum(weight_matrix(m).shape[0] for m in g.values()), H.shape[0]) for g, H in zip(groups, Hs)}
    kinds = {grids(f"{prefix}.{n}") for g in groups for n in g}
    if (len(groups) < 2 or len(shapes) > 1 or not config.batch_experts or len(kinds) > 1
            or not next(iter(kinds)).rows_independent):
        for group, H in zip(groups, Hs):
            yield from solve_group(group, H, config, prefix, grids=grids)
        return
    W = torch.stack([torch.cat([weight_matrix(m) for m in g.values()]) for g in groups])  # [B, out, in]
    t0 = time.perf_counter()
    results = solve_batch(W, torch.stack(Hs), config, [f"{prefix}.{'/'.join(g)}" for g in groups], kinds.pop())
    del W
    seconds = (time.perf_counter() - t0) / sum(len(g) for g in groups)
    for group, r in zip(groups, results):
        start = 0
        for name, module in group.items():
            size = weight_matrix(module).shape[0]
            yield name, module, r.rows(start, start + size), seconds
            start += size


def sort_channels(block: nn.Module, arch, consumer: str, H: torch.Tensor, results: dict, prefix: str,
                  config: QuantConfig) -> torch.Tensor | None:
    """Reorder the channels between ``consumer`` (e.g. ``mlp.down_proj``) and its already solved
    producers (``gate_proj``, ``up_proj``) by descending diag(H) of the consumer, in the block
    itself: the producers' output rows (weights, bias, solve results) and the consumer's input
    columns move alike, so the block computes the same function. The consumer is then solved in
    act-order with columns already in that order, so its groups are the act-order groups and its
    g_idx stays k // group. Returns the permutation (new position → old channel), or None when
    the architecture declares no such pair for ``consumer``, act-order is off/static,
    ``config.sort_channels`` is off, or a producer's grid storage spans its rows (double-quantized
    scales: their 256-value blocks run along the rows as solved, so the rows cannot move)."""
    producers = arch.producers_of(consumer)
    if (producers is None or not config.sort_channels or config.act_order not in ("group-aware", "dynamic")
            or not all(results[f"{prefix}.{n}"].grid.rows_independent for n in producers)):
        return None
    perm = torch.argsort(torch.diag(H), descending=True, stable=True).to(H.device)  # [in]
    cons = get_module(block, consumer)
    set_weight_matrix(cons, weight_matrix(cons)[:, perm])
    for name in producers:
        m = get_module(block, name)
        set_weight_matrix(m, weight_matrix(m)[perm])
        if getattr(m, "bias", None) is not None:
            m.bias.data.copy_(m.bias.data[perm])
        full = f"{prefix}.{name}"
        results[full] = results[full].permute_rows(perm.to(results[full].codes.device))
    return perm
