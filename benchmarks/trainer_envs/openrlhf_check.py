"""OpenRLHF: checkpoints written by OpenRLHF's own DeepspeedStrategy save path (``--ckpt.save_hf``), read by
relex; DeepSpeed's ZeRO folders refused with the conversion to run, and that conversion's output read too.
Run with the Python of a venv holding openrlhf (its dependencies but flash-attn), deepspeed and relex:

    python openrlhf_check.py --work WORK [--target-step 24]

OpenRLHF's weights are bf16 (its default; ``--ds.param_dtype`` takes bf16 or fp16 only):

1. ``torchrun --nproc_per_node 2 openrlhf_save.py`` trains on CPU (DeepSpeed ZeRO-2, gloo) and writes
   ``CKPT/global_step{2,..,12}_hf/`` and DeepSpeed's ``CKPT/_actor/global_step{2,..,12}/``; no step-0
   checkpoint, so the base is ``--base``;
2. ``relex extrapolate CKPT --base BASE`` reads the ``_hf`` folders; ``relex extrapolate CKPT/_actor`` is
   refused (exit 2) with the conversion to run; a folder holding both kinds side by side reads the ``_hf``
   folders and skips the DeepSpeed ones;
3. DeepSpeed's ``zero_to_fp32.py`` (which relex's message names) converts every ZeRO checkpoint; relex reads
   those too; the converted fp32 master weights, cast to bf16, must equal the ``_hf`` weights, and the two
   extrapolations must agree within bfloat16 rounding.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from common import HERE, Recorder, check_main, compare_states, load_folder, venv_bin

PACKAGES = ("openrlhf", "deepspeed", "torch", "transformers", "accelerate", "peft", "ray", "flash-attn",
            "safetensors", "typer", "relex-rlvr")
SAVES, EVERY = 6, 2

STUB = {  # flash-attn builds only with CUDA; openrlhf.models imports these names at module level
    "flash_attn/__init__.py": '"""Stand-in for flash-attn (CUDA only): importable, never called."""\n',
    "flash_attn/bert_padding.py": (
        "def _absent(*args, **kwargs):\n"
        "    raise RuntimeError('flash-attn is not installed: this is a stand-in module')\n\n\n"
        "index_first_axis = pad_input = rearrange = unpad_input = _absent\n"),
    "flash_attn/utils/__init__.py": "",
    "flash_attn/utils/distributed.py": "from flash_attn.bert_padding import _absent as all_gather  # noqa: F401\n",
}


def write_stub(folder: Path) -> Path:
    for name, text in STUB.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def extrapolate(rec: Recorder, run: Path, out: Path, base: Path, target: int, log: str, ok_codes=(0,)) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    done = rec.run([venv_bin("relex"), "extrapolate", run, "--base", base, "--target-step", target, "--out", out],
                   log, ok_codes=ok_codes)
    return json.loads((out / "relex.json").read_text()) if done.returncode == 0 else {"exit": done.returncode}


def check_dtype(rec: Recorder, base: Path, stubs: Path, param_dtype: str, target: int) -> None:
    import torch

    label = f"OpenRLHF {param_dtype}"
    root = rec.work / param_dtype
    shutil.rmtree(root, ignore_errors=True)
    ckpt = root / "ckpt"
    rec.run([venv_bin("torchrun"), "--standalone", "--nproc_per_node", 2, HERE / "openrlhf_save.py", "--base", base,
             "--ckpt", ckpt, "--saves", SAVES, "--every", EVERY, "--param-dtype", param_dtype],
            f"{param_dtype}-save", env={"PYTHONPATH": stubs})
    steps = [EVERY * (i + 1) for i in range(SAVES)]
    hf_ok = all((ckpt / f"global_step{s}_hf" / "model.safetensors").is_file() for s in steps)
    ds_ok = all(any((ckpt / "_actor" / f"global_step{s}").glob("*model_states.pt")) for s in steps)
    shims = json.loads((ckpt / "cpu_shims.json").read_text())
    rec.check(f"{label}: DeepspeedStrategy.save_model wrote global_step{{{','.join(map(str, steps))}}}_hf/, "
              "save_ckpt wrote _actor/global_stepN/", hf_ok and ds_ok, cpu_shims=shims)

    # (a) the _hf folders, as OpenRLHF lays them out (DeepSpeed's states in _actor/)
    from_hf = extrapolate(rec, ckpt, root / "relex-from-hf", base, target, f"{param_dtype}-relex-hf")
    rec.check(f"{label}: relex read CKPT/global_stepN_hf/ over --base",
              from_hf["sources"]["observed_kind"] == "safetensors" and from_hf["observed_steps"] == steps,
              observed_steps=from_hf["observed_steps"], sources=from_hf["sources"]["observed_kind"],
              verdict=from_hf.get("verdict", {}).get("verdict"))

    # (b) DeepSpeed's own folders are refused with the conversion to run
    refused = extrapolate(rec, ckpt / "_actor", root / "relex-from-deepspeed", base, target,
                          f"{param_dtype}-relex-deepspeed", ok_codes=(2,))
    message = rec.log_text(f"{param_dtype}-relex-deepspeed").strip().splitlines()[-1]
    rec.check(f"{label}: relex on CKPT/_actor (DeepSpeed ZeRO states only) exits 2 naming zero_to_fp32.py",
              refused == {"exit": 2} and "zero_to_fp32" in message and not (root / "relex-from-deepspeed").exists(),
              message=message)

    # (c) both kinds side by side: the _hf folders are read, the DeepSpeed ones skipped
    mixed = root / "mixed"
    for step in steps:
        shutil.copytree(ckpt / f"global_step{step}_hf", mixed / f"global_step{step}_hf")
        shutil.copytree(ckpt / "_actor" / f"global_step{step}", mixed / f"global_step{step}")
    from_mixed = extrapolate(rec, mixed, root / "relex-from-mixed", base, target, f"{param_dtype}-relex-mixed")
    skipped = [Path(entry["folder"]).name for entry in from_mixed["skipped"]]
    same = compare_states(load_folder(root / "relex-from-hf"), load_folder(root / "relex-from-mixed"))
    rec.check(f"{label}: global_stepN/ (DeepSpeed) beside global_stepN_hf/: the _hf folders read, the others "
              "skipped, same prediction", from_mixed["observed_steps"] == steps and same["bit_equal"]
              and sorted(skipped) == sorted(f"global_step{s}" for s in steps),
              skipped=len(skipped), bit_equal=same["bit_equal"])

    # (d) DeepSpeed's conversion of every ZeRO checkpoint, then relex on the converted folders
    converted = root / "converted"
    worst, unequal = 0.0, 0
    for step in steps:
        out = converted / f"global_step{step}"
        rec.run([sys.executable, ckpt / "_actor" / "zero_to_fp32.py", ckpt / "_actor", out,
                 "--tag", f"global_step{step}", "--safe_serialization"], f"{param_dtype}-zero_to_fp32-{step}")
        hf = load_folder(ckpt / f"global_step{step}_hf")  # (zero_to_fp32 writes weights only: no config)
        fp32 = {k: v.to(hf[k].dtype) if k in hf else v for k, v in load_folder(out).items()}
        cmp = compare_states(fp32, hf)
        unequal += cmp["unequal_tensors"] + len(cmp["only_in_first"]) + len(cmp["only_in_second"])
        worst = max(worst, cmp["max_abs_diff"])
    rec.check(f"{label}: zero_to_fp32's master weights (cast to the _hf dtype) == the _hf weights, "
              f"{len(steps)} checkpoints", unequal == 0, unequal_tensors=unequal, max_abs_diff=worst)
    extrapolate(rec, converted, root / "relex-from-zero_to_fp32", base, target, f"{param_dtype}-relex-converted")
    cmp = compare_states(load_folder(root / "relex-from-hf"), load_folder(root / "relex-from-zero_to_fp32"))
    figures = {k: cmp[k] for k in ("tensors", "dtypes", "bit_equal", "max_abs_diff", "max_abs_diff_tensor",
                                   "max_rel_diff")}
    rec.check(f"{label}: extrapolation from the bf16 _hf folders vs from zero_to_fp32's fp32 master weights "
              "(they differ by the bfloat16 rounding of the inputs: within 2^-5 of each tensor's largest value, "
              "4 bfloat16 ulps)",
              not cmp["only_in_first"] and not cmp["only_in_second"] and cmp["max_rel_diff"] <= 2 ** -5, **figures)

    from transformers import AutoModelForCausalLM

    logits = AutoModelForCausalLM.from_pretrained(root / "relex-from-hf")(input_ids=torch.arange(40).reshape(2, 20))
    rec.check(f"{label}: the prediction loads in transformers, finite logits",
              bool(torch.isfinite(logits.logits).all()))


def check(rec: Recorder, args) -> None:
    from relex.testing import save_tiny_model

    base = rec.work / "base"
    shutil.rmtree(base, ignore_errors=True)
    save_tiny_model(base)
    stubs = write_stub(rec.work / "stubs")
    check_dtype(rec, base, stubs, "bf16", args.target_step)


def main() -> int:
    return check_main("openrlhf", "OpenRLHF check", __doc__, PACKAGES, check, target_step=(int, 24))


if __name__ == "__main__":
    sys.exit(main())
