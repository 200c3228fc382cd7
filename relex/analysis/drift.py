"""Drift diagnostics of a trajectory from the Gram matrix of its deltas.

Explained variance and the R² of the coefficient look "linear" even for a pure random walk, so they
cannot say whether extrapolation is safe. These statistics can, when compared with their values for a
random walk over the same steps (the *null*) and for pure drift:

* ``alpha``: growth exponent of ‖x_t‖ ∝ t^α (random walk 0.5, drift 1);
* ``drift_ratio``: ‖x_T‖² / Σ_i ‖x_i − x_{i−1}‖² (x_0 = 0; random walk 1, drift (Σ Δt)² / Σ Δt²);
* ``cos_first_last``: cosine of the first and last deltas (random walk √(t_1/t_T), drift 1);
* ``prefix_cos``: cosine between the top direction of the first ``prefix_fraction`` of the window and of
  the whole window (drift 1);
* ``drift_share``: the share of ‖x_T‖² that is coherent motion rather than random walk (random walk 0,
  drift 1), from a factor model of the increments (see :func:`coherent_share`).

Everything is computed from G = X Xᵀ (x_i = w_{t_i} − w_0), so it costs nothing beyond the Gram pass
the engine makes anyway. The nulls are computed, not assumed: they are the same statistics evaluated on
the expected Gram matrix of a random walk at the same steps, E[G_ij] ∝ min(t_i, t_j), which is what a
high-dimensional random walk concentrates on; pure drift has G_ij ∝ t_i t_j.

The verdict rests on ``drift_share``. The drift ratio and the first/last cosine are shown beside their
nulls but do not decide: both measure the drift share of one *checkpoint interval*, so the same process
looks noisier the more often it is checkpointed (drift + walk with 91% of ‖x_T‖² drift scores 0.50 on the
drift ratio with 10 checkpoints and 0.09 with 100), and a deterministic but curved path (c ∝ √t) scores
like a half-noisy one. The factor model separates the two: the increments d_i = x_i − x_{i−1} of a
random walk are uncorrelated, those of drift all point the same way, so a rank-1 factor fitted to the
products ⟨d_i, d_j⟩ of increments far apart in time measures the coherent part, whatever the spacing of
the checkpoints and whatever the speed profile (line, √t, saturating) of the path. A rank-2 fit tells a
path that turns from one that is noisy.

A line + random-walk model G ≈ a²·t tᵀ + b²·min(t, t') fitted to G gives the expected weight-space error
of extrapolating along the line through the base versus stopping at the last checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

import numpy as np

from relex.subspace import fit_drift_noise

DRIFT = "drift-dominated"
MIXED = "mixed"
NOISE = "noise-dominated"


def random_walk_gram(steps) -> np.ndarray:
    """Expected Gram matrix of a random walk observed at ``steps`` (unit variance per step)."""
    t = np.asarray(steps, dtype=np.float64)
    return np.minimum.outer(t, t)


def pure_drift_gram(steps) -> np.ndarray:
    """Gram matrix of a straight line through the base observed at ``steps``."""
    t = np.asarray(steps, dtype=np.float64)
    return np.outer(t, t)


def _top_vector(g: np.ndarray) -> tuple[np.ndarray, float]:
    values, vectors = np.linalg.eigh(0.5 * (g + g.T))
    return vectors[:, -1], float(math.sqrt(max(values[-1], 0.0)))


@dataclass
class DriftStats:
    """Statistics of one Gram matrix (see the module docstring)."""

    alpha: float
    drift_ratio: float
    drift_ratio_max: float
    cos_first_last: float
    prefix_cos: float
    explained_rank1: float
    r2_rank1: float
    drift_share: float = float("nan")


def prefix_length(n_steps: int, prefix_fraction: float) -> int:
    return min(n_steps - 1, max(2, int(round(prefix_fraction * n_steps))))


def drift_stats(gram: np.ndarray, steps, prefix_fraction: float = 0.2) -> DriftStats:
    """Drift statistics of the trajectory whose delta Gram matrix is ``gram`` at ``steps``."""
    g = np.asarray(gram, dtype=np.float64)
    t = np.asarray(steps, dtype=np.float64)
    n = len(t)
    diag = np.clip(np.diag(g), 0.0, None)
    nan = float("nan")
    if n < 2 or diag[-1] <= 0:
        return DriftStats(nan, nan, nan, nan, nan, nan, nan)
    positive = (diag > 0) & (t > 0)
    alpha = nan
    if positive.sum() >= 2:
        alpha = float(0.5 * np.polyfit(np.log(t[positive]), np.log(diag[positive]), 1)[0])
    # ‖x_i − x_{i−1}‖² with x_0 = 0
    previous = np.concatenate([[0.0], diag[:-1]])
    cross = np.concatenate([[0.0], np.diag(g, -1)])
    increments = np.clip(diag + previous - 2 * cross, 0.0, None)
    drift_ratio = float(diag[-1] / increments.sum()) if increments.sum() > 0 else nan
    dt = np.diff(np.concatenate([[0.0], t]))
    drift_ratio_max = float(dt.sum() ** 2 / (dt**2).sum())
    cos_first_last = float(g[0, -1] / math.sqrt(diag[0] * diag[-1])) if diag[0] > 0 else nan

    u, sigma = _top_vector(g)
    prefix_cos = nan
    if n >= 3:
        p = prefix_length(n, prefix_fraction)
        u_p, sigma_p = _top_vector(g[:p, :p])
        if sigma_p > 0 and sigma > 0:
            prefix_cos = float(abs(u_p @ g[:p, :] @ u) / (sigma_p * sigma))
    eigenvalues = np.clip(np.linalg.eigvalsh(0.5 * (g + g.T)), 0.0, None)
    explained = float(eigenvalues[-1] / eigenvalues.sum()) if eigenvalues.sum() > 0 else nan
    coefficient = sigma * u
    fitted = np.polyval(np.polyfit(t, coefficient, 1), t)
    total = ((coefficient - coefficient.mean()) ** 2).sum()
    r2 = float(1 - ((coefficient - fitted) ** 2).sum() / total) if total > 0 else 1.0
    share = coherent_share(g, t, factors=1).share
    return DriftStats(alpha, drift_ratio, drift_ratio_max, cos_first_last, prefix_cos, explained, r2, share)


@dataclass
class CoherentFit:
    """Increment factor model of a trajectory: coherent motion + noise (see :func:`coherent_share`)."""

    share: float  # ‖c_T‖² / ‖x_T‖² for the coherent path c; random walk 0, drift 1
    coherent_norms: np.ndarray  # ‖c_i‖ of the coherent path at each observed step
    coherent_alpha: float  # growth exponent of ‖c_t‖ (line through the base 1, √t 0.5)
    coherent_cos: float  # cos(c_first, c_last) (straight 1; turning < 1; needs factors ≥ 2)
    factors: int
    band: int  # increments closer than this many checkpoints were not used to fit the factors
    steps: np.ndarray | None = None  # the steps the fit used (a long window is subsampled)


def increment_gram(gram: np.ndarray) -> np.ndarray:
    """Gram matrix of the increments d_i = x_i − x_{i−1} (x_0 = 0) from the Gram matrix of the deltas."""
    g = np.asarray(gram, dtype=np.float64)
    n = g.shape[0]
    difference = np.eye(n) - np.eye(n, k=-1)
    return difference @ g @ difference.T


def default_band(n_steps: int) -> int:
    """Lags (in checkpoints) left out of the factor fit: a fifth of the window."""
    return max(0, n_steps // 5)


def _masked_factors(h: np.ndarray, known: np.ndarray, k: int, iterations: int = 300,
                    tolerance: float = 1e-7) -> np.ndarray:
    """F (n×k) fitted to the ``known`` entries of H by alternating least squares over the rows, with the
    coherent part kept inside the data: (F Fᵀ)_ii ≤ H_ii (an exceeding diagonal entry is pulled back)."""
    diagonal = np.clip(np.diag(h), 0.0, None)
    values, vectors = np.linalg.eigh(np.where(known, h, 0.0) + np.diag(diagonal))
    f = vectors[:, ::-1][:, :k] * np.sqrt(np.clip(values[::-1][:k], 0.0, None))
    mask = known.astype(np.float64)
    ridge = 1e-12 * max(float(diagonal.max()), 1e-300)
    eye = np.eye(k)
    size = math.sqrt(max(float(diagonal.max()), 1e-300))  # the scale of the entries of f
    for _ in range(iterations):
        previous = f
        fitted = (f * f).sum(axis=1)
        over = fitted > diagonal  # rows whose coherent part exceeds the data: constrain their diagonal
        m = mask.copy()
        m[over, over] = 1.0
        target = np.where(known, h, 0.0)
        target[over, over] = diagonal[over]
        a = np.einsum("ij,jk,jl->ikl", m, f, f) + ridge * eye  # (n, k, k)
        b = (m * target) @ f  # (n, k)
        # Updating every row at once from the previous rows oscillates (c·g -> g/c for H = g gᵀ); the
        # average of the two converges.
        f = 0.5 * (previous + np.linalg.solve(a, b[..., None])[..., 0])
        if float(np.abs(f - previous).max()) <= tolerance * size:
            break
    return f


MAX_POINTS = 24  # checkpoints used by the factor fit (a longer window is subsampled evenly)


def _subsample(n: int, max_points: int) -> np.ndarray:
    if n <= max_points:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, max_points)).astype(int))


def coherent_share(gram: np.ndarray, steps, factors: int = 1, band: int | None = None,
                   max_points: int = MAX_POINTS) -> CoherentFit:
    """Share of ‖x_T‖² that is coherent motion, from a factor model of the long-range increment products.

    The increments d_i = x_i − x_{i−1} are split into a coherent part f_i of rank ``factors`` (any
    magnitude over time: straight, accelerating or decelerating; with 2 factors also turning) and noise
    that is uncorrelated between increments more than ``band`` checkpoints apart (a random walk, but also
    an optimizer's momentum-smoothed noise, or noise on the checkpoints themselves). After whitening by
    √Δt_i, the coherent part F is fitted to the entries of the increment Gram matrix whose lag exceeds
    ``band`` (default: a fifth of the window), where noise contributes nothing on average; the coherent
    path is c_i = Σ_{j≤i} f_j and the share is ‖c_T‖² / ‖x_T‖² (clipped to [0, 1]).

    Fitting the diagonal too (probabilistic PCA) would read slowly varying noise as drift: Adam-style
    momentum (β = 0.9) on pure noise checkpointed every 5 steps scores 0.76 that way and 0.02 here. Noise
    correlated over more than a fifth of the window stays indistinguishable from drift. At a finite
    dimension d the noise's products fluctuate by ~1/√d and the fit can pick them up, so a random walk's
    share is not exactly 0: its 95th percentile is 0.29 at d = 3072 and 0.75 at d = 32 over 12
    checkpoints (:func:`relex.analysis.nulls.random_walk_null` gives it for any d and steps).

    Windows longer than ``max_points`` checkpoints are subsampled evenly (the last one kept): the share of
    a drift + random walk does not depend on the spacing, and coarser increments carry less correlated
    noise. ``coherent_norms`` then covers the kept checkpoints only.
    """
    g = np.asarray(gram, dtype=np.float64)
    t = np.asarray(steps, dtype=np.float64)
    nan = float("nan")
    if len(t) < 2 or not np.all(np.isfinite(g)) or g[-1, -1] <= 0:
        return CoherentFit(nan, np.full(len(t), nan), nan, nan, 0, 0, t)
    keep = _subsample(len(t), max_points)
    g, t = g[np.ix_(keep, keep)], t[keep]
    n = len(t)
    dt = np.diff(np.concatenate([[0.0], t]))
    k = max(1, min(factors, n - 1))
    m = default_band(n) if band is None else max(0, min(int(band), n - 2))
    scale = 1.0 / np.sqrt(dt)
    whitened = increment_gram(g) * np.outer(scale, scale)
    whitened = 0.5 * (whitened + whitened.T)
    lags = np.abs(np.subtract.outer(np.arange(n), np.arange(n)))
    known = lags > m
    f = _masked_factors(whitened, known, k) / scale[:, None]  # (T, k) coherent increments
    path = np.cumsum(f, axis=0)
    share = float(np.clip(path[-1] @ path[-1] / g[-1, -1], 0.0, 1.0))
    norms = np.sqrt((path**2).sum(axis=1))
    alpha = cos = nan
    ok = (norms > 1e-9 * max(norms.max(), 1e-300)) & (t > 0)
    if ok.sum() >= 2:
        alpha = float(np.polyfit(np.log(t[ok]), np.log(norms[ok]), 1)[0])
        first = int(np.argmax(ok))
        cos = float(path[first] @ path[-1] / (norms[first] * norms[-1]))
    return CoherentFit(share, norms, alpha, cos, k, m, t)


def _normalised(observed: float, null: float, drift: float) -> float:
    """0 at the random-walk value, 1 at the pure-drift value (nan when the two coincide)."""
    if not (math.isfinite(observed) and math.isfinite(null) and math.isfinite(drift)) or abs(drift - null) < 1e-9:
        return float("nan")
    return float((observed - null) / (drift - null))


@dataclass
class DriftDiagnostics:
    """Observed statistics beside their random-walk null and pure-drift values, and a verdict."""

    steps: list[float]
    observed: DriftStats
    null: DriftStats
    drift: DriftStats
    scores: dict  # normalised: 0 = random walk, 1 = pure drift
    drift_share: float  # share of ‖x_T‖² that is coherent motion, not random walk (coherent_share)
    verdict: str  # DRIFT, MIXED or NOISE
    message: str
    coherent: CoherentFit | None = None  # the rank-2 fit (its cos and alpha describe the path's shape)
    backtest: dict | None = None  # line vs stopping on the observed window (see apply_backtest)
    calibration: dict | None = None  # balanced drift share and pace ratio (relex.analysis.verdict.run_verdict)

    def expected_errors(self, target: float) -> dict:
        """Expected relative weight error ‖pred − true‖/‖true − w_0‖ at ``target`` under the fitted
        drift + random-walk model, for the line through the base and for stopping at the last checkpoint."""
        return expected_errors(self._a2, self._b2, self.steps[-1], target)

    def to_dict(self) -> dict:
        return {
            "steps": self.steps,
            "observed": asdict(self.observed),
            "random_walk_null": asdict(self.null),
            "pure_drift": asdict(self.drift),
            "scores": self.scores,
            "drift_share": self.drift_share,
            "verdict": self.verdict,
            "message": self.message,
            "coherent": None if self.coherent is None else {
                "share": self.coherent.share,
                "alpha": self.coherent.coherent_alpha,
                "cos_first_last": self.coherent.coherent_cos,
                "factors": self.coherent.factors,
                "band": self.coherent.band,
            },
            "backtest": self.backtest,
            "calibration": self.calibration,
            "line_fit": {"drift_per_step_sq": getattr(self, "_a2", float("nan")),
                         "noise_per_step": getattr(self, "_b2", float("nan"))},
        }


def expected_errors(a2: float, b2: float, last_step: float, target: float) -> dict:
    """Relative errors at ``target`` for x̂ = (t*/t_T)·x_T (extrapolate) and x̂ = x_T (stop)."""
    true_sq = a2 * target**2 + b2 * target
    if true_sq <= 0:
        return {"extrapolate": float("nan"), "last_checkpoint": float("nan")}
    ratio = target / last_step
    extrapolate = b2 * target * (ratio - 1.0)
    stop = a2 * (target - last_step) ** 2 + b2 * (target - last_step)
    return {"extrapolate": math.sqrt(max(extrapolate, 0) / true_sq), "last_checkpoint": math.sqrt(max(stop, 0) / true_sq)}


# A carried backtest in which the line beats stopping by less than this fraction of stopping's error does
# not make a run plausible (see apply_backtest and docs/verdict_calibration.md). It is smaller than the
# spread measured there: retraining a toy run with another thread count moved the ratio line / stop by a
# factor of up to 1.54, which only a margin of 0.35 (1 - 1/1.54) would cover; that margin still let
# saturated runs through and halved the runs called plausible where extrapolating helped, so it was not
# adopted, and a plausible call with a ratio above 0.65 may not repeat on another CPU or thread count.
BACKTEST_MARGIN = 0.2

# Verdict thresholds on the drift share s (see _verdict).
DRIFT_THRESHOLD = 0.8
NOISE_THRESHOLD = 0.5


@lru_cache(maxsize=64)
def _references(steps: tuple, prefix_fraction: float) -> tuple[DriftStats, DriftStats]:
    """The statistics of the expected random walk and of pure drift at ``steps`` (cached)."""
    return (drift_stats(random_walk_gram(steps), steps, prefix_fraction),
            drift_stats(pure_drift_gram(steps), steps, prefix_fraction))


def diagnose(gram: np.ndarray, steps, prefix_fraction: float = 0.2) -> DriftDiagnostics:
    """Diagnose a trajectory (one tensor, or a whole model with the Gram matrices summed over tensors)."""
    steps = [float(s) for s in steps]
    observed = drift_stats(gram, steps, prefix_fraction)
    null, drift = (replace(r) for r in _references(tuple(steps), float(prefix_fraction)))
    scores = {
        "alpha": _normalised(observed.alpha, null.alpha, drift.alpha),
        "drift_ratio": _normalised(observed.drift_ratio, null.drift_ratio, drift.drift_ratio),
        "cos_first_last": _normalised(observed.cos_first_last, null.cos_first_last, drift.cos_first_last),
        "prefix_cos": _normalised(observed.prefix_cos, null.prefix_cos, drift.prefix_cos),
        "drift_share": observed.drift_share,  # already 0 for a random walk, 1 for drift
    }
    a2, b2 = fit_drift_noise(gram, steps)
    straight = coherent_share(gram, steps, factors=1)
    turning = coherent_share(gram, steps, factors=2) if len(steps) >= 5 else None
    verdict, message = _verdict(straight, turning, len(steps))
    result = DriftDiagnostics(steps, observed, null, drift, scores, straight.share, verdict, message,
                              turning if turning is not None else straight)
    result._a2, result._b2 = a2, b2
    return result


def _shape_note(fit: CoherentFit | None) -> str:
    """How the coherent path departs from a straight line through the base, if it does."""
    if fit is None:
        return ""
    notes = []
    if math.isfinite(fit.coherent_alpha):
        if fit.coherent_alpha < 0.8:
            notes.append("decelerating")
        elif fit.coherent_alpha > 1.25:
            notes.append("accelerating")
    if math.isfinite(fit.coherent_cos) and fit.coherent_cos < 0.85:
        notes.append("turning")
    return " and ".join(notes)


def _verdict(straight: CoherentFit, turning: CoherentFit | None, n_steps: int) -> tuple[str, str]:
    # Under drift + random walk, extrapolating along the drift beats stopping at the last checkpoint
    # exactly when s > 0.5, whatever the horizon, and its relative weight error far out tends to
    # sqrt((1 - s) / s): 0.5 at s = 0.8, 0.33 at s = 0.9. Toy runs lost most of their gain beyond ~0.5.
    share = straight.share
    if n_steps < 3 or not math.isfinite(share):
        return MIXED, "inconclusive: the window is too short to tell drift from noise"
    shape = _shape_note(turning)
    if share >= DRIFT_THRESHOLD:
        if shape:
            return DRIFT, (f"drift-dominated but {shape}: a line through the base will miss; "
                           "extrapolate with the model the backtest ranks first")
        return DRIFT, "drift-dominated: extrapolation along the trajectory is plausible"
    if turning is not None and turning.share >= DRIFT_THRESHOLD:
        return MIXED, (f"coherent but {shape or 'turning'}: the direction of the update changes, so a "
                       "line extrapolates poorly; check the backtest")
    if share < NOISE_THRESHOLD:
        return NOISE, "noise-dominated: extrapolation will likely hurt"
    return MIXED, "mixed drift and noise: extrapolate only a short horizon and check the backtest"


def verdict_holdout(n_steps: int) -> int | None:
    """Checkpoints the verdict's backtest holds out: the second half of the window (horizon about 2x),
    keeping at least two to fit; None when the window is too short (fewer than 4 checkpoints)."""
    if n_steps < 4:
        return None
    return n_steps - max(2, (n_steps + 1) // 2)


# How far the window backtest may be carried (see :func:`horizon`): its line was checked over one horizon
# h_b (the farthest held-out step over the last fitted one, about 2); its error is carried to the target
# multiplied by k = (h − 1) / (h_b − 1). Beyond k = 10, an order of magnitude more extrapolation than the
# backtest checked, the carried error is an assumption rather than a measurement, and the verdict refuses to
# call the extrapolation plausible. The extrapolations relex is built for, from 10-20% of a run to its end,
# carry it 4-9 times.
MAX_CARRY = 10.0


def _as_float(value) -> float:
    """``float(value)``, with integers too large for a float as infinity (never an OverflowError)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def step_text(step) -> str:
    """A step as it is written: an integer when it is one, however large."""
    if isinstance(step, (int, np.integer)):
        digits = str(abs(int(step)))
        if len(digits) > 24:  # an absurd step stays readable
            return f"{'-' if step < 0 else ''}{digits[0]}.{digits[1:3]}e+{len(digits) - 1}"
        return str(int(step))
    value = _as_float(step)
    if math.isfinite(value) and value.is_integer():
        return str(int(value))
    return f"{value:g}"


def _step_value(step):
    value = float(step)
    return int(value) if value.is_integer() else value


def times_text(ratio: float) -> str:
    """A ratio of steps as '12.5', '250' or '6.2e+17'."""
    if not math.isfinite(ratio):
        return "∞"
    if ratio < 100:
        return f"{ratio:.3g}"
    if ratio < 1e6:
        return f"{ratio:,.0f}"
    return f"{ratio:.2g}"


def horizon(steps, target_step, fit_steps=None, held_out_steps=None) -> tuple[dict, str] | None:
    """How far beyond the observed window ``target_step`` lies, and whether the window backtest reaches it.

    Returns ``(record, text)``, or ``None`` without a target. The record holds the target, the window, the
    ratio of the target to the last observed step and, with the backtest's ``fit_steps`` and
    ``held_out_steps``: the backtest's own horizon ``backtest_ratio`` (h_b), the factor ``carry`` by which
    its error is carried to the target, and the farthest step it can vouch for (``max_target_step``, where
    the carry reaches :data:`MAX_CARRY`); ``within_limit`` is False beyond it. Any integer target is
    accepted (a step too large for a float is an infinite ratio).
    """
    if target_step is None or not len(steps):
        return None
    first, last = steps[0], steps[-1]
    target = _as_float(target_step)
    last_value = float(last)
    ratio = target / last_value if last_value > 0 else math.inf
    record = {"target_step": int(target_step) if isinstance(target_step, (int, np.integer)) else target,
              "first_observed_step": _step_value(first), "last_observed_step": _step_value(last), "ratio": ratio}
    window = f"steps {step_text(first)}..{step_text(last)}"
    if target <= last_value:
        return record, f"the target lies inside the observed window (step {step_text(target_step)} from {window})"
    text = (f"the target is {times_text(ratio)}× the observed window "
            f"(step {step_text(target_step)} from {window})")
    if fit_steps is not None and held_out_steps is not None and len(fit_steps) and len(held_out_steps):
        fit_last, held_last = float(fit_steps[-1]), float(held_out_steps[-1])
        if fit_last > 0 and held_last > fit_last:
            h_b = held_last / fit_last
            carry = (ratio - 1.0) / (h_b - 1.0)
            max_ratio = 1.0 + MAX_CARRY * (h_b - 1.0)
            max_target = int(math.floor(last_value * max_ratio))
            within = carry <= MAX_CARRY
            record.update(backtest_ratio=h_b, carry=carry, max_carry=MAX_CARRY, max_ratio=max_ratio,
                          max_target_step=max_target, within_limit=within)
            if not within:
                text += (f", beyond the {times_text(max_ratio)}× (step {max_target}) that a backtest over "
                         f"{times_text(h_b)}× can vouch for (relex carries it at most {MAX_CARRY:g} times as far)")
    return record, text


def apply_backtest(diagnostics: DriftDiagnostics, fit_steps, held_out_steps, line_error: float,
                   stop_error: float, target_step: float | None = None,
                   margin: float | None = None) -> DriftDiagnostics:
    """Let a backtest on the observed window overrule the drift share when the two disagree.

    ``line_error`` is the relative weight-space error at the farthest held-out step of RELEX (rank 1,
    linear) fitted on ``fit_steps``; ``stop_error`` that of stopping at the last fitted checkpoint. The
    drift share describes the motion; the backtest checks that a line actually predicts it.

    With ``target_step``, both errors are carried to the real horizon before they are compared: the
    line's error grows in proportion to how far beyond the window it goes, ``(h − 1)`` with h the ratio of
    the predicted step to the last fitted one (the cautious assumption: a direction that is slightly off
    misses by more the farther it is followed), while stopping's error grows like ``1 − 1/h`` (what pure
    drift gives). When the line does worse than stopping, extrapolating will likely hurt, whatever the
    drift share says. The message says how far beyond the window the target lies (:func:`horizon`); a
    target beyond the :data:`MAX_CARRY` limit is never called plausible, whatever the errors.

    The record (``diagnostics.backtest``) holds the errors, ``line_beats_stop`` and, with a target,
    ``horizon`` (see :func:`horizon`).

    A drift-dominated run whose line beats stopping by less than ``margin`` (a fraction of stopping's
    error; default :data:`BACKTEST_MARGIN`) is called mixed: too close to call.
    """
    margin = BACKTEST_MARGIN if margin is None else float(margin)
    fit_steps, held_out_steps = [int(s) for s in fit_steps], [int(s) for s in held_out_steps]
    record = {"fit_steps": fit_steps, "held_out_steps": held_out_steps,
              "line_error": float(line_error), "stop_error": float(stop_error)}
    diagnostics.backtest = record
    if not (math.isfinite(line_error) and math.isfinite(stop_error)):
        return diagnostics
    evidence = (f"on the observed window a line fitted up to step {fit_steps[-1]} predicted step "
                f"{held_out_steps[-1]} with weight error {line_error:.2f}, stopping {stop_error:.2f}")
    line, stop = line_error, stop_error
    last_observed = float(diagnostics.steps[-1])
    target = None if target_step is None else _as_float(target_step)
    reach = horizon(diagnostics.steps, target_step, fit_steps, held_out_steps)
    beyond = False
    if reach is not None:
        record["horizon"], horizon_note = reach
        beyond = not reach[0].get("within_limit", True)
        evidence = f"{horizon_note}; {evidence}"
    if target is not None and target > last_observed and held_out_steps[-1] > fit_steps[-1]:
        h_backtest = held_out_steps[-1] / fit_steps[-1]
        h_target = target / last_observed
        carry = (h_target - 1.0) / (h_backtest - 1.0)
        line = line_error * carry if line_error > 0 else 0.0  # never 0 × ∞
        stop = stop_error * (1.0 - 1.0 / h_target) / (1.0 - 1.0 / h_backtest)
        record.update(target_step=target, projected_line_error=line, projected_stop_error=stop)
        evidence += f"; carried to step {step_text(target_step)}: {_error_text(line)} against {stop:.2f}"
    record["line_beats_stop"] = bool(line < stop)
    if line >= stop:
        if diagnostics.verdict == DRIFT:
            diagnostics.verdict = MIXED
            diagnostics.message = (f"extrapolation this far will likely hurt: the drift share is "
                                   f"{diagnostics.drift_share:.2f}, but {evidence}")
        else:
            diagnostics.verdict = NOISE
            diagnostics.message = f"noise-dominated: extrapolation will likely hurt ({evidence})"
    elif beyond and diagnostics.verdict == DRIFT:
        diagnostics.verdict = MIXED
        diagnostics.message = f"extrapolation this far cannot be vouched for: {evidence}"
    elif line > (1.0 - margin) * stop and diagnostics.verdict == DRIFT:
        # the line wins, but by less than the margin; the same run retrained on another CPU or thread count
        # moves these figures by more (docs/verdict_calibration.md): too close to call
        record["within_margin"] = True
        diagnostics.verdict = MIXED
        diagnostics.message = (f"too close to call: the line beats stopping by less than the {margin:.0%} "
                               "margin, and retraining the same run with another thread count can move this "
                               f"comparison by more ({evidence})")
    else:
        diagnostics.message = f"{diagnostics.message} ({evidence})"
    return diagnostics


def _error_text(error: float) -> str:
    """A relative error, readable however large it was carried."""
    if not math.isfinite(error):
        return "∞"
    return f"{error:.2f}" if error < 1e4 else f"{error:.2g}"


# ------------------------------------------------------------------ calibration checks (run level)

# A run is called drift-dominated only when these hold too (see docs/verdict_calibration.md):
# the balanced drift share (each weight matrix counted once, whatever its norm) is at least DRIFT_THRESHOLD,
# and the pace of the second half of the window is at least MIN_PACE_RATIO times that of the first.
MIN_PACE_RATIO = 0.75
MAX_PACE_RATIO = 1.5  # above: accelerating (a momentum optimizer's start): the pace is not settled


def balanced_gram(grams, ndims=None) -> np.ndarray | None:
    """Σ_k G_k / ‖x_T‖²_k over the tensors that moved: each counts once, so no single tensor (an embedding
    that moves far more than the rest) carries the whole-model figure. Matrices only (vectors such as norm
    scales are few-dimensional and noisy) unless no matrix moved. ``None`` when nothing moved."""
    moving = {n: np.asarray(g, dtype=np.float64) for n, g in grams.items()
              if np.all(np.isfinite(g)) and np.asarray(g)[-1, -1] > 0}
    matrices = {n: g for n, g in moving.items() if ndims is None or ndims.get(n, 2) >= 2}
    chosen = matrices or moving
    if not chosen:
        return None
    return sum(g / g[-1, -1] for g in chosen.values())


def pace_ratio(gram: np.ndarray, steps) -> float:
    """Pace of the second half of the window over that of the first, along the direction of the last delta.

    p_i = ⟨x_i, x_T⟩ / ‖x_T‖ is linear in t_i for a line through the base and, on average, for a random walk
    too (E⟨x_i, x_T⟩ ∝ min(t_i, t_T) = t_i), so noise leaves the ratio near 1 while a path that slows down
    inside the window gives less (√t over steps 5..20: 0.38) and one that speeds up more. The first-half pace
    is the slope through the base fitted to the first half; the second-half pace is (p_T − p_mid)/(t_T −
    t_mid). ``nan`` for fewer than 4 checkpoints.
    """
    g = np.asarray(gram, dtype=np.float64)
    t = np.asarray(steps, dtype=np.float64)
    n = len(t)
    if n < 4 or g[-1, -1] <= 0:
        return float("nan")
    p = g[:, -1] / math.sqrt(g[-1, -1])
    mid = n // 2 - 1
    first = t[: mid + 1]
    s1 = float(p[: mid + 1] @ first / (first @ first))
    s2 = float((p[-1] - p[mid]) / (t[-1] - t[mid]))
    if s1 <= 0:
        return float("nan")
    return s2 / s1
