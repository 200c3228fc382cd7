"""How linear, how low-rank and how drift-dominated a run is, each beside its random-walk null.

``analyze(run_dir)`` reads a run once (streaming, one tensor at a time) and returns a
:class:`RunAnalysis`: a per-tensor table, whole-run summaries with their random-walk nulls, the drift
verdict, backtests of every available trajectory model and, optionally, the log-probabilities of fixed
responses across the checkpoints. ``RunAnalysis.write(out_dir)`` writes JSON, CSV and PNG files.
"""

from relex.analysis.drift import DriftDiagnostics, DriftStats, coherent_share, diagnose, drift_stats

__all__ = ["DriftDiagnostics", "DriftStats", "RunAnalysis", "analyze", "coherent_share", "diagnose",
           "drift_stats"]


def __getattr__(name: str):
    # A facade: the report streams runs through relex.engine, which builds on this package's statistics
    # (drift, verdict); it is loaded when first asked for, so that importing those statistics (as the engine
    # does) does not load the engine, the report and its plots (start-up time of relex.engine and the CLI).
    if name in ("RunAnalysis", "analyze"):
        from relex.analysis import report

        return getattr(report, name)
    raise AttributeError(f"module 'relex.analysis' has no attribute {name!r}")
