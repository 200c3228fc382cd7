"""The output of relex extrapolate is a Hugging Face checkpoint that transformers loads and runs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from relex.synthetic import write_checkpoint
from relex.testing import tiny_base_and_directions
from relex_cli.app import main


def make_tiny_run(root, arch: str, tie: bool, steps=(10, 20, 30)):
    base, directions = tiny_base_and_directions(root / "checkpoint-0", 1, arch=arch, tie=tie)
    for step in steps:
        state = {n: (t + 1e-4 * step * directions[n]).to(t.dtype) for n, t in base.items()}
        folder = root / f"checkpoint-{step}"
        write_checkpoint(folder, state, step=step)
        for aux in root.joinpath("checkpoint-0").iterdir():
            if aux.suffix in (".json", ".jinja") and aux.name != "trainer_state.json":
                shutil.copy(aux, folder / aux.name)
    return base, directions


@pytest.mark.parametrize("arch,tie", [("llama", False), ("llama", True), ("qwen2", False)])
def test_output_loads_and_generates(tmp_path, arch, tie, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, directions = make_tiny_run(tmp_path / "run", arch, tie)
    code = main(["extrapolate", str(tmp_path / "run"), "--target-step", "100", "--out", str(tmp_path / "out")])
    out_text = capsys.readouterr().out
    assert code == 0
    assert "verdict: drift-dominated" in " ".join(out_text.split())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    # The loaded weights are the linear trajectory at step 100.
    state = model.state_dict()
    for name, w0 in base.items():
        expected = w0 + 1e-4 * 100 * directions[name]
        assert torch.allclose(state[name], expected, atol=1e-5), name
    if tie:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    inputs = tokenizer("12+34=", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 8
    assert isinstance(tokenizer.decode(generated[0]), str)
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "relex.json",
            "model.safetensors.index.json", "model-00001-of-00001.safetensors"} <= files
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == arch
