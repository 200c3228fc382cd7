"""A toy RLVR setting that runs on a CPU in minutes: a tiny Llama learns two-digit addition under GRPO.

It writes a real checkpoint series (``checkpoint-0`` .. ``checkpoint-N`` in the Hugging Face Trainer layout)
for relex to analyse and extrapolate. ``docs/toy_regime.md`` records which settings give drift-dominated
dynamics like LLM RLVR runs and which are noise-dominated.
"""

from relex.toy.evaluate import evaluate, expected_accuracy, greedy_accuracy, pass_at_k, sampled_accuracy
from relex.toy.task import heldout_split, score, train_split
from relex.toy.train import ToyConfig, group_advantages, train_run, warmup_model

__all__ = ["ToyConfig", "train_run", "warmup_model", "group_advantages", "heldout_split", "train_split",
           "score", "greedy_accuracy", "sampled_accuracy", "expected_accuracy", "pass_at_k", "evaluate"]
