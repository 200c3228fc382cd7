"""Held-out accuracy of checkpoint folders on the arithmetic task, with 95% bootstrap CIs.

For each checkpoint: greedy accuracy (pass@1 at temperature 0) and, with --samples K > 0, sampled avg@K
and pass@K at --temperature. CIs are percentile bootstrap over problems; with --ref, each checkpoint also
gets a paired bootstrap CI of its difference to the reference checkpoint (same resampled problems). The
json keeps every checkpoint's per-problem outcomes (`per_problem`) for later paired comparisons.

    python benchmarks/smollm_rlvr/score.py ../smollm_run/run/checkpoint-{0,36,72} \\
        --ref ../smollm_run/run/checkpoint-0 --samples 8 --out scores.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import task  # noqa: E402

import numpy as np  # noqa: E402


def generate(model, tok, problems, k: int, temperature: float, max_new: int, batch: int, seed: int):
    """Return an array (n_problems, k) of 0/1 rewards; k=1 with temperature 0 is greedy."""
    import torch

    torch.manual_seed(seed)
    rows = []
    for i in range(0, len(problems), batch):
        chunk = problems[i:i + batch]
        prompts = [task.prompt_text(p) for p in chunk]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        kw = dict(max_new_tokens=max_new, pad_token_id=tok.pad_token_id)
        if temperature > 0:
            kw |= dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, num_return_sequences=k)
        else:
            kw |= dict(do_sample=False)
        with torch.no_grad():
            out = model.generate(**enc, **kw)
        texts = tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        kk = k if temperature > 0 else 1
        for j, p in enumerate(chunk):
            rows.append([task.reward(t, p["answer"]) for t in texts[j * kk:(j + 1) * kk]])
    return np.array(rows, dtype=np.float64)


def boot_ci(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> list[float]:
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    m = x[idx].mean(1)
    return [float(np.percentile(m, 2.5)), float(np.percentile(m, 97.5))]


def stats(per_problem: np.ndarray, ref: np.ndarray | None, n_boot: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    d = {"mean": float(per_problem.mean()), "ci95": boot_ci(per_problem, n_boot, rng)}
    if ref is not None:
        diff = per_problem - ref
        d["diff_vs_ref"] = float(diff.mean())
        d["diff_ci95"] = boot_ci(diff, n_boot, np.random.default_rng(seed))
    return d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--ref", type=Path, help="reference checkpoint for paired differences (e.g. the base)")
    p.add_argument("--samples", type=int, default=0, help="K for sampled avg@K / pass@K (0: greedy only)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--limit", type=int, default=0, help="use only the first N held-out problems")
    p.add_argument("--batch", type=int, default=40, help="prompts per generate call")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="write the json here (also printed)")
    a = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    _, test = task.splits()
    if a.limit:
        test = test[:a.limit]

    order = [str(c) for c in a.checkpoints]
    if a.ref is not None and str(a.ref) not in order:
        order = [str(a.ref)] + order
    raw: dict[str, dict[str, np.ndarray]] = {}
    secs: dict[str, float] = {}
    for ck in order:
        t = time.time()
        tok = AutoTokenizer.from_pretrained(ck)
        tok.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32).eval()
        r = {"greedy": generate(model, tok, test, 1, 0.0, a.max_new_tokens, a.batch, a.seed)[:, 0]}
        if a.samples > 0:
            s = generate(model, tok, test, a.samples, a.temperature, a.max_new_tokens,
                         max(1, a.batch // a.samples), a.seed)
            r[f"avg@{a.samples}"] = s.mean(1)
            r[f"pass@{a.samples}"] = s.max(1)
        raw[str(ck)] = r
        secs[str(ck)] = round(time.time() - t, 1)
        print(f"{ck}: " + ", ".join(f"{k}={v.mean():.3f}" for k, v in r.items()) + f" ({secs[str(ck)]} s)",
              file=sys.stderr, flush=True)

    ref = raw.get(str(a.ref)) if a.ref is not None else None
    result = {
        "task": "smollm_rlvr arithmetic (held-out split)",
        "n_problems": len(test),
        "samples": a.samples,
        "temperature": a.temperature,
        "max_new_tokens": a.max_new_tokens,
        "ref": str(a.ref) if a.ref else None,
        "checkpoints": {},
    }
    for ck in order:
        entry = {"seconds": secs[ck]}
        step = None
        ts = Path(ck) / "trainer_state.json"
        if ts.exists():
            step = json.loads(ts.read_text()).get("global_step")
        entry["step"] = step
        for metric, v in raw[ck].items():
            entry[metric] = stats(v, None if ref is None else ref[metric], a.n_boot, a.seed)
        # per-problem outcomes (held-out order), so that paired differences can be computed later
        # between checkpoints scored in different runs (report.py does)
        entry["per_problem"] = {metric: [round(float(x), 4) for x in v] for metric, v in raw[ck].items()}
        result["checkpoints"][ck] = entry
    text = json.dumps(result, indent=2)
    if a.out:
        a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
