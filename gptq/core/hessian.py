"""The layer Hessian H = 2 X Xᵀ / n of ‖WX − ŴX‖², and its damped inverse Cholesky factor.

``HessianAccumulator`` keeps an fp32 running sum of XᵀX plus a row count and divides once;
``inverse_cholesky`` owns everything that can go wrong afterwards: dead inputs, damping and
a Cholesky that fails (retried with ten times the damping, then a clear error).
"""

from __future__ import annotations

import torch


class CholeskyError(RuntimeError):
    """H stayed indefinite even after increasing the damping."""


class NonFiniteError(RuntimeError):
    """NaN or Inf in weights or activations."""


class HessianAccumulator:
    """Sum of xxᵀ over calibration rows. ``add`` takes [..., in]; ``hessian()`` returns 2·Σxxᵀ/n.

    XᵀX is symmetric, so only the blocks on and above the diagonal are multiplied (in column
    chunks of ~256: 5/8 of the work at in = 1024, ~1/2 for large layers); ``hessian`` mirrors them.
    Each batch's partial product is computed on its own and then added to the sum, in batch order
    (``sum += xᵢᵀxⱼ``, not a fused multiply-add into the sum): several processes, each computing
    the partials of its own batches (``staged``: ``add`` keeps the partial for
    ``distributed.exchange``), then reach bit for bit the same H (``add_partial`` on every rank).
    """

    CHUNK = 256

    def __init__(self, columns: int, device: torch.device | str = "cpu", staged: bool = False):
        self.columns, self.device, self.staged = columns, device, staged
        self.sum = torch.zeros(columns, columns, dtype=torch.float32, device=device)  # [in, in] upper blocks
        self.count = 0
        self._staged: tuple[torch.Tensor, int] | None = None
        self.cross: CrossAccumulator | None = None  # full-precision targets: summed beside H (capture.hessians)
        nchunks = max(1, round(columns / self.CHUNK))
        bounds = [round(k * columns / nchunks) for k in range(nchunks + 1)]
        self.chunks = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def _blocks(self):
        for i, ci in enumerate(self.chunks):
            for cj in self.chunks[i:]:
                yield ci, cj

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.sum.device, torch.float32)  # [n, in]
        if self.staged:
            part = torch.zeros_like(self.sum)
            for ci, cj in self._blocks():
                part[ci, cj] = x[:, ci].T @ x[:, cj]
            self._staged = (part, x.shape[0])
            return
        for ci, cj in self._blocks():
            self.sum[ci, cj] += x[:, ci].T @ x[:, cj]
        self.count += x.shape[0]

    def take_staged(self) -> tuple[torch.Tensor | None, int]:
        """The partial of this rank's batch in the round just finished (None, 0 without one)."""
        staged, self._staged = self._staged, None
        return staged if staged is not None else (None, 0)

    def add_partial(self, part: torch.Tensor, rows: int) -> None:
        """Add one batch's partial (computed by ``add`` in staged mode, here or on another rank)."""
        for ci, cj in self._blocks():
            self.sum[ci, cj] += part[ci, cj]
        self.count += rows

    def hessian(self) -> torch.Tensor:
        """2·Σxxᵀ/n, computed in place: the accumulator is used up (no second [in, in] copy)."""
        if self.count == 0:
            raise RuntimeError("no calibration rows reached this layer")
        if self.sum is None:
            raise RuntimeError("hessian() was already taken from this accumulator")
        H, self.sum = self.sum.mul_(2.0 / self.count), None  # [in, in]
        for i, ci in enumerate(self.chunks):
            for cj in self.chunks[i + 1 :]:
                H[cj, ci] = H[ci, cj].T
        return H


class CrossAccumulator:
    """Σ (x̃ − x)ᵀ x over calibration rows, for full-precision targets (GPTAQ): x̃ is what the
    full-precision model feeds the linear, x what the partly quantized model feeds it, row for row.
    ``matrix()`` returns 2·Σ(x̃ − x)ᵀx/n, scaled as ``HessianAccumulator.hessian`` scales H: the
    pair (H, C) then gives the corrected target of ``solver.solve``. Not symmetric, so
    it is summed whole. Same staged / ``add_partial`` protocol as H for ``distributed.exchange``."""

    def __init__(self, columns: int, device: torch.device | str = "cpu", staged: bool = False):
        self.columns, self.device, self.staged = columns, device, staged
        self.sum = torch.zeros(columns, columns, dtype=torch.float32, device=device)  # [in, in]
        self.count = 0
        self._staged: tuple[torch.Tensor, int] | None = None

    def add(self, x_ref: torch.Tensor, x: torch.Tensor) -> None:
        """One batch: x_ref [..., in] the full-precision model's inputs, x the quantized model's.
        bfloat16 activations are multiplied as they are (a native bf16 matmul is ~4x faster than
        fp32 where the CPU has one, and the per-batch product is then summed in fp32): ΔX is a
        correction, scaled by α, so bf16's 8-bit mantissa on the product is far below its own
        sampling noise; H, whose Cholesky needs the precision, stays fp32 throughout."""
        x, x_ref = x.reshape(-1, x.shape[-1]), x_ref.reshape(-1, x_ref.shape[-1])
        if x_ref.shape != x.shape:
            raise ValueError(f"the full-precision input has shape {tuple(x_ref.shape)}, the quantized one "
                             f"{tuple(x.shape)}: the two streams must see the same batches")
        dtype = torch.bfloat16 if x.dtype == x_ref.dtype == torch.bfloat16 else torch.float32
        x = x.to(self.sum.device, dtype)
        part = ((x_ref.to(self.sum.device, dtype) - x).T @ x).float()  # [in, in]; x_ref is left alone
        if self.staged:
            self._staged = (part, x.shape[0])
            return
        self.sum += part  # the same sums as the staged partials added by ``add_partial``
        self.count += x.shape[0]

    def take_staged(self) -> tuple[torch.Tensor | None, int]:
        staged, self._staged = self._staged, None
        return staged if staged is not None else (None, 0)

    def add_partial(self, part: torch.Tensor, rows: int) -> None:
        self.sum += part
        self.count += rows

    def matrix(self) -> torch.Tensor:
        """2·Σ(x̃ − x)ᵀx/n, in place (the accumulator is used up)."""
        if self.count == 0:
            raise RuntimeError("no calibration rows reached this layer")
        C, self.sum = self.sum.mul_(2.0 / self.count), None
        return C


def all_finite(x: torch.Tensor) -> bool:
    """Whether ``x`` holds no NaN/Inf: one reduction without a temporary, the exact check only
    when the sum is not finite (NaN and Inf propagate into it; overflow is the false alarm)."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def dead_columns(H: torch.Tensor) -> torch.Tensor:
    """Inputs that were always zero: they carry no information and get H=1, W=0."""
    return torch.diag(H) == 0


def inverse_cholesky(H: torch.Tensor, damp: float, name: str = "layer", retries: int = 3,
                     overwrite: bool = False) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp · mean(diag H).

    H must already have its dead columns set to 1 on the diagonal. On failure the damping is
    multiplied by 10 (up to ``retries`` times) before giving up with a message naming the layer.
    With ``overwrite`` H's diagonal is used as scratch (saves an [n, n] copy; off-diagonal kept).
    The factorisation and inversion run in place on one buffer: two [n, n] matrices at most.
    """
    if not all_finite(H):
        raise NonFiniteError(f"{name}: the calibration activations contain NaN or Inf")
    Hd = H if overwrite else H.clone()
    diag0 = torch.diag(H).clone()
    mean_diag = torch.mean(diag0)
    lam = damp if damp > 0 else 1e-6
    for attempt in range(retries + 1):
        Hd.diagonal().copy_(diag0 + lam * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            torch.cholesky_inverse(L, out=L)  # L now holds (H + λI)⁻¹
            torch.linalg.cholesky_ex(L, upper=True, out=(L, info))
            if info == 0 and all_finite(L):
                return L
        del L
        lam *= 10
    raise CholeskyError(
        f"{name}: the Hessian is not positive definite even with damping {lam / 10:g}·mean(diag H). "
        "Use more or longer calibration samples (--nsamples, --seqlen), or raise --damp (e.g. 0.1)."
    )
