"""A residual rotation learned for the solver (``--rotate learned``): pure tensor code, no model.

The residual rotation Q (``gptq.models.rotation``, QuaRot/SpinQuant's R1) starts as the randomised
Hadamard matrix and moves along the orthogonal group, Q = Q₀ · exp(A − Aᵀ), with A trained by Adam
(SpinQuant trains its rotations on the orthogonal group too, with Cayley SGD on the model's loss; Liu et
al. 2024). The objective needs no pass through the model, only the statistics of what the linears reading
the residual stream receive: for each such group of linears W (q/k/v, gate/up; norms folded in), the
error GPTQ leaves when it quantizes W Q column by column on the rotated Hessian Qᵀ H Q, approximated as

    Σ_ij E_ij² / U_jj²,   E = WQ − round(WQ),   U = chol(Qᵀ (H + λI)⁻¹ Q) (upper)

(GPTQ's error for column j is its rounding error over U_jj²; Frantar et al. 2023, eq. 3 in the Cholesky
form of its §4), round-to-nearest with the rounding passed straight through to the gradient, onto a
``Rounding``: the grid the readers will be solved on (uniform, a codebook times an absmax, a GGML
type), its scales taken from each group's range, not rounded as stored scales are (the K-quants'
quantized group scales are left out). Each group's error counts relative to its value at Q₀.

The linears writing the stream (attention output, down projections) are left out. This estimate does
not follow the solver for them (it says the Hadamard rotation raises the down projections' error by
half, where the solver's falls by a tenth; for the readers it follows the solver), and an objective that
counted them by an estimate that does follow it traded the readers' error for theirs and scored worse
(docs/results.md, "A learned residual rotation", with the objectives tried and dropped).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from gptq.core.grids import GridSpec
from gptq.core.grids.codebook import TABLES
from gptq.core.grids.ggml import KVALUES_IQ4NL, TYPES


def _groups(w: torch.Tensor, group: int, edge: bool = False) -> torch.Tensor:
    """``w`` ([rows, cols]) as [rows, groups, group], a last short group padded with zeros, or with
    ``edge`` with copies of its last value, which leave its range as it is (group ≤ 0: one group per row)."""
    rows, cols = w.shape
    group = cols if group <= 0 else group
    pad = (0, -cols % group)
    return torch.nn.functional.pad(w, pad, mode="replicate" if edge else "constant").reshape(rows, -1, group)


def straight_round(w: torch.Tensor, bits: int, group: int, sym: bool, free_min: bool = False) -> torch.Tensor:
    """``w`` rounded to the nearest level of its group's min/max grid (asymmetric, or symmetric about 0
    with the zero at 2^(bits−1)), the rounding's gradient passed straight through; a last group shorter
    than ``group`` is padded with zeros (which no grid's range excludes). ``free_min`` (asymmetric):
    the levels d·q + m of GGML's q4_1/q5_1, whose range is the group's own min to max, 0 inside it or
    not (padded with its last value instead, which leaves its range as it is)."""
    rows, cols = w.shape
    maxq = 2**bits - 1
    if free_min and not sym:
        g = _groups(w, group, edge=True)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        s = ((hi - lo) / maxq).clamp(min=1e-8)
        q = (g - lo) / s
        q = torch.clamp(q + (torch.round(q) - q).detach(), 0, maxq)
        return (q * s + lo).reshape(rows, -1)[:, :cols]
    g = _groups(w, group)
    lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
    if sym:
        top = torch.maximum(-lo, hi)
        s = (2 * top / maxq).clamp(min=1e-8)
        z = torch.full_like(s, (maxq + 1) / 2)
    else:
        s = ((hi - lo) / maxq).clamp(min=1e-8)
        z = torch.round(-lo / s).detach()
    x = g / s + z
    q = torch.clamp(x + (torch.round(x) - x).detach(), 0, maxq)
    return ((q - z) * s).reshape(rows, -1)[:, :cols]


def table_round(w: torch.Tensor, table: tuple[float, ...], group: int, signed: bool = False) -> torch.Tensor:
    """``w`` rounded to the nearest value of ``table`` (within [−1, 1]) times its group's absmax, the
    rounding's gradient passed straight through (the codebook grids: NF4, FP4, iq4_nl, and the GGML types
    whose levels are a signed scale times whole numbers); padded as ``straight_round``. ``signed``: the
    scale may be negative, as GGML's d is, so each group also tries the table reversed (−table) and keeps
    whichever leaves the smaller squared error (a choice outside the gradient)."""
    rows, cols = w.shape
    g = _groups(w, group)
    s = g.abs().amax(-1, keepdim=True).clamp(min=1e-8)
    x = g / s
    xd = x.detach()
    best = None
    for sign in (1.0, -1.0) if signed else (1.0,):
        levels = torch.tensor(sorted({sign * v for v in table}), dtype=w.dtype, device=w.device)
        idx = torch.bucketize(xd, (levels[1:] + levels[:-1]) / 2)
        v = levels[idx]
        if best is None:
            best = v
        else:
            better = (v - xd).pow(2).sum(-1, keepdim=True) < (best - xd).pow(2).sum(-1, keepdim=True)
            best = torch.where(better, v, best)
    q = x + (best - x).detach()
    return (q * s).reshape(rows, -1)[:, :cols]


@dataclass(frozen=True)
class Rounding:
    """What the objective rounds onto: ``bits``/``group``/``sym`` a uniform min/max grid
    (``straight_round``; ``free_min``: its range not stretched to 0), or with ``table`` a codebook times
    the absmax, of either sign where ``signed`` (``table_round``)."""

    bits: int
    group: int
    sym: bool = False
    table: tuple[float, ...] | None = None
    signed: bool = False
    free_min: bool = False

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        if self.table is not None:
            return table_round(w, self.table, self.group, self.signed)
        return straight_round(w, self.bits, self.group, self.sym, self.free_min)

    @staticmethod
    def of(spec: GridSpec) -> "Rounding":
        """The rounding standing for the grid ``spec``: itself for uniform grids; NF4/FP4 as their tables
        times the absmax; the GGML types without a minimum as their levels times a signed scale (iq4_nl's
        table; q4_0, q5_0, q8_0, q3_k, q6_k: the whole numbers −2^(bits−1) … 2^(bits−1) − 1 over
        2^(bits−1)); those with a minimum as the asymmetric uniform grid of their bits and group: q4_1
        and q5_1 from each group's own minimum (as llama.cpp's q4_1 stores it, 0 inside the range or
        not), q2_k, q4_k and q5_k with 0 kept inside (their minimum is stored as −dmin·mn, mn ≥ 0).
        Scales are not rounded to their stored precision, nor the K-quants' group scales quantized."""
        if spec.kind == "int":
            return Rounding(spec.bits, spec.group_size, spec.sym)
        if spec.kind in TABLES:
            return Rounding(4, spec.group_size, True, TABLES[spec.kind])
        t = TYPES[spec.kind]
        if t.kind == "table":
            top = max(abs(v) for v in KVALUES_IQ4NL)
            return Rounding(t.bits, t.group, True, tuple(v / top for v in KVALUES_IQ4NL), signed=True)
        if t.kind in ("sym", "kquant3", "kquant6"):
            half = 2 ** (t.bits - 1)
            return Rounding(t.bits, t.group, True, tuple(k / half for k in range(-half, half)), signed=True)
        return Rounding(t.bits, t.group, False, free_min=t.kind == "min")


def by_rows(segments: Sequence[tuple[int, Rounding | None]]) -> Rounding | Callable[[torch.Tensor], torch.Tensor]:
    """A rounding of stacked readers, each run of ``rows`` rows by its own ``Rounding`` (None: a linear
    the solver leaves unquantized, such as a router, rounded to itself); one ``Rounding`` if all agree."""
    merged: list[list] = []
    for rows, r in segments:
        if merged and merged[-1][1] == r:
            merged[-1][0] += rows
        else:
            merged.append([rows, r])
    if len(merged) == 1 and merged[0][1] is not None:
        return merged[0][1]

    def rounding(w: torch.Tensor) -> torch.Tensor:
        parts = w.split([rows for rows, _ in merged])
        return torch.cat([p if r is None else r(p) for p, (_, r) in zip(parts, merged, strict=True)])

    return rounding


def damped_inverse(H: torch.Tensor, damp: float) -> torch.Tensor:
    """(H + λI)⁻¹ with λ = ``damp`` · mean(diag H), as the solver damps (float64 inside, float32 out)."""
    H = H.double()
    lam = damp * H.diagonal().mean().clamp(min=1e-12)
    return torch.linalg.inv(H + lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)).float()


def reader_error(W: torch.Tensor, Hinv: torch.Tensor, Q: torch.Tensor,
                 rounding: Rounding | Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Σ E² / U_jj² (module docstring) for the readers ``W`` ([out, hidden]) of an input whose damped
    inverse Hessian is ``Hinv``, rotated by ``Q``, rounded by ``rounding``."""
    Wr = W @ Q
    U = torch.linalg.cholesky(Q.T @ Hinv @ Q, upper=True)
    return ((Wr - rounding(Wr)).pow(2) / U.diagonal().pow(2)[None]).sum()


def learn_rotation(weights: Callable[[int], torch.Tensor], hinv: Mapping[int, torch.Tensor] | Sequence[torch.Tensor],
                   Q0: torch.Tensor, rounding: Rounding | Callable[[int], Callable], *, steps: int = 400,
                   lr: float = 5e-3, per_step: int = 8, seed: int = 0, n_terms: int | None = None,
                   combine: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   device: torch.device | str | None = None, progress: Callable[[int, float], None] | None = None
                   ) -> tuple[torch.Tensor, dict]:
    """The learned Q (float64, orthogonal to its precision) from ``Q0``, and a record of the run.

    ``hinv[j]``: the damped inverse Hessian of term j (float32; a mapping may read it from disk when a step
    draws it); ``weights(j)``: term j's readers, [out, hidden] (fetched when a step draws the term, so a
    caller may load them from disk); ``rounding``: what the readers round onto (one ``Rounding`` for all,
    or a function of the term j giving its readers' rounding, a ``Rounding`` or what ``by_rows``
    returns). Each step takes ``per_step`` of the ``n_terms`` terms (default: all of ``hinv``), drawn by
    a generator seeded with ``seed``: the same inputs give the same Q.

    Shared out (several processes): each holds only its own terms in ``hinv`` and passes ``combine``,
    which sums a tensor over the processes. Every term's value and gradient in Q is computed by the one
    process holding it and written into its slot of a buffer that is zero elsewhere, so the sum hands
    every process each slot exactly (x + 0 = x); all then add the slots in the order drawn and take the
    same step. Q is the one one process learns from the same terms, bit for bit (with the same threads
    per process). ``device``: where to compute (default: where the first term's inverse is; a process
    holding no term must name it). ``progress(step, objective)`` is called after every step."""
    terms = dict(enumerate(hinv)) if isinstance(hinv, Sequence) else hinv
    n = len(terms) if n_terms is None else n_terms
    combine = combine or (lambda t: t)
    dev = torch.device(device) if device is not None else next(iter(terms.values())).device
    Q0 = Q0.to(dev, torch.float32)
    h = Q0.shape[0]

    rounding_of = rounding if not isinstance(rounding, Rounding) else (lambda j: rounding)

    def error(j: int, Q: torch.Tensor) -> torch.Tensor:
        return reader_error(weights(j).to(dev, torch.float32), terms[j].to(dev), Q, rounding_of(j))

    def everyone(values: dict[int, float]) -> list[float]:  # every term's value, each from its holder
        t = torch.zeros(n, dtype=torch.float64, device=dev)
        for j, v in values.items():
            t[j] = v
        return combine(t).tolist()

    with torch.no_grad():
        base = [max(b, 1e-30) for b in everyone({j: error(j, Q0).item() for j in terms})]
    A = torch.zeros_like(Q0, requires_grad=True)
    opt = torch.optim.Adam([A], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        pick = torch.randperm(n, generator=gen)[:per_step].tolist()
        with torch.enable_grad():  # callers (the pipeline) may run under no_grad
            Q = Q0 @ torch.matrix_exp(A - A.T)
            at = Q.detach().requires_grad_()
            grads = torch.zeros(len(pick), h, h, device=dev)
            values = torch.zeros(len(pick), dtype=torch.float64, device=dev)
            for slot, j in enumerate(pick):
                if j in terms:
                    e = error(j, at) / base[j]
                    grads[slot], = torch.autograd.grad(e, at)
                    values[slot] = e.detach()
            grads, values = combine(grads), combine(values)
            opt.zero_grad()
            Q.backward(grads.sum(0) / len(pick))
        opt.step()
        if progress is not None:
            progress(step, values.sum().item() / len(pick))
    with torch.no_grad():
        u, _, vh = torch.linalg.svd((Q0 @ torch.matrix_exp(A - A.T)).double())
        Q = u @ vh  # the nearest orthogonal matrix, to float64 precision
        final = everyone({j: error(j, Q.float()).item() / base[j] for j in terms})
    return Q.cpu(), {"steps": steps, "objective": round(sum(final) / n, 4),
                     "seconds": round(time.perf_counter() - t0, 1)}
