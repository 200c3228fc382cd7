"""Speed and memory of ``relex extrapolate`` against the I/O floor and a naive in-memory implementation.

Writes a synthetic bf16 trajectory (base + T checkpoints of ``--size-gb`` each, made of ``--tensors``
equal tensors), then measures, each in a fresh process:

* the I/O floor: reading every input tensor once with safetensors and writing the output's bytes;
* ``relex extrapolate`` (the command line, as a user runs it);
* the naive implementation: every checkpoint loaded whole, float64 ``numpy.linalg.svd`` per tensor.

Each is timed with the inputs in the page cache (warm) and, when the page cache can be dropped (root on
Linux), read from disk (cold). Prints wall times, their ratios and peak resident memory (above the
interpreter's own footprint, after imports).

    python benchmarks/extrapolate_speed.py --size-gb 1.0 --observed 6 --work /tmp/relex-bench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

STEPS_GAP = 10


def make_series(work: Path, size_gb: float, observed: int, n_tensors: int) -> dict:
    import torch
    from safetensors.torch import save_file

    numel = int(size_gb * 1e9 / 2 / n_tensors)
    cols = 4096
    rows = max(1, numel // cols)
    generator = torch.Generator().manual_seed(0)
    run = work / "run"
    if (run / f"checkpoint-{observed * STEPS_GAP}" / "model.safetensors").is_file():
        return {"rows": rows, "cols": cols}
    shutil.rmtree(run, ignore_errors=True)
    for step in range(0, (observed + 1) * STEPS_GAP, STEPS_GAP):
        tensors = {}
        for i in range(n_tensors):
            g = torch.Generator().manual_seed(1000 + i)
            base = torch.randn(rows, cols, generator=g) * 0.02
            direction = torch.randn(rows, cols, generator=g)
            noise = torch.randn(rows, cols, generator=generator) if step else 0
            tensors[f"model.layers.{i}.mlp.weight"] = (base + 1e-4 * step * direction + 1e-4 * noise).to(torch.bfloat16)
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"model_type": "synthetic"}))
        del tensors
    return {"rows": rows, "cols": cols}


def child(kind: str, work: Path, observed: int) -> None:
    """Run one measured job in this (fresh) process and print a json line."""
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    import numpy  # noqa: F401 - imports count towards the baseline, not the job
    import safetensors.torch  # noqa: F401

    import relex_cli.extrapolate  # noqa: F401
    from relex_cli.app import main as relex_main

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    folders = [work / "run" / f"checkpoint-{s}" for s in range(0, (observed + 1) * STEPS_GAP, STEPS_GAP)]
    out = work / f"out-{kind}"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    if kind == "floor":
        # Read every input byte once and write one checkpoint's worth: what any tool must at least do.
        buffer = bytearray(64 << 20)
        view = memoryview(buffer)
        out.mkdir()
        with open(out / "model.safetensors", "wb") as sink:
            for folder in folders:
                with open(folder / "model.safetensors", "rb", buffering=0) as source:
                    while True:
                        n = source.readinto(buffer)
                        if not n:
                            break
                        if folder == folders[-1]:
                            sink.write(view[:n])
    elif kind == "relex":
        code = relex_main(["extrapolate", str(work / "run"), "--target-step", str(10 * observed * STEPS_GAP),
                     "--out", str(out), "--quiet", "--device", "cpu"])
        assert code == 0
    elif kind == "naive":
        import numpy as np
        from safetensors.torch import load_file, save_file

        states = [load_file(folder / "model.safetensors") for folder in folders]  # every checkpoint in memory
        steps = np.arange(1, observed + 1) * STEPS_GAP
        result = {}
        for name, w0_tensor in states[0].items():
            w0 = w0_tensor.double().numpy().reshape(-1)
            x = np.stack([s[name].double().numpy().reshape(-1) - w0 for s in states[1:]])
            u, sigma, vt = np.linalg.svd(x, full_matrices=False)
            c = x @ vt[0]
            slope, intercept = np.polyfit(steps, c, 1)
            w = w0 + (intercept + slope * 10 * observed * STEPS_GAP) * vt[0]
            result[name] = torch.from_numpy(w.reshape(w0_tensor.shape)).to(torch.bfloat16)
        out.mkdir()
        save_file(result, out / "model.safetensors")
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"kind": kind, "seconds": seconds, "peak_mb": peak / 1024, "baseline_mb": baseline / 1024}))


def drop_page_cache() -> bool:
    """Empty the OS page cache (needs root on Linux), so that the next job reads from disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def measure(kind: str, work: Path, observed: int, cold: bool = False) -> dict:
    if cold and not drop_page_cache():
        return {}
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--work", str(work), "--observed", str(observed)],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0, help="bytes per checkpoint (bf16)")
    parser.add_argument("--observed", type=int, default=6, help="observed checkpoints besides the base")
    parser.add_argument("--tensors", type=int, default=16, help="tensors per checkpoint")
    parser.add_argument("--work", type=Path, default=Path("/tmp/relex-bench"))
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.work, args.observed)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    shape = make_series(args.work, args.size_gb, args.observed, args.tensors)
    print(f"series: base + {args.observed} checkpoints of {args.size_gb:.2f} GB "
          f"({args.tensors} bf16 tensors of {shape['rows']}x{shape['cols']}), made in {time.perf_counter() - t0:.0f} s")
    load = os.getloadavg()[0]
    print(f"load average before measuring: {load:.2f} on {os.cpu_count()} cores")
    rows = []
    for cache in ("warm", "cold"):
        cold = cache == "cold"
        if not cold:
            measure("floor", args.work, args.observed)  # fill the page cache
        floor = measure("floor", args.work, args.observed, cold)
        relex_run = measure("relex", args.work, args.observed, cold)
        if not floor:
            print("cold-cache figures need permission to drop the page cache (root on Linux); skipped")
            continue
        rows.append((cache, floor, relex_run))
    naive = None if args.skip_naive else measure("naive", args.work, args.observed)
    largest = shape["rows"] * shape["cols"] * 4 * (args.observed + 2) / 1e6
    total_in = args.size_gb * (args.observed + 1) * 1e3
    for cache, floor, relex_run in rows:
        print(f"[{cache} page cache] I/O floor (read {total_in / 1e3:.1f} GB, write {args.size_gb:.1f} GB): "
              f"{floor['seconds']:.1f} s; relex extrapolate: {relex_run['seconds']:.1f} s; "
              f"ratio {relex_run['seconds'] / floor['seconds']:.2f}")
    relex_run = rows[0][2]
    print(f"relex peak memory above interpreter:    {relex_run['peak_mb'] - relex_run['baseline_mb']:.0f} MB "
          f"(largest tensor x (T+2) in float32 = {largest:.0f} MB; all inputs = {total_in:.0f} MB)")
    if naive:
        print(f"naive in-memory float64 SVD:            {naive['seconds']:.1f} s "
              f"(relex, warm cache, is {naive['seconds'] / relex_run['seconds']:.1f}x faster)")
        print(f"naive peak memory above interpreter:    {naive['peak_mb'] - naive['baseline_mb']:.0f} MB")


if __name__ == "__main__":
    main()
