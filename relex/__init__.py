"""relex: extrapolate RLVR checkpoints along their low-rank trajectory, and tell whether that is safe.

    import relex

    options = relex.RunOptions.of(target_step=500, max_step=75)
    with relex.open_run("RUN", options) as run:          # a folder, "hf://ORG/REPO", [(step, folder)], Snapshots
        print(run.plan().text())
        result = run.execute()                           # one pass: Gram matrices, the verdict
    print(result.verdict.outcome, result.verdict.message)

    relex.extrapolate("RUN", "RUN-relex-500", options)   # the same run into a checkpoint of step 500
    relex.check("RUN", options).decision                 # the verdict as a gate
"""

from __future__ import annotations

__version__ = "0.1.0"

from relex.errors import RelexInputError

__all__ = ["__version__", "ModelSpec", "RelexInputError", "RunOptions", "Snapshots", "analyze", "check",
           "extrapolate", "fit", "materialize", "open_run"]

# start-up: the engine pulls in torch; importing it lazily keeps `relex --help` and input errors fast
_LAZY = {"open_run": "relex.run", "extrapolate": "relex.api", "check": "relex.api", "analyze": "relex.api",
         "fit": "relex.api", "materialize": "relex.store", "RunOptions": "relex.options",
         "ModelSpec": "relex.trajectory", "Snapshots": "relex.io.runs"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'relex' has no attribute {name!r}")
