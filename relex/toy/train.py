"""Supervised warm-up and GRPO on the toy addition task, writing an RLVR checkpoint series.

``train_run(out_dir, config)`` builds a tiny Llama, warms it up with cross-entropy on answers (optionally
with label smoothing and a share of carry-less "distractor" answers, which make a base that samples the
right answer only part of the time), then runs RL and writes ``checkpoint-0`` (the base) and
``checkpoint-N`` every ``checkpoint_every`` steps in the Hugging Face Trainer layout.

RL objectives (``ToyConfig.objective``):
- ``"grpo"``: groups of ``samples_per_prompt`` completions sampled at ``temperature`` for each of
  ``prompts_per_step`` prompts, 0/1 verifiable reward, group-normalised advantages
  ``(r - mean) / (std + eps)``, clipped-ratio surrogate (``ppo_epochs`` updates per batch; with one update
  the ratio is 1 and the clip is inactive), optional k3 KL penalty to the base;
- ``"exact_pg"``: the exact expected-reward policy gradient for single-answer tasks,
  ``grad E[r] = grad p(y*|x)``, from one teacher-forced pass on the correct answers — no sampling noise.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from relex.progress import Progress, Report
from relex.toy import task as _task
from relex.toy.evaluate import (answer_ids, answer_logprob, answer_probabilities, generate, greedy_accuracy,
                                prompt_ids, rewards)
from relex.toy.model import EOS_ID, build_config, build_model, build_tokenizer, save_checkpoint

OBJECTIVES = ("grpo", "exact_pg")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


@dataclass
class ToyConfig:
    """Everything that defines a toy run; the same config and seed give the same weights."""

    seed: int = 0
    # model
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int | None = None  # default 2 * hidden
    # supervised warm-up (the base)
    warmup_steps: int = 450
    warmup_lr: float = 1e-3
    warmup_batch: int = 128
    label_smoothing: float = 0.0
    distractor: float = 0.6  # share of warm-up answers replaced by the carry-less sum
    # RL
    objective: str = "grpo"
    steps: int = 100
    prompts_per_step: int = 128
    samples_per_prompt: int = 8
    temperature: float = 1.0
    optimizer: str = "sgd"
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0
    clip_eps: float = 0.2
    ppo_epochs: int = 1
    kl_coef: float = 0.0
    scale_rewards: bool = True  # divide advantages by the group std (GRPO); False: mean-centring only
    max_grad_norm: float | None = None
    checkpoint_every: int = 5
    num_threads: int | None = None  # torch.set_num_threads for the run (None: leave as is)
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, not {self.objective!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {self.optimizer!r}")
        if self.steps < 1 or self.checkpoint_every < 1:
            raise ValueError("steps and checkpoint_every must be positive")

    # presets -------------------------------------------------------------------------------------
    @classmethod
    def demo(cls, **overrides) -> "ToyConfig":
        """The drift-dominated setting chosen by benchmarks/toy_regime.py (see docs/toy_regime.md).

        A "mode" base (warm-up with 60% carry-less answers: it samples the right answer ~40% of the time
        but greedy decoding prefers the carry-less one), then sampled GRPO, 128 prompts x 8 samples, plain
        SGD at lr 0.001 for 100 steps, a checkpoint every 5 steps. Held-out greedy accuracy 0.38 -> 0.84.
        """
        base = dict(name="demo", warmup_steps=450, label_smoothing=0.0, distractor=0.6, objective="grpo",
                    steps=100, prompts_per_step=128, samples_per_prompt=8, optimizer="sgd", lr=0.001,
                    checkpoint_every=5)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def ci(cls, **overrides) -> "ToyConfig":
        """Seconds-long run for tests: a very small model, a short warm-up and a few GRPO steps."""
        base = dict(name="ci", hidden=48, layers=1, heads=4, warmup_steps=150, warmup_lr=5e-3, warmup_batch=64,
                    label_smoothing=0.0, objective="grpo", steps=4, prompts_per_step=16, samples_per_prompt=8,
                    optimizer="sgd", lr=0.05, checkpoint_every=2)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def noisy(cls, **overrides) -> "ToyConfig":
        """A noise-dominated run: the demo's base and GRPO batch, but Adam at lr 1e-4 (the first toy study).

        It shares its base with ``demo()`` (same warm-up fields), gains more accuracy by its last checkpoint,
        yet its trajectory is noise-dominated and extrapolating it lands far outside where the model works.
        """
        base = dict(name="noisy", warmup_steps=450, label_smoothing=0.0, distractor=0.6, objective="grpo",
                    steps=100, prompts_per_step=128, samples_per_prompt=8, optimizer="adam", lr=1e-4,
                    checkpoint_every=5)
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes) -> "ToyConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ToyConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def warmup_key(self) -> tuple:
        """The fields that determine the base model (runs sharing them share the base)."""
        return (self.seed, self.hidden, self.layers, self.heads, self.intermediate, self.warmup_steps,
                self.warmup_lr, self.warmup_batch, self.label_smoothing, self.distractor)


# GRPO pieces -------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised advantages for rewards ``[groups, samples]``: ``(r - mean) / (std + eps)``.

    The std is the unbiased sample std of the group, as in TRL's GRPOTrainer; with ``scale=False`` the
    rewards are only centred (Dr. GRPO).
    """
    mean = rewards.mean(dim=1, keepdim=True)
    centred = rewards - mean
    if not scale:
        return centred
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    return centred / (std + eps)


def completion_mask(completions: torch.Tensor) -> torch.Tensor:
    """1 for every token up to and including the first ``<eos>``, 0 after it."""
    is_eos = (completions == EOS_ID).long()
    after = torch.cumsum(is_eos, dim=1) - is_eos  # number of <eos> strictly before each position
    return (after == 0).float()


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_eps: float = 0.2, ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0,
              denominator: int | None = None) -> torch.Tensor:
    """The clipped-ratio GRPO surrogate (to minimise), per-sequence token mean then mean over sequences."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    if ref_logp is not None and kl_coef:
        diff = ref_logp - logp
        per_token = per_token + kl_coef * (torch.exp(diff) - diff - 1)
    per_seq = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return per_seq.sum() / (denominator or per_seq.shape[0])


# training ---------------------------------------------------------------------------------------------

def _make_optimizer(params, config: ToyConfig):
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "momentum":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _set_threads(config: ToyConfig):
    if config.num_threads is not None:
        torch.set_num_threads(int(config.num_threads))


def warmup_model(config: ToyConfig, progress: Report = None):
    """Build the model and run the supervised warm-up; return the base model (deterministic in the seed)."""
    _set_threads(config)
    model = build_model(build_config(config.hidden, config.layers, config.heads, config.intermediate), config.seed)
    model.train()
    train = _task.train_problems()
    rng = np.random.default_rng([config.seed, 1])
    opt = torch.optim.AdamW(model.parameters(), lr=config.warmup_lr)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    all_prompts = prompt_ids(train)
    all_answers = answer_ids(train)
    all_distractors = torch.tensor([[int(c) + 4 for c in p.distractor] + [EOS_ID] for p in train])
    for step in range(1, config.warmup_steps + 1):
        idx = torch.from_numpy(rng.choice(len(train), config.warmup_batch, replace=False))
        prompts, targets = all_prompts[idx], all_answers[idx].clone()
        if config.distractor > 0:
            swap = torch.from_numpy(rng.random(len(idx)) < config.distractor)
            targets[swap] = all_distractors[idx][swap]
        ids = torch.cat([prompts, targets], dim=1)
        logits = model(input_ids=ids[:, :-1], use_cache=False).logits[:, prompts.shape[1] - 1:, :]
        loss = loss_fn(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None and (step % 50 == 0 or step == config.warmup_steps):
            progress(Progress("supervised warm-up", step, config.warmup_steps, "", f"loss {loss.item():.3f}"))
    model.eval()
    return model


def _eval(model) -> dict:
    p = answer_probabilities(model)
    return {"greedy": greedy_accuracy(model), "expected_t1": p.mean().item(),
            "pass8_t1": (1 - (1 - p) ** 8).mean().item()}


def train_run(out_dir: str | Path | None, config: ToyConfig | None = None,
              progress: Report = None, base=None,
              on_checkpoint: Callable[[int, torch.nn.Module], None] | None = None,
              evaluate: bool = True, leap=None,
              on_step: Callable[[int, int, torch.nn.Module], None] | None = None) -> dict:
    """Warm up (unless ``base`` is given), run RL, and write the checkpoint series into ``out_dir``.

    ``out_dir`` gets ``checkpoint-0`` (the base) and ``checkpoint-N`` every ``config.checkpoint_every`` RL
    steps and at the last step, each a Hugging Face folder (``model.safetensors``, ``config.json``,
    ``generation_config.json``, tokenizer files, ``trainer_state.json``), plus ``toy_run.json`` (the config
    and this summary). With ``out_dir=None`` nothing is written; ``on_checkpoint(step, model)`` is called at
    each checkpoint either way. ``base`` may be a warmed-up model (copied, not modified) to skip the warm-up.
    ``progress(event)`` receives :class:`relex.progress.Progress` events (the warm-up, then the GRPO steps).
    Returns a summary: timings, base and final held-out accuracy (if ``evaluate``), checkpoint steps/paths.

    With ``leap`` (a :class:`relex.integrations.leap.Leaper`, whose ``decisions`` the caller reads) the run
    leaps: every M real steps it fits the segment since the last decision and, when the verdict allows,
    jumps N steps ahead (``leap.options``). Steps are then virtual: ``config.steps``
    is the run's virtual length, checkpoints carry virtual steps (one due at the step of a jump holds the
    jumped weights under the new step), and the summary adds ``real_steps`` and ``leaps`` (every decision).
    ``on_step(real_step, step, model)`` is called after each real step (and its decision).
    """
    config = config or ToyConfig.demo()
    _set_threads(config)
    out = Path(out_dir) if out_dir is not None else None
    tokenizer = build_tokenizer() if out is not None else None
    t0 = time.perf_counter()
    if base is None:
        model = warmup_model(config, progress)
    else:
        model = copy.deepcopy(base)
    t_warm = time.perf_counter() - t0
    model.eval()  # no dropout in the model; eval mode keeps generation and training identical
    ref = copy.deepcopy(model).requires_grad_(False) if config.kl_coef else None

    summary: dict = {"config": config.to_dict(), "checkpoints": [], "warmup_seconds": round(t_warm, 3)}
    if evaluate:
        summary["base"] = _eval(model)

    def checkpoint(step: int):
        if out is not None:
            # The mean training reward of every step so far, as the HF Trainer logs it (relex check reads it).
            logged = [{"step": h["step"], "reward": h["reward"]} for h in history]
            path = save_checkpoint(model, tokenizer, out / f"checkpoint-{step}", step,
                                   {"relex_toy": {"name": config.name, "objective": config.objective},
                                    "log_history": logged})
            summary["checkpoints"].append({"step": step, "path": str(path)})
        else:
            summary["checkpoints"].append({"step": step})
        if on_checkpoint is not None:
            on_checkpoint(step, model)

    history: list[dict] = []
    checkpoint(0)
    train = _task.train_problems()
    all_prompts, all_answers = prompt_ids(train), answer_ids(train)
    rng = np.random.default_rng([config.seed, 2])
    gen = torch.Generator().manual_seed(config.seed * 1000 + 7)
    opt = _make_optimizer(model.parameters(), config)
    params = [p for p in model.parameters() if p.requires_grad]
    B, G = config.prompts_per_step, config.samples_per_prompt
    leaper = leap
    if leaper is not None:
        leaper.begin(model, 0)
    t1 = time.perf_counter()
    step = real_step = 0
    while step < config.steps:
        step += 1
        real_step += 1
        idx = torch.from_numpy(rng.choice(len(train), B, replace=False))
        prompts, answers = all_prompts[idx], all_answers[idx]
        info: dict = {"phase": "rl", "step": step, "total": config.steps}
        if config.objective == "exact_pg":
            lp = answer_logprob(model, prompts, answers, config.temperature)
            p = lp.sum(dim=1).exp()
            loss = -p.mean()
            info["reward"] = p.mean().item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            opt.step()
        else:
            prompts_rep = prompts.repeat_interleave(G, dim=0)
            answers_rep = answers.repeat_interleave(G, dim=0)
            completions = generate(model, prompts_rep, temperature=config.temperature, generator=gen)
            r = rewards(completions, answers_rep)
            adv = group_advantages(r.view(B, G), scale=config.scale_rewards).reshape(-1)
            info["reward"] = r.mean().item()
            keep = adv != 0 if not config.kl_coef else torch.ones_like(adv, dtype=torch.bool)
            info["informative"] = keep.float().mean().item()
            if keep.any():
                sel_p, sel_c, sel_a = prompts_rep[keep], completions[keep], adv[keep]
                mask = completion_mask(sel_c)
                ref_lp = None
                if ref is not None:
                    with torch.no_grad():
                        ref_lp = answer_logprob(ref, sel_p, sel_c, config.temperature)
                old_lp = None
                for _ in range(config.ppo_epochs):
                    lp = answer_logprob(model, sel_p, sel_c, config.temperature)
                    if old_lp is None:
                        old_lp = lp.detach()
                    loss = grpo_loss(lp, old_lp, sel_a, mask, config.clip_eps, ref_lp, config.kl_coef,
                                     denominator=B * G)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if config.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    opt.step()
        history.append({k: v for k, v in info.items() if k not in ("phase", "total")})
        if leaper is not None:
            history[-1]["real_step"] = real_step
            decision = leaper.after_step(model, opt, real_step, step, max_step=config.steps,
                                         rewards=[(h["step"], h["reward"]) for h in history])
            if decision is not None:
                history[-1]["leap"] = decision.to_dict()
                step = decision.to_step
        if progress is not None:
            reward = f"reward {info['reward']:.3f}" if "reward" in info else ""
            progress(Progress("GRPO", step, config.steps, "", reward))
        if step % config.checkpoint_every == 0 or step == config.steps:
            checkpoint(step)
        if on_step is not None:
            on_step(real_step, step, model)
    t_rl = time.perf_counter() - t1
    summary.update({"rl_seconds": round(t_rl, 3), "seconds_per_step": round(t_rl / real_step, 4),
                    "history": history})
    if leaper is not None:
        summary.update(real_steps=real_step, leaps=[d.to_dict() for d in leaper.decisions])
    if evaluate:
        summary["final"] = _eval(model)
    summary["total_seconds"] = round(time.perf_counter() - t0, 3)
    if out is not None:
        summary["base_dir"] = str(out / "checkpoint-0")
        (out / "toy_run.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
