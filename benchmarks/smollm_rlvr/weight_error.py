"""Weight-space error of predicted checkpoints against the real one, streamed one tensor at a time.

For every predictor P (a checkpoint folder) and the real checkpoint W at the same step, with base W0:

    rel_error  = ‖P − W‖ / ‖W − W0‖          (0: exact; 1: as far off as the base itself)
    norm_ratio = ‖P − W0‖ / ‖W − W0‖         (the length of the predicted update relative to the real one)
    cos        = ⟨P − W0, W − W0⟩ / (‖P − W0‖ ‖W − W0‖)

over the whole model (every tensor of W; a tied lm_head absent from the files counts once, through the
embedding) and per group of tensors (embedding, attention, MLP, norms). Only one tensor of each folder is in
memory at a time (float64 sums of float32 differences).

    python benchmarks/smollm_rlvr/weight_error.py --base RUN/checkpoint-0 --true RUN/checkpoint-64 \\
        relex-20=EXTRAP/p20-relex-linear last-20=RUN/checkpoint-12 --out weights.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from safetensors import safe_open


class Folder:
    """Tensor name -> file of a HF checkpoint folder (single file or sharded with an index)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.path / f for name, f in weight_map.items()}
        else:
            single = self.path / "model.safetensors"
            if not single.exists():
                raise SystemExit(f"{self.path}: no model.safetensors or model.safetensors.index.json")
            with safe_open(single, framework="numpy") as f:
                self.files = {name: single for name in f.keys()}
        self._open: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> np.ndarray:
        file = self.files[name]
        if file not in self._open:
            self._open[file] = safe_open(file, framework="numpy")
        return self._open[file].get_tensor(name).astype(np.float32, copy=False)


def group_of(name: str) -> str:
    if "embed_tokens" in name or name.startswith("lm_head"):
        return "embedding"
    if "norm" in name:
        return "norms"
    if "self_attn" in name:
        return "attention"
    if "mlp" in name:
        return "mlp"
    return "other"


def summarise(s: dict) -> dict:
    true = math.sqrt(s["true"])
    pred = math.sqrt(s["pred"])
    return {
        "rel_error": math.sqrt(s["err"]) / true if true else float("nan"),
        "norm_ratio": pred / true if true else float("nan"),
        "cos": s["dot"] / (pred * true) if pred and true else float("nan"),
        "true_update_norm": true,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("predictors", nargs="+", help="LABEL=FOLDER")
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--true", type=Path, required=True, help="the real checkpoint the predictors aim at")
    p.add_argument("--out", type=Path)
    a = p.parse_args()

    t0 = time.time()
    base, true = Folder(a.base), Folder(a.true)
    preds = {}
    for spec in a.predictors:
        label, _, path = spec.partition("=")
        if not path:
            label, path = Path(spec).name, spec
        preds[label] = Folder(Path(path))
    names = true.names()
    for label, f in preds.items():
        missing = [n for n in names if n not in f.files]
        if missing:
            raise SystemExit(f"{label}: {len(missing)} tensors missing, e.g. {missing[0]}")
    zero = {"err": 0.0, "pred": 0.0, "true": 0.0, "dot": 0.0}
    sums = {label: {"all": dict(zero)} for label in preds}
    for name in names:
        w0 = base.get(name)
        dt = (true.get(name) - w0).ravel()
        g = group_of(name)
        tt = float(np.dot(dt.astype(np.float64), dt))
        for label, f in preds.items():
            dp = (f.get(name) - w0).ravel()
            e = dp - dt
            vals = {"err": float(np.dot(e.astype(np.float64), e)), "pred": float(np.dot(dp.astype(np.float64), dp)),
                    "true": tt, "dot": float(np.dot(dp.astype(np.float64), dt))}
            for key in ("all", g):
                acc = sums[label].setdefault(key, dict(zero))
                for k, v in vals.items():
                    acc[k] += v
    result = {
        "base": str(a.base), "true": str(a.true), "tensors": len(names), "seconds": round(time.time() - t0, 1),
        "predictors": {label: {"path": str(preds[label].path), **summarise(s["all"]),
                               "groups": {g: summarise(v) for g, v in s.items() if g != "all"}}
                       for label, s in sums.items()},
    }
    for label, r in result["predictors"].items():
        print(f"{label:24s} rel_error={r['rel_error']:.3f} norm_ratio={r['norm_ratio']:.3f} cos={r['cos']:.3f}",
              file=sys.stderr)
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
