"""relex analyze: tables, nulls, files and plots on synthetic runs of known construction; log-prob scoring."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from relex.api import analyze
from relex.analysis.logprob import encode_records, load_records, sequence_logprobs
from relex.analysis.report import TENSOR_COLUMNS
from relex.analysis.tables import parse_name, read_csv, rows_to_csv
from relex.errors import RelexInputError
from relex.synthetic import make_run, write_checkpoint
from relex.testing import tiny_base_and_directions
from relex_cli.app import main

STEPS = list(range(5, 61, 5))  # 12 checkpoints
NULLS = 30


def zero(t):
    return 0.0 * np.asarray(t, dtype=np.float64)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    make_run(root / "drift", STEPS, noise=0.0)
    make_run(root / "walk", STEPS, coefficients=(zero,), noise=1.0, noise_kind="walk", seed=1)
    # drift share of ‖x_T‖² = T / (T + noise²) = 60 / 64 ≈ 0.94 by construction
    make_run(root / "mixed", STEPS, noise=2.0, noise_kind="walk", seed=2)
    return root


@pytest.fixture(scope="module")
def drift_analysis(runs):
    return analyze(runs / "drift", null_samples=NULLS)


@pytest.fixture(scope="module")
def walk_analysis(runs):
    return analyze(runs / "walk", null_samples=NULLS)


def test_tensor_table_of_pure_drift(drift_analysis):
    a = drift_analysis
    assert a.steps == STEPS
    rows = {r["name"]: r for r in a.tensors}
    assert len(rows) == 6 and all(r["moved"] for r in rows.values())
    q = rows["model.layers.0.self_attn.q_proj.weight"]
    assert (q["layer"], q["module"], q["group"], q["shape"], q["numel"]) == (0, "q_proj", "attention", [32, 32], 1024)
    for r in rows.values():
        assert set(TENSOR_COLUMNS) <= set(r), set(TENSOR_COLUMNS) - set(r)
        assert r["explained_r1"] == pytest.approx(1.0, abs=1e-6)  # float32 checkpoints
        assert r["r2_rank1"] == pytest.approx(1.0, abs=1e-6)
        assert r["drift_share"] == pytest.approx(1.0, abs=1e-4)
        assert r["alpha"] == pytest.approx(1.0, abs=1e-4)
        assert r["verdict"] == "drift-dominated"
        # nulls at the tensor's own length and size, not assumed
        assert 0.8 < r["explained_r1_null"] < r["explained_r1_null_p95"] < 1.0
        assert 0.9 < r["r2_rank1_null"] < 1.0
        assert r["drift_share_null"] < r["drift_share_null_p95"] < 0.9
        assert r["drift_share_significant"]
        # delta grows as scale·t·√d against a base of norm 0.02·√d
        assert r["relative_delta"] == pytest.approx(1e-3 * 60 / 0.02, rel=0.3)
        assert r["slope"] > 0
    small, big = rows["model.norm.weight"], rows["model.embed_tokens.weight"]  # d = 32 and d = 3072
    assert small["explained_r1_null_p95"] > big["explained_r1_null_p95"]
    assert small["drift_share_null_p95"] > 0.5 > big["drift_share_null_p95"]  # a small tensor's null is wide
    s = a.summary
    assert s["verdict"] == "drift-dominated" and a.verdict.drift_share == pytest.approx(1.0, abs=1e-4)
    assert s["whole_model_null"]["explained_r1"] == pytest.approx(0.81, abs=0.02)
    assert s["fraction_explained_r1_above_null_p95"] == 1.0
    assert s["parameters"] == sum(r["numel"] for r in rows.values())


def test_random_walk_run_looks_linear_but_is_noise(walk_analysis):
    a = walk_analysis
    s = a.summary
    assert s["verdict"] == "noise-dominated"
    assert s["whole_model"]["drift_share"] < 0.15
    # explained variance and R² sit at their random-walk null: high, and meaningless
    assert s["whole_model"]["explained_r1"] == pytest.approx(s["whole_model_null"]["explained_r1"], abs=0.05)
    assert s["whole_model"]["r2_rank1"] > 0.85
    assert abs(s["explained_r1_median"] - s["explained_r1_null_median"]) < 0.06
    assert s["backtest_best"] in ("last", "relex/anchored")
    errors = dict(a.backtest.ranking())
    assert errors["last"] < errors["relex/linear"]


def test_mixed_run_share_matches_construction(runs):
    a = analyze(runs / "mixed", null_samples=NULLS)
    assert a.summary["whole_model"]["drift_share"] == pytest.approx(60 / 64, abs=0.05)


def test_backtest_in_the_analysis(drift_analysis):
    a = drift_analysis
    # Errors from G cancel: float32 checkpoints leave a floor of about √(1e-7) ≈ 3e-4.
    errors = dict(a.backtest.ranking())
    assert errors["relex/linear"] < 2e-3 and errors["last"] > 0.05
    assert a.backtest.main_fit_points == 9
    for row in a.tensors:
        assert row["backtest_relex/linear"] < 2e-3 and row["backtest_last"] > 0.05


def test_write_files_and_plots(drift_analysis, tmp_path):
    out = drift_analysis.write(tmp_path / "report")
    names = {p.name for p in out.iterdir()}
    assert {"analysis.json", "tensors.csv", "backtest.csv", "coefficients.png", "explained_variance.png",
            "layer_heatmap.png", "backtest_horizon.png", "drift_statistics.png"} <= names
    assert "logprob.png" not in names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report")]
    payload = json.loads((out / "analysis.json").read_text())  # strict JSON: NaN written as null
    assert payload["summary"]["verdict"] == "drift-dominated"
    assert payload["verdict"]["verdict"] == "drift-dominated"
    assert len(payload["tensors"]) == 6
    rows = read_csv(out / "tensors.csv")
    assert [r["name"] for r in rows] == [r["name"] for r in drift_analysis.tensors]
    assert rows[0]["drift_share"] == pytest.approx(drift_analysis.tensors[0]["drift_share"], rel=1e-5)
    backtest_rows = read_csv(out / "backtest.csv")
    assert {"model", "fit_points", "fit_end_step", "held_out_step", "horizon", "relative_error"} == set(backtest_rows[0])
    for name in names:
        if name.endswith(".png"):
            assert (out / name).stat().st_size > 10_000, name
    with pytest.raises(RelexInputError, match="exists"):
        drift_analysis.write(tmp_path / "report")


def test_parse_name_and_csv(tmp_path):
    assert parse_name("model.layers.11.mlp.up_proj.weight") == {"layer": 11, "module": "mlp.up_proj", "group": "mlp"}
    assert parse_name("model.layers.2.input_layernorm.weight")["group"] == "norm"
    assert parse_name("model.embed_tokens.weight") == {"layer": None, "module": "embed", "group": "embed"}
    assert parse_name("lm_head.weight")["module"] == "lm_head"
    assert parse_name("transformer.h.3.attn.c_attn.bias") == {"layer": 3, "module": "c_attn.bias", "group": "attention"}
    assert parse_name("model.norm.weight")["module"] == "norm"
    text = rows_to_csv([{"a": 1, "b": float("nan"), "shape": [2, 3]}, {"a": 2, "c": "x"}], tmp_path / "t.csv")
    assert text.splitlines()[0] == "a,b,shape,c"
    back = read_csv(tmp_path / "t.csv")
    assert back[0]["a"] == 1 and math.isnan(back[0]["b"]) and back[0]["shape"] == "2x3" and back[1]["c"] == "x"


def test_cli_analyze_prints_summary_and_writes(runs, tmp_path, capsys):
    code = main(["analyze", str(runs / "drift"), "--out", str(tmp_path / "out"), "--null-samples", "20",
                 "--quiet"])
    assert code == 0
    assert capsys.readouterr().out == ""
    assert (tmp_path / "out" / "analysis.json").is_file()
    code = main(["analyze", str(runs / "walk"), "--null-samples", "20", "--no-plots", "--out", str(tmp_path / "o2")])
    text = " ".join(capsys.readouterr().out.split())
    assert code == 0
    assert "verdict: noise-dominated" in text and "random walk" in text and "backtest" in text
    assert not list((tmp_path / "o2").glob("*.png"))


@pytest.mark.parametrize("args,fragment", [
    (["{tmp}/missing"], "no checkpoints found"),
    (["{run}", "--out", "{existing}"], "output folder exists"),
    (["{run}", "--rank", "0"], "--rank must be at least 1"),
    (["{run}", "--logprob-prompts", "{tmp}/none.jsonl"], "cannot read log-prob prompts"),
])
def test_cli_bad_input(runs, tmp_path, capsys, args, fragment):
    (tmp_path / "existing").mkdir()
    (tmp_path / "missing").mkdir()
    args = [a.format(tmp=tmp_path, run=runs / "drift", existing=tmp_path / "existing") for a in args]
    code = main(["analyze", *args, "--null-samples", "20"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and fragment in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "missing"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny Llama moved along a fixed direction: base at 0, checkpoints at 10, 20, 30."""
    root = tmp_path_factory.mktemp("tiny") / "run"
    base, directions = tiny_base_and_directions(root / "checkpoint-0", 1)
    for step in (10, 20, 30):
        folder = root / f"checkpoint-{step}"
        write_checkpoint(folder, {n: t + 1e-3 * step * directions[n] for n, t in base.items()}, step=step)
        for aux in (root / "checkpoint-0").iterdir():
            if aux.suffix in (".json", ".jinja") and aux.name != "trainer_state.json":
                shutil.copy(aux, folder / aux.name)
    return root


RECORDS = [{"prompt": "12+34=", "response": "46"}, {"prompt": "Hello", "response": " world!"},
           {"prompt": "a", "response": "bcdefgh"}]


def test_sequence_logprobs_match_a_naive_computation(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_run / "checkpoint-20"
    model = AutoModelForCausalLM.from_pretrained(folder).float().eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoded = encode_records(tokenizer, RECORDS)
    batched = sequence_logprobs(model, encoded, batch_size=2)
    for (prompt, response), value in zip(encoded, batched):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        naive = sum(float(logp[len(prompt) - 1 + k, token]) for k, token in enumerate(response))
        assert value == pytest.approx(naive, abs=1e-4)
    assert encoded[0][1][-1] == tokenizer.eos_token_id  # EOS appended to each response


def test_logprob_linearity_in_the_analysis(tiny_run, tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    records = load_records(path)
    a = analyze(tiny_run, null_samples=NULLS, logprob_records=records)
    lp = a.logprob
    assert lp.steps == [0, 10, 20, 30] and lp.logprobs.shape == (4, 3)
    assert np.all(lp.logprobs < 0) and len(lp.r2) == 3
    summary = a.summary["logprob"]
    assert 0 < summary["r2_null"]["median"] < 1 and summary["responses"] == 3
    out = a.write(tmp_path / "report")
    assert (out / "logprob.png").is_file() and len(read_csv(out / "logprob.csv")) == 3


def test_load_records_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(RelexInputError, match="line 1 needs"):
        load_records(bad)
    bad.write_text("not json\n")
    with pytest.raises(RelexInputError, match="not valid JSON"):
        load_records(bad)
    good = tmp_path / "good.jsonl"
    good.write_text('{"question": "q", "answer": "a"}\n\n{"prompt": "p", "completion": "c"}\n')
    assert load_records(good) == [{"prompt": "q", "response": "a"}, {"prompt": "p", "response": "c"}]
