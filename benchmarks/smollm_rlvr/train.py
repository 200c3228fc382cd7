"""GRPO on SmolLM2-135M-Instruct with a verifiable arithmetic reward, on CPU, using TRL's GRPOTrainer.

Writes an HF Trainer run folder:
    RUN/checkpoint-0/      the base (hard-linked weights) + trainer_state.json with global_step 0
    RUN/checkpoint-N/      every --save-steps optimizer steps: model.safetensors (float32), config,
                           tokenizer, trainer_state.json; the newest one also keeps optimizer/scheduler/RNG
                           state so the run can be resumed (older ones drop optimizer.pt to save disk)
    RUN/rewards.jsonl      one line per step: step, reward, reward_std, completion length, seconds/step
    RUN/run_config.json    the settings of the run

All weights are trained (no LoRA, no frozen layers), in float32.

    python benchmarks/smollm_rlvr/train.py --base ../smollm_run/base --out ../smollm_run/run
    # rerun the same command to resume from the newest checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import task  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, default=Path("../smollm_run/base"))
    p.add_argument("--out", type=Path, default=Path("../smollm_run/run"))
    p.add_argument("--max-steps", type=int, default=64)
    p.add_argument("--save-steps", type=int, default=2)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--micro-prompts", type=int, default=4, help="prompts per forward/backward micro-batch")
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--optim", default="adamw_torch", help="any transformers optim name, e.g. adamw_torch, sgd")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-completion-length", type=int, default=12)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (0: no reference model)")
    p.add_argument("--loss-type", default="grpo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def main() -> None:
    a = parse_args()
    import torch

    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    out: Path = a.out
    out.mkdir(parents=True, exist_ok=True)
    train, test = task.splits()
    ds = task.prompt_dataset(train)

    G = a.num_generations
    micro = a.micro_prompts * G
    accum = a.prompts_per_step // a.micro_prompts
    assert accum * a.micro_prompts == a.prompts_per_step, "--prompts-per-step must be a multiple of --micro-prompts"

    cfg = GRPOConfig(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=a.seed,
        max_steps=a.max_steps,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim=a.optim,
        weight_decay=a.weight_decay,
        max_grad_norm=1.0,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum,
        num_generations=G,
        max_completion_length=a.max_completion_length,
        temperature=a.temperature,
        top_p=1.0,
        top_k=0,
        beta=a.beta,
        num_iterations=1,
        loss_type=a.loss_type,
        scale_rewards="group",
        use_vllm=False,
        save_strategy="steps",
        save_steps=a.save_steps,
        save_only_model=False,  # keep optimizer state (newest checkpoint only, see callback) for resuming
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        gradient_checkpointing=False,
        model_init_kwargs={"dtype": torch.float32},
    )

    tok = AutoTokenizer.from_pretrained(a.base)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32)

    # checkpoint-0: the base, in the same layout as the later checkpoints
    ck0 = out / "checkpoint-0"
    if not (ck0 / "trainer_state.json").exists():
        tmp = out / "checkpoint-0.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in a.base.iterdir():
            if f.name == "model.safetensors":
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)
            elif f.is_file():
                shutil.copy2(f, tmp / f.name)
        (tmp / "trainer_state.json").write_text(json.dumps({"global_step": 0, "log_history": []}, indent=2))
        os.replace(tmp, ck0)

    (out / "run_config.json").write_text(json.dumps(
        {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
        | {"trainer": "trl.GRPOTrainer", "n_train_problems": len(train), "n_test_problems": len(test),
           "task_kinds": list(task.DEFAULT_KINDS)}, indent=2))

    log_path = out / "rewards.jsonl"

    class Log(TrainerCallback):
        def __init__(self):
            self.t = time.time()

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "reward" not in logs:
                return
            now = time.time()
            rec = {"step": state.global_step, "sec_per_step": round(now - self.t, 2), "time": now}
            self.t = now
            rec |= {k: v for k, v in logs.items() if isinstance(v, (int, float))}
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps({k: rec[k] for k in ("step", "sec_per_step", "reward") if k in rec}), flush=True)

        def on_save(self, args, state, control, **kw):
            # keep optimizer/scheduler state only in the newest checkpoint
            newest = out / f"checkpoint-{state.global_step}"
            for d in out.glob("checkpoint-*"):
                if d != newest and d.is_dir():
                    for name in ("optimizer.pt", "scheduler.pt"):
                        (d / name).unlink(missing_ok=True)

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=task.accuracy_reward,
        args=cfg,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[Log()],
    )
    resume = any((d / "optimizer.pt").exists() for d in out.glob("checkpoint-*") if d.name != "checkpoint-0")
    trainer.train(resume_from_checkpoint=True if resume else None)


if __name__ == "__main__":
    main()
