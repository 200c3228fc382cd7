"""``RunOptions``: every setting of a run, in one frozen, documented object.

Every command that reads a run (``relex extrapolate``, ``check``, ``analyze``, ``fit``), the Python API
(:func:`relex.open_run`, :func:`relex.extrapolate`, …), the training callbacks and the leaps take their settings
from one :class:`RunOptions`; the command line is generated from its fields (:mod:`relex.fields`), so each
default and each help text is written here once.

    options = RunOptions(target_steps=(500,), max_step=75, model=ModelSpec(regressor="auto"))
    options = RunOptions.of(target_step=500, max_step=75, regressor="auto")   # the same, flat
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from relex.errors import RelexInputError
from relex.fields import option
from relex.io.steps import parse_steps, parse_targets
from relex.io.sizes import parse_size
from relex.model_spec import ModelSpec

INPUT, VERDICT, PROBE, OUTPUT = "Input", "Verdict", "Probe", "Output"
DEFAULT_BLOCK_BYTES = 2 * 1024**3  # the pool of stored-dtype copies one pass holds at most
OUTPUT_DTYPES = ("auto", "bfloat16", "float16", "float32")
OUTPUTS = ("checkpoint", "lora")
STORAGE_DTYPES = ("float32", "auto")

REWARDS_HELP = ("The training reward the verdict weighs beside the weights: auto reads the log_history of the last "
                "observed checkpoint's trainer_state.json (when it logs --reward-key), none the weights alone, or a "
                "trainer_state.json or JSON Lines file of {\"step\": N, \"reward\": R} objects (at least 4 inside "
                "the observed window). A reward whose trend reaches --reward-max before the target makes the "
                "verdict mixed.")


@dataclass(frozen=True)
class RunOptions:
    """What to read, how to model it, where to carry the verdict and how to write the result."""

    # -- which checkpoints ----------------------------------------------------------------------------------------
    # the step-0 checkpoint (a folder, or a Hub id ORG/NAME) when the run has no step-0 folder of its own
    base: str | None = option(None, help="Base (step-0) checkpoint: a folder or a Hub id ORG/NAME, if not the "
                                         "run's own step-0 checkpoint.", panel=INPUT)
    # the observed steps to use (None: all of them)
    steps: tuple[int, ...] | None = option(None, help="Observed steps to use, e.g. 10,20,30, 1-75 or 10-100:10 "
                                                      "(default: all).", panel=INPUT)
    # use the observed steps up to this one
    max_step: int | None = option(None, help="Use observed steps up to this one.", panel=INPUT)
    # Hub runs: the branches holding the checkpoints, or the folders of one revision
    revision_pattern: str = option("step_{N}", help="Hub runs: the branches (or tags) holding the checkpoints, {N} "
                                                    "the step, e.g. step_{N} or step-{N:04d}.", panel=INPUT)
    subfolder_pattern: str | None = option(None, help="Hub runs: read the checkpoints from folders of one revision "
                                                      "(main, or hf://ORG/REPO@REVISION) named so, e.g. "
                                                      "step-{N:04d}, instead of from branches.", panel=INPUT)
    # pickles can run code when loaded: read them only when asked
    allow_pickle: bool = option(False, help="Read pytorch_model*.bin pickles when no safetensors exist.",
                                panel=INPUT)

    # -- the trajectory model -------------------------------------------------------------------------------------
    model: ModelSpec = option(default_factory=ModelSpec, help="The trajectory model.", panel="Model", cli=False)

    # -- where to go, and the verdict on going there --------------------------------------------------------------
    # the steps to predict; the verdict's window backtest is carried to the farthest (none: the window alone);
    # "auto": the step the probe chooses (auto_target)
    target_steps: tuple[int, ...] = option((), help="Step to predict; several as 100,200 (then OUT/step-N/ each; with "
                                                    "--probe, the probe chooses one of them); auto: the step the "
                                                    "probe chooses on a grid (needs --probe).",
                                           panel=OUTPUT, flag="--target-step", metavar="N|auto")
    auto_target: bool = option(False, help="Choose the target step by the probe.", panel=PROBE, cli=False)
    # accept targets inside the observed window
    allow_interpolation: bool = option(False, help="Allow target steps inside the observed window.", panel=VERDICT)
    # the training reward the verdict weighs: "auto", "none" or a file
    rewards: str = option("auto", help=REWARDS_HELP, panel=VERDICT, metavar="auto|none|FILE")
    reward_key: str = option("reward", help="The key the mean training reward is logged under (TRL's GRPOTrainer: "
                                            "reward).", panel=VERDICT)
    reward_max: float = option(1.0, help="The reward's ceiling (a verifier's reward for a correct answer).",
                               panel=VERDICT)

    # -- the probe: the function, not the weights, on a few training problems ---------------------------------------
    probe: str | None = option(None, help="Verify the prediction on problems from the training distribution: toy-train "
                                          "(the toy task's training split) or a JSON Lines file of training problems "
                                          "with answers (see docs/probe.md). The gate then decides on the probe.",
                               panel=PROBE, metavar="TASK|FILE")
    probe_limit: int = option(64, help="Probe problems scored at most (sequential looks may stop sooner).",
                              panel=PROBE)
    probe_mode: str = option("reward", help="reward: greedy decoding scored by the verifier; logprob: the "
                                            "teacher-forced log-probability of verified completions (no "
                                            "generation: cheaper, a screen).", panel=PROBE)
    probe_confidence: float = option(0.95, help="Confidence that a candidate beats the last observed checkpoint "
                                                "(family-wise over candidates and looks).", panel=PROBE)
    probe_looks: int = option(3, help="Looks of the sequential comparison (it stops once decided).", panel=PROBE)
    probe_batch: int = option(32, help="Problems per forward pass.", panel=PROBE)
    probe_max_new_tokens: int = option(256, help="Tokens generated per probe problem at most (reward mode; within "
                                                 "the model's context; the toy needs 4).", panel=PROBE)
    horizon_limit: int | None = option(None, help="With --target-step auto: how far the candidates may reach; they "
                                                  "double from the last observed step up to it (default: the "
                                                  "farthest the window backtest vouches for, or 10× the last "
                                                  "observed step).", panel=PROBE)

    # -- the pass and its outputs ---------------------------------------------------------------------------------
    device: str = option("auto", help="auto (CUDA when available), cpu or cuda.", panel=OUTPUT)
    # the most memory the stored copies of the inputs may take at once (a larger tensor is read twice)
    block_bytes: int = option(DEFAULT_BLOCK_BYTES, help="Memory of the pass's buffers.", panel=OUTPUT, cli=False)
    dtype: str = option("auto", help="auto (as the newest checkpoint), bfloat16, float16 or float32.", panel=OUTPUT)
    output: str = option("checkpoint", help="checkpoint: a full Hugging Face checkpoint (for a LoRA run, the merged "
                                            "model; needs the base). lora (LoRA runs only): a PEFT adapter over the "
                                            "same base holding the prediction exactly.", panel=OUTPUT)
    lora_rank: int | None = option(None, help="With --output lora: truncate each module's update to this rank (SVD of "
                                              "the small factors); the truncation error per module goes to "
                                              "relex.json. Default: exact (rank = sum of the observed adapters' "
                                              "ranks).", panel=OUTPUT)
    storage_dtype: str = option("float32", help="dtype of the stored basis vectors: float32 (materialize then equals "
                                                "extrapolate bit for bit) or auto (each tensor's own dtype: half the "
                                                "size for bf16 models, not bit-identical).", panel=OUTPUT)
    max_shard_size: str = option("5GB", help="Largest shard, e.g. 5GB or 500MB.", panel=OUTPUT)
    overwrite: bool = option(False, help="Replace OUT if it exists.", panel=OUTPUT)

    def __post_init__(self):
        set_ = object.__setattr__
        if self.steps is not None:
            set_(self, "steps", tuple(parse_steps(self.steps)))
        if isinstance(self.target_steps, str) and self.target_steps.strip().lower() == "auto":
            set_(self, "auto_target", True)
            set_(self, "target_steps", ())
        set_(self, "target_steps", () if self.target_steps in ((), None) else parse_targets(self.target_steps))
        if self.auto_target and self.target_steps:
            raise RelexInputError("--target-step auto chooses the target: give no other target step")
        if self.auto_target and self.probe is None:
            raise RelexInputError("--target-step auto needs --probe (the problems that choose the target)")
        if self.probe is not None:
            set_(self, "probe", str(self.probe))
        if self.probe_mode not in ("reward", "logprob"):
            raise RelexInputError(f"unknown --probe-mode {self.probe_mode!r} (use reward or logprob)")
        if not 0.5 <= float(self.probe_confidence) < 1.0:
            raise RelexInputError(f"--probe-confidence must be in [0.5, 1), got {self.probe_confidence}")
        for name in ("probe_limit", "probe_looks", "probe_batch", "probe_max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise RelexInputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.probe is None:  # a probe setting without a probe would be ignored: say so instead
            given = [f.name for f in dataclasses.fields(self)
                     if f.name.startswith("probe_") and getattr(self, f.name) != f.default]
            if given:
                raise RelexInputError(f"--{given[0].replace('_', '-')} sets the probe: it needs --probe")
        if self.horizon_limit is not None:
            if not self.auto_target:
                raise RelexInputError("--horizon-limit bounds the targets of --target-step auto: it needs auto")
            if int(self.horizon_limit) < 1:
                raise RelexInputError(f"--horizon-limit must be a step, got {self.horizon_limit!r}")
        if self.max_step is not None and (isinstance(self.max_step, bool) or int(self.max_step) < 0):
            raise RelexInputError(f"--max-step must be a step (an integer of at least 0), got {self.max_step!r}")
        if self.base is not None:
            set_(self, "base", str(self.base))
        rewards = "none" if self.rewards is None else str(self.rewards)
        set_(self, "rewards", rewards)
        if not isinstance(self.reward_max, (int, float)) or not math.isfinite(self.reward_max):
            raise RelexInputError(f"--reward-max must be a finite number, got {self.reward_max!r}")
        device = str(self.device)
        if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise RelexInputError(f"unknown --device {device!r} (use auto, cpu, cuda or cuda:N)")
        if self.dtype not in OUTPUT_DTYPES:
            raise RelexInputError(f"unknown --dtype {self.dtype!r} (use {', '.join(OUTPUT_DTYPES)})")
        if self.output not in OUTPUTS:
            raise RelexInputError(f"unknown --output {self.output!r} (use checkpoint or lora)")
        if self.lora_rank is not None and (self.output != "lora" or int(self.lora_rank) < 1):
            raise RelexInputError("--lora-rank takes a positive rank and needs --output lora")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise RelexInputError(f"unknown --storage-dtype {self.storage_dtype!r} (use float32 or auto)")
        parse_size(self.max_shard_size)
        if int(self.block_bytes) <= 0:
            raise RelexInputError(f"block_bytes must be positive, got {self.block_bytes!r}")
        if not isinstance(self.model, ModelSpec):
            raise TypeError(f"model must be a relex.ModelSpec, got {type(self.model).__name__}")

    # -- building and changing ------------------------------------------------------------------------------------
    @classmethod
    def of(cls, **settings) -> "RunOptions":
        """Options from flat keywords: any field of :class:`RunOptions` or of :class:`relex.trajectory.ModelSpec`
        (``method=``, ``rank=``, ``regressor=``, …), and ``target_step=`` for ``target_steps``."""
        return cls().replace(**settings)

    def replace(self, **changes) -> "RunOptions":
        """A copy with ``changes``, flat as in :meth:`of`."""
        if "target_step" in changes:
            if "target_steps" in changes:
                raise TypeError("give target_step or target_steps, not both")
            changes["target_steps"] = changes.pop("target_step")
        model_fields = {f.name for f in dataclasses.fields(ModelSpec)}
        run_fields = {f.name for f in dataclasses.fields(RunOptions)}
        model = {k: changes.pop(k) for k in list(changes) if k in model_fields and k not in run_fields}
        unknown = sorted(set(changes) - run_fields)
        if unknown:
            raise TypeError(f"unknown option{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
        if model and "model" in changes:  # a spec and options beside it: which one is meant is ambiguous
            raise TypeError(f"give the model options in model= or one by one, not both ({', '.join(sorted(model))})")
        if model:
            changes["model"] = dataclasses.replace(self.model, **model)
        return dataclasses.replace(self, **changes)

    # -- what the run needs from them -----------------------------------------------------------------------------
    @property
    def target_step(self) -> int | None:
        """The farthest target (where the verdict carries the window backtest), or None."""
        return max(self.target_steps) if self.target_steps else None

    @property
    def probed(self) -> bool:
        """A probe decides (a fixed target verified, or the target chosen)."""
        return self.probe is not None

    @property
    def reward_file(self) -> Path | None:
        """The reward log the user named, or None for ``auto`` and ``none``."""
        return None if self.rewards in ("auto", "none") else Path(self.rewards)

    def record(self) -> dict:
        """The settings that shape the result, as ``relex.json`` records them."""
        return {"method": self.model.method, **self.model.record()}


def fields_of(panel: str | None = None) -> list[dataclasses.Field]:
    """The fields of :class:`RunOptions` and :class:`relex.trajectory.ModelSpec` the command line offers, in
    order (``panel``: only those of one group)."""
    fields = [f for f in dataclasses.fields(RunOptions) if f.name != "model"] + list(dataclasses.fields(ModelSpec))
    return [f for f in fields if f.metadata.get("cli", True) and (panel is None or f.metadata["panel"] == panel)]
