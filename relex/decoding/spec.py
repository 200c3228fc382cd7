"""What ``relex eval --logits-extrapolate`` and ``--selective`` describe: two checkpoints and a rule.

Both options take comma-separated ``key=value`` pairs. A piece without ``=`` continues the previous value, so
``steps=10,20,30`` reads as one list.

``--logits-extrapolate``, two checkpoints named directly::

    a=CKPT_A,b=CKPT_B,alpha=2.5
    a=CKPT_A,b=CKPT_B,target=300        # alpha = (300 - step_a) / (step_b - step_a)

  the steps of a and b come from ``a_step=``/``b_step=``, else from each folder's ``trainer_state.json``
  (``global_step``), else from its name (``checkpoint-200``, ``global_step_200``, ``step_200``);

``--logits-extrapolate``, the trajectory view (a run folder, as ``relex extrapolate`` reads it)::

    run=RUN,target=300[,steps=10-100:10|max_step=100][,base=BASE][,a=STEP,b=STEP]

  b defaults to the newest observed checkpoint of the chosen window and a to the one before it (the two
  newest; the base when the window holds one checkpoint); ``a=STEP``/``b=STEP`` pick other steps of the run
  (``a=0`` is the base).

``--selective``::

    base=BASE,rl=RL[,tau=-0.3][,gamma=0.1]
    run=RUN[,steps=...|max_step=...][,tau=..,gamma=..]   # base: the run's base; RL: its newest checkpoint

Either option also takes ``label=NAME`` (the column in the results) and ``device_a=``/``device_b=`` (for
``--selective`` also ``device_base=``/``device_rl=``): the devices of the two models.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from relex.decoding.rules import LogitsExtrapolation, SelectiveExtrapolation, alpha_for
from relex.errors import RelexInputError

LOGITS_KEYS = ("a", "b", "alpha", "target", "run", "steps", "max_step", "base", "a_step", "b_step", "label",
               "device_a", "device_b")
SELECTIVE_KEYS = ("base", "rl", "tau", "gamma", "run", "steps", "max_step", "label", "device_a", "device_b",
                  "device_base", "device_rl")


@dataclass
class DecodingSpec:
    """Two checkpoints and the rule that combines them at decode time (one column of ``relex eval``).

    For ``kind="logits"`` a is the earlier and b the later checkpoint; for ``kind="selective"`` a is the
    base and b the RL model. ``steps`` records ``(step_a, step_b, target)`` when known.
    """

    kind: str
    a: str
    b: str
    alpha: float | None = None
    tau: float | None = None
    gamma: float | None = None
    label: str | None = None
    device_a: str | None = None
    device_b: str | None = None
    step_a: int | None = None
    step_b: int | None = None
    target: int | None = None

    def rule(self):
        if self.kind == "logits":
            return LogitsExtrapolation(float(self.alpha))
        return SelectiveExtrapolation(tau=float(self.tau), gamma=float(self.gamma))

    @property
    def model_name(self) -> str:
        """The lm-eval model this spec is scored with (:mod:`relex.decoding.lm_eval_model`)."""
        return "relex-logits" if self.kind == "logits" else "relex-selective"

    def default_label(self) -> str:
        if self.kind == "logits":
            return f"logits→{self.target}" if self.target is not None else f"logits α={self.alpha:g}"
        return f"selective τ={self.tau:g} γ={self.gamma:g}"

    def describe(self) -> str:
        if self.kind == "logits":
            where = "" if self.step_a is None else f" (steps {self.step_a} → {self.step_b}" + (
                f", target {self.target})" if self.target is not None else ")")
            return f"logits extrapolation α={self.alpha:g}{where}: a={self.a}, b={self.b}"
        return f"selective extrapolation τ={self.tau:g}, γ={self.gamma:g}: base={self.a}, rl={self.b}"

    def model_args(self) -> dict:
        """Arguments of the lm-eval model besides ``pretrained`` (checkpoint b)."""
        args: dict = {"a": self.a}
        if self.kind == "logits":
            args["alpha"] = float(self.alpha)
        else:
            args.update(tau=float(self.tau), gamma=float(self.gamma))
        if self.device_a:
            args["device_a"] = self.device_a
        return args

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DecodingSpec":
        return cls(**data)


def parse_pairs(text: str, option: str, known: tuple[str, ...]) -> dict[str, str]:
    """``{"key": "value"}`` of ``"k=v,k=v"``; a piece without ``=`` continues the previous value."""
    pairs: dict[str, str] = {}
    last = None
    for piece in str(text).split(","):
        if "=" in piece:
            key, value = piece.split("=", 1)
            key = key.strip().lower().replace("-", "_")
            if key not in known:
                raise RelexInputError(f"{option}: unknown key '{key}'; known keys: {', '.join(known)}")
            if key in pairs:
                raise RelexInputError(f"{option}: '{key}' is given twice")
            pairs[key] = value.strip()
            last = key
        elif piece.strip():
            if last is None:
                raise RelexInputError(f"{option} takes key=value pairs separated by commas, got '{piece.strip()}'")
            pairs[last] += "," + piece.strip()
    for key, value in pairs.items():
        if not value:
            raise RelexInputError(f"{option}: '{key}' has no value")
    return pairs


def _number(pairs: dict, key: str, option: str, kind=float):
    if key not in pairs:
        return None
    try:
        value = kind(pairs[key])
    except ValueError:
        raise RelexInputError(f"{option}: {key} must be {'an integer' if kind is int else 'a number'}, "
                              f"got '{pairs[key]}'") from None
    if kind is float and not math.isfinite(value):
        raise RelexInputError(f"{option}: {key} must be finite, got '{pairs[key]}'")
    return value


def checkpoint_step(folder: str | Path) -> int | None:
    """The training step of a checkpoint folder: ``trainer_state.json``'s ``global_step``, else its name (or
    the name of a parent, for verl's ``global_step_N/actor/huggingface``); None when neither says."""
    from relex.io.discover import step_of

    folder = Path(folder).expanduser()
    state = folder / "trainer_state.json"
    if state.is_file():
        try:
            step = json.loads(state.read_text(encoding="utf-8")).get("global_step")
        except (OSError, ValueError):
            step = None
        if step is not None:
            return int(step)
    for part in [folder, *list(folder.parents)[:2]]:
        step = step_of(part.name)
        if step is not None:
            return step
    return None


def _series(pairs: dict, option: str, base: str | None = None):
    from relex.io.discover import discover_series

    series = discover_series(pairs["run"], base=base, steps=pairs.get("steps"),
                             max_step=_number(pairs, "max_step", option, int), min_observed=1)
    return series


def _full_model(checkpoint, option: str) -> str:
    if checkpoint.kind != "hf":
        raise RelexInputError(f"{option} decodes with full checkpoints; step {checkpoint.step} is "
                              f"a {'LoRA adapter' if checkpoint.kind == 'lora' else 'set of FSDP shards'} "
                              "(write a full checkpoint first, e.g. with relex extrapolate's readers)",
                              checkpoint.path)
    return str(checkpoint.path)


def parse_logits(text: str) -> DecodingSpec:
    """The :class:`DecodingSpec` of a ``--logits-extrapolate`` value (syntax in the module docstring)."""
    option = "--logits-extrapolate"
    pairs = parse_pairs(text, option, LOGITS_KEYS)
    alpha = _number(pairs, "alpha", option)
    target = _number(pairs, "target", option, int)
    if (alpha is None) == (target is None):
        raise RelexInputError(f"{option}: give either alpha=A or target=STEP (the step to extrapolate to)")
    if "run" in pairs:
        if "a_step" in pairs or "b_step" in pairs:
            raise RelexInputError(f"{option}: with run=, name the steps as a=STEP and b=STEP")
        series = _series(pairs, option, pairs.get("base"))
        by_step = {c.step: c for c in [series.base, *series.observed]}
        known = ", ".join(map(str, sorted(by_step)))
        for key in ("a", "b"):
            if key in pairs and _number(pairs, key, option, int) not in by_step:
                raise RelexInputError(f"{option}: {key}={pairs[key]} is not a step of the run (steps: {known})",
                                      pairs["run"])
        b_step = _number(pairs, "b", option, int) if "b" in pairs else series.newest.step
        earlier = [step for step in sorted(by_step) if step < b_step]
        if "a" in pairs:
            a_step = _number(pairs, "a", option, int)
        elif earlier:
            a_step = earlier[-1]
        else:
            raise RelexInputError(f"{option}: no checkpoint before b={b_step} to extrapolate from", pairs["run"])
        chosen = [by_step[a_step], by_step[b_step]]
        ckpt_a, ckpt_b = chosen
        a, b, step_a, step_b = _full_model(ckpt_a, option), _full_model(ckpt_b, option), ckpt_a.step, ckpt_b.step
    else:
        if "steps" in pairs or "max_step" in pairs or "base" in pairs:
            raise RelexInputError(f"{option}: steps=, max_step= and base= choose checkpoints of a run: give run=RUN")
        if "a" not in pairs or "b" not in pairs:
            raise RelexInputError(f"{option}: name the two checkpoints, a=EARLIER,b=LATER (or give run=RUN)")
        a, b = pairs["a"], pairs["b"]
        step_a = _number(pairs, "a_step", option, int)
        step_b = _number(pairs, "b_step", option, int)
        if target is not None:
            step_a = checkpoint_step(a) if step_a is None else step_a
            step_b = checkpoint_step(b) if step_b is None else step_b
            for key, path, step in (("a", a, step_a), ("b", b, step_b)):
                if step is None:
                    raise RelexInputError(f"{option}: the step of {key} is unknown (no trainer_state.json and no "
                                          f"step in the folder name); give {key}_step=N or alpha=", path)
    if target is not None:
        if step_a == step_b:
            raise RelexInputError(f"{option}: a and b are both step {step_a}; alpha = (target - a) / (b - a) "
                                  "needs two different steps")
        alpha = alpha_for(step_a, step_b, target)
    return DecodingSpec("logits", a=a, b=b, alpha=float(alpha), label=pairs.get("label"),
                        device_a=pairs.get("device_a"), device_b=pairs.get("device_b"),
                        step_a=step_a, step_b=step_b, target=target)


def parse_selective(text: str) -> DecodingSpec:
    """The :class:`DecodingSpec` of a ``--selective`` value (syntax in the module docstring)."""
    option = "--selective"
    pairs = parse_pairs(text, option, SELECTIVE_KEYS)
    tau = _number(pairs, "tau", option)
    gamma = _number(pairs, "gamma", option)
    if "run" in pairs:
        if "rl" in pairs:
            raise RelexInputError(f"{option}: with run=, the RL model is the newest checkpoint of the window "
                                  "(choose it with steps= or max_step=)")
        series = _series(pairs, option, pairs.get("base"))
        base, rl = _full_model(series.base, option), _full_model(series.newest, option)
        step_a, step_b = 0, series.newest.step
    else:
        if "steps" in pairs or "max_step" in pairs:
            raise RelexInputError(f"{option}: steps= and max_step= choose checkpoints of a run: give run=RUN")
        if "base" not in pairs or "rl" not in pairs:
            raise RelexInputError(f"{option}: name the two models, base=BASE,rl=RL (or give run=RUN)")
        base, rl = pairs["base"], pairs["rl"]
        step_a, step_b = None, None
    for short, long in (("device_a", "device_base"), ("device_b", "device_rl")):
        if short in pairs and long in pairs:
            raise RelexInputError(f"{option}: give {short} or {long}, not both")
    return DecodingSpec("selective", a=base, b=rl, tau=-0.3 if tau is None else tau,
                        gamma=0.1 if gamma is None else gamma, label=pairs.get("label"),
                        device_a=pairs.get("device_a") or pairs.get("device_base"),
                        device_b=pairs.get("device_b") or pairs.get("device_rl"), step_a=step_a, step_b=step_b)
