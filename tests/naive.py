"""Independent naive implementations of every mode, the tests' oracles: whole tensors, float64, full SVDs.

Nothing here shares code with the engine: each function holds every checkpoint of the run in memory,
forms the deltas in float64, takes full ``numpy.linalg.svd`` decompositions and fits the predictors with
``numpy.polyfit`` / ``scipy.optimize.curve_fit``. Inputs: ``base`` maps names to tensors, ``checkpoints``
is a list of such maps (one per observed step). Each function returns a list (one per target) of maps
name -> float64 numpy array.
"""

from __future__ import annotations

import numpy as np

PREDICTORS = ("linear", "poly2", "poly3", "loglinear", "powerlaw", "saturating")


def fit_predictor(name: str, t: np.ndarray, c: np.ndarray):
    """A callable t -> ĉ(t) fitted to the series (t, c) with a textbook routine."""
    from scipy.optimize import curve_fit

    t = np.asarray(t, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    if name == "linear":
        p = np.polyfit(t, c, 1)
        return lambda s: np.polyval(p, np.asarray(s, dtype=np.float64))
    if name.startswith("poly"):
        p = np.polyfit(t, c, int(name[4:]))
        return lambda s: np.polyval(p, np.asarray(s, dtype=np.float64))
    if name == "loglinear":
        p = np.polyfit(np.log(t), c, 1)
        return lambda s: np.polyval(p, np.log(np.asarray(s, dtype=np.float64)))
    scale = t.max()
    if name == "powerlaw":
        positive = c > 0
        b0 = np.polyfit(np.log(t[positive]), np.log(c[positive]), 1)[0] if positive.sum() >= 2 else 1.0
        b0 = float(np.clip(b0, -1.5, 3.5))
        (a, b), _ = curve_fit(lambda s, a, b: a * (s / scale) ** b, t, c, p0=[c[-1], b0], maxfev=20000)
        return lambda s: a * (np.asarray(s, dtype=np.float64) / scale) ** b
    if name == "saturating":
        best = None
        for tau0 in scale * np.array([0.1, 0.3, 1.0, 3.0, 10.0]):
            try:
                (a, tau), _ = curve_fit(lambda s, a, tau: a * (1 - np.exp(-s / tau)), t, c,
                                        p0=[c[-1] / (1 - np.exp(-t[-1] / tau0)), tau0], maxfev=20000)
            except RuntimeError:
                continue
            loss = ((a * (1 - np.exp(-t / tau)) - c) ** 2).sum()
            if best is None or loss < best[0]:
                best = (loss, a, tau)
        _, a, tau = best
        return lambda s: a * (1 - np.exp(-np.asarray(s, dtype=np.float64) / tau))
    raise ValueError(f"no naive version of predictor {name!r}")


def _deltas(base, checkpoints, name):
    w0 = base[name].double().numpy()
    x = np.stack([c[name].double().numpy().reshape(-1) - w0.reshape(-1) for c in checkpoints])
    return w0, x


def naive_temporal(base, checkpoints, steps, targets, *, rank: int = 1, predictor: str = "linear",
                   anchored: bool = False, shrink: float | str | None = None, scale: float = 1.0):
    """RELEX with any predictor; ``anchored`` adds the last delta and shrinks the increment by
    ``shrink`` (a number, or ``"model"``: the drift + random-walk λ recomputed from scratch)."""
    steps = np.asarray(steps, dtype=np.float64)
    outputs = [dict() for _ in targets]
    for name in base:
        w0, x = _deltas(base, checkpoints, name)
        if not np.any(x):
            for out in outputs:
                out[name] = w0
            continue
        u, s, vt = np.linalg.svd(x, full_matrices=False)
        keep = [j for j in range(min(rank, len(s))) if s[j] > 1e-6 * s[0]]
        fits, directions = [], []
        for j in keep:
            v = vt[j] if x[-1] @ vt[j] >= 0 else -vt[j]  # coefficient at the newest step ≥ 0
            coefficient = x @ v
            fits.append(fit_predictor(predictor, steps, coefficient))
            directions.append(v)
        for k, target in enumerate(targets):
            if not anchored:
                update = sum(f(target) * v for f, v in zip(fits, directions))
            else:
                increment = sum((f(target) - f(steps[-1])) * v for f, v in zip(fits, directions))
                lam = shrink if shrink != "model" else _model_shrink(x, steps, increment, target)
                update = x[-1] + lam * increment
            outputs[k][name] = w0 + scale * update.reshape(w0.shape)
    return outputs


def _model_shrink(x: np.ndarray, steps: np.ndarray, increment: np.ndarray, target: float) -> float:
    """argmin_λ E‖x_T + λ·I − x(t*)‖² when x_t = a·t·d + (random walk, variance b² per step), I = B X."""
    from scipy.optimize import nnls

    g = x @ x.T
    drift, walk = np.outer(steps, steps), np.minimum.outer(steps, steps)
    design = np.stack([drift.ravel() / drift.max(), walk.ravel() / walk.max()], axis=1)
    (a2, b2), _ = nnls(design, g.ravel())
    a2, b2 = a2 / drift.max(), b2 / walk.max()
    b = np.linalg.lstsq(x.T, increment, rcond=None)[0]  # I = Bᵀ X
    k = a2 * drift + b2 * walk  # E[x_i·x_j]
    k_star = a2 * steps * target + b2 * steps  # E[x_i·x(t*)]
    lam = (b @ k_star - b @ k[:, -1]) / (b @ k @ b)
    return float(np.clip(lam, 0.0, 1.0))


def naive_elementwise(base, checkpoints, steps, targets, *, first: int | None = None, copy_norms: bool = False,
                      scale: float = 1.0):
    steps = list(steps)
    a = len(steps) - 2 if first is None else steps.index(first)
    b = len(steps) - 1
    outputs = [dict() for _ in targets]
    for name, w0_tensor in base.items():
        w0 = w0_tensor.double().numpy()
        wa, wb = (checkpoints[i][name].double().numpy() for i in (a, b))
        for k, target in enumerate(targets):
            if copy_norms and w0.ndim == 1:
                outputs[k][name] = wb
                continue
            alpha = (target - steps[a]) / (steps[b] - steps[a])
            outputs[k][name] = w0 + scale * (wa + alpha * (wb - wa) - w0)
    return outputs


def naive_matrix_rank1(base, checkpoints, steps, targets, *, predictor: str = "linear", anchored: bool = False,
                       shrink: float = 1.0, scale: float = 1.0, copy_norms: bool = False):
    """Per-matrix rank-1 with full SVDs of each delta; 1-D tensors element-wise between the last two."""
    steps = np.asarray(steps, dtype=np.float64)
    fallback = naive_elementwise(base, checkpoints, list(steps), targets, copy_norms=copy_norms, scale=scale)
    outputs = [dict() for _ in targets]
    for name, w0_tensor in base.items():
        w0 = w0_tensor.double().numpy()
        if w0.ndim < 2:
            for k in range(len(targets)):
                outputs[k][name] = fallback[k][name]
            continue
        deltas = [c[name].double().numpy().reshape(w0.shape[0], -1) - w0.reshape(w0.shape[0], -1)
                  for c in checkpoints]
        triples = []
        for d in deltas:
            u, s, vt = np.linalg.svd(d, full_matrices=False)
            triples.append((u[:, 0], s[0], vt[0]))
        u_t, _, v_t = triples[-1]
        coefficient = np.array([s * (u @ u_t) * (v @ v_t) for u, s, v in triples])
        fit = fit_predictor(predictor, steps, coefficient)
        direction = np.outer(u_t, v_t)
        for k, target in enumerate(targets):
            if anchored:
                update = deltas[-1] + shrink * (fit(target) - fit(steps[-1])) * direction
            else:
                update = fit(target) * direction
            outputs[k][name] = w0 + scale * update.reshape(w0.shape)
    return outputs


def naive_relex(base, checkpoints, steps, targets, rank: int = 1, scale: float = 1.0):
    """Reference RELEX on whole tensors in float64 with ``numpy.linalg.svd`` (an independent oracle).

    ``base`` maps names to tensors, ``checkpoints`` is a list of such maps (one per step). Returns a list
    (one per target) of maps name -> float64 numpy array. Holds every checkpoint in memory.
    """
    steps = np.asarray(steps, dtype=np.float64)
    outputs = [dict() for _ in targets]
    for name, w0_tensor in base.items():
        w0 = w0_tensor.double().numpy().reshape(-1)
        x = np.stack([c[name].double().numpy().reshape(-1) - w0 for c in checkpoints])
        if not np.any(x):
            for out in outputs:
                out[name] = w0.reshape(w0_tensor.shape)
            continue
        u, s, vt = np.linalg.svd(x, full_matrices=False)
        keep = [j for j in range(min(rank, len(s))) if s[j] > 1e-6 * s[0]]
        update = np.zeros_like(w0)
        for k, target in enumerate(targets):
            update = np.zeros_like(w0)
            for j in keep:
                c = x @ vt[j]  # coefficients ⟨x_i, v_j⟩
                slope, intercept = np.polyfit(steps, c, 1)
                update += (intercept + slope * target) * vt[j]
            outputs[k][name] = (w0 + scale * update).reshape(w0_tensor.shape)
    return outputs


def naive_toy_greedy(folder, problems=None) -> list[bool]:
    """Verdicts of the toy checkpoint in ``folder`` on ``problems`` (default: the held-out split; anything with
    the toy's ``prompt`` and ``answer``) by a route independent of ``relex.toy.evaluate`` and of lm-eval: the
    checkpoint's own tokenizer, ``transformers``' ``generate`` (greedy, KV cache), and exact match of the
    generated ids with the answer's digits followed by ``<eos>``. One flag per problem, in their order."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from relex.toy.task import heldout_problems

    problems = heldout_problems() if problems is None else list(problems)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompts = tokenizer([p.prompt for p in problems], return_tensors="pt")  # same length: no padding
    with torch.no_grad():
        out = model.generate(**prompts, do_sample=False, max_new_tokens=4, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    completions = out[:, prompts["input_ids"].shape[1]:].tolist()
    flags = []
    for ids, problem in zip(completions, problems):
        wanted = tokenizer(problem.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        flags.append(ids[:len(wanted)] == wanted)
    return flags


# -- probe problems: sums "a+b=" and the log-probability of their answers ------------------------------------


def sums(seed: int = 0) -> list[tuple[int, int]]:
    """Every (a, b) with two-digit a, b in 10..39, in a seeded order (the first ones train, later ones are
    unseen)."""
    pairs = [(a, b) for a in range(10, 40) for b in range(10, 40)]
    np.random.default_rng(seed).shuffle(pairs)
    return pairs


def naive_answer_logprob(model, tokenizer, pairs) -> float:
    """The mean over problems of the mean log-probability of the answer's tokens after "a+b=", one problem at a
    time, no batching, no padding, float64 softmax: the oracle of the probe's log-probability screen."""
    import torch

    scores = []
    with torch.no_grad():
        for a, b in pairs:
            prompt = tokenizer(f"{a}+{b}=", add_special_tokens=False)["input_ids"]
            answer = tokenizer(str(a + b), add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + answer])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            scores.append(float(np.mean([logp[len(prompt) - 1 + k, token].item() for k, token in enumerate(answer)])))
    return float(np.mean(scores))


# -- the run verdict's figures, from explicit deltas ------------------------------------------------------


def naive_coherent_share(x: np.ndarray, steps) -> float:
    """Share of ‖x_T‖² that is coherent motion (the drift share), from the explicit deltas ``x`` (T×D).

    The model of ``relex.analysis.drift.coherent_share`` (rank 1, windows of at most 24 checkpoints), fitted
    by a different route: the increments d_i = x_i − x_{i−1}, whitened by √Δt_i, give H = D Dᵀ; one factor f
    minimises Σ (H_ij − f_i f_j)² over the pairs more than T // 5 checkpoints apart, plus (f_i² − H_ii)² where
    f_i² exceeds H_ii (the coherent part stays inside the data), with scipy's BFGS from several starts; the
    coherent path is c_T = Σ_i f_i √Δt_i and the share ‖c_T‖² / ‖x_T‖², clipped to [0, 1]."""
    from scipy.optimize import minimize

    t = np.asarray(steps, dtype=np.float64)
    n = len(t)
    assert n <= 24, "the naive fit does not subsample long windows"
    dt = np.diff(np.concatenate([[0.0], t]))
    d = np.diff(np.vstack([np.zeros(x.shape[1]), x]), axis=0) / np.sqrt(dt)[:, None]
    h = d @ d.T
    diagonal = np.diag(h)
    i, j = np.triu_indices(n, k=n // 5 + 1)
    scale = np.sqrt(diagonal.max())

    def loss(g):  # in units of the largest whitened increment
        f = g * scale
        residual = h[i, j] - f[i] * f[j]
        over = np.clip(f * f - diagonal, 0.0, None)
        return (2 * residual @ residual + over @ over) / scale**4

    values, vectors = np.linalg.eigh(h)
    starts = [np.sqrt(np.clip(diagonal, 0.0, None)), vectors[:, -1] * np.sqrt(max(values[-1], 0.0))]
    starts += list(np.random.default_rng(0).standard_normal((8, n)) * np.sqrt(diagonal.mean()))
    best = min((minimize(loss, s / scale, method="BFGS", options={"gtol": 1e-12, "maxiter": 10000})
                for s in starts), key=lambda r: r.fun)
    path = float(best.x @ np.sqrt(dt)) * scale
    return float(np.clip(path * path / (x[-1] @ x[-1]), 0.0, 1.0))


def _pace(x: np.ndarray, t: np.ndarray) -> float:
    """Pace of the second half of the window over the first, along the last delta's direction: the rise of the
    projection p_i = ⟨x_i, x_T⟩/‖x_T‖ from the middle checkpoint to the last, per step, over the slope of a line
    through the base fitted to the first half."""
    p = x @ x[-1] / np.linalg.norm(x[-1])
    mid = len(t) // 2 - 1
    first_half = float(p[: mid + 1] @ t[: mid + 1] / (t[: mid + 1] @ t[: mid + 1]))
    return float((p[-1] - p[mid]) / (t[-1] - t[mid])) / first_half


def naive_run_figures(base, checkpoints, steps, target=None) -> dict:
    """The figures of relex's verdict on a run, from whole tensors in float64 (``base``: name -> tensor,
    ``checkpoints``: one such map per step), each by its textbook definition:

    ``explained_rank1`` σ₁²/Σσ² of the stacked deltas; ``r2_rank1`` the R² of a line through their rank-1
    coefficient; ``alpha`` the slope of log ‖x_t‖ against log t; ``drift_ratio`` ‖x_T‖²/Σ‖x_i − x_{i−1}‖²;
    ``cos_first_last``; ``drift_share`` (:func:`naive_coherent_share`) of the whole model and of the moving
    matrices each scaled to a unit last delta (``balanced_drift_share``); ``pace`` (both ways); and the window
    backtest: the first ``max(2, (T + 1) // 2)`` checkpoints fitted, the last one predicted by RELEX rank 1
    linear (:func:`naive_relex`, tensor by tensor) and by stopping at the last fitted checkpoint, errors
    relative over the whole model, carried to ``target`` by the documented factors."""
    import torch

    t = np.asarray(steps, dtype=np.float64)
    names = sorted(base)
    deltas = {name: np.stack([c[name].double().numpy().reshape(-1) - base[name].double().numpy().reshape(-1)
                              for c in checkpoints]) for name in names}
    moving = [name for name in names if np.any(deltas[name])]
    x = np.hstack([deltas[name] for name in moving])
    matrices = [name for name in moving if base[name].dim() >= 2] or moving
    balanced = np.hstack([deltas[name] / np.linalg.norm(deltas[name][-1]) for name in matrices])
    norms = np.linalg.norm(x, axis=1)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    coefficient = u[:, 0] * s[0]
    fitted = np.polyval(np.polyfit(t, coefficient, 1), t)
    increments = np.diff(np.vstack([np.zeros(x.shape[1]), x]), axis=0)
    figures = {
        "step": float(t[-1]), "checkpoints": float(len(t)),
        "drift_share": naive_coherent_share(x, t),
        "explained_rank1": float(s[0] ** 2 / (s**2).sum()),
        "r2_rank1": float(1 - ((coefficient - fitted) ** 2).sum() / ((coefficient - coefficient.mean()) ** 2).sum()),
        "alpha": float(np.polyfit(np.log(t), np.log(norms), 1)[0]),
        "drift_ratio": float(norms[-1] ** 2 / (increments**2).sum()),
        "cos_first_last": float(x[0] @ x[-1] / (norms[0] * norms[-1])),
        "balanced_drift_share": naive_coherent_share(balanced, t),
    }
    if len(t) >= 4:
        figures["pace"] = _pace(balanced, t)
        figures["whole_pace"] = _pace(x, t)
        p = max(2, (len(t) + 1) // 2)
        line_sq = stop_sq = true_sq = 0.0
        for name in moving:
            d = deltas[name]
            (predicted,) = naive_relex({name: torch.zeros(d.shape[1], dtype=torch.float64)},
                                       [{name: torch.from_numpy(row)} for row in d[:p]], t[:p], [t[-1]])
            line_sq += float(((predicted[name] - d[-1]) ** 2).sum())
            stop_sq += float(((d[p - 1] - d[-1]) ** 2).sum())
            true_sq += float((d[-1] ** 2).sum())
        figures["backtest_line_error"] = line = float(np.sqrt(line_sq / true_sq))
        figures["backtest_stop_error"] = stop = float(np.sqrt(stop_sq / true_sq))
        figures["fit_last_step"], figures["held_out_step"] = float(t[p - 1]), float(t[-1])
        if target is not None and target > t[-1]:
            h_backtest, h_target = t[-1] / t[p - 1], target / t[-1]
            figures["backtest_projected_line_error"] = line * (h_target - 1) / (h_backtest - 1)
            figures["backtest_projected_stop_error"] = stop * (1 - 1 / h_target) / (1 - 1 / h_backtest)
    return figures


def naive_plausible(figures: dict) -> bool:
    """Whether the documented rules call these figures drift-dominated (extrapolation plausible): a drift
    share of at least 0.8, whole-model and balanced; a pace between 0.75 and 1.5 both ways; and a line that
    beats stopping, carried to the target, by at least the 20% margin (the reward rule is left out: the runs
    it is used on log no reward)."""
    line = figures.get("backtest_projected_line_error", figures.get("backtest_line_error"))
    stop = figures.get("backtest_projected_stop_error", figures.get("backtest_stop_error"))
    return (figures["checkpoints"] >= 3 and figures["drift_share"] >= 0.8 and figures["balanced_drift_share"] >= 0.8
            and all(0.75 <= figures.get(k, 1.0) <= 1.5 for k in ("pace", "whole_pace"))
            and (line is None or line < 0.8 * stop))
