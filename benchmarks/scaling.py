"""How ``relex extrapolate``'s time and memory grow with the number of observed checkpoints and the model size.

For each row a synthetic bf16 run is written (GPT-like shapes, untied embedding and head), then measured in
fresh processes as in ``extrapolate_speed.py``: the I/O floor (every input byte read once, one checkpoint
written) and ``relex.extrapolate`` (warm page cache, the median of ``--repeat`` runs), with relex's
peak memory beside the bound (T + 1) × the largest tensor in its stored dtype + 25%. Each run is deleted
once measured. Prints a Markdown table.

    python benchmarks/scaling.py                       # T = 4, 16, 75 (a vocab-sized embedding) and 3 sizes
    python benchmarks/scaling.py --observed 4 --params 40e6,150e6   # chosen rows only
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from extrapolate_speed import _write_run, measure, model_shapes

QWEN_VOCAB = 151936  # a vocab-sized embedding: (T + 1) copies of it exceed the default pool at T = 75


def row(work: Path, label: str, shapes: dict, observed: int, repeat: int) -> str:
    run, out = work / "run", work / "out"
    shutil.rmtree(run, ignore_errors=True)
    _write_run(run, shapes, observed)
    measure("floor", run, out, observed)  # fill the page cache
    floors, relexes = [], []
    for _ in range(repeat):
        floors.append(measure("floor", run, out, observed)["seconds"])
        relexes.append(measure("relex", run, out, observed))
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    params = sum(math.prod(s) for s in shapes.values())
    largest = max(math.prod(s) for s in shapes.values()) * 2
    floor = statistics.median(floors)
    seconds = statistics.median(r["seconds"] for r in relexes)
    peak = max(r["peak_mb"] - r["baseline_mb"] for r in relexes)
    bound = (observed + 1) * largest * 1.25 / 1e6
    inputs = (observed + 1) * params * 2 / 1e9
    return (f"| {label} | {params / 1e6:.0f}M | {observed} | {inputs:.1f} GB | {floor:.1f} s | {seconds:.1f} s | "
            f"{seconds / floor:.1f}× | {peak:.0f} MB | {bound:.0f} MB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--observed", default="4,16,75", help="T values of the first table")
    parser.add_argument("--params", default="40e6,150e6,500e6", help="model sizes of the second table (T = 4)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "relex-scaling")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"load average before measuring: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores\n")
    header = ("| run | parameters | T | inputs | I/O floor | relex | relex / floor | relex peak memory | "
              "bound (T + 1) × largest + 25% |\n|---|---|---|---|---|---|---|---|---|")
    print(header)
    for observed in [int(t) for t in args.observed.split(",") if t]:
        shapes = model_shapes(45e6, vocab=QWEN_VOCAB)
        print(row(args.work, f"vocab {QWEN_VOCAB}", shapes, observed, args.repeat), flush=True)
    for params in [float(p) for p in args.params.split(",") if p]:
        print(row(args.work, "vocab 49152", model_shapes(params), 4, args.repeat), flush=True)
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
