"""The sha256 of every tensor relex writes, over a matrix of modes, predictors, targets, dtypes and block sizes.

Writes small synthetic runs (:func:`relex.synthetic.make_run`: float32, bfloat16 with tensors larger than one
Gram chunk, float16 with an integer buffer, and a LoRA adapter run), runs ``extrapolate``, ``fit`` +
``materialize`` and ``collect_grams`` over the matrix, and saves one digest per output tensor (and per Gram
matrix). Run it before and after a change to the engine and compare: every output tensor must be identical.

    python benchmarks/output_digests.py --out before.json
    python benchmarks/output_digests.py --out after.json --compare before.json

Runs single-threaded (as the test suite does) unless ``--threads`` says otherwise. ``relex.json`` figures are
digested separately and reported, not failed on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

STEPS = (3, 7, 8, 15, 22, 30, 41, 55)
SMALL_STEPS = (5, 10, 15, 20, 30, 40)
BIG_SHAPES = {
    "model.embed_tokens.weight": (600, 160),  # 96,000 entries: more than one 65,536-column Gram chunk
    "model.layers.0.self_attn.q_proj.weight": (160, 160),
    "model.layers.0.mlp.up_proj.weight": (320, 160),
    "model.layers.0.conv.weight": (8, 16, 20),
    "model.layers.0.input_layernorm.weight": (160,),
    "model.layers.1.self_attn.q_proj.weight": (160, 160),
    "model.norm.weight": (160,),
    "lm_head.weight": (600, 160),
}
LORA_MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")


def digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous()
    raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
    return f"{str(data.dtype).replace('torch.', '')}{list(data.shape)}:{hashlib.sha256(raw).hexdigest()[:24]}"


def folder_digests(folder: Path) -> dict[str, str]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(folder.rglob("*.safetensors")):
        rel = file.parent.relative_to(folder)
        for name, tensor in sorted(load_file(file).items()):
            out[f"{rel}/{name}"] = digest(tensor)
    return out


def json_digest(folder: Path) -> str | None:
    """Digest of the model figures in ``relex.json`` files (statistics, choices, the verdict)."""
    parts = []
    for file in sorted(folder.rglob("relex.json")):
        payload = json.loads(file.read_text())
        tensors = {n: {k: v for k, v in t.items() if k != "relative_delta"}
                   for n, t in (payload.get("tensors") or {}).items()}
        parts.append(json.dumps([tensors, payload.get("selection"), payload.get("verdict")], sort_keys=True,
                                default=str))
    return hashlib.sha256("".join(parts).encode()).hexdigest()[:24] if parts else None


def make_runs(root: Path) -> dict[str, dict]:
    from relex.synthetic import linear, make_run, write_checkpoint
    from relex.testing import load_state

    runs = {}
    make_run(root / "f32", SMALL_STEPS, noise=0.05, dtype=torch.float32, seed=1)
    runs["f32"] = {"run": root / "f32"}

    make_run(root / "bf16", STEPS, shapes=BIG_SHAPES, coefficients=(linear, lambda t: np.sqrt(np.asarray(t, float))),
             noise=0.3, noise_kind="walk", dtype=torch.bfloat16, seed=2)
    runs["bf16"] = {"run": root / "bf16"}

    make_run(root / "f16", SMALL_STEPS, noise=0.1, dtype=torch.float16, seed=3)
    for step in (0, *SMALL_STEPS):  # an integer buffer that changes: it keeps its newest value
        folder = root / "f16" / f"checkpoint-{step}"
        state = load_state(folder)
        state["model.layers.0.counter"] = torch.arange(12, dtype=torch.int64) * (step + 1)
        write_checkpoint(folder, state, step=step)
    runs["f16"] = {"run": root / "f16"}

    runs["lora"] = make_lora_run(root / "lora")
    return runs


def make_lora_run(root: Path) -> dict:
    """A base with two LoRA-adapted projections and a norm saved whole, adapters moving along a line."""
    from safetensors.torch import save_file

    from relex.synthetic import write_checkpoint

    g = torch.Generator().manual_seed(4)
    shapes = {f"{m}.weight": (48, 32) for m in LORA_MODULES}
    shapes.update({"model.norm.weight": (32,), "model.embed_tokens.weight": (64, 32), "lm_head.weight": (64, 32)})
    base = {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in shapes.items()}
    write_checkpoint(root / "base", base)
    r = 4
    a0 = {m: torch.randn(r, 32, generator=g) * 0.1 for m in LORA_MODULES}
    da = {m: torch.randn(r, 32, generator=g) * 0.01 for m in LORA_MODULES}
    db = {m: torch.randn(48, r, generator=g) * 0.01 for m in LORA_MODULES}
    dn = torch.randn(32, generator=g) * 0.001
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
              "modules_to_save": None, "base_model_name_or_path": str(root / "base")}
    for step in (2, 4, 6, 8, 11):
        folder = root / "run" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        tensors = {}
        for m in LORA_MODULES:
            noise = torch.randn(48, r, generator=g) * 0.001
            tensors[f"base_model.model.{m}.lora_A.weight"] = (a0[m] + step * da[m]).contiguous()
            tensors[f"base_model.model.{m}.lora_B.weight"] = (step * db[m] + noise).contiguous()
        tensors["base_model.model.model.norm.weight"] = (base["model.norm.weight"].float() + step * dn).to(torch.bfloat16)
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps(config))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return {"run": root / "run", "base": root / "base"}


def cases() -> list[tuple[str, str, dict]]:
    """(run, kind, options): kind is extrapolate, fit (fit + materialize) or grams."""
    out = []
    regressors = ["linear", "poly2", "poly3", "loglinear", "powerlaw", "saturating", "anchored",
                  "anchored-saturating", "anchored@0.5", "mlp"]
    for reg in regressors:
        out.append(("bf16", "extrapolate", {"regressor": reg, "target_step": 100}))
    for reg in ("linear", "anchored", "saturating"):
        out.append(("f32", "extrapolate", {"regressor": reg, "target_step": 80}))
        out.append(("f16", "extrapolate", {"regressor": reg, "target_step": 80}))
    more = [
        {"rank": 2, "target_step": [60, 100, 400]},
        {"rank": 3, "regressor": "anchored", "target_step": 100},
        {"regressor": "auto", "target_step": 100},
        {"regressor": "auto", "auto_scope": "group", "target_step": 100},
        {"regressor": "auto", "auto_scope": "tensor", "target_step": [70, 200]},
        {"regressor": "auto", "scale": "auto", "target_step": 100},
        {"scale": 0.7, "target_step": 100, "dtype": "float32"},
        {"target_step": [60, 100], "dtype": "bfloat16"},
        {"target_step": 100, "dtype": "float16"},
        {"target_step": 100},
        {"target_step": 100, "block_bytes": 4096},
        {"target_step": 100, "block_bytes": 50_000},
        {"regressor": "anchored", "target_step": 100, "block_bytes": 4096},
        {"regressor": "auto", "auto_scope": "tensor", "target_step": 100},
        {"regressor": "auto", "auto_scope": "tensor", "target_step": 100, "block_bytes": 4096},
        {"regressor": "mlp", "target_step": 100, "block_bytes": 4096},
        {"method": "matrix-rank1", "target_step": 100},
        {"method": "matrix-rank1", "regressor": "anchored", "target_step": [70, 100]},
        {"method": "matrix-rank1", "regressor": "saturating", "target_step": 100},
        {"method": "matrix-rank1", "regressor": "auto", "auto_scope": "tensor", "target_step": 100},
        {"method": "matrix-rank1", "regressor": "auto", "target_step": 100},
        {"method": "matrix-rank1", "target_step": 100, "block_bytes": 4096},
        {"method": "matrix-rank1", "regressor": "anchored", "target_step": 100, "block_bytes": 50_000},
        {"method": "elementwise", "target_step": [60, 100]},
        {"method": "elementwise", "copy_norms": True, "from_step": 22, "target_step": 100},
        {"method": "elementwise", "target_step": 100, "block_bytes": 4096},
        {"method": "last", "target_step": 100},
        {"method": "last", "target_step": 100, "dtype": "float32", "block_bytes": 4096},
        {"steps": "7,15,30,55", "target_step": 100},
        {"max_step": 22, "regressor": "poly2", "target_step": 100},
    ]
    out += [("bf16", "extrapolate", o) for o in more]
    out += [("f16", "extrapolate", {"method": "matrix-rank1", "target_step": 80}),
            ("f16", "extrapolate", {"method": "elementwise", "target_step": 80, "block_bytes": 4096}),
            ("f16", "extrapolate", {"regressor": "auto", "target_step": 80, "dtype": "float32"})]
    fits = [
        {"target_step": [70, 100]},
        {"rank": 2, "regressor": "poly2", "scale": 0.8, "target_step": [70, 100]},
        {"regressor": "anchored", "target_step": 100},
        {"regressor": "auto", "scale": "auto", "target_step": 100},
        {"regressor": "auto", "auto_scope": "tensor", "target_step": 100},
        {"regressor": "auto", "auto_scope": "tensor", "block_bytes": 4096, "target_step": 100},
        {"method": "matrix-rank1", "regressor": "anchored-saturating", "target_step": 100},
        {"method": "matrix-rank1", "block_bytes": 4096, "target_step": 100},
        {"method": "elementwise", "copy_norms": True, "from_step": 15, "target_step": 100},
        {"method": "last", "dtype": "float32", "target_step": 100},
        {"storage_dtype": "auto", "target_step": 100},
    ]
    out += [("bf16", "fit", o) for o in fits]
    out += [("f16", "fit", {"target_step": 80}), ("f32", "fit", {"regressor": "anchored", "target_step": 80})]
    for run in ("f32", "bf16", "f16", "lora"):
        out.append((run, "grams", {}))
    out.append(("bf16", "grams", {"block_bytes": 4096}))
    out += [("lora", "extrapolate", {"target_step": 20}),
            ("lora", "extrapolate", {"regressor": "anchored", "target_step": [15, 30]}),
            ("lora", "extrapolate", {"output": "lora", "target_step": [15, 30]}),
            ("lora", "extrapolate", {"output": "lora", "lora_rank": 2, "target_step": 20}),
            ("lora", "extrapolate", {"output": "lora", "method": "elementwise", "target_step": 20}),
            ("lora", "extrapolate", {"method": "matrix-rank1", "target_step": 20}),
            ("lora", "fit", {"target_step": 20})]
    return out


def label(run: str, kind: str, options: dict) -> str:
    return f"{run}:{kind}:" + ",".join(f"{k}={v}" for k, v in sorted(options.items()))


def run_case(runs: dict, run: str, kind: str, options: dict, work: Path) -> tuple[dict, str | None]:
    import relex.api
    import relex.run
    import relex.store

    where = runs[run]
    extra = {"base": where["base"]} if "base" in where else {}
    out = work / "out"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if kind == "grams":
        with relex.run.open_run(where["run"], **extra, **options) as opened:
            grams = opened.execute().grams
        result = {f"gram/{n}": hashlib.sha256(np.ascontiguousarray(g).tobytes()).hexdigest()[:24]
                  for n, g in grams.items()}
        return result, None
    options = dict(options)
    target = options.pop("target_step")
    if kind == "extrapolate":
        relex.api.extrapolate(where["run"], out, target_step=target, **extra, **options)
        return folder_digests(out), json_digest(out)
    block = {"block_bytes": options["block_bytes"]} if "block_bytes" in options else {}
    relex.api.fit(where["run"], work / "trajectory", **extra, **options)
    relex.store.materialize(work / "trajectory", out, target_step=target, **block)
    stored = {f"store:{k}": v for k, v in folder_digests(work / "trajectory").items()}
    return {**stored, **folder_digests(out)}, json_digest(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where to save the digests (json)")
    parser.add_argument("--compare", type=Path, help="digests of an earlier run to compare with")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", help="run only cases whose label contains this text")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="relex-digests-") as tmp:
        root = Path(tmp)
        runs = make_runs(root / "runs")
        for run, kind, options in cases():
            name = label(run, kind, options)
            if args.only and args.only not in name:
                continue
            tensors, figures = run_case(runs, run, kind, options, root / "work")
            results[name] = {"tensors": tensors, "json": figures}
    payload = {"threads": args.threads, "torch": torch.__version__, "cases": results}
    args.out.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    n_tensors = sum(len(c["tensors"]) for c in results.values())
    print(f"{len(results)} cases, {n_tensors} output tensors digested in {time.perf_counter() - started:.0f} s "
          f"-> {args.out}")
    if args.compare is None:
        return 0
    reference = json.loads(args.compare.read_text())["cases"]
    differing, json_notes, missing, unblocked = [], [], [], []
    for (run, kind, options) in cases():
        name = label(run, kind, options)
        case = results.get(name)
        if case is None:
            continue
        ref = reference.get(name)
        if ref is None:
            missing.append(name)
            continue
        bad = _different(ref["tensors"], case["tensors"])
        if bad and "block_bytes" in options:
            # the reference cut large tensors into row blocks, which changed its arithmetic; compare with
            # the reference of the same case without blocks
            whole = reference.get(label(run, kind, {k: v for k, v in options.items() if k != "block_bytes"}))
            if whole is not None and not _different(whole["tensors"], case["tensors"]):
                unblocked.append(name)
                bad = []
        if bad:
            differing.append((name, bad))
        if ref["json"] != case["json"]:
            json_notes.append(name)
    for name, bad in differing:
        print(f"DIFFERENT {name}: {len(bad)} tensor(s), e.g. {bad[:3]}")
    for name in unblocked:
        print(f"equal to the reference without blocks (not to its blocked outputs): {name}")
    for name in missing:
        print(f"not in the reference: {name}")
    if json_notes:
        print(f"relex.json model figures differ in {len(json_notes)} case(s), e.g. {json_notes[:3]}")
    compared = len(results) - len(missing)
    same = compared - len(differing) - len(unblocked)
    print(f"compared {compared} cases: {same} identical, {len(unblocked)} identical to the unblocked reference, "
          f"{len(differing)} different")
    return 1 if differing else 0


def _different(reference: dict, case: dict) -> list[str]:
    return sorted(k for k in set(reference) | set(case) if reference.get(k) != case.get(k))


if __name__ == "__main__":
    sys.exit(main())
