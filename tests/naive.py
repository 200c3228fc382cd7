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


def naive_toy_greedy(folder) -> list[bool]:
    """Held-out verdicts of the toy checkpoint in ``folder`` by a route independent of ``relex.toy.evaluate``
    and of lm-eval: the checkpoint's own tokenizer, ``transformers``' ``generate`` (greedy, KV cache), and
    exact match of the generated ids with the answer's digits followed by ``<eos>``. One flag per problem of
    the held-out split, in its order."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from relex.toy.task import heldout_problems

    problems = heldout_problems()
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
