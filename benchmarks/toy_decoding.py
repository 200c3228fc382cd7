"""Weight-space against output-space extrapolation on the toy RLVR run of ``relex demo``.

From the demo's 10% and 20% prefixes (checkpoints up to step 10 and 20 of 100), five ways past the last
observed checkpoint, scored on the 300 held-out problems against the real final checkpoint:

* RELEX (``relex.extrapolate``, the default temporal rank-1 mode) and element-wise (``method="elementwise"``),
  both written as a step-100 checkpoint and decoded alone;
* logits extrapolation (``relex.decoding.LogitsExtrapolation``) with ``alpha = (100 - a) / (b - a)``, once
  with a, b the two newest checkpoints of the prefix (the default of ``--logits-extrapolate run=...``), once
  with a the base (step 0);
* selective Δlog p extrapolation (``relex.decoding.SelectiveExtrapolation``) with the base and the last
  observed checkpoint as the RL model; τ and γ are chosen on a validation split — 300 problems drawn from
  the training split with a fixed seed (the held-out split is never looked at) — by greedy accuracy; the
  paper's own setting (τ = −0.3, γ = 0.1) is shown too.

Every row decodes with :class:`relex.decoding.TwoModelDecoder` (one model for checkpoints), greedy and 8
samples at temperature 1, scored by the toy's exact-match verifier. Differences to the real final checkpoint
carry 95% paired-bootstrap intervals over problems. "cost" is the decode time per token divided by that of
one model decoding alone (the median of repeated greedy passes over the 300 prompts).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/toy_decoding.py [--out relex-demo] [--samples 8]

``--out`` is the folder ``relex demo`` writes: its trained run (``OUT/run``) is reused when it is the demo's
setting, otherwise the run is trained there (about 1-2 minutes on two idle cores). Prints the markdown table
of the README and writes ``OUT/toy_decoding.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

FRACTIONS = (0.1, 0.2)
TAUS = (-1.0, -0.3, -0.1, 0.0, 0.1, 0.3, 1.0, 3.0)
GAMMAS = (0.1, 0.3, 1.0, 2.0, 4.0, 8.0)
PAPER = (-0.3, 0.1)
VALIDATION_SIZE = 300
VALIDATION_SEED = 1234


def validation_problems():
    """300 problems of the training split, drawn with a fixed seed: where τ and γ are chosen."""
    from relex.toy.task import train_problems

    return random.Random(VALIDATION_SEED).sample(list(train_problems()), VALIDATION_SIZE)


def run_folder(out: Path) -> Path:
    """The demo's run in ``out/run``: reused when finished with the demo's setting, else trained."""
    from relex.demo import _cached_run
    from relex.toy import ToyConfig, train_run

    config = ToyConfig.demo()
    run_dir = out / "run"
    if _cached_run(run_dir, config):
        print(f"reusing the toy run in {run_dir}", flush=True)
    else:
        print(f"training the toy run into {run_dir} (ToyConfig.demo(): 100 GRPO steps)", flush=True)
        train_run(run_dir, config, evaluate=False)
    return run_dir


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


class Scorer:
    """Per-problem greedy and sampled scores of a decoder on fixed problems (the toy's verifier)."""

    def __init__(self, problems, samples: int, seed: int = 0):
        from relex.toy.evaluate import answer_ids, prompt_ids

        self.problems = list(problems)
        self.samples = samples
        self.seed = seed
        self.prompts = prompt_ids(self.problems)
        self.answers = answer_ids(self.problems)

    def greedy(self, decoder) -> list[float]:
        from relex.toy.evaluate import ANSWER_TOKENS, rewards

        tokens, *_ = decoder.generate_ids(self.prompts, max_new_tokens=ANSWER_TOKENS)
        return rewards(tokens, self.answers).tolist()

    def sampled(self, decoder) -> list[float]:
        from relex.toy.evaluate import ANSWER_TOKENS
        from relex.toy.model import decode
        from relex.toy.task import score

        generator = torch.Generator().manual_seed(self.seed)
        prompts = self.prompts.repeat_interleave(self.samples, dim=0)
        tokens, *_ = decoder.generate_ids(prompts, max_new_tokens=ANSWER_TOKENS, temperature=1.0,
                                          generator=generator)
        flags = [score(decode(row), problem.answer)
                 for row, problem in zip(tokens.tolist(), [p for p in self.problems for _ in range(self.samples)])]
        return [sum(flags[i:i + self.samples]) / self.samples for i in range(0, len(flags), self.samples)]

    def seconds_per_token(self, decoder, repeats: int = 7) -> float:
        from relex.toy.evaluate import ANSWER_TOKENS

        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            _, _, _, stats = decoder.generate_ids(self.prompts, max_new_tokens=ANSWER_TOKENS)
            times.append((time.perf_counter() - started) / stats.new_tokens)
        return statistics.median(times)


def choose_selective(base, rl, validation: Scorer) -> tuple[float, float, float, list]:
    """The (τ, γ) of the best greedy accuracy on the validation split (ties: the smaller γ, then τ)."""
    from relex.decoding import SelectiveExtrapolation, TwoModelDecoder

    grid = []
    for gamma in GAMMAS:
        for tau in TAUS:
            decoder = TwoModelDecoder(rl, SelectiveExtrapolation(tau=tau, gamma=gamma), model_a=base)
            accuracy = sum(validation.greedy(decoder)) / len(validation.problems)
            grid.append({"tau": tau, "gamma": gamma, "validation_greedy": accuracy})
    best = max(grid, key=lambda g: (g["validation_greedy"], -g["gamma"], -g["tau"]))
    return best["tau"], best["gamma"], best["validation_greedy"], grid


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("relex-demo"),
                        help="the relex demo folder (its run is reused or trained in OUT/run)")
    parser.add_argument("--samples", type=int, default=8, help="samples per problem at temperature 1")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (timings are per core count)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers.utils import logging as hf_logging

    from relex.api import extrapolate
    from relex.decoding import LogitsExtrapolation, SelectiveExtrapolation, SingleModel, TwoModelDecoder, alpha_for
    from relex.demo import prefix_step
    from relex.evaluate.stats import paired_bootstrap
    from relex.toy import ToyConfig
    from relex.toy.task import heldout_problems

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    run_dir = run_folder(out)
    config = ToyConfig.demo()
    final = config.steps
    heldout = Scorer(heldout_problems(), args.samples)
    validation = Scorer(validation_problems(), args.samples)
    models: dict[int, object] = {}

    def checkpoint(step: int):
        if step not in models:
            models[step] = load(run_dir / f"checkpoint-{step}")
        return models[step]

    rows: list[dict] = []

    def add(label: str, prefix: str, decoder, kind: str, **extra):
        rows.append(dict(label=label, prefix=prefix, kind=kind, decoder=decoder, **extra))

    add("base", "", TwoModelDecoder(checkpoint(0), SingleModel()), "checkpoint", step=0)
    selections = {}
    for fraction in FRACTIONS:
        last = prefix_step(fraction, final, config.checkpoint_every)
        prefix = f"{round(fraction * 100)}%"
        previous = last - config.checkpoint_every
        add(f"last observed (step {last})", prefix, TwoModelDecoder(checkpoint(last), SingleModel()), "checkpoint",
            step=last)
        for method, name in (("relex", "RELEX"), ("elementwise", "element-wise")):
            folder = out / "decoding" / f"{method}-from-{last}"
            started = time.perf_counter()
            extrapolate(run_dir, folder, target_step=final, max_step=last, method=method, overwrite=True)
            add(f"{name} (weights)", prefix, TwoModelDecoder(load(folder), SingleModel()), "weights",
                write_seconds=time.perf_counter() - started)
        for a in (previous, 0):
            alpha = alpha_for(a, last, final)
            add(f"logits, steps {a} & {last}, α={alpha:g}", prefix,
                TwoModelDecoder(checkpoint(last), LogitsExtrapolation(alpha), model_a=checkpoint(a)), "logits",
                alpha=alpha, a=a, b=last)
        print(f"choosing τ, γ on the validation split for the {prefix} prefix "
              f"({len(TAUS) * len(GAMMAS)} settings)", flush=True)
        tau, gamma, valid, grid = choose_selective(checkpoint(0), checkpoint(last), validation)
        selections[prefix] = {"tau": tau, "gamma": gamma, "validation_greedy": valid, "grid": grid}
        add(f"selective, τ={tau:g} γ={gamma:g} (validation)", prefix,
            TwoModelDecoder(checkpoint(last), SelectiveExtrapolation(tau=tau, gamma=gamma), model_a=checkpoint(0)),
            "selective", tau=tau, gamma=gamma, base=0, rl=last)
        add(f"selective, τ={PAPER[0]:g} γ={PAPER[1]:g} (paper)", prefix,
            TwoModelDecoder(checkpoint(last), SelectiveExtrapolation(*PAPER), model_a=checkpoint(0)), "selective",
            tau=PAPER[0], gamma=PAPER[1], base=0, rl=last)
    add(f"real final (step {final})", "", TwoModelDecoder(checkpoint(final), SingleModel()), "checkpoint", step=final)

    print("scoring on the held-out split", flush=True)
    for row in rows:
        row["greedy_scores"] = heldout.greedy(row["decoder"])
        row["sampled_scores"] = heldout.sampled(row["decoder"])
    one_model = heldout.seconds_per_token(rows[-1]["decoder"])
    reference = rows[-1]
    for row in rows:
        row["greedy"] = sum(row["greedy_scores"]) / len(row["greedy_scores"])
        row["sampled"] = sum(row["sampled_scores"]) / len(row["sampled_scores"])
        row["greedy_diff"] = paired_bootstrap(reference["greedy_scores"], row["greedy_scores"], seed=0)
        row["sampled_diff"] = paired_bootstrap(reference["sampled_scores"], row["sampled_scores"], seed=0)
        row["replaced"] = None
        if row["kind"] in ("logits", "selective"):
            row["cost"] = heldout.seconds_per_token(row["decoder"]) / one_model
            _, _, _, stats = row["decoder"].generate_ids(heldout.prompts, max_new_tokens=4)
            if row["kind"] == "selective":
                row["replaced"] = stats.replaced_fraction
        else:
            row["cost"] = 1.0

    def ci(d):
        return f"{100 * d['diff']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]"

    lines = ["| from | way past the last checkpoint | greedy | vs real final | sampled avg@%d | vs real final | "
             "cost per token |" % args.samples, "|---|---|---|---|---|---|---|"]
    for row in rows:
        same = row is reference
        cost = f"{row['cost']:.2f}×" + (f" (resampled {100 * row['replaced']:.1f}%)" if row["replaced"] is not None else "")
        lines.append(f"| {row['prefix'] or '—'} | {row['label']} | {100 * row['greedy']:.1f} | "
                     f"{'—' if same else ci(row['greedy_diff'])} | {100 * row['sampled']:.1f} | "
                     f"{'—' if same else ci(row['sampled_diff'])} | {cost} |")
    table = "\n".join(lines)
    print()
    print(table)
    print(f"\naccuracy in % on the 300 held-out problems; differences in points with 95% paired-bootstrap "
          f"intervals; one model decodes at {1e3 * one_model:.3f} ms per token here")
    for prefix, chosen in selections.items():
        print(f"selective from {prefix}: τ={chosen['tau']:g}, γ={chosen['gamma']:g} "
              f"(validation greedy {100 * chosen['validation_greedy']:.1f}%)")
    record = {
        "run": str(run_dir), "samples": args.samples, "threads": args.threads,
        "seconds_per_token_one_model": one_model, "selections": selections,
        "rows": [{k: v for k, v in row.items() if k != "decoder"} for row in rows], "table": table,
    }
    (out / "toy_decoding.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out / 'toy_decoding.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
