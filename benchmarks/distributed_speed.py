"""Speed of ``relex extrapolate`` split across 1, 2 and 4 CPU processes (torchrun, gloo) on one synthetic run.

Writes the bf16 trajectory of ``extrapolate_speed.py`` (base + ``--observed`` checkpoints of ``--size-gb``
each, ``--tensors`` equal tensors), fills the page cache, then times, ``--repeat`` times and interleaved:

* ``relex extrapolate`` in one process, without a launcher;
* ``torchrun --standalone --nproc_per_node N -m relex_cli extrapolate ...`` for each N of ``--procs``.

Each row prints the wall time of the whole launch (interpreter start, imports, rendezvous, work) and the
engine's own time (``seconds`` of ``relex.json``, measured by rank 0 from the call to the rename), both as
medians, and their ratio to the one-process run. Every rank gets ``cores // N`` torch threads (at least one),
so N processes never ask for more compute threads than one process has. Every output is checked tensor by
tensor against the one-process output.

    python benchmarks/distributed_speed.py --size-gb 0.5 --observed 6 --tensors 16 --procs 1,2,4 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from extrapolate_speed import STEPS_GAP, make_series


def launch(procs: int | None, run: Path, out: Path, observed: int) -> tuple[float, float]:
    """(wall seconds of the whole launch, the engine's seconds from relex.json); ``procs=None``: no launcher."""
    shutil.rmtree(out, ignore_errors=True)
    cores = os.cpu_count() or 1
    threads = max(1, cores // (procs or 1))
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(threads))
    command = ["-m", "relex_cli", "extrapolate", str(run), "--target-step", str(10 * observed * STEPS_GAP),
               "--out", str(out), "--quiet", "--device", "cpu"]
    if procs is None:
        command = [sys.executable, *command]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
                   *command]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return wall, json.loads((out / "relex.json").read_text())["summary"]["seconds"]


def same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    def state(folder: Path) -> dict:
        tensors = {}
        for file in sorted(folder.glob("*.safetensors")):
            tensors.update(load_file(file))
        return tensors

    left, right = state(a), state(b)
    return left.keys() == right.keys() and all(torch.equal(left[n], right[n]) for n in left)


def median(values: list[float]) -> str:
    text = f"{statistics.median(values):.2f}"
    return text if len(values) == 1 else f"{text} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=0.5, help="bytes per checkpoint (bf16)")
    parser.add_argument("--observed", type=int, default=6, help="observed checkpoints besides the base")
    parser.add_argument("--tensors", type=int, default=16, help="tensors per checkpoint")
    parser.add_argument("--procs", default="1,2,4", help="process counts to launch with torchrun")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "relex-bench-distributed")
    parser.add_argument("--clean", action="store_true", help="remove the benchmark data at the end")
    args = parser.parse_args()
    procs = [int(p) for p in args.procs.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    run = args.work / "run"
    t0 = time.perf_counter()
    shapes = make_series(run, args.size_gb, args.observed, args.tensors)
    rows, cols = next(iter(shapes.values()))
    total_gb = args.size_gb * (args.observed + 1)
    print(f"series: base + {args.observed} checkpoints of {args.size_gb:.2f} GB ({args.tensors} bf16 tensors of "
          f"{rows}x{cols}; {total_gb:.1f} GB read per run), ready in {time.perf_counter() - t0:.0f} s")
    print(f"{os.cpu_count()} cores; load average before measuring: {os.getloadavg()[0]:.2f}")
    reference = args.work / "out-single"
    launch(None, run, reference, args.observed)  # fills the page cache and gives the reference output
    labels = ["1 process, no launcher"] + [f"torchrun, {p} process{'es' if p > 1 else ''}" for p in procs]
    walls: dict[str, list[float]] = {label: [] for label in labels}
    engines: dict[str, list[float]] = {label: [] for label in labels}
    identical = True
    for _ in range(args.repeat):
        for label, count in zip(labels, [None, *procs]):
            out = args.work / f"out-{count or 'single'}"
            wall, engine = launch(count, run, out, args.observed)
            walls[label].append(wall)
            engines[label].append(engine)
            if count is not None:
                identical = identical and same_tensors(reference, out)
    base_wall = statistics.median(walls[labels[0]])
    base_engine = statistics.median(engines[labels[0]])
    print(f"[warm page cache, {args.repeat}x interleaved, median (min-max); load average now "
          f"{os.getloadavg()[0]:.2f}]")
    print(f"{'':28s} {'whole launch s':>22s} {'ratio':>6s} {'engine s':>22s} {'ratio':>6s} {'GB/s':>6s}")
    for label in labels:
        wall, engine = statistics.median(walls[label]), statistics.median(engines[label])
        print(f"{label:28s} {median(walls[label]):>22s} {wall / base_wall:6.2f} {median(engines[label]):>22s} "
              f"{engine / base_engine:6.2f} {total_gb / engine:6.2f}")
    print(f"every output equals the one-process output tensor for tensor: {identical}")
    for count in [None, *procs]:
        shutil.rmtree(args.work / f"out-{count or 'single'}", ignore_errors=True)
    if args.clean:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
