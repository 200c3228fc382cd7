"""Speed and memory of ``relex extrapolate`` against the I/O floor and a naive in-memory implementation.

Writes a synthetic bf16 trajectory (base + T checkpoints of ``--size-gb`` each, made of ``--tensors``
equal tensors) and measures, each job in a fresh process and timed inside it (after imports):

* the I/O floor: reading every input byte once and writing one checkpoint's worth of bytes;
* ``relex.extrapolate`` (:func:`relex.api.extrapolate`) to one target step;
* the naive implementation: every checkpoint loaded whole, float64 ``numpy.linalg.svd`` per tensor.

The floor and relex are measured with the inputs in the page cache (warm; ``--repeat`` times, interleaved,
to show the spread on a shared machine) and, when the page cache can be dropped (root on Linux), read from
disk (cold). Peak resident memory is printed above the interpreter's own footprint, beside the bound
(T + 1) × the largest tensor in its stored dtype + 25%.

``--whole-process`` adds whole processes as a user runs them, on a second run of ``--model-params``
parameters (bf16, base + ``--whole-observed`` checkpoints): the ``relex extrapolate`` command against a
process that opens every input tensor with safetensors and writes one checkpoint (safetensors maps the
files: it reads only the bytes it writes), and against the same process reading every input byte first.
relex's modules are byte-compiled first, as an installed package has them.

    python benchmarks/extrapolate_speed.py --size-gb 1.0 --observed 6 --tensors 16 --whole-process

Data goes to ``--work`` (default: a folder in the system's temporary directory); ``--clean`` removes it at
the end.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS_GAP = 10


def make_series(run: Path, size_gb: float, observed: int, n_tensors: int) -> dict:
    """Base + ``observed`` checkpoints of ``n_tensors`` equal bf16 tensors (7629 × 4096 at 1 GB and 16)."""

    numel = int(size_gb * 1e9 / 2 / n_tensors)
    cols = 4096
    rows = max(1, numel // cols)
    shapes = {f"model.layers.{i}.mlp.weight": (rows, cols) for i in range(n_tensors)}
    _write_run(run, shapes, observed)
    return shapes


def model_shapes(params: float, vocab: int = 49152, layers: int = 12) -> dict[str, tuple[int, ...]]:
    """A GPT-like decoder of about ``params`` parameters: untied embedding and head, ``layers`` layers."""
    hidden = 64
    while True:
        total = 2 * vocab * (hidden + 64) + layers * 12 * (hidden + 64) ** 2
        if total > params and hidden == 64:
            break
        if total > params:
            break
        hidden += 64
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)})
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{name}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (4 * hidden, hidden)
        shapes[p + "mlp.up_proj.weight"] = (4 * hidden, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, 4 * hidden)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _write_run(run: Path, shapes: dict, observed: int) -> None:
    import torch
    from safetensors.torch import save_file

    if (run / f"checkpoint-{observed * STEPS_GAP}" / "model.safetensors").is_file():
        return
    shutil.rmtree(run, ignore_errors=True)
    noise_gen = torch.Generator().manual_seed(0)
    for step in range(0, (observed + 1) * STEPS_GAP, STEPS_GAP):
        tensors = {}
        for i, (name, shape) in enumerate(shapes.items()):
            g = torch.Generator().manual_seed(1000 + i)
            base = torch.randn(shape, generator=g) * 0.02
            if step:
                direction = torch.randn(shape, generator=g)
                base += 1e-4 * step * direction + 1e-4 * torch.randn(shape, generator=noise_gen)
            tensors[name] = base.to(torch.bfloat16)
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"model_type": "synthetic"}))
        del tensors


def _memory(key: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> int:
    """Start measuring peak memory from now; the current resident size in bytes."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current size (Linux >= 4.0)
        return _memory("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak() -> int:
    return _memory("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(kind: str, run: Path, out: Path, observed: int) -> None:
    """Run one measured job in this (fresh) process and print a json line."""
    import numpy  # noqa: F401 - imports count towards the baseline, not the job
    import safetensors.torch  # noqa: F401
    import torch

    import relex.api

    baseline = _reset_peak()
    folders = [run / f"checkpoint-{s}" for s in range(0, (observed + 1) * STEPS_GAP, STEPS_GAP)]
    shutil.rmtree(out, ignore_errors=True)
    target = 10 * observed * STEPS_GAP
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
        relex.api.extrapolate(run, out, target_step=target, device="cpu")
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
            w = w0 + (intercept + slope * target) * vt[0]
            result[name] = torch.from_numpy(w.reshape(w0_tensor.shape)).to(torch.bfloat16)
        out.mkdir()
        save_file(result, out / "model.safetensors")
    seconds = time.perf_counter() - started
    print(json.dumps({"kind": kind, "seconds": seconds, "peak_mb": _peak() / 1e6, "baseline_mb": baseline / 1e6}))


def drop_page_cache() -> bool:
    """Empty the OS page cache (needs root on Linux), so that the next job reads from disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def measure(kind: str, run: Path, out: Path, observed: int, cold: bool = False) -> dict:
    if cold and not drop_page_cache():
        return {}
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--run", str(run), "--out", str(out),
                           "--observed", str(observed)], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


WHOLE_READ_AND_WRITE = """
import sys
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
read_bytes = sys.argv[3] == "read"
folders = sorted(Path(sys.argv[1]).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
buffer = bytearray(64 << 20)
for folder in folders:
    if read_bytes:  # every input byte, into one reused buffer
        with open(folder / "model.safetensors", "rb", buffering=0) as source:
            while source.readinto(buffer):
                pass
    with safe_open(folder / "model.safetensors", "pt") as f:  # every tensor, as safetensors gives them
        tensors = {k: f.get_tensor(k) for k in f.keys()}
Path(sys.argv[2]).mkdir(parents=True)
save_file(tensors, Path(sys.argv[2]) / "model.safetensors", metadata={"format": "pt"})
"""


def whole_process(kind: str, run: Path, out: Path, observed: int) -> float:
    """Wall time of a whole process as a user runs it (interpreter start, imports, work).

    ``relex``: the ``relex extrapolate`` command. ``safetensors``: a process that opens every input tensor with
    safetensors and writes the newest checkpoint with ``save_file`` (safetensors maps the files, so only the
    bytes it writes are ever read). ``read``: the same, after reading every input byte once.
    """
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    if kind == "relex":
        command = [sys.executable, "-m", "relex_cli", "extrapolate", str(run), "--target-step",
                   str(10 * observed * STEPS_GAP), "--out", str(out), "--quiet", "--device", "cpu"]
    else:
        command = [sys.executable, "-c", WHOLE_READ_AND_WRITE, str(run), str(out), kind]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return seconds


def byte_compile(packages: tuple[str, ...] = ("relex", "relex_cli")) -> None:
    """Write the bytecode cache of relex's own modules, as an installed package has it: ``pip install``
    compiles them, but an editable install run with ``PYTHONDONTWRITEBYTECODE`` set (as some CI machines
    are) compiles them at every start of ``relex`` (0.05 s here)."""
    for name in packages:
        spec = importlib.util.find_spec(name)
        for folder in (spec.submodule_search_locations or []) if spec is not None else []:
            compileall.compile_dir(folder, quiet=1)


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} (min {min(values):.2f}, max {max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0, help="bytes per checkpoint (bf16)")
    parser.add_argument("--observed", type=int, default=6, help="observed checkpoints besides the base")
    parser.add_argument("--tensors", type=int, default=16, help="tensors per checkpoint")
    parser.add_argument("--repeat", type=int, default=3, help="warm measurements of the floor and relex")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "relex-bench")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--skip-cold", action="store_true")
    parser.add_argument("--whole-process", action="store_true", help="also time whole processes on a second run")
    parser.add_argument("--whole-process-only", action="store_true", help="time only the whole processes")
    parser.add_argument("--model-params", type=float, default=150e6)
    parser.add_argument("--whole-observed", type=int, default=4)
    parser.add_argument("--clean", action="store_true", help="remove the benchmark data at the end")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.run, args.out, args.observed)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    run, out = args.work / "run", args.work / "out"
    if args.whole_process_only:
        whole_processes(args, out)
        return
    t0 = time.perf_counter()
    shapes = make_series(run, args.size_gb, args.observed, args.tensors)
    rows, cols = next(iter(shapes.values()))
    print(f"series: base + {args.observed} checkpoints of {args.size_gb:.2f} GB "
          f"({args.tensors} bf16 tensors of {rows}x{cols}), ready in {time.perf_counter() - t0:.0f} s")
    print(f"load average before measuring: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    measure("floor", run, out, args.observed)  # fill the page cache
    floors, relexes, ratios = [], [], []
    for _ in range(args.repeat):
        floor = measure("floor", run, out, args.observed)
        relex_run = measure("relex", run, out, args.observed)
        floors.append(floor["seconds"])
        relexes.append(relex_run)
        ratios.append(relex_run["seconds"] / floor["seconds"])
    total_in = args.size_gb * (args.observed + 1)
    print(f"[warm page cache, {args.repeat}x] I/O floor (read {total_in:.1f} GB, write {args.size_gb:.1f} GB): "
          f"{spread(floors)} s; relex: {spread([r['seconds'] for r in relexes])} s; "
          f"relex / floor: {spread(ratios)}")
    if not args.skip_cold:
        cold_floor = measure("floor", run, out, args.observed, cold=True)
        if cold_floor:
            cold_relex = measure("relex", run, out, args.observed, cold=True)
            print(f"[cold page cache] I/O floor: {cold_floor['seconds']:.2f} s; relex: {cold_relex['seconds']:.2f} s; "
                  f"relex / floor: {cold_relex['seconds'] / cold_floor['seconds']:.2f}")
        else:
            print("cold-cache figures need permission to drop the page cache (root on Linux); skipped")
    largest = rows * cols * 2
    bound = (args.observed + 1) * largest * 1.25 / 1e6
    peak = max(r["peak_mb"] - r["baseline_mb"] for r in relexes)
    print(f"relex peak memory above the interpreter: {peak:.0f} MB; bound (T + 1) x largest tensor "
          f"({largest / 1e6:.1f} MB bf16) + 25% = {bound:.0f} MB; all inputs = {total_in * 1e3:.0f} MB")
    if not args.skip_naive:
        naive = measure("naive", run, out, args.observed)
        best = min(r["seconds"] for r in relexes)
        print(f"naive in-memory float64 SVD: {naive['seconds']:.1f} s, peak {naive['peak_mb'] - naive['baseline_mb']:.0f} MB "
              f"(relex, warm, is {naive['seconds'] / statistics.median([r['seconds'] for r in relexes]):.1f}x faster; "
              f"best run {naive['seconds'] / best:.1f}x)")
    if args.whole_process:
        whole_processes(args, out)
    shutil.rmtree(out, ignore_errors=True)
    if args.clean:
        shutil.rmtree(args.work, ignore_errors=True)


def whole_processes(args, out: Path) -> None:
    """Whole ``relex extrapolate`` processes against processes that read the inputs and write one checkpoint."""
    model = args.work / "model-run"
    shapes = model_shapes(args.model_params)
    _write_run(model, shapes, args.whole_observed)
    params = sum(math.prod(s) for s in shapes.values())
    byte_compile()
    whole_process("read", model, out, args.whole_observed)  # fill the page cache
    times: dict[str, list[float]] = {"safetensors": [], "read": [], "relex": []}
    for _ in range(args.repeat):
        for kind in times:
            times[kind].append(whole_process(kind, model, out, args.whole_observed))
    print(f"[whole processes, {args.repeat}x, load {os.getloadavg()[0]:.1f}] {params / 1e6:.0f}M-parameter bf16 run, "
          f"base + {args.whole_observed} checkpoints of {params * 2 / 1e6:.0f} MB:")
    print(f"  safetensors opens every input and writes one checkpoint: {spread(times['safetensors'])} s")
    print(f"  the same, reading every input byte first:               {spread(times['read'])} s")
    print(f"  relex extrapolate:                                      {spread(times['relex'])} s; "
          f"ratio {spread([r / s for r, s in zip(times['relex'], times['safetensors'])])} and "
          f"{spread([r / s for r, s in zip(times['relex'], times['read'])])}")


if __name__ == "__main__":
    main()
