"""Hadamard matrices and the fast Walsh-Hadamard transform, for rotations (QuaRot, Ashkboos et al. 2024, arXiv
2404.00456, section 3; SpinQuant's R1/R4, Liu et al. 2024, arXiv 2405.16406).

A Hadamard matrix H of order n has entries +-1 and H H^T = n I, so H / sqrt(n) is orthogonal. Orders built here:
* Sylvester: 2^k (H_2k = [[H, H], [H, -H]]);
* Paley I: q + 1 for a prime q = 3 (mod 4) (12, 20, 24, 32, 44, 48, 60, 68, 72, 80, 84, ...);
* Paley II: 2 (q + 1) for a prime q = 1 (mod 4) (12, 28, 36, 60, 76, 108, ...);
and Kronecker products of one of those with a Sylvester matrix: order m 2^k (QuaRot's construction for widths that
are not powers of two). SmolLM2's widths: hidden 576 = 36 x 16 (Paley II, q = 17, times Sylvester 16), intermediate
1536 = 12 x 128 (Paley I, q = 11, times Sylvester 128).

The fast transform of x [..., m p] (p = 2^k) computes x (H_m kron H_p)^T / sqrt(m p) as a Walsh-Hadamard butterfly
over the p axis (log2 p stages of additions) followed by one dense m x m product: O(n (log p + m)) per row instead of
the dense O(n^2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from compress.core.errors import ConfigError


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(math.isqrt(q)) + 1))


def sylvester(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order n = 2^k (float32, +-1, symmetric)."""
    if n < 1 or n & (n - 1):
        raise ConfigError(f"a Sylvester Hadamard matrix has an order that is a power of two, not {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) mod q, chi the quadratic character of the field of q elements (q prime)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)])
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def paley1(q: int) -> torch.Tensor:
    """Paley construction I (q prime, q = 3 mod 4): H = I + S, S = [[0, 1^T], [-1, Q]], order q + 1."""
    if not (_is_prime(q) and q % 4 == 3):
        raise ConfigError(f"Paley I needs a prime q = 3 (mod 4), not {q}")
    s = torch.zeros(q + 1, q + 1)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(q + 1) + s


def paley2(q: int) -> torch.Tensor:
    """Paley construction II (q prime, q = 1 mod 4): C = [[0, 1^T], [1, Q]] (a symmetric conference matrix),
    H = C kron [[1, 1], [1, -1]] + I kron [[1, -1], [-1, -1]], order 2 (q + 1)."""
    if not (_is_prime(q) and q % 4 == 1):
        raise ConfigError(f"Paley II needs a prime q = 1 (mod 4), not {q}")
    c = torch.zeros(q + 1, q + 1)
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = _jacobsthal(q)
    return torch.kron(c, torch.tensor([[1.0, 1.0], [1.0, -1.0]])) + torch.kron(torch.eye(q + 1), torch.tensor([[1.0, -1.0], [-1.0, -1.0]]))


@lru_cache(maxsize=None)
def _known(m: int) -> tuple[str, int] | None:
    """A construction ("paley1"|"paley2", q) of a Hadamard matrix of order m (m = 0 mod 4, not a power of two)."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return ("paley1", m - 1)
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return ("paley2", m // 2 - 1)
    return None


@dataclass(frozen=True)
class HadamardPlan:
    """Order n = m p: a Paley (or trivial, m = 1) factor of order m times a Sylvester factor of order p = 2^k."""

    n: int
    m: int
    p: int
    construction: str  # "paley1(q=11)", "paley2(q=17)" or "sylvester"

    def describe(self) -> str:
        return f"{self.n} = " + (f"{self.construction} {self.m} x sylvester {self.p}" if self.m > 1 else f"sylvester {self.p}")


@lru_cache(maxsize=None)
def hadamard_plan(n: int) -> HadamardPlan | None:
    """How to build a Hadamard matrix of order n here, or None: n = 2^k, or n = m 2^j with m a Paley order (the
    smallest such m is chosen, so the fast transform's dense part is as small as possible)."""
    if n < 1:
        return None
    if n & (n - 1) == 0:
        return HadamardPlan(n, 1, n, "sylvester")
    odd = n
    while odd % 2 == 0:
        odd //= 2
    m = odd
    while m <= n:
        if n % m == 0 and m % 4 == 0:
            known = _known(m)
            if known is not None:
                return HadamardPlan(n, m, n // m, f"{known[0]}(q={known[1]})")
        m *= 2
    return None


def hadamard_orders(limit: int = 4096) -> list[int]:
    """The orders <= limit this module builds (for error messages and docs)."""
    return [n for n in range(1, limit + 1) if hadamard_plan(n) is not None]


@lru_cache(maxsize=32)
def _factor(m: int) -> torch.Tensor:
    if m == 1:
        return torch.ones(1, 1)
    kind, q = _known(m)
    return paley1(q) if kind == "paley1" else paley2(q)


def require_plan(n: int, what: str) -> HadamardPlan:
    plan = hadamard_plan(n)
    if plan is None:
        near = [k for k in hadamard_orders(max(2 * n, 64)) if k % 4 == 0]
        raise ConfigError(f"{what}: no Hadamard matrix of order {n} is built here (orders 2^k and m 2^k with m a "
                          f"Paley order, e.g. {', '.join(str(k) for k in near[-6:])}); use --r1 random for a random "
                          "orthogonal R1, or --no-online")
    return plan


def hadamard_factor(plan: HadamardPlan) -> torch.Tensor:
    """The m x m +-1 factor (float32) of a plan."""
    return _factor(plan.m).clone()


def hadamard_matrix(n: int) -> torch.Tensor:
    """H_n (entries +-1, H H^T = n I) as float32, dense: kron(H_m, H_p)."""
    plan = require_plan(n, "hadamard_matrix")
    return torch.kron(_factor(plan.m), sylvester(plan.p))


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform along the last dimension (a power of two): x H_p (Sylvester order)."""
    p = x.shape[-1]
    if p & (p - 1):
        raise ConfigError(f"the fast Walsh-Hadamard transform needs a power-of-two width, not {p}")
    lead = x.shape[:-1]
    y = x.reshape(-1, p)
    h = 1
    while h < p:
        y = y.view(-1, p // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*lead, p)


def hadamard_transform(x: torch.Tensor, hm: torch.Tensor, p: int) -> torch.Tensor:
    """x (H_m kron H_p)^T / sqrt(m p) for x [..., m p], fast: the butterfly over p, then the m x m factor. Computed
    in float32, returned in x's dtype."""
    m = hm.shape[0]
    n = m * p
    if x.shape[-1] != n:
        raise ConfigError(f"the online Hadamard transform is of order {n}, the input has width {x.shape[-1]}")
    dtype = x.dtype
    y = fwht(x.float().reshape(*x.shape[:-1], m, p))  # X[i, :] H_p (H_p symmetric)
    if m > 1:
        y = torch.matmul(hm.to(y.device, y.dtype), y)  # H_m X
    return (y.reshape(x.shape) / math.sqrt(n)).to(dtype)


def random_signs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).float() * 2 - 1


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """QuaRot's randomized Hadamard R = diag(s) H_n / sqrt(n), s uniform in {+-1}: orthogonal, float64."""
    h = hadamard_matrix(n).double() / math.sqrt(n)
    return random_signs(n, seed).double()[:, None] * h


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian matrix, signs fixed by R's diagonal), float64."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]
