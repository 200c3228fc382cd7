"""The built-in demonstration: a toy RLVR run on CPU, extrapolated from its first 10% and 20%.

``run_demo`` trains (or reuses) the toy run of :mod:`relex.toy`, calls :func:`relex.extrapolate` on the
first 10% and 20% of its checkpoints to predict the final step, and again with the target chosen by a probe of
the toy's training problems (``--target-step auto --probe toy-train``), scores the base, the last observed, the
extrapolated and the real final checkpoints on the held-out split, and writes ``demo.json`` and ``demo.png``.
The verdict and the probe's choice printed beside the scores are the ones relex gives *before* any evaluation.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from relex.api import extrapolate
from relex.errors import RelexInputError
from relex.jsonable import write_json
from relex.probe.problems import TOY_PROBE
from relex.progress import Report

FRACTIONS = (0.1, 0.2)
PROBE_PROBLEMS = 64  # training problems the auto horizon is chosen on


def _ci_config():
    from relex.toy import ToyConfig

    # A checkpoint every step, so that 10% of a short run still holds two checkpoints.
    return ToyConfig.ci(name="ci", steps=20, checkpoint_every=1)


def _preset(name: str):
    def make():
        from relex.toy import ToyConfig

        return getattr(ToyConfig, name)()

    return make


DEMO_PRESETS = {"demo": _preset("demo"), "noisy": _preset("noisy"), "ci": _ci_config}


@dataclass
class DemoRow:
    label: str
    step: int
    greedy: float
    sampled: float
    expected: float
    gain_fraction: float | None = None


@dataclass
class DemoResult:
    out_dir: Path
    config: dict
    rows: list[DemoRow]
    curve: list[dict]  # accuracy of every real checkpoint
    verdicts: dict[str, dict] = field(default_factory=dict)  # prefix label -> the verdict (Verdict.to_dict())
    seconds: dict = field(default_factory=dict)
    probes: dict[str, dict] = field(default_factory=dict)  # prefix label -> the probe's curve (auto horizon)

    def to_dict(self) -> dict:
        return {
            "out_dir": str(self.out_dir),
            "config": self.config,
            "rows": [r.__dict__ for r in self.rows],
            "curve": self.curve,
            "verdicts": self.verdicts,
            "probes": self.probes,
            "seconds": self.seconds,
        }


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def score_checkpoint(folder: Path, samples: int = 8) -> dict:
    """Held-out greedy accuracy, sampled accuracy (avg@``samples`` at T=1) and exact expected accuracy."""
    from relex.toy import expected_accuracy, greedy_accuracy, sampled_accuracy

    model = _load(folder)
    return {
        "greedy": greedy_accuracy(model),
        "sampled": sampled_accuracy(model, samples=samples),
        "expected": expected_accuracy(model),
    }


def _cached_run(run_dir: Path, config) -> bool:
    """True when ``run_dir`` already holds a finished run of exactly this config."""
    record = run_dir / "toy_run.json"
    if not record.is_file():
        return False
    try:
        saved = json.loads(record.read_text())["config"]
    except (OSError, ValueError, KeyError):
        return False
    return saved == config.to_dict() and (run_dir / f"checkpoint-{config.steps}").is_dir()


def prefix_step(fraction: float, steps: int, every: int) -> int:
    """The last checkpoint step within the first ``fraction`` of the run (at least two checkpoints)."""
    return max(2 * every, int(math.floor(fraction * steps / every)) * every)


def run_demo(
    out_dir: str | Path = "relex-demo",
    config=None,
    fractions: Sequence[float] = FRACTIONS,
    fresh: bool = False,
    samples: int = 8,
    progress: Report = None,
    say: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the whole demonstration into ``out_dir`` and return its figures (see the module docstring)."""
    from relex.toy import ToyConfig, train_run

    say = say or (lambda message: None)
    config = config or ToyConfig.demo()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RelexInputError("output path exists and is not a folder", out)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    seconds = {}
    started = time.perf_counter()
    if fresh or not _cached_run(run_dir, config):
        shutil.rmtree(run_dir, ignore_errors=True)
        say(f"training the toy run ({config.name}: {config.steps} RL steps) into {run_dir}")
        train_run(run_dir, config, progress=progress, evaluate=False)
    else:
        say(f"reusing the toy run in {run_dir}")
    seconds["train"] = time.perf_counter() - started
    final = config.steps

    extrapolated = {}
    verdicts = {}
    autos = {}
    probes = {}
    t0 = time.perf_counter()
    for fraction in fractions:
        last = prefix_step(fraction, config.steps, config.checkpoint_every)
        if last >= final:
            raise RelexInputError(f"the run has too few checkpoints for a {fraction:.0%} prefix "
                                  f"({config.steps} steps, one every {config.checkpoint_every})")
        label = f"{round(fraction * 100)}%"
        target_dir = out / "extrapolated" / f"relex-from-{label.rstrip('%')}pct"
        say(f"extrapolating from the first {label} (steps ≤ {last}) to step {final}")
        result = extrapolate(run_dir, target_dir, target_step=final, max_step=last, overwrite=True)
        extrapolated[label] = (last, target_dir)
        verdicts[label] = result.verdict.to_dict()
        # the auto horizon: the target a probe of training problems chooses (none better: the last observed)
        auto_dir = out / "extrapolated" / f"auto-from-{label.rstrip('%')}pct"
        shutil.rmtree(auto_dir, ignore_errors=True)
        say(f"choosing the target from the first {label} on a probe of {PROBE_PROBLEMS} training problems")
        auto = extrapolate(run_dir, auto_dir, target_step="auto", probe=TOY_PROBE, probe_limit=PROBE_PROBLEMS,
                           max_step=last, overwrite=True)
        autos[label] = (auto.probe.chosen, auto_dir if auto.written else None)
        probes[label] = auto.probe.curve.to_dict()
    seconds["extrapolate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say("scoring checkpoints on the held-out split")
    from relex.toy import greedy_accuracy

    curve = []
    for folder in sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        step = int(folder.name.split("-")[1])
        curve.append({"step": step, "greedy": greedy_accuracy(_load(folder))})
    base_scores = score_checkpoint(run_dir / "checkpoint-0", samples)
    final_scores = score_checkpoint(run_dir / f"checkpoint-{final}", samples)
    rows = [DemoRow("base", 0, **base_scores)]
    for label, (last, target_dir) in extrapolated.items():
        observed = score_checkpoint(run_dir / f"checkpoint-{last}", samples)
        rows.append(DemoRow(f"last observed ({label})", last, **observed))
        rows.append(DemoRow(f"RELEX from {label}", final, **score_checkpoint(target_dir, samples)))
        chosen, auto_dir = autos[label]
        if auto_dir is None:  # no target beat the last observed checkpoint: it stays
            rows.append(DemoRow(f"RELEX auto from {label}", last, **observed))
        else:
            rows.append(DemoRow(f"RELEX auto from {label}", chosen, **score_checkpoint(auto_dir, samples)))
    rows.append(DemoRow("real final", final, **final_scores))
    gain = final_scores["greedy"] - base_scores["greedy"]
    for row in rows:
        row.gain_fraction = (row.greedy - base_scores["greedy"]) / gain if abs(gain) > 1e-9 else None
    seconds["score"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - started

    demo = DemoResult(out, config.to_dict(), rows, curve, verdicts, seconds, probes)
    write_json(out / "demo.json", demo.to_dict())
    plot_demo(demo, out / "demo.png")
    return demo


def plot_demo(demo: DemoResult, path: Path) -> None:
    """Accuracy of the real run with the extrapolated points; the diagnostics beside their null values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [1.3, 1]})
    steps = [p["step"] for p in demo.curve]
    left.plot(steps, [p["greedy"] for p in demo.curve], "-o", ms=3, color="#444", label="real run (greedy)")
    colors = ["#1f77b4", "#d62728", "#2ca02c"]
    by_label = {r.label: r for r in demo.rows}
    for color, label in zip(colors, demo.verdicts):  # one color per observed prefix
        seen, fixed = by_label[f"last observed ({label})"], by_label[f"RELEX from {label}"]
        left.axvspan(0, seen.step, color=color, alpha=0.07)
        left.axvline(seen.step, color=color, lw=0.8, ls=":")
        left.scatter([fixed.step], [fixed.greedy], s=90, marker="*", color=color, zorder=5,
                     label=f"{fixed.label} (observed ≤ step {seen.step})")
        auto = by_label.get(f"RELEX auto from {label}")
        if auto is not None:
            kept = " (none better: kept)" if auto.step == seen.step else ""
            left.scatter([auto.step], [auto.greedy], s=60, marker="D", facecolors="none", edgecolors=color,
                         zorder=5, label=f"{auto.label}: step {auto.step}{kept}")
    left.set_xlabel("RL step")
    left.set_ylabel("held-out accuracy (greedy)")
    left.set_ylim(0, 1)
    left.set_title("toy RLVR run, its final step extrapolated, and the probe's choice")
    left.legend(loc="lower right", fontsize=8)
    left.grid(alpha=0.3)

    labels = list(demo.verdicts)
    stats = [("drift_share", "drift share\n(verdict)"), ("alpha", "growth\nexponent α"), ("drift_ratio", "drift\nratio"),
             ("cos_first_last", "cos(first,\nlast delta)"), ("prefix_cos", "cos(prefix dir.,\nwindow dir.)")]
    low, high = -1.0, 1.5  # scores far below the null are clipped (and labelled) to keep the scale readable
    x = np.arange(len(stats))
    width = 0.8 / (len(labels) + 1)
    for i, label in enumerate(labels):
        d = demo.verdicts[label]
        scores = (d.get("diagnostics") or {}).get("scores", {})
        values = [float("nan") if scores.get(key) is None else scores[key] for key, _ in stats]
        shown = [min(max(v, low), high) if v == v else 0.0 for v in values]
        right.bar(x + i * width, shown, width, color=colors[i % len(colors)],
                  label=f"first {label}: {d['message'].split(':')[0].split(' (')[0]}")
        for xi, value, bar_value in zip(x + i * width, values, shown):
            if value == value and value != bar_value:
                right.text(xi, bar_value, f"{value:.1f}", ha="center", va="bottom" if value > 0 else "top",
                           fontsize=7)
    right.axhline(0.0, color="#888", lw=1, ls="--")
    right.axhline(1.0, color="#2ca02c", lw=1, ls="--")
    right.text(len(stats) - 0.4, 0.02, "random walk", fontsize=8, color="#555", ha="right", va="bottom")
    right.text(len(stats) - 0.4, 1.02, "pure drift", fontsize=8, color="#2ca02c", ha="right", va="bottom")
    right.set_xticks(x + width * (len(labels) - 1) / 2, [name for _, name in stats])
    right.set_ylabel("score (0 = random-walk null, 1 = pure drift)")
    right.set_ylim(low - 0.15, high + 0.1)
    right.set_title("drift diagnostics of the observed prefix")
    right.legend(fontsize=8, loc="best")
    right.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
