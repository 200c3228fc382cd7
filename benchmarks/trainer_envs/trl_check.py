"""TRL + PEFT LoRA: a real ``trl.GRPOTrainer`` with a ``peft.LoraConfig`` writes adapter checkpoints; relex
extrapolates them to a PEFT adapter (``--output lora``) and to a merged checkpoint, and the adapter loaded
with ``PeftModel.from_pretrained`` must give the merged checkpoint's logits. Run with the Python of a venv
holding trl, peft and relex:

    python trl_check.py --work WORK [--steps 12 --save-steps 2 --target-step 24]

Everything is offline: the tiny Llama and its byte-level tokenizer are built by ``relex.testing``, the
prompts are made here and the reward is a Python function (the share of digits in the completion).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

from common import Recorder, check_main, compare_states, load_folder, venv_bin

PACKAGES = ("trl", "peft", "torch", "transformers", "accelerate", "datasets", "safetensors", "typer", "relex-rlvr")
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def digit_reward(completions, **_) -> list[float]:
    """The share of characters of each completion that are digits: a verifiable, learnable signal."""
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]


def train(rec: Recorder, base: Path, run: Path, steps: int, save_steps: int, lr: float) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(1)
    rng = random.Random(0)
    prompts = [f"{rng.randint(10, 99)} + {rng.randint(10, 99)} =" for _ in range(64)]
    dataset = Dataset.from_dict({"prompt": prompts})
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side = "left"
    config = GRPOConfig(
        output_dir=str(run), use_cpu=True, bf16=False, fp16=False, seed=0,
        max_steps=steps, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        per_device_train_batch_size=8, gradient_accumulation_steps=1, num_generations=4,
        max_completion_length=8, temperature=1.0, beta=0.0, num_iterations=1, use_vllm=False,
        save_strategy="steps", save_steps=save_steps, save_only_model=True, logging_steps=1,
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, model_init_kwargs={"dtype": torch.float32},
    )
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGET_MODULES, task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=str(base), reward_funcs=digit_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora)
    trainer.train()
    rewards = [round(e["reward"], 4) for e in trainer.state.log_history if "reward" in e]
    (run / "rewards.json").write_text(json.dumps(rewards))
    rec.note(f"GRPOTrainer: {steps} steps, LoRA r=4 alpha=8 on {len(TARGET_MODULES)} projections, "
             f"mean reward per step {rewards}")


def logits_of(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def check(rec: Recorder, args) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from relex.testing import save_tiny_model

    base, run = rec.work / "base", rec.work / "run"
    for folder in (base, run):
        shutil.rmtree(folder, ignore_errors=True)
    save_tiny_model(base)
    rec.run([sys.executable, Path(__file__).resolve(), "--work", rec.work, "--train-only",
             "--steps", args.steps, "--save-steps", args.save_steps, "--lr", args.lr], "grpo-train")
    rec.notes += json.loads((rec.work / "train_notes.json").read_text())

    saved = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    adapters = [run / f"checkpoint-{s}" for s in saved]
    complete = all((a / "adapter_model.safetensors").is_file() and (a / "adapter_config.json").is_file()
                   for a in adapters)
    last = load_file(adapters[-1] / "adapter_model.safetensors")
    b_norm = sum(float(v.norm()) for k, v in last.items() if "lora_B" in k)
    rec.check("GRPOTrainer + LoraConfig wrote >= 4 adapter checkpoints (checkpoint-N/adapter_model.safetensors)",
              complete and len(adapters) >= 4 and b_norm > 0, steps=saved, adapter_tensors=len(last),
              sum_of_lora_B_norms_at_last=round(b_norm, 4))

    adapter_out, merged_out = rec.work / "relex-adapter", rec.work / "relex-merged"
    for out, extra in ((adapter_out, ["--output", "lora"]), (merged_out, [])):
        shutil.rmtree(out, ignore_errors=True)
        rec.run([venv_bin("relex"), "extrapolate", run, "--base", base, "--target-step", args.target_step,
                 "--out", out, *extra], out.name)
    report = json.loads((merged_out / "relex.json").read_text())
    rec.check("relex read the adapters as LoRA over the base", report["sources"]["observed_kind"] == "lora"
              and report["observed_steps"] == saved, sources=report["sources"]["observed_kind"],
              observed_steps=report["observed_steps"], verdict=report.get("verdict", {}).get("verdict"))
    adapter_config = json.loads((adapter_out / "adapter_config.json").read_text())

    torch.manual_seed(0)
    ids = torch.randint(0, 256, (3, 32))
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    base_logits = logits_of(base_model, ids)
    peft_model = PeftModel.from_pretrained(base_model, adapter_out)
    peft_model.eval()
    from_adapter = logits_of(peft_model, ids)
    merged_model = AutoModelForCausalLM.from_pretrained(merged_out, dtype=torch.float32)
    from_merged = logits_of(merged_model, ids)
    diff = float((from_adapter - from_merged).abs().max())
    scale = float(from_merged.abs().max())
    moved = float((from_merged - base_logits).abs().max())
    rec.check("PeftModel.from_pretrained(base, relex adapter) logits == relex merged checkpoint's logits "
              "(max |diff| <= 1e-5 * max |logit|)", diff <= 1e-5 * scale and moved > 1e3 * diff,
              max_abs_diff=diff, max_abs_logit=round(scale, 4), rel=diff / scale,
              logits_moved_from_base=round(moved, 4), adapter_r=adapter_config.get("r"),
              adapter_lora_alpha=adapter_config.get("lora_alpha"))

    # The merged checkpoint is the adapter merged into the base by PEFT itself (merge_and_unload).
    merged_by_peft = {k: v.detach() for k, v in peft_model.merge_and_unload().state_dict().items()}
    cmp = compare_states(merged_by_peft, load_folder(merged_out))
    rec.check("PEFT's merge_and_unload of the relex adapter == relex merged checkpoint (tensor for tensor, "
              "max |diff| <= 1e-5 * max |value|)",
              not cmp["only_in_first"] and not cmp["only_in_second"] and cmp["max_rel_diff"] <= 1e-5,
              tensors=cmp["tensors"], bit_equal=cmp["bit_equal"], max_abs_diff=cmp["max_abs_diff"],
              max_rel_diff=cmp["max_rel_diff"])


def main() -> int:
    return check_main("trl", "TRL + PEFT LoRA check", __doc__, PACKAGES, check, steps=(int, 12),
                      save_steps=(int, 2), target_step=(int, 24), lr=(float, 5e-3))


def train_only() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--save-steps", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    args = parser.parse_args()
    rec = Recorder("trl", args.work)
    train(rec, args.work / "base", args.work / "run", args.steps, args.save_steps, args.lr)
    (args.work / "train_notes.json").write_text(json.dumps(rec.notes))


if __name__ == "__main__":
    if "--train-only" in sys.argv:
        train_only()
    else:
        sys.exit(main())
