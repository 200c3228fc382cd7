"""Temporal SVD of a tensor's trajectory through its T×T Gram matrix.

For deltas x_i = w_{t_i} − w_0 stacked as X ∈ R^{T×d}, the uncentered SVD X = U Σ Vᵀ follows from the
Gram matrix G = X Xᵀ = U Σ² Uᵀ. G is accumulated chunk by chunk over d, so a tensor never needs more than
T rows of one chunk in memory, and the cost is O(T² d) with no SVD of a weight matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

RELATIVE_TOLERANCE = 1e-6


GRAM_CHUNK = 1 << 16


def gram(x: torch.Tensor) -> np.ndarray:
    """G = X Xᵀ of a (T, n) float tensor, returned in float64.

    Products of 64k-column chunks are summed in float64: over millions of entries this is ~1000x more
    accurate than one float32 product (relative error ~1e-6 instead of ~1e-3) and no slower.
    """
    t, n = x.shape
    g = torch.zeros((t, t), dtype=torch.float64, device=x.device)
    for start in range(0, n, GRAM_CHUNK):
        block = x[:, start:start + GRAM_CHUNK]
        g += (block @ block.T).double()
    return g.cpu().numpy()


@dataclass
class TemporalSVD:
    """Leading components of a trajectory's temporal SVD.

    ``u`` is (T, k) with orthonormal columns, ``sigma`` (k,) the singular values, and
    ``explained`` the explained variance of ranks 1..T (cumulative; ``explained[0]`` is rank 1).
    Signs are fixed so that each component's coefficient at the newest step is non-negative.
    """

    u: np.ndarray
    sigma: np.ndarray
    explained: np.ndarray

    @property
    def rank(self) -> int:
        return len(self.sigma)

    @property
    def coefficients(self) -> np.ndarray:
        """c_ij = σ_j u_ij = ⟨x_i, v_j⟩, shape (T, k)."""
        return self.u * self.sigma


def temporal_svd(g: np.ndarray, rank: int = 1, rel_tol: float = RELATIVE_TOLERANCE) -> TemporalSVD:
    """Rank-``rank`` temporal SVD from a Gram matrix; components with σ_j ≤ rel_tol·σ_1 are dropped."""
    g = 0.5 * (np.asarray(g, dtype=np.float64) + np.asarray(g, dtype=np.float64).T)
    t = g.shape[0]
    if not np.any(g):
        return TemporalSVD(np.zeros((t, 0)), np.zeros(0), np.zeros(t))
    eigenvalues, eigenvectors = np.linalg.eigh(g)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues = np.clip(eigenvalues[order], 0.0, None)
    eigenvectors = eigenvectors[:, order]
    total = eigenvalues.sum()
    explained = np.cumsum(eigenvalues) / total if total > 0 else np.zeros(t)
    sigma = np.sqrt(eigenvalues)
    keep = [j for j in range(min(rank, t)) if sigma[j] > rel_tol * sigma[0]]
    u = eigenvectors[:, keep].copy()
    # Deterministic signs: the coefficient at the newest step is non-negative.
    flip = np.where(u[-1] < 0, -1.0, 1.0)
    u *= flip
    return TemporalSVD(u=u, sigma=sigma[keep], explained=explained)


def directions(x: torch.Tensor, svd: TemporalSVD) -> torch.Tensor:
    """Right singular vectors v_j = Xᵀ u_j / σ_j of a (T, n) chunk, as a (k, n) tensor."""
    weights = torch.as_tensor(svd.u / svd.sigma, dtype=x.dtype, device=x.device)  # (T, k)
    return weights.T @ x


# -- per-matrix top singular triples (the matrix-rank1 mode) ------------------------------------------

TRIPLE_RESIDUAL = 1e-3  # largest accepted max(‖A v − σ u‖, ‖Aᵀu − σ v‖) / σ


@dataclass
class SingularTriple:
    """Top singular triple A ≈ σ u vᵀ (+ the rest) of one matrix, with its solver residual."""

    u: np.ndarray  # (m,)
    sigma: float
    v: np.ndarray  # (n,)
    residual: float  # relative residual of the triple (0 for the closed forms)


def top_singular_triple(matrix, dtype=np.float32) -> SingularTriple:
    """Exact top singular triple of a 2-D array with ARPACK (``scipy.sparse.linalg.svds``, k=1).

    Lanczos iteration to machine precision (``tol=0``) from a fixed start vector, then a convergence
    check on both residuals; a failed check is retried in float64 with a larger Krylov space, and a second
    failure raises. Power iteration and randomized ``svd_lowrank`` are not used: when σ₂/σ₁ ≈ 1 they stop
    on vectors mixed with the second direction. Signs are deterministic: the largest |entry| of v is
    positive. A zero matrix gives σ = 0 and zero vectors.
    """
    a = np.asarray(matrix)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {a.shape}")
    a = a.astype(dtype, copy=False)
    m, n = a.shape
    if m == 0 or n == 0 or not np.any(a):
        return SingularTriple(np.zeros(m, dtype=dtype), 0.0, np.zeros(n, dtype=dtype), 0.0)
    if min(m, n) == 1:  # rank one by construction: closed form
        flat = a.reshape(-1).astype(np.float64)
        sigma = float(np.linalg.norm(flat))
        u, v = (np.ones(1), flat / sigma) if m == 1 else (flat / sigma, np.ones(1))
        return _signed(u, sigma, v, 0.0, dtype)
    from scipy.sparse.linalg import ArpackNoConvergence, svds  # only for matrix-rank1 (start-up of the others)

    last_error = None
    for attempt, (work_dtype, ncv) in enumerate([(dtype, None), (np.float64, min(min(m, n), 40))]):
        work = a if attempt == 0 else a.astype(work_dtype)
        v0 = np.random.default_rng(0).standard_normal(min(m, n)).astype(work.dtype)
        try:
            u, s, vt = svds(work, k=1, tol=0, v0=v0, ncv=ncv, maxiter=max(1000, 20 * min(m, n)))
        except ArpackNoConvergence as exc:
            last_error = exc
            continue
        u, sigma, v = u[:, 0].astype(np.float64), float(s[0]), vt[0].astype(np.float64)
        residual = _residual(work, u, sigma, v)
        if residual <= TRIPLE_RESIDUAL:
            return _signed(u, sigma, v, residual, dtype)
        last_error = f"residual {residual:.2e}"
    raise RuntimeError(f"top singular triple of a {m}x{n} matrix did not converge ({last_error})")


def _residual(a: np.ndarray, u: np.ndarray, sigma: float, v: np.ndarray) -> float:
    if sigma <= 0:
        return 0.0
    av = a @ v.astype(a.dtype)
    atu = a.T @ u.astype(a.dtype)
    return float(max(np.linalg.norm(av - sigma * u), np.linalg.norm(atu - sigma * v)) / sigma)


def _signed(u, sigma, v, residual, dtype) -> SingularTriple:
    if v[np.argmax(np.abs(v))] < 0:
        u, v = -u, -v
    return SingularTriple(np.asarray(u, dtype=dtype), sigma, np.asarray(v, dtype=dtype), residual)


def fit_drift_noise(gram: np.ndarray, steps) -> tuple[float, float]:
    """Non-negative (a², b²) with G ≈ a²·t tᵀ + b²·min(t, t'), least squares over the entries.

    The Gram matrix of a line drifting a per step, plus a random walk of b² variance per step, observed at
    ``steps``. With two unknowns the non-negative least-squares solution is the unconstrained one when both
    are ≥ 0, and otherwise the better of the two one-column fits (each clipped at 0): the Karush-Kuhn-Tucker
    conditions leave no other candidate.
    """
    t = np.asarray(steps, dtype=np.float64)
    design = np.stack([np.outer(t, t).ravel(), np.minimum.outer(t, t).ravel()], axis=1)
    target = np.asarray(gram, dtype=np.float64).ravel()
    scale = np.abs(design).max(axis=0)
    scale[scale == 0] = 1.0
    design = design / scale
    candidates = []
    solution = np.linalg.lstsq(design, target, rcond=None)[0]
    if (solution >= 0).all():
        candidates.append(solution)
    for j in range(2):
        column = design[:, j]
        norm_sq = float(column @ column)
        single = np.zeros(2)
        single[j] = max(0.0, float(column @ target) / norm_sq) if norm_sq > 0 else 0.0
        candidates.append(single)
    coef = min(candidates, key=lambda c: float(np.sum((design @ c - target) ** 2)))
    a2, b2 = coef / scale
    return float(a2), float(b2)
