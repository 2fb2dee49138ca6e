"""Mixed precision under a size budget: which grid each group of linears gets.

A *unit* is a set of linears that must share one choice (those reading one input: q/k/v, gate/up;
engines fuse them into one layer). Each unit has, per candidate grid, the bytes the format stores
for it and an estimated error. Choosing one candidate per unit so that the bytes fit the budget
and the summed error is least is a multiple-choice knapsack:

    minimise  Σ_u err[u][c_u]   subject to   Σ_u bytes[u][c_u] ≤ budget

``greedy`` solves it on marginal error per byte: every unit starts on its smallest candidate and the
upgrade with the largest error drop per extra byte is taken while it fits, walking each unit's lower
convex hull of (bytes, error); what is left is then spent on any single upgrade that fits (best drop
first, ``_fill``). ``allocate_exact`` is the exact dynamic programme over bytes rounded up to a
resolution (budget / 20000: exact for budgets under 20000 bytes). ``allocate`` runs both and keeps
the lower error: on a model's hundreds of units greedy is within a fraction of a percent of exact
(``benchmarks mix``), but with a handful of coarse steps it can miss by a factor (tests).

Worked example: two units, candidates (bytes, error) A: (3, 10) (4, 4); B: (3, 9) (4, 8); budget 7.
Start 6 bytes, error 19; A's upgrade drops 6 per byte, B's 1: take A → 7 bytes, error 13.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class BudgetError(ValueError):
    """The budget cannot be met (or is not needed): the message names the feasible range."""


@dataclass(frozen=True)
class Unit:
    """Linears sharing one choice, and per candidate (index into the run's candidate list) the
    bytes stored and the estimated error; a candidate the unit cannot take is absent."""

    names: tuple[str, ...]
    options: tuple[int, ...]  # candidate indices this unit can take
    bytes: tuple[int, ...]  # per option
    errors: tuple[float, ...]  # per option


def _hull(unit: Unit) -> list[int]:
    """Positions (into unit.options) on the lower convex hull of (bytes, error), by increasing bytes;
    dominated options (more bytes, no less error) are dropped."""
    order = sorted(range(len(unit.options)), key=lambda k: (unit.bytes[k], unit.errors[k]))
    kept: list[int] = []
    for k in order:
        if kept and unit.errors[k] >= unit.errors[kept[-1]]:
            continue  # dominated: costs more, no better
        if kept and unit.bytes[k] == unit.bytes[kept[-1]]:
            kept.pop()
        while len(kept) >= 2:  # keep slopes (error drop per byte) decreasing
            a, b = kept[-2], kept[-1]
            s_ab = (unit.errors[a] - unit.errors[b]) / (unit.bytes[b] - unit.bytes[a])
            s_bk = (unit.errors[b] - unit.errors[k]) / (unit.bytes[k] - unit.bytes[b])
            if s_bk >= s_ab:
                kept.pop()
            else:
                break
        kept.append(k)
    return kept


def bounds(units: list[Unit]) -> tuple[int, int]:
    """(smallest, largest) total bytes any allocation can have."""
    return sum(min(u.bytes) for u in units), sum(max(u.bytes) for u in units)


def allocate(units: list[Unit], budget: int, resolution: int = 20000) -> list[int]:
    """Position (into each unit's options) of the chosen candidate per unit, total bytes ≤ budget: the
    better of ``greedy`` and ``allocate_exact`` (its leftover bytes spent by ``_fill``)."""
    g = greedy(units, budget)
    e = _fill(units, allocate_exact(units, budget, resolution), budget)
    return e if total(units, e)[1] < total(units, g)[1] else g


def greedy(units: list[Unit], budget: int) -> list[int]:
    """The greedy allocation on each unit's lower convex hull (module docstring), then ``_fill``."""
    lo, _ = bounds(units)
    if budget < lo:
        raise BudgetError(f"the budget is {budget} bytes, below the smallest possible ({lo})")
    hulls = [_hull(u) for u in units]
    step = [0] * len(units)  # position along each hull
    used = sum(u.bytes[h[0]] for u, h in zip(units, hulls))

    def slope(i: int) -> float:
        u, h, s = units[i], hulls[i], step[i]
        return (u.errors[h[s]] - u.errors[h[s + 1]]) / (u.bytes[h[s + 1]] - u.bytes[h[s]])

    # hull slopes decrease along each hull, so taking the steepest available step first is the
    # greedy optimum of the convex relaxation; a step that does not fit closes that unit's hull
    open_ = {i for i, h in enumerate(hulls) if len(h) > 1}
    while open_:
        i = max(open_, key=lambda j: (slope(j), -j))
        u, h, s = units[i], hulls[i], step[i]
        extra = u.bytes[h[s + 1]] - u.bytes[h[s]]
        if used + extra <= budget:
            used += extra
            step[i] += 1
            if step[i] + 1 == len(h):
                open_.discard(i)
        else:
            open_.discard(i)
    return _fill(units, [h[s] for h, s in zip(hulls, step)], budget)


def _fill(units: list[Unit], choice: list[int], budget: int) -> list[int]:
    """Spend what ``choice`` leaves of the budget: any single change (off the hull too) that fits and
    lowers the error, the largest drop first, until none does."""
    choice = list(choice)
    used = total(units, choice)[0]
    improved = True
    while improved:
        improved = False
        best = None
        for i, u in enumerate(units):
            c = choice[i]
            for k in range(len(u.options)):
                extra = u.bytes[k] - u.bytes[c]
                gain = u.errors[c] - u.errors[k]
                if gain > 0 and used + extra <= budget and (best is None or gain > best[0]):
                    best = (gain, i, k, extra)
        if best is not None:
            _, i, k, extra = best
            choice[i], used = k, used + extra
            improved = True
    return choice


def allocate_exact(units: list[Unit], budget: int, resolution: int = 20000) -> list[int]:
    """The exact multiple-choice knapsack over bytes in steps of ``budget / resolution`` (each
    option's bytes rounded up, so the result always fits): a dynamic programme over
    units × ``resolution`` states. For checking ``allocate``; small models only."""
    lo, _ = bounds(units)
    if budget < lo:
        raise BudgetError(f"the budget is {budget} bytes, below the smallest possible ({lo})")
    q = max(1, math.ceil(budget / resolution))
    cap = budget // q
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0  # least error with exactly this many steps used
    picks = []
    for u in units:
        new = np.full(cap + 1, np.inf)
        pick = np.full(cap + 1, -1, dtype=np.int64)
        for k in range(len(u.options)):
            w = math.ceil(u.bytes[k] / q)
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = best[: cap + 1 - w] + u.errors[k]
            better = cand < new
            new[better], pick[better] = cand[better], k
        best = new
        picks.append(pick)
    if not np.isfinite(best).any():
        raise BudgetError("no allocation fits the budget at this resolution")
    at = int(np.argmin(best))
    choice = [0] * len(units)
    for i in range(len(units) - 1, -1, -1):
        k = int(picks[i][at])
        choice[i] = k
        at -= math.ceil(units[i].bytes[k] / q)
    return choice


def floor_bits(unit_bytes: list[tuple[int, ...]], unit_bits: list[tuple[int, ...]], budget: int) -> int:
    """The widest bit width b at which a uniform file fits the budget: every unit on its cheapest
    option of at least b bits, summed, within ``budget`` (per unit, the options' bytes and bits, in the
    same order); 0 if no width fits. A budget run stores no unit below it (``pipeline.mix.setup``):
    the estimates rank one unit's damage against another's only roughly, and where a uniform file of
    that width fits, the bytes are better spent above it than on keeping a few units below it
    (docs/results.md, "Size against quality").

    Worked example: two units, options (bytes, bits) (3, 3) (4, 4) (8, 8) each. Budget 9: at 8 bits
    16 bytes, at 4 bits 8 → 4. Budget 7: at 4 bits 8 > 7, at 3 bits 6 → 3."""
    for b in sorted({w for bits in unit_bits for w in bits}, reverse=True):
        need = 0
        for sizes, bits in zip(unit_bytes, unit_bits):
            ok = [n for n, w in zip(sizes, bits) if w >= b]
            if not ok:
                break
            need += min(ok)
        else:
            if need <= budget:
                return b
    return 0


def total(units: list[Unit], choice: list[int]) -> tuple[int, float]:
    """(bytes, estimated error) of an allocation."""
    return (sum(u.bytes[c] for u, c in zip(units, choice)), sum(u.errors[c] for u, c in zip(units, choice)))
