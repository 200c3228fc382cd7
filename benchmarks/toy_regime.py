"""Which toy RLVR settings are drift-dominated, and how far does extrapolation get there?

For each setting: warm up a base (cached across settings that share it), run RL keeping every checkpoint in
memory, then compute from the whole-model Gram matrix G = X X^T of the deltas x_i = w_{t_i} - w_0:
- alpha: slope of log ||x_i|| against log t_i (pure drift 1, random walk 0.5);
- drift ratio ||x_T||^2 / sum ||x_i - x_{i-1}||^2 with x_0 = 0 (pure drift T, random walk ~1);
- cos(first delta, last delta), and cos(rank-1 direction of the 20% prefix, rank-1 direction of the run);
and extrapolate from the first 10% / 20% of the checkpoints to the last step with RELEX (per-tensor rank-1,
OLS on real steps, w* = w0 + c(t*) v), element-wise linear (w0 + t*/t_b (w_b - w0)) and the last observed
checkpoint, reporting the fraction of the real run's held-out accuracy gain over the base each recovers.
The same is done for a nearer target (the checkpoint at 50% of the run, from the 20% prefix).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/toy_regime.py --out toy_regime.json [--only name1,name2]

Prints one line per setting as it finishes and a table at the end; the json is rewritten after each
setting, so an interrupted sweep keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from relex.toy import ToyConfig, train_run, warmup_model
from relex.toy.evaluate import answer_probabilities, greedy_accuracy

# name, description, config -------------------------------------------------------------------------------
SHARP = dict(label_smoothing=0.5, distractor=0.0, warmup_steps=450)
MODE = dict(label_smoothing=0.0, distractor=0.6, warmup_steps=450)
PLAIN = dict(label_smoothing=0.0, distractor=0.0, warmup_steps=170)
RL = dict(objective="grpo", steps=100, prompts_per_step=128, samples_per_prompt=8, optimizer="sgd", lr=0.01,
          checkpoint_every=2)

SETTINGS: list[tuple[str, str, dict]] = [
    ("mode-sgd-lr003", "mode base (60% carry-less answers), GRPO 128x8, SGD 0.003",
     {**MODE, **RL, "lr": 0.003}),
    ("mode-sgd-lr001", "mode base, GRPO 128x8, SGD 0.001",
     {**MODE, **RL, "lr": 0.001}),
    ("mode-sgd-lr01", "mode base, GRPO 128x8, SGD 0.01",
     {**MODE, **RL, "lr": 0.01}),
    ("sharp-sgd-lr01", "sharpening base (LS 0.5), GRPO 128x8, SGD 0.01",
     {**SHARP, **RL, "lr": 0.01}),
    ("noisy-adam", "plain base (early-stopped warm-up), GRPO 128x8, Adam 1e-4 (the first study)",
     {**PLAIN, **RL, "optimizer": "adam", "lr": 1e-4}),
    ("mode-adam", "mode base, GRPO 128x8, Adam 1e-4",
     {**MODE, **RL, "optimizer": "adam", "lr": 1e-4}),
    ("mode-exact-lr003", "mode base, exact expected-reward gradient, 128 prompts, SGD 0.003",
     {**MODE, **RL, "objective": "exact_pg", "lr": 0.003}),
    ("mode-sgd-b32", "mode base, GRPO 32x8, SGD 0.003",
     {**MODE, **RL, "prompts_per_step": 32, "lr": 0.003}),
    ("mode-sgd-kl", "mode base, GRPO 128x8, SGD 0.003, KL 0.05",
     {**MODE, **RL, "lr": 0.003, "kl_coef": 0.05}),
    ("mode-sgd-h64", "mode base, hidden 64, GRPO 128x8, SGD 0.003",
     {**MODE, **RL, "hidden": 64, "lr": 0.003}),
    ("mode-momentum", "mode base, GRPO 128x8, SGD momentum 0.9, lr 0.0003",
     {**MODE, **RL, "optimizer": "momentum", "lr": 0.0003}),
    ("modeLS-sgd-lr003", "mode base with label smoothing 0.3, GRPO 128x8, SGD 0.003",
     {**MODE, **RL, "label_smoothing": 0.3, "lr": 0.003}),
    # second round, around the setting that worked (SGD 0.001)
    ("mode-sgd-lr001-ck5", "as mode-sgd-lr001, checkpoints every 5 steps (T=20)",
     {**MODE, **RL, "lr": 0.001, "checkpoint_every": 5}),
    ("mode-sgd-lr001-s1", "as mode-sgd-lr001, seed 1 (base and RL)",
     {**MODE, **RL, "lr": 0.001, "seed": 1}),
    ("mode-sgd-lr001-s2", "as mode-sgd-lr001, seed 2 (base and RL)",
     {**MODE, **RL, "lr": 0.001, "seed": 2}),
    ("mode-sgd-lr002", "mode base, GRPO 128x8, SGD 0.002",
     {**MODE, **RL, "lr": 0.002}),
    ("mode-sgd-lr001-b256", "mode base, GRPO 256x8, SGD 0.001",
     {**MODE, **RL, "lr": 0.001, "prompts_per_step": 256}),
    ("mode-sgd-lr001-200", "mode base, GRPO 128x8, SGD 0.001, 200 steps (checkpoints every 4)",
     {**MODE, **RL, "lr": 0.001, "steps": 200, "checkpoint_every": 4}),
    ("mode-sgd-lr001-b64", "mode base, GRPO 64x8, SGD 0.001",
     {**MODE, **RL, "lr": 0.001, "prompts_per_step": 64}),
    ("mode-exact-lr001", "mode base, exact expected-reward gradient, 128 prompts, SGD 0.001",
     {**MODE, **RL, "objective": "exact_pg", "lr": 0.001}),
]


# diagnostics from a Gram matrix ---------------------------------------------------------------------------
def gram_diagnostics(G: np.ndarray, steps: np.ndarray) -> dict:
    """alpha, drift ratio (and its max T), cos(first, last) from G over deltas at ``steps`` (base excluded)."""
    G = np.asarray(G, dtype=np.float64)
    t = np.asarray(steps, dtype=np.float64)
    T = len(t)
    norms = np.sqrt(np.clip(np.diag(G), 1e-300, None))
    alpha = float(np.polyfit(np.log(t), np.log(norms), 1)[0])
    inc = G[0, 0] + sum(G[i, i] + G[i - 1, i - 1] - 2 * G[i, i - 1] for i in range(1, T))
    drift = float(G[-1, -1] / inc)
    cos = float(G[0, -1] / (norms[0] * norms[-1]))
    lam = np.linalg.eigvalsh(G)
    return {"alpha": alpha, "drift_ratio": drift, "drift_max": T, "cos_first_last": cos,
            "ev_rank1": float(lam[-1] / lam.sum())}


def top_direction(G: np.ndarray, idx) -> tuple[np.ndarray, float]:
    lam, U = np.linalg.eigh(G[np.ix_(idx, idx)])
    u = U[:, -1]
    return u, math.sqrt(max(lam[-1], 0.0))


def prefix_direction_cos(G: np.ndarray, prefix) -> float:
    """cos between the rank-1 direction of the prefix deltas and that of all deltas (from G alone)."""
    full = list(range(G.shape[0]))
    up, sp = top_direction(G, prefix)
    uf, sf = top_direction(G, full)
    return float(abs(up @ G[np.ix_(prefix, full)] @ uf) / (sp * sf))


# extrapolation -------------------------------------------------------------------------------------------
def relex_rank1(deltas: np.ndarray, steps: np.ndarray, target: float) -> np.ndarray:
    """RELEX rank-1 for one tensor: deltas [T, d] at ``steps`` -> predicted delta at ``target``."""
    G = deltas @ deltas.T
    lam, U = np.linalg.eigh(G)
    sigma = math.sqrt(max(lam[-1], 0.0))
    if sigma <= 1e-12:
        return np.zeros(deltas.shape[1], dtype=deltas.dtype)
    u = U[:, -1]
    v = deltas.T @ u / sigma
    c = sigma * u
    slope, intercept = np.polyfit(steps.astype(np.float64), c, 1)
    return (slope * target + intercept) * v


class Trajectory:
    """Every checkpoint's parameters (float64 numpy), keyed by step."""

    def __init__(self):
        self.steps: list[int] = []
        self.params: list[dict[str, np.ndarray]] = []

    def add(self, step: int, model):
        self.steps.append(step)
        self.params.append({n: p.detach().double().numpy().copy() for n, p in model.named_parameters()})

    def deltas(self, name: str, idx) -> np.ndarray:
        base = self.params[0][name]
        return np.stack([(self.params[i][name] - base).ravel() for i in idx])

    def gram(self) -> np.ndarray:
        idx = list(range(1, len(self.steps)))
        G = np.zeros((len(idx), len(idx)))
        for name in self.params[0]:
            X = self.deltas(name, idx)
            G += X @ X.T
        return G


def evaluate_params(template, params: dict[str, np.ndarray]) -> dict:
    model = copy.deepcopy(template)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.from_numpy(params[n]).to(p.dtype))
    p = answer_probabilities(model)
    return {"greedy": greedy_accuracy(model), "expected_t1": p.mean().item()}


def predictions(traj: Trajectory, prefix_end: int, target_index: int) -> dict[str, dict[str, np.ndarray]]:
    """Predicted parameters at checkpoint ``target_index`` from checkpoints 1..prefix_end (indices)."""
    idx = list(range(1, prefix_end + 1))
    steps = np.array([traj.steps[i] for i in idx], dtype=np.float64)
    t_star, t_b = traj.steps[target_index], traj.steps[prefix_end]
    base, last = traj.params[0], traj.params[prefix_end]
    out = {"relex": {}, "elementwise": {}, "last": dict(last)}
    for name, w0 in base.items():
        X = traj.deltas(name, idx)
        out["relex"][name] = w0 + relex_rank1(X, steps, t_star).reshape(w0.shape)
        out["elementwise"][name] = w0 + (t_star / t_b) * (last[name] - w0)
    return out


def weight_error(traj: Trajectory, pred: dict, target_index: int) -> float:
    num = den = 0.0
    for name, w0 in traj.params[0].items():
        true = traj.params[target_index][name]
        num += float(((pred[name] - true) ** 2).sum())
        den += float(((true - w0) ** 2).sum())
    return math.sqrt(num / den)


def run_setting(name: str, desc: str, overrides: dict, bases: dict, log=print) -> dict:
    config = ToyConfig(name=name, num_threads=1, **overrides)
    key = config.warmup_key()
    t0 = time.perf_counter()
    if key not in bases:
        bases[key] = (warmup_model(config), time.perf_counter() - t0)
    base, warm_seconds = bases[key]
    traj = Trajectory()
    summary = train_run(None, config, base=base, on_checkpoint=traj.add)
    acc0, acc1 = summary["base"], summary["final"]
    G = traj.gram()
    steps = np.array(traj.steps[1:], dtype=np.float64)
    row = {"name": name, "description": desc, "config": config.to_dict(),
           "base_greedy": acc0["greedy"], "final_greedy": acc1["greedy"],
           "base_t1": acc0["expected_t1"], "final_t1": acc1["expected_t1"],
           "base_pass8": acc0["pass8_t1"], "final_pass8": acc1["pass8_t1"],
           "warmup_seconds": round(warm_seconds, 1), "rl_seconds": summary["rl_seconds"],
           "seconds_per_step": summary["seconds_per_step"],
           "reward_first": summary["history"][0]["reward"], "reward_last": summary["history"][-1]["reward"]}
    row.update(gram_diagnostics(G, steps))
    try:  # the library's diagnostics, with random-walk nulls and a verdict
        from relex.analysis.drift import diagnose
        from relex.analysis.verdict import drift_class
        d = diagnose(G, steps)
        row["verdict"], row["drift_share"] = drift_class(d)[0], d.drift_share  # the class from the share alone
        row["null"] = {k: getattr(d.null, k) for k in ("alpha", "drift_ratio", "cos_first_last", "prefix_cos")}
        row["scores"] = d.scores
    except ImportError:
        pass
    T = len(steps)
    n10, n20, n50 = max(2, round(0.1 * T)), max(2, round(0.2 * T)), round(0.5 * T)
    row["prefix_dir_cos20"] = prefix_direction_cos(G, list(range(n20)))
    # the real checkpoints, evaluated the same way as the predictions
    real = {i: evaluate_params(base, traj.params[i]) for i in (n10, n20, n50, T)}
    gain = {m: real[T][m] - acc0[m if m == "greedy" else "expected_t1"] for m in ("greedy", "expected_t1")}
    gain50 = {m: real[n50][m] - acc0[m if m == "greedy" else "expected_t1"] for m in ("greedy", "expected_t1")}
    extrap = {}
    for label, pe, ti, g in (("10->100", n10, T, gain), ("20->100", n20, T, gain), ("20->50", n20, n50, gain50)):
        for method, params in predictions(traj, pe, ti).items():
            acc = evaluate_params(base, params)
            extrap[f"{method}_{label}"] = {
                "greedy": acc["greedy"], "expected_t1": acc["expected_t1"],
                "frac_greedy": (acc["greedy"] - acc0["greedy"]) / g["greedy"] if abs(g["greedy"]) > 1e-9 else None,
                "frac_t1": ((acc["expected_t1"] - acc0["expected_t1"]) / g["expected_t1"]
                            if abs(g["expected_t1"]) > 1e-9 else None),
                "weight_error": weight_error(traj, params, ti)}
    row["real_checkpoints"] = {str(traj.steps[i]): real[i] for i in real}
    row["extrapolation"] = extrap
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def fmt(x, nd=2):
    return "  -  " if x is None else f"{x:.{nd}f}"


def table(rows: list[dict]) -> str:
    head = ("| setting | greedy base→final | T=1 base→final | α | drift (max) | cos first/last | prefix dir cos | verdict | "
            "RELEX 10% / 20% (greedy frac) | elem 20% | last 20% | RELEX 20%→50% | RELEX 20% (T=1 frac) | "
            "w-err RELEX 20% | s/step | s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        e = r["extrapolation"]
        lines.append(
            f"| {r['name']} | {r['base_greedy']:.3f}→{r['final_greedy']:.3f} | {r['base_t1']:.3f}→{r['final_t1']:.3f} | "
            f"{r['alpha']:.2f} | {r['drift_ratio']:.1f} ({r['drift_max']}) | {r['cos_first_last']:.2f} | "
            f"{r['prefix_dir_cos20']:.2f} | {r.get('verdict', '-').split('-')[0]} | {fmt(e['relex_10->100']['frac_greedy'])} / {fmt(e['relex_20->100']['frac_greedy'])} | "
            f"{fmt(e['elementwise_20->100']['frac_greedy'])} | {fmt(e['last_20->100']['frac_greedy'])} | "
            f"{fmt(e['relex_20->50']['frac_greedy'])} | {fmt(e['relex_20->100']['frac_t1'])} | "
            f"{e['relex_20->100']['weight_error']:.2f} | {r['seconds_per_step']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="toy_regime.json")
    parser.add_argument("--only", default="", help="comma-separated setting names")
    parser.add_argument("--append", action="store_true", help="keep rows already in --out")
    parser.add_argument("--render", action="store_true", help="only print the table of the rows in --out")
    args = parser.parse_args(argv)
    if args.render:
        print(table(json.loads(Path(args.out).read_text())))
        return 0
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    wanted = [s for s in args.only.split(",") if s]
    out = Path(args.out)
    rows = json.loads(out.read_text()) if args.append and out.exists() else []
    done = {r["name"] for r in rows}
    bases: dict = {}
    for name, desc, overrides in SETTINGS:
        if (wanted and name not in wanted) or name in done:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {desc}", flush=True)
        row = run_setting(name, desc, overrides, bases)
        rows.append(row)
        out.write_text(json.dumps(rows, indent=1) + "\n")
        print(table([row]).splitlines()[-1], flush=True)
    print(table(rows))


if __name__ == "__main__":
    sys.exit(main())
