"""relex demo end to end on the CI-sized toy run: trains, extrapolates, scores, writes the table and plot."""

from __future__ import annotations

import json

from relex_cli.app import main


def test_demo_ci_preset(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--preset", "ci", "--out", str(out), "--samples", "2"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    demo = json.loads((out / "demo.json").read_text())
    labels = [row["label"] for row in demo["rows"]]
    assert labels == ["base", "last observed (10%)", "RELEX from 10%", "last observed (20%)", "RELEX from 20%",
                      "real final"]
    steps = [row["step"] for row in demo["rows"]]
    final = demo["config"]["steps"]
    assert steps == [0, 2, final, 4, final, final]
    for row in demo["rows"]:
        for key in ("greedy", "sampled", "expected"):
            assert 0.0 <= row[key] <= 1.0
    # The share of the gain is computed from the greedy accuracies it is printed beside.
    base, real = demo["rows"][0]["greedy"], demo["rows"][-1]["greedy"]
    if abs(real - base) > 1e-9:
        for row in demo["rows"]:
            assert abs(row["gain_fraction"] - (row["greedy"] - base) / (real - base)) < 1e-9
    assert set(demo["diagnostics"]) == {"10%", "20%"}
    for diagnostics in demo["diagnostics"].values():
        assert diagnostics["verdict"] in {"drift-dominated", "mixed", "noise-dominated"}
        assert diagnostics["message"] in printed
    assert [p["step"] for p in demo["curve"]] == list(range(0, final + 1))
    assert (out / "demo.png").stat().st_size > 10_000
    assert (out / "extrapolated" / "relex-from-20pct" / "relex.json").is_file()
    # A second run reuses the trained run instead of training again.
    assert main(["demo", "--preset", "ci", "--out", str(out), "--samples", "2"]) == 0
    assert "reusing the toy run" in capsys.readouterr().out
