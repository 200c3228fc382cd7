"""How linear, how low-rank and how drift-dominated a run is, each beside its random-walk null.

``analyze(run_dir)`` reads a run once (streaming, one tensor at a time) and returns a
:class:`RunAnalysis`: a per-tensor table, whole-run summaries with their random-walk nulls, the drift
verdict, backtests of every available trajectory model and, optionally, the log-probabilities of fixed
responses across the checkpoints. ``RunAnalysis.write(out_dir)`` writes JSON, CSV and PNG files.
"""

from relex.analysis.drift import DriftDiagnostics, DriftStats, coherent_share, diagnose, drift_stats
from relex.analysis.report import RunAnalysis, analyze

__all__ = ["DriftDiagnostics", "DriftStats", "RunAnalysis", "analyze", "coherent_share", "diagnose",
           "drift_stats"]
