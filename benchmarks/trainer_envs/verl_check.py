"""verl: checkpoints written by verl's own FSDPCheckpointManager, extrapolated from the shards and from
verl's own model merger's output, compared tensor for tensor. Run with the Python of a venv holding verl
and relex:

    python verl_check.py --work WORK [--target-step 24]

For each FSDP version (verl's ``fsdp`` = FSDP1, ``fsdp2``) and weight dtype (float32, bfloat16):

1. ``torchrun --nproc_per_node 2 verl_save.py`` writes ``RUN/global_step_{0,2,..,12}/actor/`` (gloo, CPU);
2. ``relex extrapolate RUN --target-step T --out shards`` reads the per-rank shards;
3. ``python -m verl.model_merger merge --backend fsdp`` turns every checkpoint into
   ``MERGED/global_step_N/actor/huggingface/`` (verl's "merged" layout), and
   ``relex extrapolate MERGED --target-step T --out merged`` reads those;
4. the two outputs are compared tensor for tensor; so are relex's reassembled shards and the merger's
   tensors, checkpoint by checkpoint. verl's merger casts every tensor to bfloat16
   (``fsdp_model_merger.py``: ``_local_tensor.bfloat16()``), so only bfloat16 runs can be bit-equal.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from common import HERE, Recorder, check_main, compare_states, load_folder, venv_bin

PACKAGES = ("verl", "torch", "transformers", "accelerate", "peft", "ray", "tensordict", "numpy", "safetensors",
            "typer", "relex-rlvr")
CONFIGS = (("fsdp", "float32"), ("fsdp", "bfloat16"), ("fsdp2", "float32"), ("fsdp2", "bfloat16"))
SAVES, EVERY = 6, 2  # checkpoints at steps 0, 2, ..., 12


def extrapolate(rec: Recorder, run: Path, out: Path, target: int, log: str, *extra) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    rec.run([venv_bin("relex"), "extrapolate", run, "--target-step", target, "--out", out, *extra], log)
    return json.loads((out / "relex.json").read_text())


def check_config(rec: Recorder, base: Path, strategy: str, dtype: str, target: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from relex.io.fsdp import FsdpSource

    label = f"verl {strategy} {dtype}"
    root = rec.work / f"{strategy}-{dtype}"
    shutil.rmtree(root, ignore_errors=True)
    run, merged = root / "run", root / "merged"
    rec.run([venv_bin("torchrun"), "--standalone", "--nproc_per_node", 2, HERE / "verl_save.py", "--base", base,
             "--out", run, "--strategy", strategy, "--dtype", dtype, "--saves", SAVES, "--every", EVERY],
            f"{strategy}-{dtype}-save")
    steps = [EVERY * i for i in range(SAVES + 1)]
    expected = [f"model_world_size_2_rank_{r}.pt" for r in (0, 1)] + ["fsdp_config.json"]
    written = all((run / f"global_step_{s}" / "actor" / name).is_file() for s in steps for name in expected)
    config = json.loads((run / f"global_step_{steps[-1]}" / "actor" / "fsdp_config.json").read_text())
    mesh_error = (run / "verl_device_mesh_error.txt").read_text().strip()
    rec.check(f"{label}: FSDPCheckpointManager wrote global_step_{{{','.join(map(str, steps))}}}/actor",
              written and config == {"FSDP_version": 1 if strategy == "fsdp" else 2, "world_size": 2},
              fsdp_config=config, verl_create_device_mesh_on_this_host=mesh_error)

    # (a) relex straight from the shards
    shards = extrapolate(rec, run, root / "relex-from-shards", target, f"{strategy}-{dtype}-relex-shards")
    kinds = {shards["sources"]["observed_kind"], shards["sources"]["base"]["kind"]}
    rec.check(f"{label}: relex read the per-rank shards", kinds == {"fsdp"} and shards["observed_steps"] == steps[1:],
              sources=sorted(kinds), observed_steps=shards["observed_steps"], base=Path(shards["base"]).parent.name,
              verdict=shards.get("verdict", {}).get("verdict"))

    # (b) verl's merger on every checkpoint, then relex on the merged folders
    for step in steps:
        rec.run([sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp",
                 "--local_dir", run / f"global_step_{step}" / "actor",
                 "--target_dir", merged / f"global_step_{step}" / "actor" / "huggingface"],
                f"{strategy}-{dtype}-merge-{step}")
    from_merged = extrapolate(rec, merged, root / "relex-from-merged", target, f"{strategy}-{dtype}-relex-merged")
    rec.check(f"{label}: relex read verl's merged folders", from_merged["sources"]["observed_kind"] == "safetensors",
              sources=from_merged["sources"]["observed_kind"])

    # relex's reassembly of each checkpoint against verl's merger (which casts to bfloat16)
    worst, unequal = 0.0, 0
    for step in steps:
        hf = load_folder(merged / f"global_step_{step}" / "actor" / "huggingface")
        with FsdpSource(run / f"global_step_{step}" / "actor") as source:
            mine = {name: source.read(name).to(torch.bfloat16) for name in source.tensors}
        cmp = compare_states(mine, hf)
        unequal += cmp["unequal_tensors"] + len(cmp["only_in_first"]) + len(cmp["only_in_second"])
        worst = max(worst, cmp["max_abs_diff"])
    rec.check(f"{label}: relex's reassembled shards (cast to bfloat16) == verl merger's tensors, "
              f"{len(steps)} checkpoints", unequal == 0, unequal_tensors=unequal, max_abs_diff=worst)

    # the two extrapolations
    a, b = load_folder(root / "relex-from-shards"), load_folder(root / "relex-from-merged")
    cmp = compare_states(a, b)
    figures = {k: cmp[k] for k in ("tensors", "dtypes", "bit_equal", "unequal_tensors", "max_abs_diff",
                                   "max_abs_diff_tensor", "max_rel_diff")}
    if dtype == "bfloat16":
        rec.check(f"{label}: extrapolation from shards == from verl-merged folders (bit-equal)",
                  cmp["bit_equal"], **figures)
    else:
        # float32 shards, bfloat16 merged inputs: the fits differ by the inputs' rounding.
        rec.check(f"{label}: extrapolation from float32 shards vs from verl's bfloat16-merged folders "
                  "(they differ by the bfloat16 rounding of the inputs: within 2^-5 of each tensor's largest value, "
                  "4 bfloat16 ulps)",
                  not cmp["only_in_first"] and not cmp["only_in_second"] and cmp["max_rel_diff"] <= 2 ** -5,
                  **figures)
        # The original tiny model is bit-for-bit the step-0 checkpoint: --base gives the same prediction.
        with_base = root / "relex-from-shards-with-base"
        extrapolate(rec, run, with_base, target, f"{strategy}-{dtype}-relex-base", "--base", base,
                    "--steps", f"{steps[1]}-{steps[-1]}:{EVERY}")
        cmp = compare_states(a, load_folder(with_base))
        rec.check(f"{label}: --base (the HF folder) == global_step_0 as base (bit-equal)", cmp["bit_equal"],
                  max_abs_diff=cmp["max_abs_diff"])

    # the prediction loads in transformers and moved beyond the last checkpoint along the run's direction
    model = AutoModelForCausalLM.from_pretrained(root / "relex-from-shards")
    ids = torch.arange(40).reshape(2, 20)
    logits = model(input_ids=ids).logits
    with FsdpSource(run / "global_step_0" / "actor") as first, \
            FsdpSource(run / f"global_step_{steps[-1]}" / "actor") as last:
        moved = sum(float((last.read(n).double() - first.read(n).double()).norm() ** 2) for n in first.tensors) ** 0.5
        size = sum(float(first.read(n).double().norm() ** 2) for n in first.tensors) ** 0.5
    rec.check(f"{label}: the prediction loads in transformers, finite logits", bool(torch.isfinite(logits).all()),
              relative_update_at_last_step=round(moved / size, 4))


def check(rec: Recorder, args) -> None:
    from relex.testing import save_tiny_model

    base = rec.work / "base"
    shutil.rmtree(base, ignore_errors=True)
    save_tiny_model(base)  # float32 Llama, hidden 64, 2 layers, byte-level tokenizer; built offline
    for strategy, dtype in CONFIGS:
        check_config(rec, base, strategy, dtype, args.target_step)


def main() -> int:
    return check_main("verl", "verl check", __doc__, PACKAGES, check, target_step=(int, 24))


if __name__ == "__main__":
    sys.exit(main())
