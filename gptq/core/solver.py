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

Worked example: one row W = [0.6, 0.6], H = [[1, .9], [.9, 1]], a 1-bit grid {0, 1}.
Round-to-nearest gives Ŵ = [1, 1]; the output error (W−Ŵ) H (W−Ŵ)ᵀ is 0.608. GPTQ rounds
column 0 to 1 (error −0.4), then moves column 1 by −0.4·0.9 = −0.36 to 0.24, which rounds to 0:
Ŵ = [1, 0] with error 0.088, because the two inputs are correlated and column 1 absorbs
most of column 0's mistake.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gptq.core.config import QuantConfig
from gptq.core.grids.uniform import UniformFamily
from gptq.core.hessian import NonFiniteError, all_finite, dead_columns, inverse_cholesky


@dataclass(frozen=True)
class SolveResult:
    weight: torch.Tensor  # [out, in] dequantized Ŵ (float32, or float64 if W was)
    codes: torch.Tensor  # [out, in] uint8 integer codes in [0, maxq]
    scales: torch.Tensor  # [n_groups, out] float16 (uniform grids) or float32 (codebook absmax)
    zeros: torch.Tensor  # [n_groups, out] int32 in [0, maxq] (float32 for GGML's stored minimums)
    g_idx: torch.Tensor  # [in] int32 group of each input column
    row_loss: torch.Tensor  # [out] Σ_j (w − ŵ)² / U[j,j]² / 2 per row
    scale_state: object | None = None  # how the grids themselves are stored (double-quantized absmax, K-quant scales)

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
        return SolveResult(self.weight[start:stop], self.codes[start:stop], self.scales[:, start:stop],
                           self.zeros[:, start:stop], self.g_idx, self.row_loss[start:stop], state)


def concat_rows(parts: list[SolveResult]) -> SolveResult:
    """The result of a matrix whose row slices were solved separately (against the same H), in
    order: the inverse of ``SolveResult.rows`` for grids without a cross-row state."""
    if len(parts) == 1:
        return parts[0]
    return SolveResult(torch.cat([p.weight for p in parts]), torch.cat([p.codes for p in parts]),
                       torch.cat([p.scales for p in parts], dim=1), torch.cat([p.zeros for p in parts], dim=1),
                       parts[0].g_idx, torch.cat([p.row_loss for p in parts]), None)


def n_groups(columns: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(columns / group_size)


def _min_zero(config: QuantConfig) -> int:
    # v1 stores zero − 1: a zero of 0 would be written as −1 and corrupt its neighbours
    return 1 if (config.checkpoint_format == "gptq" and not config.sym) else 0


def grid_family(config: QuantConfig):
    """What the solver asks for a grid, a code and a value: the uniform integer grids, a codebook
    (bitsandbytes NF4/FP4, ``codebook.py``) or a GGML block type (``ggml.py``)."""
    if config.grid == "int":
        return UniformFamily(config.bits, config.sym, config.mse, _min_zero(config))
    if config.grid in ("nf4", "fp4"):
        from gptq.core.grids.codebook import CodebookFamily

        return CodebookFamily(config.grid, config.mse, config.double_quant)
    from gptq.core.grids.ggml import ggml_family

    return ggml_family(config.grid, config.mse)


def solve_order(diag: torch.Tensor, gs: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The order the columns are solved in, and the group each solved column belongs to.

    diag: [n] diag(H). Returns perm [n] (solve position → input column) and group_of [n]
    (solve position → group index, i.e. the g_idx of column perm[j]). Example, n = 6, groups of
    3, diag = [1, 9, 2, 5, 7, 3]:

        none         perm [0 1 2 3 4 5]   group_of [0 0 0 1 1 1]
        static       perm [1 4 3 5 2 0]   group_of [0 1 1 1 0 0]   (grids fixed up front)
        group-aware  perm [1 2 0 4 3 5]   group_of [0 0 0 1 1 1]   (group 0 holds the 9)
        dynamic      perm [1 4 3 5 2 0]   group_of [0 0 0 1 1 1]   (g_idx becomes [1 0 1 0 0 1])

    Group-aware ranks groups by their largest diag(H) (their most important column) and sorts
    columns inside each group, as GPTQModel's group-aware reordering does; a group's columns are
    then solved consecutively, so its grid is fitted to error-updated columns (like dynamic) while
    g_idx stays k // group (like static)."""
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
    gmax = torch.full((ng,), -math.inf, dtype=diag.dtype, device=diag.device).scatter_reduce(
        0, group, diag, "amax")  # [groups] most important column of each group
    rank = torch.empty(ng, dtype=torch.int64, device=diag.device)
    rank[torch.argsort(gmax, descending=True, stable=True)] = torch.arange(ng, device=diag.device)
    # sort by (rank of the column's group, descending diag): two stable sorts
    perm = by_diag[torch.argsort(rank[group[by_diag]], stable=True)]
    return perm, perm // gs


def _group_ends(group_of: torch.Tensor) -> dict[int, int]:
    """{j: end} for each run of equal groups in solve order, starting at j and ending before end."""
    g = group_of.tolist()
    starts = [j for j in range(len(g)) if j == 0 or g[j] != g[j - 1]]
    return dict(zip(starts, starts[1:] + [len(g)]))


@torch.no_grad()
def solve(W: torch.Tensor, H: torch.Tensor, config: QuantConfig, name: str = "layer",
          C: torch.Tensor | None = None) -> SolveResult:
    """Quantize ``W`` [out, in] against the Hessian ``H`` [in, in]. Pure: inputs are not modified.

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

    Memory beyond the inputs: two [in, in] matrices (the permuted H, then its factor) and about
    three [out, in] ones (Wᵀ being updated, Ŵᵀ, the result in input order) plus the uint8 codes."""
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    if not all_finite(W):
        raise NonFiniteError(f"{name}: the weight contains NaN or Inf")
    rows, n = W.shape
    if H.shape != (n, n):
        raise ValueError(f"{name}: H has shape {tuple(H.shape)}, expected ({n}, {n})")
    gs = n if config.group_size == -1 else config.group_size
    ng = n_groups(n, config.group_size)
    family = grid_family(config)
    # a family may fit several consecutive groups at once (a GGML K-quant super-block: 8 or 16
    # groups whose scales are quantized together): the solve order then ranks such units
    per_fit = family.groups_per_fit
    unit = gs * per_fit
    if per_fit > 1 and (n % unit or config.act_order not in ("none", "group-aware")):
        raise ValueError(f"{name}: {config.grid} fits {unit} columns at a time: the input size ({n}) must be a "
                         "multiple and act-order none or group-aware")

    dead = dead_columns(H)  # always-zero inputs: H = 1 and W = 0 there
    diag = torch.diag(H).to(dtype).masked_fill(dead, 1)
    perm, unit_of = (t.to(W.device) for t in solve_order(diag, unit, config.act_order))  # [n], [n] solve order
    group_of = unit_of if per_fit == 1 else perm // gs  # [n] the grid of each solved column
    Hp = H[perm[:, None], perm[None, :]].to(dtype)  # [n, n] solve order, our own copy
    dead_p = dead[perm]
    Hp[dead_p, dead_p] = 1
    U = inverse_cholesky(Hp, config.damp, name, overwrite=True)  # [n, n] upper
    del Hp
    col_weight = 1.0 / torch.diag(U) ** 2  # [n] GPTQ's cost of an error in column j

    # work on Wᵀ so that every column of W is a contiguous row in the inner loop
    WT = W.T.index_select(0, perm).to(dtype).contiguous()  # [n, out] solve order, our own copy
    WT[dead_p] = 0
    if C is not None and config.fp_target:  # W′ᵀ = Wᵀ + α·H⁻¹·Cᵀ·Wᵀ, H⁻¹ = UᵀU (solve order)
        Cp = C[perm[:, None], perm[None, :]].to(dtype)
        WT += config.fp_target * (U.T @ (U @ (Cp.T @ WT)))
        del Cp
        WT[dead_p] = 0
    inv = torch.argsort(perm)
    W0 = WT.index_select(0, inv).T  # [out, n] the target in input order (a view)
    family.prepare(W0, gs)
    static = config.act_order == "static" or config.group_size == -1  # grids fixed before solving
    scales = torch.zeros(ng, rows, dtype=dtype, device=W.device)
    zeros = torch.zeros(ng, rows, dtype=dtype, device=W.device)
    if static:
        for g in range(ng):
            grid = family.fit(W0[:, g * gs : (g + 1) * gs], None, group=g)
            scales[g], zeros[g] = grid.scale, grid.zero
    del W0
    group_end = _group_ends(unit_of)  # {solve position where a fitted unit starts: where it ends}

    QT = torch.empty_like(WT)  # [n, out] dequantized Ŵᵀ, solve order
    CT = torch.empty(n, rows, dtype=torch.uint8, device=W.device)  # [n, out] integer codes
    losses = torch.zeros(rows, dtype=dtype, device=W.device)
    group_list, unit_list = group_of.tolist(), unit_of.tolist()
    d_list = torch.diag(U).tolist()
    B = config.block_size
    for i1 in range(0, n, B):
        i2 = min(i1 + B, n)
        W1 = WT[i1:i2].clone()  # [b, out] updated in place
        Err1 = torch.zeros_like(W1)  # [b, out] scaled errors
        U1 = U[i1:i2, i1:i2]  # [b, b]
        for i in range(i2 - i1):
            j = i1 + i
            if not static and j in group_end:
                end = group_end[j]
                cur = W1[i : min(end, i2) - i1]
                if end > i2:  # group reaches past the block: apply the pending updates
                    rest = WT[i2:end] - U[i1:j, i2:end].T @ Err1[:i]
                    cur = torch.cat([cur, rest], dim=0)
                u = unit_list[j]
                if per_fit == 1:
                    grid = family.fit(cur.T.contiguous(), col_weight[j:end], group=u)
                    scales[u], zeros[u] = grid.scale, grid.zero
                else:  # the unit's columns in solve order, and where each sits inside the unit
                    grid = family.fit(cur.T.contiguous(), col_weight[j:end], group=u, cols=perm[j:end] - u * unit)
                    scales[u * per_fit : (u + 1) * per_fit], zeros[u * per_fit : (u + 1) * per_fit] = grid.scale, grid.zero
            g = group_list[j]
            s, z = scales[g], zeros[g]  # [out]
            w = W1[i]  # [out]
            q = family.quantize(w, s, z)
            CT[j] = q
            wq = QT[j]
            family.dequantize_into(q, s, z, wq)
            err = Err1[i]
            torch.sub(w, wq, out=err).div_(d_list[j])
            W1[i:].addr_(U1[i, i:], err, alpha=-1)
        losses += (Err1 * Err1).sum(dim=0) / 2
        WT[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1)
    del WT, U

    g_idx = group_of[inv].to(torch.int32)  # [in] group of each original column
    return SolveResult(
        weight=QT.index_select(0, inv).T,  # [out, in]
        codes=CT.index_select(0, inv).T,  # [out, in]
        scales=scales.to(family.scale_dtype),
        zeros=zeros.to(family.zero_dtype),
        g_idx=g_idx,
        row_loss=losses,
        scale_state=family.state(),
    )


def _batchable(config: QuantConfig, group_of: torch.Tensor) -> bool:
    """Whether ``solve_batch`` can take these matrices in one column loop: uniform integer grids,
    and every matrix starts a new grid at the same solve positions (group_of [B, n])."""
    if config.grid != "int" or group_of.shape[0] < 2:
        return False
    starts = group_of[:, 1:] != group_of[:, :-1]  # [B, n-1]
    return bool((starts == starts[:1]).all())


@torch.no_grad()
def solve_batch(W: torch.Tensor, H: torch.Tensor, config: QuantConfig, names: list[str]) -> list[SolveResult]:
    """``solve`` for B same-shape matrices, each against its own Hessian: W [B, out, in], H [B, in, in]
    (e.g. the down projections of B experts). One Cholesky per matrix, then a single column loop
    whose per-column steps are batched, so B small matrices cost about one loop's Python overhead
    instead of B. The algorithm is ``solve``'s step for step (solve order, grids fitted as each
    group comes up, lazy-batch updates); results agree with ``solve`` per matrix up to the rounding
    of batched products (tested). Where the grids or the solve orders do not line up (codebook and
    GGML grids; a partial last group placed differently by act-order), each matrix is solved alone."""
    B, rows, n = W.shape
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    gs = n if config.group_size == -1 else config.group_size
    ng = n_groups(n, config.group_size)
    dead = torch.diagonal(H, dim1=1, dim2=2) == 0  # [B, n]
    diag = torch.diagonal(H, dim1=1, dim2=2).to(dtype).masked_fill(dead, 1)
    orders = [solve_order(diag[b], gs, config.act_order) for b in range(B)]
    perm = torch.stack([o[0] for o in orders]).to(W.device)  # [B, n] solve position → input column
    group_of = torch.stack([o[1] for o in orders]).to(W.device)  # [B, n] solve position → group
    if not _batchable(config, group_of):
        return [solve(W[b], H[b], config, names[b]) for b in range(B)]
    for b in range(B):
        if not all_finite(W[b]):
            raise NonFiniteError(f"{names[b]}: the weight contains NaN or Inf")
    family = grid_family(config)
    static = config.act_order == "static" or config.group_size == -1
    ar = torch.arange(B, device=W.device)
    scales = torch.zeros(B, ng, rows, dtype=dtype, device=W.device)
    zeros = torch.zeros(B, ng, rows, dtype=dtype, device=W.device)
    W0 = W.to(dtype).masked_fill(dead[:, None, :], 0)  # [B, out, in]
    if static:
        for g in range(ng):
            grid = family.fit(W0[:, :, g * gs : (g + 1) * gs].reshape(B * rows, -1), None)
            scales[:, g], zeros[:, g] = grid.scale.view(B, rows), grid.zero.view(B, rows)
    group_end = _group_ends(group_of[0])
    U = torch.empty(B, n, n, dtype=dtype, device=W.device)
    for b in range(B):  # O(n³) each: batching them would save no time
        Hp = H[b][perm[b][:, None], perm[b][None, :]].to(dtype)
        dead_p = dead[b][perm[b]]
        Hp[dead_p, dead_p] = 1
        U[b] = inverse_cholesky(Hp, config.damp, names[b], overwrite=True)
        del Hp
    d = torch.diagonal(U, dim1=1, dim2=2)  # [B, n]
    col_weight = 1.0 / d**2  # [B, n]
    WT = torch.gather(W0.transpose(1, 2), 1, perm[:, :, None].expand(B, n, rows)).contiguous()  # [B, n, out]
    del W0
    QT = torch.empty_like(WT)  # [B, n, out] dequantized, solve order
    CT = torch.empty(B, n, rows, dtype=torch.uint8, device=W.device)
    losses = torch.zeros(B, rows, dtype=dtype, device=W.device)
    Bs = config.block_size
    for i1 in range(0, n, Bs):
        i2 = min(i1 + Bs, n)
        W1 = WT[:, i1:i2].clone()  # [B, b, out]
        Err1 = torch.zeros_like(W1)
        U1 = U[:, i1:i2, i1:i2]  # [B, b, b]
        for i in range(i2 - i1):
            j = i1 + i
            if not static and j in group_end:
                end = group_end[j]
                cur = W1[:, i : min(end, i2) - i1]  # [B, k, out]
                if end > i2:
                    rest = WT[:, i2:end] - U[:, i1:j, i2:end].transpose(1, 2) @ Err1[:, :i]
                    cur = torch.cat([cur, rest], dim=1)
                k = cur.shape[1]
                grid = family.fit(cur.transpose(1, 2).reshape(B * rows, k),
                                  col_weight[:, j:end].repeat_interleave(rows, dim=0))
                u = group_of[:, j]  # [B]
                scales[ar, u], zeros[ar, u] = grid.scale.view(B, rows), grid.zero.view(B, rows)
            g = group_of[:, j]
            s, z = scales[ar, g], zeros[ar, g]  # [B, out]
            w = W1[:, i]  # [B, out]
            q = family.quantize(w, s, z)
            CT[:, j] = q
            wq = QT[:, j]
            family.dequantize_into(q, s, z, wq)
            err = Err1[:, i]
            torch.sub(w, wq, out=err).div_(d[:, j : j + 1])
            W1[:, i:].baddbmm_(U1[:, i, i:].unsqueeze(2), err.unsqueeze(1), alpha=-1)
        losses += (Err1 * Err1).sum(dim=1) / 2
        WT[:, i2:].baddbmm_(U[:, i1:i2, i2:].transpose(1, 2), Err1, alpha=-1)
    del WT, U
    out = []
    for b in range(B):
        inv = torch.argsort(perm[b])
        out.append(SolveResult(QT[b].index_select(0, inv).T, CT[b].index_select(0, inv).T,
                               scales[b].to(family.scale_dtype), zeros[b].to(family.zero_dtype),
                               group_of[b][inv].to(torch.int32), losses[b], None))
    return out


@torch.no_grad()
def round_to_nearest(W: torch.Tensor, config: QuantConfig) -> SolveResult:
    """The baseline GPTQ is measured against: each group's grid from W, then plain rounding."""
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    W = W.to(dtype)
    rows, n = W.shape
    gs = n if config.group_size == -1 else config.group_size
    ng = n_groups(n, config.group_size)
    g_idx = (torch.arange(n, device=W.device) // gs).to(torch.int32)
    scales = torch.zeros(ng, rows, dtype=dtype, device=W.device)
    zeros = torch.zeros_like(scales)
    family = grid_family(config)
    family.prepare(W, gs)
    unit = gs * family.groups_per_fit
    for u in range(math.ceil(n / unit)):
        k = slice(u * family.groups_per_fit, (u + 1) * family.groups_per_fit)
        if family.groups_per_fit == 1:
            grid = family.fit(W[:, u * unit : (u + 1) * unit], None, group=u)
        else:
            grid = family.fit(W[:, u * unit : (u + 1) * unit], None, group=u, cols=torch.arange(unit, device=W.device))
        scales[k], zeros[k] = grid.scale, grid.zero
    s, z = scales[g_idx.long()].T, zeros[g_idx.long()].T  # [out, in]
    codes = family.quantize(W, s, z)
    Q = family.dequantize(codes, s, z)
    return SolveResult(Q, codes.to(torch.uint8), scales.to(family.scale_dtype), zeros.to(family.zero_dtype), g_idx,
                       ((W - Q) ** 2).sum(dim=1), family.state())
