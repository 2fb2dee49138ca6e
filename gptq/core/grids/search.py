"""The clipping search every grid family shares: shrink a grid's range to lower GPTQ's weighted error.

A min/max grid wastes levels on outliers; shrinking its range by a factor s (clipping the outliers)
can lower Σ_k col_weight[k]·(w − ŵ)² (the solver's col_weight = 1/U[k,k]²). The search tries

    coarse   s = 1.00, 0.96, ..., 0.20                  (MSE_COARSE: 0 % to 80 % in 4 % steps)
    fine     s = best ± 0.03 in 0.01 steps, in [0.2, 1]  (MSE_FINE, around each entry's coarse best)

independently for each entry (a row's grid; a K-quant group of a row), and keeps the first
candidate of least error. A family gives the error of its grids as ``cost(shrinks [P, *shape]) →
[P, *shape]``; it may score V variants of every candidate (SignedFamily: its scale with either
sign) as [V·P, *shape], variant-major, and then learns which variant won.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MSE_COARSE = torch.arange(0, 21) * 0.04  # shrink the range by 0 %, 4 %, ..., 80 %
MSE_FINE = torch.arange(-3, 4) * 0.01  # then ±3 % around each row's best, in 1 % steps

Cost = Callable[[torch.Tensor], torch.Tensor]  # shrinks [P, *shape] → errors [V·P, *shape]

def chunk(like: torch.Tensor) -> int:
    """Elements of one chunk of a search's [candidates, rows, weights] temporaries (``by_rows``): on a
    CPU one that stays in cache (several times faster than the whole matrix at once), on a GPU large
    and bounded (~256 MB)."""
    return 1 << 18 if like.device.type == "cpu" else 1 << 26


def best_of(cost: Cost, shrinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate of least cost per entry, the first one on ties: shrinks [P, *shape] → (best shrink
    [*shape], the variant it won with [*shape], 0 when the cost scores no variants)."""
    pick = cost(shrinks).argmin(dim=0)  # [*shape] into the V·P candidates
    P = shrinks.shape[0]
    return shrinks.gather(0, (pick % P)[None])[0], pick // P


def shrink_search(cost: Cost, shape: tuple[int, ...], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The coarse-then-fine search (module docstring) for every entry of ``shape``, in ``like``'s dtype and
    device: (best shrink [*shape], its variant [*shape])."""
    lead = (-1,) + (1,) * len(shape)
    coarse = (1.0 - MSE_COARSE.to(like)).view(lead).expand(-1, *shape)  # [P, *shape]
    best, _ = best_of(cost, coarse)
    fine = torch.clamp(best[None] + MSE_FINE.to(like).view(lead), 1.0 - float(MSE_COARSE[-1]), 1.0)  # [F, *shape]
    return best_of(cost, fine)


def by_rows(cost_rows: Callable[[int, int], torch.Tensor], rows: int, per_row: int, budget: int) -> torch.Tensor:
    """Costs [P, rows] computed a chunk of rows at a time: ``cost_rows(r0, r1)`` → [P, r1 − r0], each
    chunk's [P, rows, k] temporaries holding about ``budget`` elements (``per_row`` = P·k a row), so
    that they stay in cache. Rows are independent: the result is the whole one."""
    step = max(1, budget // per_row)
    return torch.cat([cost_rows(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)], dim=1)
