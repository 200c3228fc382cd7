"""relex in the training loop.

* :class:`RelexCallback` — a ``transformers.TrainerCallback`` (HF ``Trainer`` and TRL's trainers): the
  verdict on the checkpoints so far at every save, logged through the trainer, and optionally the
  extrapolated checkpoint of target steps written as the run goes;
* :func:`assess` — the same for any run folder, from any loop: verdict, figures, optional extrapolation.
"""

from __future__ import annotations

from relex.integrations.assess import Assessment, assess, figures_of, is_plausible

__all__ = ["Assessment", "RelexCallback", "assess", "figures_of", "is_plausible"]


def __getattr__(name: str):
    # The callback imports transformers; only load it when asked for.
    if name == "RelexCallback":
        from relex.integrations.trainer import RelexCallback

        return RelexCallback
    raise AttributeError(f"module 'relex.integrations' has no attribute {name!r}")
