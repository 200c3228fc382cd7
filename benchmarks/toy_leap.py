"""Train less on the toy RLVR run: real steps to reach the plain run's accuracy, plain against leaping.

For each seed, the base of ``relex demo`` is warmed up once; then

* ``plain`` — the demo's run (``ToyConfig.demo()``: GRPO, plain SGD, 100 steps), held-out greedy accuracy
  after every real step; its accuracy at step 100 is the run's *final accuracy*;
* ``leap M,N`` — the same run with :class:`relex.integrations.leap.LeapOptions` (every M real steps, jump N
  steps when the verdict on the segment says plausible: ``require="plausible"``), scored after every real
  step; ``lenient``: when ``relex check --lenient`` would pass the jump; ``always``: whatever the verdict says;
  ``probe``: the length chosen at each decision on a probe of 64 training problems (the horizon search of
  :mod:`relex.probe`: jump lengths up to N scored against the current weights; none better: no jump);
* ``+check`` — the same, reverting a jump that lowers greedy accuracy on 200 training problems drawn at
  random (a validation set the held-out score never sees; the toy task has no unseen problems beyond the
  held-out split);
* ``noisy plain`` / ``noisy leap M,N`` — the noisy preset (Adam, lr 1e-4), where the verdict should refuse.

and reports, per setting, the real steps (and training seconds, scoring excluded) until held-out greedy
accuracy first reaches 90% and 100% of the plain run's final accuracy of the same seed and preset, the
jumps made and refused (or reverted). A leaping run stops once it reached 100%, any run after ``--max-real``
real steps.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/toy_leap.py --out toy-leap [--seeds 0,1,2] [--plot docs/leap.png]

Each (seed, setting) is written to ``OUT/SEED-SETTING.json`` as soon as it is done and reused by a later
call, so the table can be built up over several calls. One torch thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

VALIDATION = 200  # training problems (a seeded sample) the +check variant scores a jump on
PROBE, PROBE_PROBLEMS = "toy-train", 64  # the probe the "probe" variants choose each jump's length on
# name: (preset, (every, leap) or None, require, check)
SETTINGS = {
    "plain": ("demo", None, None, False),
    "leap 10,40": ("demo", (10, 40), "plausible", False),
    "leap 20,100": ("demo", (20, 100), "plausible", False),
    "leap 20,100 lenient": ("demo", (20, 100), "lenient", False),
    "leap 10,40 always": ("demo", (10, 40), "always", False),
    "leap 20,100 always": ("demo", (20, 100), "always", False),
    "leap 20,100 always +check": ("demo", (20, 100), "always", True),
    "leap 10,40 probe": ("demo", (10, 40), "probe", False),
    "leap 20,100 probe": ("demo", (20, 100), "probe", False),
    "noisy plain": ("noisy", None, None, False),
    "noisy leap 20,100": ("noisy", (20, 100), "plausible", False),
    "noisy leap 20,100 always": ("noisy", (20, 100), "always", False),
    "noisy leap 20,100 probe": ("noisy", (20, 100), "probe", False),
}


class Done(Exception):
    """Raised from the step hook to end a run early."""


def run_setting(name: str, seed: int, base, target: float | None, max_real: int) -> dict:
    from relex.integrations.leap import Leaper, LeapOptions
    from relex.toy import ToyConfig, greedy_accuracy, train_run
    from relex.toy.task import train_problems

    preset, leap, require, check = SETTINGS[name]
    config = getattr(ToyConfig, preset)(seed=seed)
    leaper = None
    if leap is not None:
        problems = train_problems()  # in a fixed order, not a random one: sample them
        chosen = np.random.default_rng(12345).choice(len(problems), VALIDATION, replace=False)
        validation = [problems[int(i)] for i in chosen]
        probe = {"probe": PROBE, "probe_limit": PROBE_PROBLEMS} if require == "probe" else {}
        leaper = Leaper(LeapOptions(every=leap[0], leap=leap[1], require=require, **probe,
                                    check=(lambda model: greedy_accuracy(model, validation)) if check else None))
        config = config.replace(steps=10_000)  # the run's virtual length: it ends by real steps here
    curve: list[dict] = []
    clock = {"train": 0.0, "last": time.perf_counter()}

    def on_step(real_step: int, step: int, model) -> None:
        now = time.perf_counter()
        clock["train"] += now - clock["last"]
        accuracy = greedy_accuracy(model)
        curve.append({"real": real_step, "step": step, "greedy": accuracy, "seconds": round(clock["train"], 3)})
        clock["last"] = time.perf_counter()
        reached = target is not None and accuracy >= target
        if real_step >= max_real or (reached and leap is not None):
            raise Done

    try:
        train_run(None, config, base=base, evaluate=False, leap=leaper, on_step=on_step)
    except Done:
        pass
    leaps = None if leaper is None else [{k: v for k, v in d.to_dict().items() if k != "figures"}
                                         for d in leaper.decisions]
    return {"setting": name, "seed": seed, "curve": curve, "leaps": leaps}


def first(curve: list[dict], threshold: float) -> dict | None:
    return next((p for p in curve if p["greedy"] >= threshold), None)


def table(records: list[dict]) -> str:
    """One row per setting: per seed (slash-separated) and median real steps to 90% and 100% of the plain
    run's final accuracy, the median training seconds to 100%, and the decisions over all seeds."""
    by = {(r["seed"], r["setting"]): r for r in records}
    seeds = sorted({s for s, _ in by})
    rows = [f"seeds {', '.join(map(str, seeds))}; '>n': not reached in the n real steps run",
            "",
            "| setting | plain final acc. | real steps to 90% | median | real steps to 100% | median "
            "| s to 100% (median) | jumps made / refused / reverted | s per decision (median) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name in SETTINGS:
        present = [s for s in seeds if (s, name) in by]
        if not present:
            continue
        finals, reach, costs, decisions = [], {0.9: [], 1.0: []}, [], {"jumped": 0, "refused": 0, "reverted": 0}
        for seed in present:
            record = by[(seed, name)]
            plain = by.get((seed, "noisy plain" if name.startswith("noisy") else "plain"))
            final = plain["curve"][99]["greedy"] if plain and len(plain["curve"]) >= 100 else float("nan")
            finals.append(final)
            for share in (0.9, 1.0):
                point = first(record["curve"], share * final)
                reach[share].append((point["real"], point["seconds"]) if point else (None, len(record["curve"])))
            for d in record.get("leaps") or []:
                decisions[d["reason"]] = decisions.get(d["reason"], 0) + 1
                costs.append(d["seconds"])
        cells = [name, "/".join(f"{f:.3f}" for f in finals)]
        for share in (0.9, 1.0):
            cells.append("/".join(str(r) if r is not None else f">{n}" for r, n in reach[share]))
            reached = [r for r, _ in reach[share] if r is not None]
            cells.append(f"{statistics.median(reached):.0f}" if len(reached) == len(present) else
                         f"{len(reached)}/{len(present)} reached")
        times = [t for r, t in reach[1.0] if r is not None]
        cells.append(f"{statistics.median(times):.0f}" if len(times) == len(present) else "—")
        cells.append("—" if SETTINGS[name][1] is None else
                     f"{decisions['jumped']} / {decisions['refused']} / {decisions['reverted']}")
        cells.append(f"{statistics.median(costs):.2f}" if costs else "—")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = [("demo", [n for n in SETTINGS if not n.startswith("noisy")]),
               ("noisy", [n for n in SETTINGS if n.startswith("noisy")])]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colours = {}
    for ax, (preset, names) in zip(axes, presets):
        for name in names:
            for record in [r for r in records if r["setting"] == name]:
                colour = colours.setdefault(name, "black" if "plain" in name else f"C{len(colours)}")
                _, leap, require, check = SETTINGS[name]
                # Refused jumps leave a run identical to the plain one: dashed lines on top of it.
                style = ":" if check else {"plausible": "--", "lenient": "-.", "probe": (0, (1, 1))}.get(require, "-")
                xs = [p["real"] for p in record["curve"]]
                ys = [p["greedy"] for p in record["curve"]]
                ax.plot(xs, ys, color=colour, alpha=0.8, lw=2.2 if leap is None else 1.3, linestyle=style,
                        label=name if record["seed"] == min(r["seed"] for r in records) else None)
        ax.set_title(f"toy run, preset {preset} (seeds {', '.join(str(s) for s in sorted({r['seed'] for r in records}))})")
        ax.set_xlabel("real training steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("held-out greedy accuracy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--settings", default=";".join(SETTINGS), help="names separated by ; (see SETTINGS)")
    parser.add_argument("--max-real", type=int, default=100)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--table-only", action="store_true", help="print the table of the records in --out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.settings.split(";") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; known: {list(SETTINGS)}")
    if not args.table_only:
        from relex.toy import ToyConfig, warmup_model

        for seed in [int(s) for s in args.seeds.split(",")]:
            base = None
            for name in sorted(names, key=lambda n: SETTINGS[n][1] is not None):  # plain runs first
                file = args.out / f"{seed}-{name.replace(' ', '_').replace(',', '-')}.json"
                if file.is_file():
                    continue
                if base is None:
                    started = time.perf_counter()
                    base = warmup_model(ToyConfig.demo(seed=seed))
                    print(f"seed {seed}: base warmed up in {time.perf_counter() - started:.0f} s", flush=True)
                plain_name = "noisy plain" if name.startswith("noisy") else "plain"
                plain_file = args.out / f"{seed}-{plain_name.replace(' ', '_')}.json"
                target = None
                if SETTINGS[name][1] is not None and plain_file.is_file():
                    curve = json.loads(plain_file.read_text())["curve"]
                    target = curve[min(99, len(curve) - 1)]["greedy"]
                started = time.perf_counter()
                record = run_setting(name, seed, base, target, args.max_real)
                file.write_text(json.dumps(record) + "\n")
                print(f"seed {seed}: {name}: {len(record['curve'])} real steps, best "
                      f"{max(p['greedy'] for p in record['curve']):.3f}, {time.perf_counter() - started:.0f} s",
                      flush=True)
    records = [json.loads(f.read_text()) for f in sorted(args.out.glob("*.json"))]
    print(table(records))
    if args.plot is not None:
        plot(records, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
