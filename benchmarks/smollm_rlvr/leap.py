"""GRPO on SmolLM2-135M-Instruct with relex's LeapCallback: train M steps, jump N steps ahead, repeat.

The same task, model and GRPOTrainer settings as train.py (4 prompts x 8 completions per step, AdamW lr 5e-6
constant, float32, no KL), with :class:`relex.integrations.LeapCallback` added: every ``--every`` real
steps the trajectory of the segment since the last decision is fitted in memory and, when the verdict says a
jump of ``--leap`` steps is plausible (or always, with ``--require always``), the weights jump there.

Checkpoints carry *virtual* steps (a jump adds its length to the step counter): ``RUN/checkpoint-V/``.
``RUN/real_steps.json`` maps each saved checkpoint to the real training steps behind it, so the run can be
compared with the plain run of train.py at equal real steps (paired differences on the same held-out
problems):

    python benchmarks/smollm_rlvr/leap.py --base ../smollm_run/base --out ../smollm_run/leap \
        --every 8 --leap 16 --max-real-steps 32
    python benchmarks/smollm_rlvr/leap.py --pairs ../smollm_run/leap --plain ../smollm_run/run
    # prints, per real step R saved by both runs, the score.py command pairing LEAP's checkpoint with the
    # plain checkpoint-R as the reference

``--replay PLAIN_RUN`` asks, without training, what the verdict-guarded callback would have decided along a
plain run: for each segment of ``--every`` steps the fit the callback makes (``fit_segment``: the segment's
first checkpoint as the base, its checkpoints every ``--snapshot-every`` steps, the rewards the trainer logged
inside it) and the verdict on a jump of ``--leap`` steps. While every decision is a refusal, the guarded run
*is* the plain run, so this is its whole record:

    python benchmarks/smollm_rlvr/leap.py --replay ../smollm_run/run --every 8 --leap 16 --max-real-steps 32

``--max-steps`` is the run's virtual length (a jump is cut short there); ``--max-real-steps`` stops it after
that many optimizer steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import task  # noqa: E402

REAL_STEPS = "real_steps.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--every", type=int, default=8, help="M: real steps per segment")
    p.add_argument("--leap", type=int, default=16, help="N: steps jumped at the end of a segment")
    p.add_argument("--snapshot-every", type=int, default=2)
    p.add_argument("--require", default="plausible",
                   help="plausible or lenient (the verdict decides), always, or probe (with --probe)")
    p.add_argument("--probe", type=Path, help="a JSON Lines probe of training problems (task.py --probe-jsonl): "
                   "at each decision the jump length is chosen on it (relex.probe)")
    p.add_argument("--probe-limit", type=int, default=64)
    p.add_argument("--probe-max-new-tokens", type=int, default=12)
    p.add_argument("--optimizer-state", default="keep", help="keep or reset the AdamW moments at a jump")
    p.add_argument("--max-steps", type=int, default=1000, help="the run's virtual length")
    p.add_argument("--max-real-steps", type=int, default=32)
    p.add_argument("--save-steps", type=int, default=2)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--micro-prompts", type=int, default=0,
                   help="prompts per forward/backward micro-batch, as train.py (default: all of a step's)")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--max-completion-length", type=int, default=12)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--replay", type=Path, help="a plain run of train.py: the guarded decisions along it, no training")
    p.add_argument("--pairs", type=Path, help="print the score.py commands pairing this leap run with --plain")
    p.add_argument("--plain", type=Path, help="the plain run of train.py (with --pairs)")
    a = p.parse_args(argv)
    if a.pairs is None and a.replay is None and (a.base is None or a.out is None):
        p.error("training needs --base and --out (or give --pairs LEAP_RUN --plain PLAIN_RUN)")
    if a.pairs is not None and a.plain is None:
        p.error("--pairs needs --plain")
    return a


def pairs(leap_run: Path, plain_run: Path) -> list[tuple[int, Path, Path]]:
    """(real step, plain checkpoint, leap checkpoint) for every real step both runs saved."""
    real_steps = json.loads((leap_run / REAL_STEPS).read_text())
    found = []
    for name, real in sorted(real_steps.items(), key=lambda kv: kv[1]):
        plain = plain_run / f"checkpoint-{real}"
        if plain.is_dir() and (leap_run / name).is_dir():
            found.append((real, plain, leap_run / name))
    return found


def train(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from relex.integrations.leap import LEAP
    from relex.integrations.leap_callback import LeapCallback

    out: Path = a.out
    out.mkdir(parents=True, exist_ok=True)
    train_split, _ = task.splits()
    dataset = task.prompt_dataset(train_split)
    micro = a.micro_prompts or a.prompts_per_step
    if a.prompts_per_step % micro:
        raise SystemExit("--prompts-per-step must be a multiple of --micro-prompts")

    config = GRPOConfig(
        output_dir=str(out), use_cpu=True, bf16=False, fp16=False, seed=a.seed, max_steps=a.max_steps,
        learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", weight_decay=0.0,
        max_grad_norm=1.0, per_device_train_batch_size=micro * a.num_generations,
        gradient_accumulation_steps=a.prompts_per_step // micro, num_generations=a.num_generations,
        max_completion_length=a.max_completion_length, temperature=a.temperature, top_p=1.0, top_k=0, beta=0.0,
        num_iterations=1, loss_type="grpo", scale_rewards="group", use_vllm=False, save_strategy="steps",
        save_steps=a.save_steps, save_only_model=True, logging_steps=1, report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, model_init_kwargs={"dtype": torch.float32})
    tokenizer = AutoTokenizer.from_pretrained(a.base)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32)
    probe = None
    if a.probe is not None:
        from relex.probe.problems import load_probe

        probe = load_probe(a.probe, a.probe_limit, max_new_tokens=a.probe_max_new_tokens)
    leap = LeapCallback(every=a.every, leap=a.leap, snapshot_every=a.snapshot_every,
                        require="probe" if probe is not None and a.require == "plausible" else a.require,
                        optimizer_state=a.optimizer_state, probe=probe, tokenizer=tokenizer)
    real_steps: dict[str, int] = {}

    class RealSteps(TrainerCallback):
        """Records the real steps behind each saved checkpoint and stops after --max-real-steps."""

        def __init__(self):
            self.real = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.real += 1
            if self.real >= a.max_real_steps:
                control.should_training_stop = True
                control.should_save = True

        def on_save(self, args, state, control, **kwargs):
            real_steps[f"checkpoint-{state.global_step}"] = self.real
            (out / REAL_STEPS).write_text(json.dumps(real_steps, indent=2) + "\n")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and (LEAP + "from_step" in logs or "reward" in logs):
                keys = [k for k in logs if k.startswith(LEAP) or k in ("reward", "relex/plausible")]
                print(json.dumps({"step": state.global_step, "real": self.real, **{k: logs[k] for k in keys}}),
                      flush=True)

    trainer = GRPOTrainer(model=model, reward_funcs=task.accuracy_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[leap, RealSteps()])
    trainer.train()
    decisions = [d.to_dict() for d in leap.decisions]
    (out / "leaps.json").write_text(json.dumps(decisions, indent=2) + "\n")
    print(json.dumps({"real_steps": real_steps, "jumps": sum(d["jumped"] for d in decisions),
                      "decisions": len(decisions)}), flush=True)


def replay(a: argparse.Namespace) -> None:
    """The verdict-guarded callback's decisions along the plain run ``a.replay`` (one JSON line each)."""
    from safetensors.torch import load_file

    from relex.integrations.leap import fit_segment

    run: Path = a.replay
    logged = [json.loads(line) for line in (run / "rewards.jsonl").read_text().splitlines() if line.strip()]
    rewards = [(float(e["step"]), float(e["reward"])) for e in logged if "reward" in e]
    for start in range(0, a.max_real_steps, a.every):
        end = start + a.every
        folders = [run / f"checkpoint-{s}" for s in range(start, end + 1, a.snapshot_every)]
        if not all(f.is_dir() for f in folders):
            break
        base = load_file(str(folders[0] / "model.safetensors"))
        snapshots = [(s - start, load_file(str(f / "model.safetensors")))
                     for s, f in zip(range(start, end + 1, a.snapshot_every), folders)][1:]
        # what LeapCallback passes: the rewards logged inside the segment before its last step
        inside = [(s - start, r) for s, r in rewards if start < s < end]
        fit = fit_segment(base, snapshots, a.every + a.leap, rewards=inside)
        verdict = fit.verdict
        reward = (verdict.calibration or {}).get("reward")  # the trend the verdict weighed
        print(json.dumps({"real_step": end, "segment": [start, end], "target": start + a.every + a.leap,
                          "verdict": verdict.drift_class, "plausible": verdict.plausible,
                          "passes_gate": fit.passes_gate, "message": verdict.message,
                          "reward": None if reward is None else reward["text"], "figures": fit.figures,
                          "seconds": round(fit.seconds, 1)}), flush=True)


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.replay is not None:
        replay(a)
        return
    if a.pairs is not None:
        score = Path(__file__).resolve().parent / "score.py"
        for real, plain, leap in pairs(a.pairs, a.plain):
            print(f"# real step {real}: plain {plain.name} against leap {leap.name}")
            print(f"python {score} {plain} {leap} --ref {plain} --out {a.pairs}/scores-real-{real}.json")
        return
    train(a)


if __name__ == "__main__":
    main()
