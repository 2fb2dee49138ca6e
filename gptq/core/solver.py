"""GPTQ: quantize W column by column, pushing each column's rounding error onto the columns
not yet quantized so that ‖WX − ŴX‖² stays small (Frantar et al., 2022, Algorithm 1).

With U the upper Cholesky factor of H⁻¹ (H = 2XXᵀ/n, damped), quantizing column j is

    err      = (W[:, j] − Ŵ[:, j]) / U[j, j]
    W[:, j:] −= err ⊗ U[j, j:]                         # the OBQ update, in Cholesky form

Columns are visited in blocks of ``block_size``; inside a block the update is applied at
once, to the columns after the block lazily with one matmul (the "lazy batch" trick):

    in:  0 ............................................................ n
         |---- block i1:i2 ----|------ columns i2: (one matmul) ------|
         |  g0   |  g1   |  g2   |  g3  ...        <- groups: a (scale, zero) per row each

A group's grid is computed when its first column comes up, from the group's *current*
(already error-updated) columns; a group reaching past the block gets its pending updates
applied first, so the result is the same for every block size (tested).

One loop serves ``solve`` (one matrix) and ``solve_batch`` (B same-shape matrices, each with
its own H, stepped through together): its tensors carry a leading batch dimension.

Worked example: one row W = [0.6, 0.6], H = [[1, .9], [.9, 1]], a 1-bit grid {0, 1}.
Round-to-nearest gives Ŵ = [1, 1]; the output error (W−Ŵ) H (W−Ŵ)ᵀ is 0.608. GPTQ rounds
column 0 to 1 (error −0.4), then moves column 1 by −0.4·0.9 = −0.36 to 0.24, which rounds to 0:
Ŵ = [1, 0] with error 0.088, because the two inputs are correlated and column 1 absorbs
most of column 0's mistake.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from gptq.core.config import GROUP_RANKS, QuantConfig
from gptq.core.grids import GridSpec
from gptq.core.hessian import NonFiniteError, all_finite, dead_columns, inverse_cholesky


@dataclass(frozen=True)
class SolveResult:
    weight: torch.Tensor | None  # [out, in] dequantized Ŵ (float32, or float64 if W was); None once written back
    codes: torch.Tensor  # [out, in] uint8 integer codes in [0, maxq]
    scales: torch.Tensor  # [n_groups, out] float16 (uniform grids) or float32 (codebook absmax)
    zeros: torch.Tensor  # [n_groups, out] int32 in [0, maxq] (float32 for GGML's stored minimums)
    g_idx: torch.Tensor  # [in] int32 group of each input column
    row_loss: torch.Tensor  # [out] Σ_j (w − ŵ)² / U[j,j]² / 2 per row
    scale_state: object | None = None  # how the grids themselves are stored (double-quantized absmax, K-quant scales)
    grid: GridSpec | None = None  # what the matrix was solved on

    @property
    def loss(self) -> float:
        """The paper's reported layer loss: the sum over rows."""
        return float(self.row_loss.sum())

    def rows(self, start: int, stop: int) -> "SolveResult":
        """The result for output rows [start, stop): rows are solved independently, so a matrix
        stacked from several linears sharing one H splits back exactly."""
        if (start, stop) == (0, self.weight.shape[0]):
            return self
        state = None if self.scale_state is None else self.scale_state.rows(start, stop)
        return SolveResult(None if self.weight is None else self.weight[start:stop], self.codes[start:stop],
                           self.scales[:, start:stop], self.zeros[:, start:stop], self.g_idx,
                           self.row_loss[start:stop], state, self.grid)

    def permute_rows(self, perm: torch.Tensor) -> "SolveResult":
        """The result with its output rows reordered (row ``k`` of the new one is row ``perm[k]``):
        exact, rows being solved independently, where the grids' storage is per row."""
        if self.grid is not None and not self.grid.rows_independent:
            raise ValueError("the grids' storage spans the rows (double quantization): rows cannot move")
        state = None if self.scale_state is None else self.scale_state.permute_rows(perm)
        return SolveResult(None if self.weight is None else self.weight[perm], self.codes[perm],
                           self.scales[:, perm], self.zeros[:, perm], self.g_idx, self.row_loss[perm], state,
                           self.grid)

    def without_weight(self) -> "SolveResult":
        """The result as the formats need it: without the float Ŵ (written back into the model)."""
        return replace(self, weight=None)


def concat_rows(parts: list[SolveResult]) -> SolveResult:
    """The result of a matrix whose row slices were solved separately (against the same H), in
    order: the inverse of ``SolveResult.rows`` for grids without a cross-row state."""
    if len(parts) == 1:
        return parts[0]
    return SolveResult(torch.cat([p.weight for p in parts]), torch.cat([p.codes for p in parts]),
                       torch.cat([p.scales for p in parts], dim=1), torch.cat([p.zeros for p in parts], dim=1),
                       parts[0].g_idx, torch.cat([p.row_loss for p in parts]), None, parts[0].grid)


def solve_order(diag: torch.Tensor, gs: int, mode: str, rank: str = "max") -> tuple[torch.Tensor, torch.Tensor]:
    """The order the columns are solved in, and the group each solved column belongs to.

    diag: [n] diag(H). Returns perm [n] (solve position → input column) and group_of [n]
    (solve position → group index, i.e. the g_idx of column perm[j]). Example, n = 6, groups of
    3, diag = [1, 9, 2, 5, 7, 3]:

        none         perm [0 1 2 3 4 5]   group_of [0 0 0 1 1 1]
        static       perm [1 4 3 5 2 0]   group_of [0 1 1 1 0 0]   (grids fixed up front)
        group-aware  perm [1 2 0 4 3 5]   group_of [0 0 0 1 1 1]   (group 0 holds the 9)
        dynamic      perm [1 4 3 5 2 0]   group_of [0 0 0 1 1 1]   (g_idx becomes [1 0 1 0 0 1])

    Group-aware ranks groups by their largest diag(H) (their most important column; ``rank="sum"``:
    by the sum over their columns) and sorts columns inside each group, as GPTQModel's group-aware
    reordering does; a group's columns are then solved consecutively, so its grid is fitted to
    error-updated columns (like dynamic) while g_idx stays k // group (like static)."""
    n = diag.numel()
    cols = torch.arange(n, device=diag.device)
    if mode == "none":
        return cols, cols // gs
    by_diag = torch.argsort(diag, descending=True, stable=True)
    if mode == "static":
        return by_diag, by_diag // gs
    if mode == "dynamic":
        return by_diag, cols // gs
    if mode != "group-aware":
        raise ValueError(f"unknown act-order mode {mode!r}")
    group = cols // gs  # [n]
    ng = int(group[-1]) + 1
    if rank not in GROUP_RANKS:
        raise ValueError(f"unknown group rank {rank!r}")
    importance = torch.full((ng,), -math.inf if rank == "max" else 0.0, dtype=diag.dtype, device=diag.device
                            ).scatter_reduce(0, group, diag, "amax" if rank == "max" else "sum")  # [groups]
    place = torch.empty(ng, dtype=torch.int64, device=diag.device)  # each group's place in the solve order
    place[torch.argsort(importance, descending=True, stable=True)] = torch.arange(ng, device=diag.device)
    # sort by (place of the column's group, descending diag): two stable sorts
    perm = by_diag[torch.argsort(place[group[by_diag]], stable=True)]
    return perm, perm // gs


def _group_ends(group_of: torch.Tensor) -> dict[int, int]:
    """{j: end} for each run of equal groups in solve order, starting at j and ending before end."""
    g = group_of.tolist()
    starts = [j for j in range(len(g)) if j == 0 or g[j] != g[j - 1]]
    return dict(zip(starts, starts[1:] + [len(g)]))


@torch.no_grad()
def solve(W: torch.Tensor, H: torch.Tensor, config: QuantConfig, name: str = "layer",
          C: torch.Tensor | None = None, grid: GridSpec | None = None) -> SolveResult:
    """Quantize ``W`` [out, in] against the Hessian ``H`` [in, in] onto ``grid`` (default: the uniform
    integer grid of ``config``'s bits, group size and symmetry). Pure: inputs are not modified.

    Full-precision targets (GPTAQ's asymmetric calibration, Li et al., 2025): with ``C`` [in, in] = 2·Σ(x̃ − x)ᵀx/n, x̃ the
    full-precision model's inputs to this linear and x the partly quantized model's, the objective
    becomes ‖WX̃ − ŴX‖² (the quantized layer answers what the full-precision one would have, not
    what it would compute on inputs that already carry the earlier layers' errors). Writing
    X̃ = X + ΔX, it equals ‖(W′ − Ŵ)X‖² plus a constant, with the shifted target

        W′ = W + W·ΔXXᵀ·(XXᵀ)⁻¹ = W + W·C·H⁻¹

    (the residual WX̃ − W′X is orthogonal to the rows of X), so GPTQ solved on W′ against the
    same H minimises it. H⁻¹ is the damped inverse the solve uses anyway, and the shift is scaled
    by ``config.fp_target`` (GPTAQ's α, 0.25: the full shift fits the calibration tokens' ΔX too
    closely). ``row_loss`` is then measured from W′.

    A batch of one for ``_solve`` (the column loop ``solve_batch`` shares). Memory beyond the
    inputs: two [in, in] matrices (the permuted H, then its factor) and about three [out, in] ones
    (Wᵀ being updated, Ŵᵀ, the result in input order) plus the uint8 codes."""
    grid = grid or config.grid()
    family = grid.family(config.mse)
    order = _order(W, H, grid, family.groups_per_fit, config, name)
    return _solve(W[None], H[None], None if C is None else C[None], [order], config, grid, family, [name])[0]


def _batchable(grid: GridSpec, group_of: torch.Tensor) -> bool:
    """Whether ``solve_batch`` can take these matrices in one column loop: uniform integer grids,
    and every matrix starts a new grid at the same solve positions (group_of [B, n])."""
    if grid.kind != "int" or group_of.shape[0] < 2:
        return False
    starts = group_of[:, 1:] != group_of[:, :-1]  # [B, n-1]
    return bool((starts == starts[:1]).all())


@torch.no_grad()
def solve_batch(W: torch.Tensor, H: torch.Tensor, config: QuantConfig, names: list[str],
                grid: GridSpec | None = None) -> list[SolveResult]:
    """``solve`` for B same-shape matrices, each against its own Hessian: W [B, out, in], H [B, in, in]
    (e.g. the down projections of B experts). One Cholesky per matrix, then ``solve``'s column loop
    with all B in it, each step batched, so B small matrices cost about one loop's Python overhead
    instead of B. Results agree with ``solve`` per matrix up to the rounding of batched products
    (tested). Where the grids or the solve orders do not line up (codebook and GGML grids; a
    partial last group placed differently by act-order), each matrix is solved alone."""
    B = W.shape[0]
    grid = grid or config.grid()
    orders = [_order(W[b], H[b], grid, 1, config, names[b]) for b in range(B)]  # integer grids fit one group
    if not _batchable(grid, torch.stack([o.group_of for o in orders])):
        return [solve(W[b], H[b], config, names[b], grid=grid) for b in range(B)]
    return _solve(W, H, None, orders, config, grid, grid.family(config.mse), names)


@dataclass(frozen=True)
class _Order:
    """Where one matrix's columns come up in the column loop."""

    perm: torch.Tensor  # [n] solve position → input column
    unit_of: torch.Tensor  # [n] solve position → the unit its grid is fitted with (a group, or a super-block)
    group_of: torch.Tensor  # [n] solve position → the group whose grid rounds it
    dead: torch.Tensor  # [n] inputs that were always zero (input order)


def _dtype(W: torch.Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def _order(W: torch.Tensor, H: torch.Tensor, grid: GridSpec, per_fit: int, config: QuantConfig, name: str) -> _Order:
    """The solve order of one matrix W [out, in] (``solve_order`` on its diag(H)), its inputs checked. A
    family may fit ``per_fit`` consecutive groups at once (a GGML K-quant super-block: 8 or 16 groups
    whose scales are quantized together): the order then ranks such units."""
    if not all_finite(W):
        raise NonFiniteError(f"{name}: the weight contains NaN or Inf")
    n = W.shape[-1]
    if H.shape != (n, n):
        raise ValueError(f"{name}: H has shape {tuple(H.shape)}, expected ({n}, {n})")
    gs = n if grid.group_size == -1 else grid.group_size
    unit = gs * per_fit
    if per_fit > 1 and (n % unit or config.act_order not in ("none", "group-aware")):
        raise ValueError(f"{name}: {grid.kind} fits {unit} columns at a time: the input size ({n}) must be a "
                         "multiple and act-order none or group-aware")
    dead = dead_columns(H)  # always-zero inputs: H = 1 and W = 0 there
    diag = torch.diag(H).to(_dtype(W)).masked_fill(dead, 1)
    perm, unit_of = (t.to(W.device) for t in solve_order(diag, unit, config.act_order, config.group_rank))
    return _Order(perm, unit_of, unit_of if per_fit == 1 else perm // gs, dead)


def _factor(H: torch.Tensor, order: _Order, damp: float, name: str, dtype: torch.dtype) -> torch.Tensor:
    """U [n, n]: the upper Cholesky factor of the damped H⁻¹ in solve order (H = 1 on dead inputs)."""
    Hp = H[order.perm[:, None], order.perm[None, :]].to(dtype)  # [n, n] solve order, our own copy
    dead_p = order.dead[order.perm]
    Hp[dead_p, dead_p] = 1
    return inverse_cholesky(Hp, damp, name, overwrite=True)


def _target(W: torch.Tensor, C: torch.Tensor | None, U: torch.Tensor, order: _Order, fp_target: float,
            dtype: torch.dtype) -> torch.Tensor:
    """Wᵀ [n, out] in solve order, zero on dead inputs, so that every column of W is a contiguous row
    in the column loop; with C the shifted target W′ᵀ = Wᵀ + α·H⁻¹·Cᵀ·Wᵀ, H⁻¹ = UᵀU (``solve``)."""
    perm, dead_p = order.perm, order.dead[order.perm]
    WT = W.T.index_select(0, perm).to(dtype).contiguous()  # our own copy
    WT[dead_p] = 0
    if C is not None and fp_target:
        Cp = C[perm[:, None], perm[None, :]].to(dtype)
        WT += fp_target * (U.T @ (U @ (Cp.T @ WT)))
        del Cp
        WT[dead_p] = 0
    return WT


def _stacked(B: int, parts) -> torch.Tensor:
    """[B, ...] from B same-shape parts made one at a time; for B = 1 the part itself, its layout kept
    (LAPACK's factor is column-major, and a matrix product rounds by the layout it is given)."""
    if B == 1:
        return next(iter(parts))[None]
    out = None
    for b, part in enumerate(parts):
        out = part.new_empty(B, *part.shape) if out is None else out
        out[b] = part
        del part  # before the next one is made
    return out


def _solve(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor | None, orders: list[_Order], config: QuantConfig,
           grid: GridSpec, family, names: list[str]) -> list[SolveResult]:
    """GPTQ on B same-shape matrices W [B, out, n], each against its own H [B, n, n] (and C) in its own
    solve order: per matrix the factor and the target, then one column loop for all of them."""
    B, rows, n = W.shape
    dtype = _dtype(W)
    gs = n if grid.group_size == -1 else grid.group_size
    U = _stacked(B, (_factor(H[b], orders[b], config.damp, names[b], dtype) for b in range(B)))  # [B, n, n] upper
    WT = _stacked(B, (_target(W[b], None if C is None else C[b], U[b], orders[b], config.fp_target, dtype)
                      for b in range(B)))  # [B, n, out] solve order
    grids = _Grids(family, orders, gs, torch.diagonal(U, dim1=1, dim2=2), rows)
    inv = torch.argsort(grids.perm, dim=1)  # [B, n] input column → solve position
    W0 = WT.gather(1, inv[:, :, None].expand(B, n, rows)).transpose(1, 2)  # [B, out, n] the targets, input order
    if B == 1:  # (a batch has uniform integer grids: nothing to prepare)
        family.prepare(W0[0], gs)
    static = config.act_order == "static" or grid.group_size == -1  # grids fixed before solving
    if static:
        grids.fit_all(W0)
    del W0
    QT, CT, losses = _column_loop(WT, U, grids, {} if static else _group_ends(grids.unit_of[0]), config.block_size)
    del WT, U
    # back to input order: Ŵ and the codes [out, in], g_idx [in] the group of each input column
    return [SolveResult(QT[b].index_select(0, inv[b]).T, CT[b].index_select(0, inv[b]).T,
                        grids.scales[b].to(family.scale_dtype), grids.zeros[b].to(family.zero_dtype),
                        grids.group_of[b][inv[b]].to(torch.int32), losses[b], family.state(), grid)
            for b in range(B)]


class _Grids:
    """The grids of B matrices as the solve fits them: scales, zeros [B, groups, out]. A unit (a group,
    or a GGML super-block of ``per_fit`` groups) is fitted to its columns' current values, weighted
    by col_weight = 1/U[j,j]² (GPTQ's cost of an error in column j); or every group up front."""

    def __init__(self, family, orders: list[_Order], gs: int, d: torch.Tensor, rows: int):
        B, n = d.shape  # d [B, n]: diag(U)
        self.family, self.gs, self.per_fit = family, gs, family.groups_per_fit
        self.perm, self.unit_of, self.group_of = (torch.stack([getattr(o, k) for o in orders])
                                                  for k in ("perm", "unit_of", "group_of"))  # [B, n] each
        self.col_weight = 1.0 / d**2  # [B, n]
        self.scales = torch.zeros(B, math.ceil(n / gs), rows, dtype=d.dtype, device=d.device)
        self.zeros = torch.zeros_like(self.scales)
        self.batch = torch.arange(B, device=d.device)  # [B]
        self.within = torch.arange(self.per_fit, device=d.device)  # [per_fit] a unit's groups from its first
        self.units, self.groups = self.unit_of[0].tolist(), self.group_of[0].tolist()  # B = 1: as Python ints

    def fit_all(self, W0: torch.Tensor) -> None:
        """Every group's grid from the unquantized targets W0 [B, out, n] (static act-order, or one group a row)."""
        B, rows, _ = W0.shape
        for g in range(self.scales.shape[1]):
            fitted = self.family.fit(W0[:, :, g * self.gs : (g + 1) * self.gs].reshape(B * rows, -1), None, group=g)
            self.scales[:, g], self.zeros[:, g] = fitted.scale.reshape(B, rows), fitted.zero.reshape(B, rows)

    def fit(self, j: int, end: int, cols: torch.Tensor) -> None:
        """Fit the unit that solve positions j..end−1 make up from their current values cols [B, k, out]."""
        B, k, rows = cols.shape
        w = cols.transpose(1, 2).contiguous().view(B * rows, k)  # [B·out, k]
        if B == 1:  # the family may keep a unit's state (K-quant scales) and need its columns' places in it
            u = self.units[j]
            fitted = self.family.fit(w, self.col_weight[0, j:end], group=u,
                                     cols=self.perm[0, j:end] - u * self.gs * self.per_fit)
        else:  # a weight per row and column: each matrix's rows weigh by its own col_weight
            fitted = self.family.fit(w, self.col_weight[:, j:end].repeat_interleave(rows, dim=0))
        g = self.unit_of[:, j, None] * self.per_fit + self.within  # [B, per_fit] the groups fitted
        self.scales[self.batch[:, None], g] = fitted.scale.reshape(B, self.per_fit, rows)
        self.zeros[self.batch[:, None], g] = fitted.zero.reshape(B, self.per_fit, rows)

    def at(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid (scale, zero) [B, out] that rounds solve position j."""
        if len(self.batch) == 1:  # views: one matrix pays no indexing per column
            g = self.groups[j]
            return self.scales[:, g], self.zeros[:, g]
        g = self.group_of[:, j]
        return self.scales[self.batch, g], self.zeros[self.batch, g]


# The column loop's updates. One matrix (B = 1) takes the 2-D products (and divides by U[j, j] as a
# Python float): batched ones round differently, and ``solve`` keeps its bits; a batch agrees with its
# matrices solved alone up to that rounding.
def _sub_mm_(M: torch.Tensor, A: torch.Tensor, E: torch.Tensor) -> None:
    """M [B, p, q] −= A [B, p, k] @ E [B, k, q], in place."""
    if len(M) == 1:
        M[0].addmm_(A[0], E[0], alpha=-1)
    else:
        M.baddbmm_(A, E, alpha=-1)


def _sub_outer_(M: torch.Tensor, a: torch.Tensor, e: torch.Tensor) -> None:
    """M [B, p, q] −= a [B, p] ⊗ e [B, q], in place."""
    if len(M) == 1:
        M[0].addr_(a[0], e[0], alpha=-1)
    else:
        M.baddbmm_(a.unsqueeze(2), e.unsqueeze(1), alpha=-1)


def _column_loop(WT: torch.Tensor, U: torch.Tensor, grids: _Grids, fit_at: dict[int, int], block_size: int):
    """Algorithm 1 with lazy batches (module docstring), B matrices at a time: rounds WT [B, n, out]
    (updated in place) against U [B, n, n] onto ``grids``, fitting the unit that starts at each
    solve position in ``fit_at`` ({j: end}). Returns Ŵᵀ [B, n, out], the codes [B, n, out] (uint8)
    and the row losses [B, out], all in solve order."""
    B, n, rows = WT.shape
    family = grids.family
    QT = torch.empty_like(WT)  # [B, n, out] dequantized Ŵᵀ
    CT = torch.empty(B, n, rows, dtype=torch.uint8, device=WT.device)  # [B, n, out] integer codes
    losses = torch.zeros(B, rows, dtype=WT.dtype, device=WT.device)
    d = torch.diagonal(U, dim1=1, dim2=2)  # [B, n]
    pivots = d[0].tolist() if B == 1 else d[:, :, None].unbind(1)  # U[j, j]: a float, or [B, 1]
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = WT[:, i1:i2].clone()  # [B, b, out] updated in place
        Err1 = torch.zeros_like(W1)  # [B, b, out] scaled errors
        U1 = U[:, i1:i2, i1:i2]  # [B, b, b]
        for i in range(i2 - i1):
            j = i1 + i
            if j in fit_at:  # a unit's first column: its grids from its columns as they are now
                end = fit_at[j]
                cols = W1[:, i : min(end, i2) - i1]  # [B, k, out]
                if end > i2:  # the unit reaches past the block: apply its pending updates first
                    A, E = U[:, i1:j, i2:end].transpose(1, 2), Err1[:, :i]  # [B, k, i], [B, i, out]
                    rest = WT[:, i2:end] - ((A[0] @ E[0])[None] if B == 1 else A @ E)
                    cols = torch.cat([cols, rest], dim=1)
                grids.fit(j, end, cols)
            s, z = grids.at(j)  # [B, out]
            w = W1[:, i]  # [B, out]
            q = family.quantize(w, s, z)
            CT[:, j] = q
            wq = QT[:, j]
            family.dequantize_into(q, s, z, wq)
            err = Err1[:, i]
            torch.sub(w, wq, out=err).div_(pivots[j])  # (w − ŵ) / U[j, j]
            _sub_outer_(W1[:, i:], U1[:, i, i:], err)  # W[:, j:] −= err ⊗ U[j, j:]
        losses += (Err1 * Err1).sum(dim=1) / 2
        _sub_mm_(WT[:, i2:], U[:, i1:i2, i2:].transpose(1, 2), Err1)  # the columns after the block, at once
    return QT, CT, losses


@torch.no_grad()
def round_to_nearest(W: torch.Tensor, config: QuantConfig, grid: GridSpec | None = None) -> SolveResult:
    """The baseline GPTQ is measured against: each group's grid from W, then plain rounding."""
    dtype = _dtype(W)
    W = W.to(dtype)
    rows, n = W.shape
    grid = grid or config.grid()
    gs = n if grid.group_size == -1 else grid.group_size
    ng = math.ceil(n / gs)
    g_idx = (torch.arange(n, device=W.device) // gs).to(torch.int32)
    scales = torch.zeros(ng, rows, dtype=dtype, device=W.device)
    zeros = torch.zeros_like(scales)
    family = grid.family(config.mse)
    family.prepare(W, gs)
    unit = gs * family.groups_per_fit
    for u in range(math.ceil(n / unit)):
        w = W[:, u * unit : (u + 1) * unit]
        fitted = family.fit(w, None, group=u, cols=torch.arange(w.shape[1], device=W.device))
        k = slice(u * family.groups_per_fit, (u + 1) * family.groups_per_fit)
        scales[k], zeros[k] = fitted.scale, fitted.zero
    s, z = scales[g_idx.long()].T, zeros[g_idx.long()].T  # [out, in]
    codes = family.quantize(W, s, z)
    Q = family.dequantize(codes, s, z)
    return SolveResult(Q, codes.to(torch.uint8), scales.to(family.scale_dtype), zeros.to(family.zero_dtype), g_idx,
                       ((W - Q) ** 2).sum(dim=1), family.state(), grid)
