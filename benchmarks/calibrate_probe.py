"""Calibrate the probe: does choosing the target on a probe of training problems help, and never hurt?

The toy corpus of ``benchmarks/calibrate_verdict.py`` (its settings, seeds 0-2, prefixes of 10%, 20% and 30% of
the RL steps). For each (run, prefix) this compares four checkpoints on the 300 held-out problems (greedy,
per problem):

- the last observed checkpoint (what stopping gives);
- today's fixed target: RELEX to the run's last step;
- the auto horizon with the probe: candidates on a grid from just past the last observed step to the horizon
  limit, the one the probe chooses (:func:`relex.probe.search.search`), or the last observed one when none
  beats it;
- the oracle: the best of the same candidates (and the fixed target) on the held-out set, which the probe
  never sees.

Measuring stores, per (run, prefix), every candidate of a fine grid (each √2 times the previous step) with its
per-problem held-out correctness and its per-problem probe scores on a large probe set (both modes), so the
search itself is replayed offline (``--report``) for any probe setting, the grid's factor included (a grid of
factor 2 is every other candidate of the stored one): the settings are tuned on seeds 0-1 and reported on
seed 2, held out.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/calibrate_probe.py --out probe-calibration.jsonl \\
        [--only demo,noisy,...] [--seeds 0,1,2] [--threads 1]
    python benchmarks/calibrate_probe.py --out probe-calibration.jsonl --report

Runs already in ``--out`` are skipped, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibrate_verdict import ORDER, PREFIXES, per_problem_greedy, settings, trained_run  # noqa: E402

from relex.probe.search import GRID_FACTOR, target_grid  # noqa: E402
from relex.probe.verify import default_limit  # noqa: E402

PROBE_PROBLEMS = 128  # scored for every candidate when measuring; a setting's search uses a prefix of them
MEASURED_FACTOR = math.sqrt(2.0)  # the stored grid; a setting's grid (factor √2 or 2) is a subset of it
SIGNIFICANT = 0.95  # the held-out comparisons (as relex eval reports them)
DEFAULT = {"mode": "reward", "limit": 64, "confidence": 0.95, "looks": 3, "factor": GRID_FACTOR}
GRID = {"mode": ("reward", "logprob"), "limit": (32, 64, 128), "confidence": (0.8, 0.9, 0.95), "looks": (1, 3),
        "factor": (MEASURED_FACTOR, 2.0)}


def measure_run(name: str, kwargs: dict, seed: int, threads: int, bases: dict, out: Path, log=print) -> None:
    from relex.errors import RelexInputError
    from relex.probe.problems import load_probe
    from relex.probe.scoring import ProbeModel
    from relex.run import open_run
    from relex.sinks import CheckpointSink, checkpoint_layout, target_folders

    probe = load_probe("toy-train", PROBE_PROBLEMS)
    with trained_run(name, kwargs, seed, threads, bases) as (config, work, summary, train_seconds):
        seed = config.seed
        final = [c["step"] for c in summary["checkpoints"]][-1]
        for fraction in PREFIXES:
            t1 = time.perf_counter()
            max_step = int(round(fraction * config.steps))
            try:
                with open_run(work / "run", max_step=max_step, device="cpu") as run:
                    steps = list(run.steps)
                    last = steps[-1]
                    grid = target_grid(last, default_limit(steps), MEASURED_FACTOR)
                    targets = sorted(set(grid) | {final})
                    folders = target_folders(work / f"candidates-{max_step}", targets)
                    sink = CheckpointSink(folders, checkpoint_layout(run.readers, "auto"),
                                          np.array(targets, dtype=np.float64), run.device, "5GB")
                    try:
                        result = run.execute(sink)
                    finally:
                        sink.close()
                    for t in targets:
                        sink.save(t, {"probe_candidate": True}, run.readers.config_folders())
            except RelexInputError as error:  # too few checkpoints in a short prefix
                log(f"  {name} s{seed} {int(fraction * 100)}%: skipped ({error})", flush=True)
                continue
            last_folder = work / "run" / f"checkpoint-{last}"
            started = time.perf_counter()
            heldout = {last: per_problem_greedy(last_folder)}
            heldout_seconds = time.perf_counter() - started
            heldout.update({t: per_problem_greedy(folders[t]) for t in targets})
            probes, tokens = {}, {}
            for mode in ("reward", "logprob"):
                scores = {}
                for step, folder in [(last, last_folder)] + [(t, folders[t]) for t in grid]:
                    model = ProbeModel(folder, probe)
                    scores[step] = model.score(range(len(probe)), mode).tolist()
                    tokens[mode] = model.tokens / len(probe)
                probes[mode] = scores
            verdict = result.verdict_at(final)
            row = {"setting": name, "seed": seed, "threads": threads, "prefix": fraction, "last": last,
                   "final": final, "steps": steps, "grid": grid,
                   "heldout": {str(t): v.tolist() for t, v in heldout.items()},
                   "probe": {mode: {str(t): v for t, v in s.items()} for mode, s in probes.items()},
                   "probe_tokens_per_problem": tokens,
                   "heldout_tokens": int(sum(7 + k for k in range(4)) * 300),  # 300 problems, 4 greedy steps each
                   "heldout_seconds": round(heldout_seconds, 3),
                   "weights_outcome": verdict.outcome.value,
                   "train_seconds": round(train_seconds, 1), "seconds": round(time.perf_counter() - t1, 1)}
            with out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            best = max(targets, key=lambda t: heldout[t].mean())
            log(f"  {name} s{seed} {int(fraction * 100)}%: last {heldout[last].mean():.3f}, fixed "
                f"{heldout[final].mean():.3f}, best {best} {heldout[best].mean():.3f}", flush=True)
            shutil.rmtree(work / f"candidates-{max_step}", ignore_errors=True)


# -- replaying the search offline ----------------------------------------------------------------------------


class Recorded:
    """A checkpoint's stored per-problem probe scores, scored as a ProbeModel would score them."""

    def __init__(self, scores, tokens_per_problem: float, step: int = 0):
        self.scores, self.per_problem, self.step = np.asarray(scores, dtype=np.float64), tokens_per_problem, step
        self.tokens = 0

    def score(self, indices, mode):
        indices = list(indices)
        self.tokens += int(round(self.per_problem * len(indices)))
        return self.scores[indices]


def setting_grid(row: dict, factor: float) -> list[int]:
    """The candidates a search of grid ``factor`` scores on a stored row (a subset of the stored grid)."""
    grid = target_grid(row["last"], default_limit(row["steps"]), factor)
    missing = sorted(set(grid) - set(row["grid"]))
    if missing:
        raise SystemExit(f"{row['setting']} s{row['seed']}: the grid of factor {factor:g} needs candidates "
                         f"{missing}, which were not measured")
    return grid


def choose(row: dict, setting: dict) -> tuple[int | None, dict]:
    """The probe's choice on a stored row under ``setting`` (mode, limit, confidence, looks, factor), and its
    cost."""
    from relex.probe.problems import ProbeSet
    from relex.probe.search import search

    mode = setting["mode"]
    stored, per = row["probe"][mode], row["probe_tokens_per_problem"][mode]
    n = min(setting["limit"], len(stored[str(row["last"])]))
    probe = ProbeSet("toy-train", "toy", tuple(range(n)), 4)  # only its length matters to the search
    reference = Recorded(stored[str(row["last"])][:n], per, row["last"])
    grid = setting_grid(row, setting["factor"])
    curve = search(reference, {t: (lambda t=t: Recorded(stored[str(t)][:n], per, t)) for t in grid}, probe,
                   mode=mode, confidence=setting["confidence"], looks=setting["looks"])
    return curve.chosen, {"tokens": curve.tokens, "seconds": curve.seconds}


_INTERVALS: dict = {}  # (setting, seed, prefix, step) -> the held-out paired interval against the last checkpoint


def interval(row: dict, step: int) -> dict:
    """The paired-bootstrap interval of checkpoint ``step`` minus the last observed one, on the held-out set."""
    from relex.evaluate.stats import paired_bootstrap

    key = (row["setting"], row["seed"], row["prefix"], step)
    if key not in _INTERVALS:
        _INTERVALS[key] = paired_bootstrap(row["heldout"][str(row["last"])], row["heldout"][str(step)],
                                           confidence=SIGNIFICANT)
    return _INTERVALS[key]


def evaluate(rows: list[dict], setting: dict) -> dict:
    """Hurts, the share of the oracle's gain, and the cost, for the fixed target and the probe's choice."""
    out = {"rows": len(rows), "fixed_hurt": 0, "auto_hurt": 0, "helping_rows": 0, "fixed_gain": 0.0,
           "auto_gain": 0.0, "oracle_gain": 0.0, "auto_jumped": 0, "tokens": 0, "heldout_tokens": 0,
           "seconds": 0.0, "hurt_rows": []}
    for row in rows:
        heldout = {int(t): np.asarray(v) for t, v in row["heldout"].items()}
        last = heldout[row["last"]]
        chosen, cost = choose(row, setting)
        picked = heldout[chosen] if chosen is not None else last
        fixed = heldout[row["final"]]
        oracle_step = max(heldout, key=lambda t: heldout[t].mean())
        oracle = heldout[oracle_step]
        out["tokens"] += cost["tokens"]
        out["heldout_tokens"] += row["heldout_tokens"]
        # the probe's seconds, estimated at the held-out scoring's measured seconds per token (the same model
        # and the same greedy generation; the replay itself runs no model)
        out["seconds"] += cost["tokens"] * row["heldout_seconds"] / row["heldout_tokens"]
        out["auto_jumped"] += chosen is not None
        for label, step in (("fixed", row["final"]), ("auto", chosen)):
            if step is not None and step != row["last"] and interval(row, step)["ci_high"] < 0:
                out[f"{label}_hurt"] += 1
                if label == "auto":
                    out["hurt_rows"].append(f"{row['setting']} s{row['seed']} {int(row['prefix'] * 100)}%")
        if interval(row, oracle_step)["ci_low"] > 0:  # some target helps
            out["helping_rows"] += 1
            out["oracle_gain"] += float(oracle.mean() - last.mean())
            out["fixed_gain"] += float(fixed.mean() - last.mean())
            out["auto_gain"] += float(picked.mean() - last.mean())
    gain = out["oracle_gain"] or float("nan")
    out["fixed_share"], out["auto_share"] = out["fixed_gain"] / gain, out["auto_gain"] / gain
    out["tokens_per_row"] = out["tokens"] / max(1, len(rows))
    out["seconds_per_row"] = out["seconds"] / max(1, len(rows))
    out["heldout_tokens_per_checkpoint"] = out["heldout_tokens"] / max(1, len(rows))
    return out


def tune(rows: list[dict]) -> tuple[dict, list[tuple[dict, dict]]]:
    """The setting with no significant hurt and the largest share of the oracle's gain (cheapest on a tie),
    among those whose probe costs fewer tokens per row than scoring one checkpoint on the held-out set."""
    results = []
    for values in itertools.product(*GRID.values()):
        setting = dict(zip(GRID, values))
        results.append((setting, evaluate(rows, setting)))
    cheap = [(s, r) for s, r in results if r["tokens_per_row"] < r["heldout_tokens_per_checkpoint"]] or results
    safe = [(s, r) for s, r in cheap if r["auto_hurt"] == 0] or cheap
    best = max(safe, key=lambda sr: (round(sr[1]["auto_share"], 3), -sr[1]["tokens"]))
    return best[0], results


def describe(setting: dict) -> str:
    factor = "√2" if abs(setting["factor"] - MEASURED_FACTOR) < 1e-9 else f"{setting['factor']:g}"
    return (f"{setting['mode']}, {setting['limit']} problems, confidence {setting['confidence']}, "
            f"{setting['looks']} look(s), grid ×{factor}")


def report(rows: list[dict]) -> str:
    tuned_rows = [r for r in rows if r["seed"] in (0, 1)]
    held_rows = [r for r in rows if r["seed"] == 2]
    setting, _ = tune(tuned_rows) if tuned_rows else (DEFAULT, [])
    previous = {**DEFAULT, "factor": MEASURED_FACTOR}  # the default's search on a grid of √2 steps
    lines = [f"setting tuned on seeds 0-1 ({len(tuned_rows)} rows): {describe(setting)}",
             f"relex's default: {describe(DEFAULT)}",
             f"default √2: the default on the √2 grid ({describe(previous)})", "",
             "| probe setting | rows | n | helping | fixed: hurt | fixed: share of oracle gain | auto: hurt | "
             "auto: share | jumped | probe tokens / row | probe s / row (est.) | held-out tokens / checkpoint |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    hurts = []
    for name, chosen_setting in (("tuned", setting), ("default", DEFAULT), ("default √2", previous)):
        for label, chosen in (("seeds 0-1 (tuned on)", tuned_rows), ("seed 2 (held out)", held_rows), ("all", rows)):
            if not chosen:
                continue
            e = evaluate(chosen, chosen_setting)
            lines.append(f"| {name} | {label} | {e['rows']} | {e['helping_rows']} | {e['fixed_hurt']} | "
                         f"{e['fixed_share']:.2f} | {e['auto_hurt']} | {e['auto_share']:.2f} | {e['auto_jumped']} | "
                         f"{e['tokens_per_row']:,.0f} | {e['seconds_per_row']:.3f} | "
                         f"{e['heldout_tokens_per_checkpoint']:,.0f} |")
            if label == "all" and e["hurt_rows"]:
                hurts.append(f"{name}: the probe's choice significantly worse than the last checkpoint on "
                             + ", ".join(e["hurt_rows"]))
    return "\n".join(lines + [""] + (hurts or ["no row where the probe's choice is significantly worse"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", help="comma-separated settings (default: the corpus of calibrate_verdict.py)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="tune on seeds 0-1, report seed 2, from --out")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()] \
        if args.out.exists() else []
    if args.report:
        if not rows:
            print(f"calibrate_probe.py: error: {args.out}: no rows to report (run without --report first)",
                  file=sys.stderr)
            return 2
        print(report(rows))
        return 0
    known = settings()
    names = args.only.split(",") if args.only else ORDER
    done = {(r["setting"], r["seed"]) for r in rows}
    bases: dict = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in names:
            if (name, seed + int(known[name].get("seed", 0))) in done:
                continue
            print(f"{name} seed {seed}", flush=True)
            measure_run(name, known[name], seed, args.threads, bases, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
