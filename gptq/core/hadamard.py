"""Orthogonal matrices for rotating a model before it is solved (``gptq.models.rotation``).

A Hadamard matrix H of order n has entries ±1 and H Hᵀ = n I, so H / √n is orthogonal and
spreads every input direction evenly over all outputs: multiplied into a weight matrix it leaves
no column (no channel) much larger than the others, which is what low-bit grids need (QuIP#,
QuaRot). Orders that are not powers of two (SmolLM2's 576 = 36 · 16, 1536 = 12 · 128,
2880 = 180 · 16, 5120 = 20 · 256, 14336 = 28 · 512) are built as a Kronecker product of a
Paley matrix with a Sylvester one:

    Sylvester      order 2^k           H_2k = [[H, H], [H, -H]]
    Paley I        order q + 1         q prime, q ≡ 3 (mod 4)
    Paley II       order 2 (q + 1)     q prime, q ≡ 1 (mod 4)

(Paley, "On orthogonal matrices", J. Math. Phys. 12 (1933); the constructions as in
Seberry & Yamada, "Hadamard matrices, sequences and block designs" (1992), §1.) Orders with no
such construction fall back to a random orthogonal matrix (``orthogonal``).

Everything is float64 and deterministic: the same (n, kind, seed) gives the same bytes on every
machine and every rank.
"""

from __future__ import annotations

import torch

KINDS = ("hadamard", "random")


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i), χ the quadratic character modulo the prime q (χ(0) = 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley_1(q: int) -> torch.Tensor:
    """Order q + 1 (q ≡ 3 mod 4): I + [[0, 1ᵀ], [−1, Q]]."""
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return s + torch.eye(n, dtype=torch.float64)


def _paley_2(q: int) -> torch.Tensor:
    """Order 2 (q + 1) (q ≡ 1 mod 4): C = [[0, 1ᵀ], [1, Q]], each 0 replaced by [[1, −1], [−1, −1]]
    and each ±1 by ±[[1, 1], [1, −1]]."""
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, one) + torch.kron((c == 0).to(torch.float64), zero)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _base(m: int) -> torch.Tensor | None:
    """A Paley matrix of order m, or None."""
    if m in (1, 2):
        return _sylvester(m)
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley_1(m - 1)
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley_2(m // 2 - 1)
    return None


def hadamard_factors(n: int) -> tuple[int, int] | None:
    """(m, 2^k) with n = m · 2^k and a Paley (or trivial) matrix of order m, the smallest such m; None
    if none exists."""
    if n < 1:
        return None
    k = n & -n  # the largest power of two dividing n
    while k >= 1:
        if _base(n // k) is not None:
            return n // k, k
        k //= 2
    return None


def _hadamard(n: int) -> torch.Tensor:
    factors = hadamard_factors(n)
    if factors is None:
        raise ValueError(f"no Hadamard matrix of order {n} is built here (orders m · 2^k with m = 1, 2, a Paley "
                         "order q + 1 (prime q ≡ 3 mod 4) or 2 (q + 1) (prime q ≡ 1 mod 4)); use a random rotation")
    m, p = factors
    return torch.kron(_base(m), _sylvester(p))


def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix of order n (entries ±1, H Hᵀ = n I), float64; ValueError if none is built here."""
    return _hadamard(n)


def has_hadamard(n: int) -> bool:
    return hadamard_factors(n) is not None


def construction(n: int, kind: str) -> str:
    """How ``orthogonal(n, kind, seed)`` builds its matrix, without building it."""
    if kind not in KINDS:
        raise ValueError(f"rotation kind {kind!r}; choose one of {KINDS}")
    if kind == "hadamard" and has_hadamard(n):
        m, p = hadamard_factors(n)
        return f"hadamard {m}x{p}" if m > 2 else f"hadamard {n}"
    return "random" if kind == "random" else f"random (no Hadamard matrix of order {n})"


def orthogonal(n: int, kind: str, seed: int) -> tuple[torch.Tensor, str]:
    """An n × n orthogonal matrix (float64) and how it was made.

    hadamard  H · diag(s) / √n with s a seeded random ±1 vector (a randomised Hadamard matrix); a
              random orthogonal matrix where no Hadamard matrix of order n is built here
    random    a Haar-random orthogonal matrix (QR of a seeded Gaussian matrix, signs fixed)
    """
    how = construction(n, kind)
    g = torch.Generator().manual_seed(seed)
    if how.startswith("hadamard"):
        signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.int64).to(torch.float64) * 2 - 1
        return _hadamard(n) * signs[None, :] / n**0.5, how
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None, :], how
