"""relex in the training loop.

* :class:`RelexCallback` — a ``transformers.TrainerCallback`` (HF ``Trainer`` and TRL's trainers): the
  verdict on the checkpoints so far at every save, logged through the trainer, and optionally the
  extrapolated checkpoint of target steps written as the run goes;
* :func:`assess` — the same for any run folder, from any loop: verdict, figures, optional extrapolation;
* :class:`LeapCallback` — train less: every M steps jump N steps ahead along the fitted trajectory when the
  verdict allows (:class:`LeapOptions`; :class:`Leaper` for any training loop).
"""

from __future__ import annotations

from relex.integrations.assess import Assessment, assess, figures_of

__all__ = ["Assessment", "LeapCallback", "LeapOptions", "Leaper", "RelexCallback", "assess", "figures_of"]


def __getattr__(name: str):
    # The callbacks import transformers; only load them when asked for.
    if name == "RelexCallback":
        from relex.integrations.trainer import RelexCallback

        return RelexCallback
    if name == "LeapCallback":
        from relex.integrations.leap_callback import LeapCallback

        return LeapCallback
    if name in ("LeapOptions", "Leaper"):
        from relex.integrations import leap

        return getattr(leap, name)
    raise AttributeError(f"module 'relex.integrations' has no attribute {name!r}")
