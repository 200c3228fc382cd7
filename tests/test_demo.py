"""relex demo end to end: on the CI-sized toy run (trains, extrapolates, scores, writes the table and plot), and
the demo's claim on the demo's own run."""

from __future__ import annotations

import json
import shutil

import pytest

from command import relex
from naive import naive_toy_greedy
from relex.toy import ToyConfig
from relex_cli.app import main


def test_demo_ci_preset(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--preset", "ci", "--out", str(out), "--samples", "2"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    demo = json.loads((out / "demo.json").read_text())
    labels = [row["label"] for row in demo["rows"]]
    final = demo["config"]["steps"]
    auto = {label: curve["chosen"] for label, curve in demo["probes"].items()}  # the probe's choice, or None
    assert labels == ["base", "last observed (10%)", "RELEX from 10%", "RELEX auto from 10%",
                      "last observed (20%)", "RELEX from 20%", "RELEX auto from 20%", "real final"]
    steps = [row["step"] for row in demo["rows"]]
    assert steps == [0, 2, final, auto["10%"] or 2, 4, final, auto["20%"] or 4, final]
    for label, curve in demo["probes"].items():  # candidates past the last observed step, up to the horizon limit
        assert curve["reference_step"] == {"10%": 2, "20%": 4}[label]
        assert [c["step"] for c in curve["candidates"]] and all(c["step"] > curve["reference_step"]
                                                                for c in curve["candidates"])
    for row in demo["rows"]:
        for key in ("greedy", "sampled", "expected"):
            assert 0.0 <= row[key] <= 1.0
    # The share of the gain is computed from the greedy accuracies it is printed beside.
    base, real = demo["rows"][0]["greedy"], demo["rows"][-1]["greedy"]
    if abs(real - base) > 1e-9:
        for row in demo["rows"]:
            assert abs(row["gain_fraction"] - (row["greedy"] - base) / (real - base)) < 1e-9
    assert set(demo["verdicts"]) == {"10%", "20%"}
    for verdict in demo["verdicts"].values():
        assert verdict["verdict"] in {"drift-dominated", "mixed", "noise-dominated"}
        assert verdict["message"] in printed
    assert [p["step"] for p in demo["curve"]] == list(range(0, final + 1))
    assert (out / "demo.png").stat().st_size > 10_000
    assert (out / "extrapolated" / "relex-from-20pct" / "relex.json").is_file()
    # A second run reuses the trained run instead of training again.
    assert main(["demo", "--preset", "ci", "--out", str(out), "--samples", "2"]) == 0
    assert "reusing the toy run" in capsys.readouterr().out


def test_relex_demo_recovers_most_of_the_gain_from_20_percent(toy, tmp_path):
    """The README's claim, through the installed ``relex demo`` on the demo's own run (trained once into the
    tests' cache, then reused by the command as a second ``relex demo`` reuses it): from 20 observed steps, whose
    checkpoints have barely moved, RELEX writes a step-100 checkpoint whose held-out greedy accuracy recovers
    most of the real run's gain (0.95 in the README's run; 0.93 in a run trained with one thread).

    The accuracies the demo prints are checked against an independent route (transformers' greedy
    ``generate`` and exact match, tests/naive.py), and the claim is asserted on those. The thresholds leave
    room for the toy run not being bit-reproducible across CPUs and thread counts (base / final greedy
    0.383 / 0.840 and 0.337 / 0.863 seen for the same seed)."""
    out = tmp_path / "demo"
    shutil.copytree(toy["demo-final"], out / "run")  # the command's own run folder: reused, not retrained
    done = relex("demo", "--out", out, "--samples", 2)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = " ".join(done.stdout.split())
    assert f"reusing the toy run in {out / 'run'}" in printed
    demo = json.loads((out / "demo.json").read_text())
    assert demo["config"] == ToyConfig.demo().to_dict() and demo["config"]["steps"] == 100
    rows = {row["label"]: row for row in demo["rows"]}
    folders = {"base": out / "run" / "checkpoint-0", "last observed (10%)": out / "run" / "checkpoint-10",
               "RELEX from 10%": out / "extrapolated" / "relex-from-10pct",
               "last observed (20%)": out / "run" / "checkpoint-20",
               "RELEX from 20%": out / "extrapolated" / "relex-from-20pct",
               "real final": out / "run" / "checkpoint-100"}
    for label, curve in demo["probes"].items():  # the auto horizon: the probe's choice, or the last observed
        last = folders[f"last observed ({label})"]
        chosen = curve["chosen"]
        folders[f"RELEX auto from {label}"] = (
            out / "extrapolated" / f"auto-from-{label.rstrip('%')}pct" if chosen else last)
    assert set(rows) == set(folders)
    greedy = {}
    for label, folder in folders.items():
        flags = naive_toy_greedy(folder)
        greedy[label] = sum(flags) / len(flags)
        assert len(flags) == 300 and rows[label]["greedy"] == pytest.approx(greedy[label], abs=1e-12), label
    base, final = greedy["base"], greedy["real final"]
    gain = final - base
    assert gain >= 0.35  # the run itself learns: 0.46 and 0.53 in the runs above
    for label in folders:
        assert rows[label]["gain_fraction"] == pytest.approx((greedy[label] - base) / gain, abs=1e-9), label
    # 20 of 100 steps observed: the last observed checkpoint has a small share of the gain, the extrapolated
    # one most of it (0.93-0.95 above), and far more accuracy than the checkpoint it was extrapolated from.
    assert (greedy["last observed (20%)"] - base) / gain <= 0.25
    assert (greedy["RELEX from 20%"] - base) / gain >= 0.75
    assert greedy["RELEX from 20%"] - greedy["last observed (20%)"] >= 0.3
    # from 10% the README shows 0.98 (0.86 in the one-thread run): most of the gain too, with a looser bound
    assert (greedy["RELEX from 10%"] - base) / gain >= 0.6
    # The verdict printed from 20% carries its window backtest (fit up to step 10, step 20 held out, h = 2) to
    # step 100 (h = 5): the line's error times (5 - 1) / (2 - 1) = 4, stopping's times (1 - 1/5) / (1 - 1/2).
    verdict = demo["verdicts"]["20%"]
    backtest = verdict["backtest"]
    assert backtest["fit_steps"] == [5, 10] and backtest["held_out_steps"] == [15, 20]
    assert backtest["projected_line_error"] == pytest.approx(4 * backtest["line_error"], rel=1e-12)
    assert backtest["projected_stop_error"] == pytest.approx(1.6 * backtest["stop_error"], rel=1e-12)
    assert (f"carried to step 100: {backtest['projected_line_error']:.2f} against "
            f"{backtest['projected_stop_error']:.2f}") in verdict["message"]
    assert verdict["message"] in printed
