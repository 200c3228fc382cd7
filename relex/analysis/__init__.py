"""How linear, how low-rank and how drift-dominated a run is, each beside its random-walk null; the verdict.

* :mod:`relex.analysis.drift` — the drift statistics of a Gram matrix, beside their nulls;
* :mod:`relex.analysis.verdict` — the verdict's rules (:class:`Verdict`, :class:`RunVerdict`), and
  :mod:`relex.analysis.wording` its words;
* :mod:`relex.analysis.report` — the analysis of a pass (:class:`RunAnalysis`: a per-tensor table, whole-run
  summaries with their random-walk nulls, backtests of every trajectory model, optionally the
  log-probabilities of fixed responses across the checkpoints). :func:`relex.analyze` runs the pass and this.
"""

from relex.analysis.drift import DriftDiagnostics, DriftStats, coherent_share, diagnose, drift_stats
from relex.analysis.verdict import Outcome, RunVerdict, Verdict, run_verdict

__all__ = ["DriftDiagnostics", "DriftStats", "Outcome", "RunAnalysis", "RunVerdict", "Verdict", "coherent_share",
           "diagnose", "drift_stats", "run_verdict"]


def __getattr__(name: str):
    # A facade: the report and its plots load matplotlib, which the verdict's users (every pass) do not need
    # (start-up time of the command line).
    if name == "RunAnalysis":
        from relex.analysis import report

        return report.RunAnalysis
    raise AttributeError(f"module 'relex.analysis' has no attribute {name!r}")
