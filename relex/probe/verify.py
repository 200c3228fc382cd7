"""A run's candidates, verified on the probe: one pass writes the checkpoint of every candidate target, the probe
scores each against the last observed checkpoint, and the gate decides on that.

The candidates are one fixed target (``--target-step N --probe P``: is N better?) or a grid from just past the last
observed step to the horizon limit (``--target-step auto``: which is best?). They are written by the same pass and
sink as ``relex extrapolate`` writes (memory bounded as there), into a scratch folder of the caller's choosing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from relex.analysis.verdict import GateDecision, Outcome, Verdict, horizon_limit
from relex.errors import RelexInputError
from relex.io.staging import require_free_space
from relex.model_spec import ModelSpec
from relex.options import RunOptions
from relex.probe.problems import ProbeSet, load_probe
from relex.probe.scoring import ProbeModel
from relex.probe.search import ProbeCurve, search, target_grid
from relex.run import PassResult, Run
from relex.sinks import CheckpointSink, checkpoint_layout, target_folders


@dataclass
class ProbeOutcome:
    """The pass that wrote the candidates, the probe's curve, and the gate's decision on it."""

    result: PassResult
    curve: ProbeCurve
    candidates: dict[int, Path]  # target step → its checkpoint folder (in the scratch folder)
    verdict: Verdict  # the weights' verdict, carried to the chosen target (or the farthest candidate)

    @property
    def chosen(self) -> int | None:
        return self.curve.chosen

    def gate(self) -> GateDecision:
        """Passes when a candidate beats the last observed checkpoint on the probe: the probe decides."""
        curve = self.curve
        if curve.chosen is not None:
            c = next(c for c in curve.candidates if c.step == curve.chosen)
            d = c.difference
            reason = (f"the probe chose step {c.step}: {c.mean:.3f} against {curve.reference_mean:.3f} at the last "
                      f"observed step {curve.reference_step} ({d['diff']:+.3f} [{d['ci_low']:+.3f}, "
                      f"{d['ci_high']:+.3f}] on {c.problems} problems)")
            return GateDecision(True, Outcome.PLAUSIBLE, reason, decided_by="probe")
        scored = [c for c in curve.candidates if c.difference]
        best = max(scored, key=lambda c: c.mean, default=None)
        reason = f"no target beats the last observed step {curve.reference_step} on the probe"
        if curve.blind:
            reason += f" ({curve.blind})"
        elif best is not None:
            d = best.difference
            reason += (f" (best: step {best.step}, {d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] on "
                       f"{best.problems} problems)")
        return GateDecision(False, Outcome.NOT_BETTER, reason, decided_by="probe")

    def to_dict(self) -> dict:
        return {"decided_by": "probe", "chosen": self.chosen, "curve": self.curve.to_dict(),
                "weights_verdict": self.verdict.to_dict()}


def default_limit(steps) -> int:
    """The farthest target ``--target-step auto`` considers without ``--horizon-limit``: the farthest step the
    window backtest can vouch for, else 10× the last observed step."""
    return horizon_limit(steps) or 10 * steps[-1]


def candidate_targets(run: Run, options: RunOptions) -> list[int]:
    """The targets a probe scores: the fixed ones, or (auto) a grid up to the horizon limit."""
    if not options.auto_target:
        return list(options.target_steps)
    last = run.steps[-1]
    limit = options.horizon_limit or default_limit(run.steps)
    grid = target_grid(last, limit)
    if not grid:
        raise RelexInputError(f"--horizon-limit {limit} leaves no candidate: the grid starts at twice the last "
                              f"observed step ({2 * last})")
    return grid


def plan_text(run: Run, options: RunOptions) -> str:
    """What probing ``run`` will do, for ``--dry-run``: the probe, the candidates and the scratch space they take."""
    targets = candidate_targets(run, options)
    per_checkpoint = sum(t.nbytes for t in checkpoint_layout(run.readers, options.dtype, run.rank_names()))
    newest = run.series.observed[-1]
    written = len(targets) + (newest.kind != "hf")  # a LoRA/FSDP/in-memory reference is written whole too
    how = "the probe chooses one" if options.auto_target or len(targets) > 1 else "the probe verifies it"
    whole = f" (written whole from its {newest.kind} checkpoint)" if newest.kind != "hf" else ""
    lines = [f"probe: {options.probe} ({options.probe_mode}, up to {options.probe_limit} problems in "
             f"{options.probe_looks} looks, confidence {options.probe_confidence:g}) against the last observed step "
             f"{run.steps[-1]}{whole}",
             f"candidates: step {', '.join(str(t) for t in targets)} ({how})",
             f"scratch: {written} checkpoint{'s' if written > 1 else ''} of {per_checkpoint / 1e9:.2f} GB written, "
             "then deleted"]
    if options.auto_target:
        lines.append("the weights' verdict: carried to the step the probe chooses, and reported beside it")
    return "\n".join(lines)


def reference_checkpoint(run: Run, folder: Path, progress=None, out_dir_for_space: Path | None = None) -> Path:
    """The last observed checkpoint as a model folder, which every candidate is compared with: the checkpoint
    itself when it is a Hugging Face model folder; otherwise (LoRA adapters over the base, FSDP shards, snapshots
    in memory) the base plus its update, written into ``folder`` by a pass of method ``last`` (the same sink, dtype
    and config files as the candidates)."""
    newest = run.series.observed[-1]
    if newest.kind == "hf":
        return newest.path
    last = run.steps[-1]
    again = run.with_options(run.options.replace(model=ModelSpec(method="last"), target_steps=(last,),
                                                 auto_target=False, horizon_limit=None, allow_interpolation=True,
                                                 rewards="none"))
    _write_checkpoints(again, {last: folder}, out_dir_for_space or folder.parent, progress,
                       f"writing the last observed step {last} ({newest.kind})",
                       {"probe_reference": True, "step": last, "source_kind": newest.kind})
    return folder


def _write_checkpoints(run: Run, folders: dict[int, Path], space_on: Path, progress, task: str,
                       record: dict) -> PassResult:
    """One pass of ``run`` writing the checkpoint of each target step into its folder (``folders``, in the order of
    the targets), with ``record`` as its ``relex.json`` and the run's config and tokenizer files: each loads as a
    model. The disk of ``space_on`` must have room for them first."""
    targets = list(folders)
    layout = checkpoint_layout(run.readers, run.options.dtype, run.rank_names())
    sink = CheckpointSink(folders, layout, np.array(targets, dtype=np.float64), run.device,
                          run.options.max_shard_size)
    config_folders = run.readers.config_folders()
    try:
        require_free_space(space_on, sink.output_bytes(config_folders))
        result = run.execute(sink, progress=progress, task=task)
    finally:
        sink.close()
    for target in targets:
        sink.save(target, record, config_folders)
    return result


def verify(run: Run, options: RunOptions, scratch: Path, probe: ProbeSet | None = None, progress=None,
           out_dir_for_space: Path | None = None) -> ProbeOutcome:
    """Write the candidates of ``run`` into ``scratch`` (one pass), probe them, and decide (see the module
    docstring). ``out_dir_for_space``: the disk whose free space the candidates must fit (default: scratch's)."""
    probe = probe or load_probe(options.probe, options.probe_limit, max_new_tokens=options.probe_max_new_tokens)
    scratch.mkdir(parents=True, exist_ok=True)
    reference = reference_checkpoint(run, scratch / "last-observed", progress, out_dir_for_space)
    device = str(run.device)
    # loaded before the candidates are written: a checkpoint the probe cannot score is refused before that work
    reference_model = ProbeModel(reference, probe, device, options.probe_batch)
    reference_model.step = run.steps[-1]
    targets = candidate_targets(run, options)
    folders = target_folders(scratch, targets) if len(targets) > 1 else {targets[0]: scratch / f"step-{targets[0]}"}
    result = _write_checkpoints(run, folders, out_dir_for_space or scratch, progress, "writing the candidates",
                                {"probe_candidate": True})
    curve = search(reference_model, {t: (lambda t=t: ProbeModel(folders[t], probe, device, options.probe_batch))
                                     for t in targets}, probe, mode=options.probe_mode,
                   confidence=options.probe_confidence, looks=options.probe_looks, progress=progress)
    verdict = result.verdict_at(curve.chosen if curve.chosen is not None else max(targets))
    return ProbeOutcome(result, curve, folders, verdict)


def plot_curve(curve: ProbeCurve, path: Path) -> None:
    """The probe against the target step: each candidate's mean with its interval, the last observed one."""
    import matplotlib  # start-up: only when a plot is written

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.8), dpi=120, layout="constrained")
    ax = figure.add_subplot(1, 1, 1)
    scored = [c for c in curve.candidates if c.difference]
    steps = [c.step for c in scored]
    means = [c.mean for c in scored]
    low = [curve.reference_mean + c.difference["ci_low"] for c in scored]
    high = [curve.reference_mean + c.difference["ci_high"] for c in scored]
    if curve.mode == "reward":  # a share of problems solved: the band stays within [0, 1]
        low, high = [max(0.0, x) for x in low], [min(1.0, x) for x in high]
    ax.axhline(curve.reference_mean, color="#888", ls="--", lw=1,
               label=f"last observed (step {curve.reference_step})")
    if scored:
        ax.fill_between(steps, low, high, color="#1f77b4", alpha=0.15, label="interval of the difference")
        ax.plot(steps, means, "-o", color="#1f77b4", label="candidate")
    if curve.chosen is not None:
        chosen = next(c for c in scored if c.step == curve.chosen)
        ax.scatter([chosen.step], [chosen.mean], s=140, marker="*", color="#d62728", zorder=5, label="chosen")
    ax.set_xlabel("target step")
    ax.set_ylabel(f"probe ({curve.mode})")
    ax.set_title(f"probe {curve.probe['name']}: {curve.probe['problems']} problems, looks {curve.looks_done}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.savefig(path)


__all__ = ["ProbeOutcome", "candidate_targets", "default_limit", "plan_text", "plot_curve", "reference_checkpoint",
           "verify"]
