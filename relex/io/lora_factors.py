"""The algebra of LoRA factors: updates ``ΔW = P Q`` (``P``: out × r, ``Q``: r × in) handled without forming them.

Inner products of two updates need no dense matrix: ``⟨P_i Q_i, P_j Q_j⟩_F = tr((P_iᵀ P_j)(Q_j Q_iᵀ))``
(:func:`factor_inner`, :func:`factor_gram_matrix`). A mix of updates is again a low-rank product::

    Σ_i a_i P_i Q_i = [a_1 P_1 | … | a_T P_T] · [Q_1; …; Q_T]          (rank ≤ Σ_i r_i, exact)

:func:`mix_factors` returns that product, or its best rank-k approximation (Eckart–Young) from a QR
decomposition of both stacked factors and an SVD of the small core, with the relative Frobenius error of the
truncation. Everything here is torch arithmetic on tensors in memory.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


def factor_inner(pi: torch.Tensor, qi: torch.Tensor, pj: torch.Tensor, qj: torch.Tensor) -> float:
    """``⟨P_i Q_i, P_j Q_j⟩_F = tr((P_iᵀ P_j)(Q_j Q_iᵀ))`` in float64, without forming either product."""
    left = pi.double().T @ pj.double()  # r_i × r_j
    right = qi.double() @ qj.double().T  # r_i × r_j; tr(L (Q_j Q_iᵀ)) = Σ L ∘ (Q_i Q_jᵀ)
    return float((left * right).sum())


def factor_gram_matrix(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
    """The T × T Gram matrix ``G_ij = ⟨P_i Q_i, P_j Q_j⟩_F`` of T factor pairs, in float64, without forming any
    product: with ``P = [P_1 | … | P_T]`` and ``Q = [Q_1; …; Q_T]``, ``G_ij`` is the sum of block ``(i, j)`` of
    ``(PᵀP) ∘ (Q Qᵀ)``."""
    p = torch.cat([pq[0].double() for pq in pairs], dim=1)  # out × Σr
    q = torch.cat([pq[1].double() for pq in pairs], dim=0)  # Σr × in
    blocks = (p.T @ p) * (q @ q.T)  # entry (a, b): (P_aᵀP_b)(Q_a Q_bᵀ) for rank indices a, b
    edges = np.cumsum([0] + [pq[0].shape[1] for pq in pairs])
    full = blocks.numpy()
    t = len(pairs)
    return np.array([[full[edges[i]:edges[i + 1], edges[j]:edges[j + 1]].sum() for j in range(t)]
                     for i in range(t)])


def mix_factors(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float],
                rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``Σ_i w_i P_i Q_i`` as one low-rank product ``P @ Q``; returns ``(P, Q, relative truncation error)``.

    ``rank=None``, or ``rank`` at least ``R = Σ_i r_i``: exactly ``P = [w_1 P_1 | … | w_T P_T]``,
    ``Q = [Q_1; …; Q_T]`` (padded with zero columns / rows up to ``rank``), error 0.0. Otherwise the best
    rank-``rank`` approximation: ``P_cat = U_P R_P`` and ``Q_catᵀ = U_Q R_Q`` (reduced QR), the SVD
    ``R_P R_Qᵀ = U S Vᵀ`` of the small core, and ``P = U_P U_k S_k^½``, ``Q = S_k^½ V_kᵀ U_Qᵀ`` (the
    singular values split evenly between the factors, which keeps both in a range a bf16 adapter stores
    well), padded with zeros when the product has lower rank; the error is ``‖ΔW − ΔW_k‖_F / ‖ΔW‖_F =
    √(Σ_{j>k} S_j²) / √(Σ_j S_j²)`` (0.0 for ΔW = 0). Computed in float64; returned in the inputs' float
    dtype (at least float32).
    """
    if len(pairs) != len(weights) or not pairs:
        raise ValueError("mix_factors needs one weight per factor pair, and at least one pair")
    if rank is not None and rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    out_dtype = torch.float32
    for p, q in pairs:
        out_dtype = torch.promote_types(out_dtype, torch.promote_types(p.dtype, q.dtype))
    p_cat = torch.cat([p.double() * float(w) for (p, _), w in zip(pairs, weights)], dim=1)
    q_cat = torch.cat([q.double() for _, q in pairs], dim=0)
    total = p_cat.shape[1]
    m, n = p_cat.shape[0], q_cat.shape[1]
    if rank is None or rank >= total:
        width = total if rank is None else rank
        p_out = torch.zeros((m, width), dtype=torch.float64)
        q_out = torch.zeros((width, n), dtype=torch.float64)
        p_out[:, :total], q_out[:total] = p_cat, q_cat
        return p_out.to(out_dtype), q_out.to(out_dtype), 0.0
    u_p, r_p = torch.linalg.qr(p_cat)  # m × K1, K1 × R
    u_q, r_q = torch.linalg.qr(q_cat.T)  # n × K2, K2 × R
    u, s, vh = torch.linalg.svd(r_p @ r_q.T, full_matrices=False)  # core K1 × K2
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    p_out = torch.zeros((m, rank), dtype=torch.float64)
    q_out = torch.zeros((rank, n), dtype=torch.float64)
    p_out[:, :k] = (u_p @ u[:, :k]) * root
    q_out[:k] = root[:, None] * (vh[:k] @ u_q.T)
    energy = float((s * s).sum())
    error = math.sqrt(max(0.0, float((s[k:] * s[k:]).sum())) / energy) if energy > 0 else 0.0
    return p_out.to(out_dtype), q_out.to(out_dtype), error

