"""relex's commands as Python functions, each a thin caller of :func:`relex.run.open_run` and :meth:`Run.execute`.

* :func:`extrapolate` — the checkpoint (or PEFT adapter) of each target step;
* :func:`check` — the verdict as a gate, nothing written;
* :func:`analyze` — how linear, how low-rank and how drift-dominated the run is, each figure beside its null;
* :func:`fit` — the trajectory model, stored; :func:`relex.store.materialize` writes any step from it.

Each takes a run (a folder, ``"hf://ORG/REPO"``, a list of ``(step, folder)`` pairs or
:class:`relex.io.runs.Snapshots`) and a :class:`relex.options.RunOptions`, or its settings as keywords
(``target_step=500, max_step=75, regressor="auto"``). The verdict each reports is the one the pass computed:
the same for every command given the same run and options.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from relex.analysis.report import RunAnalysis, analyze_pass
from relex.analysis.verdict import GateDecision, Verdict
from relex.distributed import current
from relex.errors import RelexInputError
from relex.io.discover import CheckpointSeries, is_checkpoint_name
from relex.io.hub import parse_hub_run
from relex.io.staging import check_output_folder, require_free_space
from relex.io.writer import aux_bytes, write_index
from relex.jsonable import write_json
from relex.options import RunOptions
from relex.progress import Report, counts_of
from relex.run import PassResult, TensorResult, open_run
from relex.staging import staged_folder
from relex.sinks import AdapterSink, CheckpointSink, TrajectorySink, checkpoint_layout, run_record, target_folders
from relex.store import FitResult, MANIFEST, trajectory_manifest
from relex.summaries import verdict_markdown

__all__ = ["CheckResult", "ExtrapolationResult", "analyze", "check", "extrapolate", "fit"]


def _options(options: RunOptions | None, settings: dict) -> RunOptions:
    options = options or RunOptions()
    return options.replace(**settings) if settings else options


# ------------------------------------------------------------------ extrapolate


@dataclass
class ExtrapolationResult:
    """What :func:`extrapolate` wrote and measured."""

    out_dirs: dict[int, Path]
    options: RunOptions
    result: PassResult
    bytes_written: int
    device: str
    output: str = "checkpoint"
    probe: object = None  # the probe's outcome (relex.probe.verify.ProbeOutcome) when a probe decided

    @property
    def written(self) -> bool:
        """Whether a checkpoint was written (a probe that finds no better target writes none)."""
        return bool(self.out_dirs)

    @property
    def target_steps(self) -> list[int]:
        return list(self.out_dirs)

    @property
    def series(self) -> CheckpointSeries:
        return self.result.series

    @property
    def verdict(self) -> Verdict:
        return self.result.verdict

    @property
    def tensors(self) -> list[TensorResult]:
        return self.result.tensors

    @property
    def method(self) -> str:
        return self.options.model.method

    @property
    def seconds(self) -> float:
        return self.result.seconds

    @property
    def bytes_read(self) -> int:
        return self.result.bytes_read

    @property
    def selection(self) -> dict | None:
        return self.result.selection

    def summary(self) -> dict:
        """Whole-run figures: tensor count, explained variance and fit R² (mean, min), time, bytes."""
        return {**self.result.summary(), "bytes_written": self.bytes_written}

    def markdown(self, title: str = "relex extrapolate", decision: GateDecision | None = None,
                 notes: Sequence[tuple[str, str]] = ()) -> str:
        """The Markdown summary: the verdict (with the gate's ``decision``, when one was required), ``notes``."""
        return verdict_markdown(self.verdict, run=self.result.label, steps=self.series.steps,
                                tensors=len(self.result.grams), parameters=self.result.parameters, title=title,
                                decision=decision, notes=notes,
                                probe=None if self.probe is None else self.probe.curve.to_dict())

    def to_dict(self, per_tensor: bool = True) -> dict:
        """The provenance of the run (``relex.json`` adds each target's step and digests to it)."""
        result, series = self.result, self.result.series
        payload = run_record(
            method=self.method, options=self.options.model.record(), base=series.base.path,
            observed_steps=series.steps, observed_folders=[c.path for c in series.observed],
            sources=result.sources, skipped=[{"folder": str(f), "reason": r} for f, r in series.skipped],
            output=self.output, target_steps=self.target_steps,
            outputs={str(k): str(v) for k, v in self.out_dirs.items()}, device=self.device,
            summary=self.summary(), verdict=result.verdict.to_dict(), selection=result.selection,
            passes=result.passes)
        if self.probe is not None:
            payload["probe"] = self.probe.to_dict()
        if per_tensor:
            payload["tensors"] = {t.name: {"shape": list(t.shape), "relative_delta": t.relative_delta, **t.stats}
                                  for t in result.tensors}
        return payload


def check_output_place(out_dir: Path, source) -> None:
    """An output inside the run folder under a checkpoint-like name would later be read as training."""
    if not isinstance(source, (str, Path)) or parse_hub_run(str(source)) is not None:
        return
    if is_checkpoint_name(out_dir.name) and out_dir.resolve().parent == Path(source).resolve():
        raise RelexInputError(
            "this output would sit in the run folder under a checkpoint name and look like a trained "
            "checkpoint; write it elsewhere (e.g. RUN-relex-STEP)", out_dir)


def extrapolate(source, out_dir: str | Path, options: RunOptions | None = None, *, progress: Report = None,
                **settings) -> ExtrapolationResult:
    """Write the checkpoint of each target step (``options.target_steps``) predicted from ``source``'s
    observed checkpoints into ``out_dir`` (several targets: ``out_dir/step-N/`` each), with ``relex.json``.

    ``options.output="lora"`` writes a PEFT adapter instead (LoRA runs only). The output is staged beside
    ``out_dir`` and renamed at the end: an interrupted run never leaves a folder that looks complete. Raises
    :class:`relex.RelexInputError` on bad input (including an output that does not fit its disk); nothing is
    written then.
    """
    options = _options(options, settings)
    if not options.target_steps and not options.auto_target:
        raise RelexInputError("give at least one --target-step")
    out_dir = Path(out_dir)
    if options.probed:
        return _extrapolate_probed(source, out_dir, options, progress)
    ranks = current()
    if ranks.distributed and options.output == "lora":
        raise RelexInputError("--output lora writes one adapter file: run it in one process (without torchrun)")
    ranks.step(lambda: (check_output_folder(out_dir, options.overwrite), check_output_place(out_dir, source)))
    targets = list(options.target_steps)
    target_array = np.array(targets, dtype=np.float64)
    with open_run(source, options, progress=progress) as run:
        readers = run.readers
        if options.output == "lora":
            AdapterSink.check(readers, options.model.method)
        config_folders = readers.config_folders()
        with staged_folder(out_dir, options.overwrite, ranks=ranks) as staging:
            folders = target_folders(staging, targets)

            def make_sink():
                if options.output == "lora":
                    return AdapterSink(readers, folders, target_array, run.device, options.lora_rank, options.dtype)
                layout = checkpoint_layout(readers, options.dtype, run.rank_names())
                return CheckpointSink(folders, layout, target_array, run.device, options.max_shard_size,
                                      part=ranks.distributed)

            sink = ranks.step(make_sink)
            try:
                needed = sum(ranks.gather(lambda: sink.output_bytes(config_folders)))
                ranks.step(lambda: require_free_space(out_dir, needed))  # before reading anything
                result = run.execute(sink, progress=progress, task="extrapolating")
            finally:
                sink.close()
            parts = None if result.parts is None else [rank_parts[0] for rank_parts in result.parts]
            bytes_written = sink.bytes_written if parts is None else sum(
                written["bytes_written"] for part in parts for written in part.values())
            extrapolation = ExtrapolationResult(
                out_dirs={t: (out_dir if len(targets) == 1 else out_dir / f"step-{t}") for t in targets},
                options=options, result=result, bytes_written=bytes_written, device=str(run.device),
                output=options.output)
            record = extrapolation.to_dict()

            def save() -> None:
                for t in targets:
                    if parts is None:
                        sink.save(t, record, config_folders)
                    else:
                        sink.save(t, record, config_folders, parts)

            ranks.step(lambda: save() if ranks.leader else None)
    return extrapolation


def _extrapolate_probed(source, out_dir: Path, options: RunOptions, progress: Report) -> ExtrapolationResult:
    """Extrapolation decided by a probe: the candidates written by one pass, the one the probe chooses kept (see
    :mod:`relex.probe.verify`; with ``--output lora``, written again as an adapter); none better than the last
    observed checkpoint: nothing written."""
    from relex.probe.verify import plot_curve, verify  # start-up: the probe loads transformers

    if current().distributed:
        raise RelexInputError("--probe scores whole models: run it in one process (without torchrun)")
    check_output_folder(out_dir, options.overwrite)
    check_output_place(out_dir, source)

    class NothingBetter(Exception):
        pass

    with open_run(source, options, progress=progress) as run:
        if options.output == "lora":
            AdapterSink.check(run.readers, options.model.method)  # before anything is probed
        try:
            with staged_folder(out_dir, options.overwrite) as staging:
                outcome = verify(run, options, staging / ".candidates", progress=progress, out_dir_for_space=out_dir)
                if outcome.chosen is None:
                    raise NothingBetter()
                result = dataclasses.replace(outcome.result, verdict=outcome.verdict)
                if options.output == "lora":
                    shutil.rmtree(staging / ".candidates")
                    extrapolation = _write_chosen_adapter(run, options, outcome, staging, out_dir, result, progress)
                else:
                    chosen = outcome.candidates[outcome.chosen]
                    for item in chosen.iterdir():
                        item.rename(staging / item.name)
                    shutil.rmtree(staging / ".candidates")
                    digests = json.loads((staging / "relex.json").read_text())["shards_sha256"]
                    extrapolation = ExtrapolationResult(
                        out_dirs={outcome.chosen: out_dir}, options=options, result=result,
                        bytes_written=sum(f.stat().st_size for f in staging.iterdir() if f.is_file()),
                        device=str(run.device), probe=outcome)
                    write_json(staging / "relex.json", {**extrapolation.to_dict(), "target_step": outcome.chosen,
                                                        "shards_sha256": digests})
                plot_curve(outcome.curve, staging / "probe.png")
        except NothingBetter:
            return ExtrapolationResult(out_dirs={}, options=options,
                                       result=dataclasses.replace(outcome.result, verdict=outcome.verdict),
                                       bytes_written=0, device=str(run.device), output=options.output, probe=outcome)
    return extrapolation


def _write_chosen_adapter(run, options: RunOptions, outcome, staging: Path, out_dir: Path, result: PassResult,
                          progress: Report) -> ExtrapolationResult:
    """The probe's choice of a LoRA run as a PEFT adapter: one more pass, the same model (the candidate that was
    probed is this adapter merged into the base, up to ``--lora-rank`` truncation)."""
    chosen = outcome.chosen
    sink = AdapterSink(run.readers, {chosen: staging}, np.array([chosen], dtype=np.float64), run.device,
                       options.lora_rank, options.dtype)
    config_folders = run.readers.config_folders()
    try:
        require_free_space(out_dir, sink.output_bytes(config_folders))
        again = run.with_options(options.replace(target_steps=(chosen,), auto_target=False, horizon_limit=None))
        again.execute(sink, progress=progress, task=f"writing the adapter of step {chosen}")
    finally:
        sink.close()
    extrapolation = ExtrapolationResult(out_dirs={chosen: out_dir}, options=options, result=result,
                                        bytes_written=sink.bytes_written, device=str(run.device), output="lora",
                                        probe=outcome)
    sink.save(chosen, extrapolation.to_dict(), config_folders)
    return extrapolation


# ------------------------------------------------------------------ check


@dataclass
class CheckResult:
    """Everything ``relex check`` prints: the verdict and the gate's decision on it."""

    run: str
    series: CheckpointSeries
    target_step: int | None
    verdict: Verdict
    decision: GateDecision
    sources: dict  # how each checkpoint was read (as relex.json records it)
    skipped: list[dict]  # folders that looked like checkpoints but were not read
    probe: object = None  # the probe's outcome (relex.probe.verify.ProbeOutcome) when a probe decided
    tensors: int = 0
    parameters: int = 0
    seconds: float = 0.0
    bytes_read: int = 0

    @property
    def steps(self) -> list[int]:
        return list(self.series.steps)

    @property
    def exit_code(self) -> int:
        return self.decision.exit_code

    def markdown(self, title: str = "relex check", notes: Sequence[tuple[str, str]] = ()) -> str:
        """The Markdown summary: the gate's decision, the verdict and its figures, then ``notes``."""
        return verdict_markdown(self.verdict, run=self.run, steps=self.steps, tensors=self.tensors,
                                parameters=self.parameters, title=title, decision=self.decision, notes=notes,
                                probe=None if self.probe is None else self.probe.curve.to_dict())

    def to_dict(self) -> dict:
        from relex import __version__

        return {"format": "relex-check/2", "relex_version": __version__, "run": self.run,
                "target_step": self.target_step, "steps": self.steps, "gate": self.decision.to_dict(),
                "verdict": self.verdict.to_dict(), "probe": None if self.probe is None else self.probe.to_dict(),
                "sources": self.sources, "skipped": self.skipped, "tensors": self.tensors,
                "parameters": self.parameters, "seconds": self.seconds, "bytes_read": self.bytes_read}


def check(source, options: RunOptions | None = None, *, lenient: bool = False, progress: Report = None,
          **settings) -> CheckResult:
    """Read ``source`` once (nothing is written) and judge whether extrapolating it to the farthest target step
    is plausible; without a target (or with ``allow_interpolation`` and a target inside the window) the window
    alone is judged. Only a plausible verdict passes, unless ``lenient`` (then a mixed or inconclusive one passes too,
    with a warning).

    With ``options.probe`` the probe decides (:mod:`relex.probe.verify`): the candidates (the target, or with
    ``--target-step auto`` a grid of them) are written to a scratch folder, scored on the probe against the last
    observed checkpoint, and deleted; the gate passes when one is better. The weights' verdict is reported beside.
    """
    options = _options(options, settings)
    if options.probed and lenient:
        raise RelexInputError("--lenient loosens the weights' gate, and with --probe the probe decides: give one of "
                              "them")
    outcome = None
    with open_run(source, options, progress=progress) as run:
        if options.probed:
            from relex.probe.verify import verify  # start-up: the probe loads transformers

            if current().distributed:
                raise RelexInputError("--probe scores whole models: run it in one process (without torchrun)")
            scratch = Path(tempfile.mkdtemp(prefix="relex-probe-"))
            try:
                outcome = verify(run, options, scratch, progress=progress)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            result, verdict, decision = outcome.result, outcome.verdict, outcome.gate()
        else:
            result = run.execute(progress=progress)
            verdict = result.verdict
            decision = verdict.gate(lenient)
    return CheckResult(run=result.label, series=result.series,
                       target_step=outcome.chosen if outcome is not None else options.target_step,
                       verdict=verdict, decision=decision, sources=result.sources,
                       skipped=[{"path": str(p), "reason": r} for p, r in result.series.skipped],
                       tensors=len(result.grams), parameters=result.parameters, seconds=result.seconds,
                       bytes_read=result.bytes_read, probe=outcome)


# ------------------------------------------------------------------ analyze


def analyze(source, options: RunOptions | None = None, *, rank: int = 3, holdout: int | None = None,
            fractions: Sequence[float] = (0.25, 0.5, 0.75), backtest_ranks: Sequence[int] = (1, 2),
            learned: bool = False, null_samples: int = 200, logprob_records: Sequence[dict] | None = None,
            logprob_batch_size: int = 64, progress: Report = None, **settings) -> RunAnalysis:
    """Analyse ``source``'s linearity in weight space (and, given ``logprob_records``, in output space): one
    pass, then arithmetic on its Gram matrices (see :class:`relex.analysis.report.RunAnalysis`).

    ``rank``: explained variance at ranks 1..rank; ``holdout``, ``fractions``, ``backtest_ranks``, ``learned``:
    the backtests; ``null_samples``: random walks per tensor size for the nulls; ``logprob_records``:
    ``{"prompt", "response"}`` records scored under every checkpoint.
    """
    options = _options(options, settings)
    if rank < 1:
        raise RelexInputError(f"--rank must be at least 1, got {rank}")
    if null_samples < 10:
        raise RelexInputError(f"--null-samples must be at least 10, got {null_samples}")
    with open_run(source, options, progress=progress) as run:
        result = run.execute(progress=progress, task="analysing")
        device = str(run.device)
    return analyze_pass(result, run_dir=str(source) if isinstance(source, (str, Path)) else None, rank=rank,
                                 holdout=holdout, fractions=fractions, backtest_ranks=backtest_ranks, learned=learned,
                                 null_samples=null_samples, logprob_records=logprob_records,
                                 logprob_batch_size=logprob_batch_size, device=device,
                                 logprob_progress=counts_of(progress, "scoring log-probabilities"))


# ------------------------------------------------------------------ fit


def fit(source, out_dir: str | Path, options: RunOptions | None = None, *, progress: Report = None,
        **settings) -> FitResult:
    """Fit ``source``'s trajectory model and store it in ``out_dir`` (``trajectory.json`` and safetensors of the
    basis vectors; see :mod:`relex.store`); :func:`relex.store.materialize` then writes any step. ``options.dtype``
    is the dtype materialize will write, ``options.storage_dtype`` that of the stored vectors. Reads the run
    twice (the store's layout needs every model first)."""
    options = _options(options, settings)
    out_dir = Path(out_dir)
    ranks = current()
    ranks.step(lambda: check_output_folder(out_dir, options.overwrite))
    with open_run(source, options, progress=progress) as run:
        readers = run.readers
        config_folders = readers.config_folders()
        with staged_folder(out_dir, options.overwrite, ranks=ranks) as staging:
            sink = TrajectorySink(staging, readers, options.storage_dtype, options.dtype, run.rank_names(),
                                  options.max_shard_size, part=ranks.distributed,
                                  before_writing=lambda needed: require_free_space(out_dir,
                                                                                   needed + aux_bytes(config_folders)))
            try:
                result = run.execute(sink, progress=progress, task="fitting")
            finally:
                sink.close()
            parts = None if result.parts is None else [rank_parts[0]["store"] for rank_parts in result.parts]
            bytes_written = sink.bytes_written if parts is None else sum(p["bytes_written"] for p in parts)
            manifest = trajectory_manifest(result, readers, options, bytes_written)

            def save() -> None:
                if parts is not None:
                    write_index(staging, parts)
                sink.writer.copy_aux_files(config_folders)
                sink.writer.write_json(MANIFEST, manifest)

            ranks.step(lambda: save() if ranks.leader else None)
    return FitResult(out_dir, manifest, result.seconds, result.bytes_read, bytes_written)
