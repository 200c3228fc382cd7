"""How linear, how low-rank and how drift-dominated a run is, each beside its random-walk null."""

from relex.analysis.drift import DriftDiagnostics, DriftStats, diagnose, drift_stats

__all__ = ["DriftDiagnostics", "DriftStats", "diagnose", "drift_stats"]
