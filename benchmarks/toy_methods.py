"""Held-out accuracy of every mode × predictor on the built-in toy RLVR run.

Trains (or reuses) the toy run of ``relex demo`` (``ToyConfig.demo()``: drift-dominated, SGD, 100 GRPO
steps, a checkpoint every 5), then, for each observed prefix (20% and 50% of the run), extrapolates to the
final step with every mode and predictor and scores the result on the held-out problems:

* ``expected`` — exact expected accuracy at temperature 1 (the probability of the right answer, averaged
  over problems: no sampling noise), ``greedy`` — greedy accuracy;
* ``gain`` — the share of the real run's expected-accuracy gain over the base that the checkpoint recovers
  (1 = as good as the real final checkpoint, 0 = the base, negative = worse than the base);
* ``w-err`` — weight error ‖ŵ − w_final‖ / ‖w_final − w_0‖ against the real final checkpoint.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/toy_methods.py --out toy-methods [--fractions 0.2,0.5]

Prints a markdown table (and writes ``toy_methods.json`` beside the run). A few minutes on 2 CPU cores,
most of it training the run (cached in ``OUT/run``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

PREDICTORS = ["linear", "poly2", "loglinear", "powerlaw", "saturating", "mlp", "anchored", "anchored-saturating",
              "auto"]
MODES = [("relex", PREDICTORS), ("matrix-rank1", PREDICTORS), ("elementwise", ["—"]),
         ("last", ["—"])]  # last = the last observed checkpoint of the prefix


def train_or_reuse(run_dir: Path):
    from relex.toy import ToyConfig, train_run

    config = ToyConfig.demo()
    record = run_dir / "toy_run.json"
    if record.is_file() and json.loads(record.read_text()).get("config") == config.to_dict() \
            and (run_dir / f"checkpoint-{config.steps}").is_dir():
        print(f"reusing the toy run in {run_dir}", flush=True)
    else:
        print(f"training the toy run into {run_dir} (a few minutes)", flush=True)
        train_run(run_dir, config, evaluate=False)
    return config


def score(folder: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from relex.toy import expected_accuracy, greedy_accuracy

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return {"expected": expected_accuracy(model), "greedy": greedy_accuracy(model)}


def weight_error(folder: Path, final: dict, base: dict) -> float:
    from relex.testing import load_state

    out = load_state(folder)
    num = sum(float((out[n].double() - final[n].double()).square().sum()) for n in final)
    den = sum(float((final[n].double() - base[n].double()).square().sum()) for n in final)
    return math.sqrt(num / den)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("toy-methods"))
    parser.add_argument("--fractions", default="0.2,0.5")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    import relex
    from relex.demo import prefix_step
    from relex.testing import load_state

    run_dir = args.out / "run"
    config = train_or_reuse(run_dir)
    final_step = config.steps
    base_state = load_state(run_dir / "checkpoint-0")
    final_state = load_state(run_dir / f"checkpoint-{final_step}")
    base_scores, final_scores = score(run_dir / "checkpoint-0"), score(run_dir / f"checkpoint-{final_step}")
    gain = final_scores["expected"] - base_scores["expected"]
    fractions = [float(f) for f in args.fractions.split(",")]
    rows: dict[tuple[str, str], dict] = {}
    choices: dict[str, dict] = {}
    for fraction in fractions:
        last = prefix_step(fraction, config.steps, config.checkpoint_every)
        for mode, predictors in MODES:
            for predictor in predictors:
                label = f"{int(round(fraction * 100))}%"
                out = args.out / "extrapolated" / f"{label[:-1]}pct-{mode}-{predictor.replace('—', 'default')}"
                options = {} if predictor == "—" else {"regressor": predictor}
                started = time.perf_counter()
                try:
                    result = relex.extrapolate(run_dir, out, target_step=final_step, max_step=last, method=mode,
                                               overwrite=True, device="cpu", **options)
                except relex.RelexInputError as exc:
                    rows.setdefault((mode, predictor), {})[label] = {"error": str(exc)}
                    print(f"{label} {mode:12s} {predictor:20s} skipped: {exc}", flush=True)
                    continue
                seconds = time.perf_counter() - started
                scores = score(out)
                figures = {**scores, "gain": (scores["expected"] - base_scores["expected"]) / gain,
                           "weight_error": weight_error(out, final_state, base_state), "seconds": seconds}
                if result.selection:
                    decisions = result.selection["decisions"]["run"]
                    figures["chosen"] = decisions["regressor"]
                    choices[f"{label} {mode}"] = {k: v["error"] for k, v in decisions["errors"].items()}
                rows.setdefault((mode, predictor), {})[label] = figures
                print(f"{label} {mode:12s} {predictor:20s} expected {scores['expected']:.3f} "
                      f"gain {figures['gain']:+.2f} w-err {figures['weight_error']:.3f} "
                      f"{figures.get('chosen', '')} ({seconds:.1f} s)", flush=True)

    labels = [f"{int(round(f * 100))}%" for f in fractions]
    lines = [f"Toy run `ToyConfig.demo()` ({config.steps} GRPO steps, SGD lr {config.lr}, a checkpoint every "
             f"{config.checkpoint_every}); target: step {final_step}. Base expected accuracy "
             f"{base_scores['expected']:.3f} (greedy {base_scores['greedy']:.3f}), real final "
             f"{final_scores['expected']:.3f} (greedy {final_scores['greedy']:.3f}).", ""]
    header = "| mode | predictor | " + " | ".join(
        f"{lab} expected | {lab} gain | {lab} greedy | {lab} w-err" for lab in labels) + " |"
    lines += [header, "|" + "---|" * (2 + 4 * len(labels))]
    for (mode, predictor), by_fraction in rows.items():
        cells = []
        for lab in labels:
            f = by_fraction.get(lab, {})
            if "expected" not in f:
                cells += ["n/a"] * 4
                continue
            chosen = f" ({f['chosen']})" if "chosen" in f else ""
            cells += [f"{f['expected']:.3f}", f"{f['gain']:+.2f}{chosen}", f"{f['greedy']:.3f}",
                      f"{f['weight_error']:.3f}"]
        lines.append(f"| {mode} | {predictor} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print("\n" + table)
    (args.out / "toy_methods.json").write_text(json.dumps(
        {"config": config.to_dict(), "base": base_scores, "final": final_scores,
         "rows": [{"mode": m, "predictor": p, **v} for (m, p), v in rows.items()],
         "auto_backtests": choices, "table": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
