"""Verifiable arithmetic task shared by train.py and score.py.

Problems are generated deterministically from a seed; the held-out split is disjoint from the training
split (no problem, and no operand-swapped twin of a problem, appears in both). The verifier takes the
last integer in the completion and compares it with the exact answer.
"""

from __future__ import annotations

import random
import re

INSTRUCTION = "Answer with just the final number."

# problem kinds: (name, generator) -> (question text, integer answer, canonical key)


def _add2(r: random.Random):
    a, b = r.randint(1, 25), r.randint(1, 9)
    return f"What is {a} + {b}?", a + b, ("+", a, b)


def _sub2(r: random.Random):
    a, b = r.randint(6, 40), r.randint(1, 5)
    return f"What is {a} - {b}?", a - b, ("-", a, b)


def _mul1(r: random.Random):
    a, b = r.randint(2, 9), r.randint(2, 12)
    return f"What is {a} * {b}?", a * b, ("*", min(a, b), max(a, b))


def _word(r: random.Random):
    name = r.choice(["Tom", "Anna", "Sam", "Lily", "Ben", "Mia"])
    item = r.choice(["apples", "pencils", "stickers", "marbles", "cookies"])
    a, b = r.randint(2, 12), r.randint(1, 6)
    if r.random() < 0.5:
        return (f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
                a + b, ("w+", name, item, a, b))
    a = a + b
    return (f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?",
            a - b, ("w-", name, item, a, b))


KINDS = {"add": _add2, "sub": _sub2, "mul": _mul1, "word": _word}
DEFAULT_KINDS = ("add", "sub", "word")


def make_problems(n: int, seed: int, kinds=DEFAULT_KINDS) -> list[dict]:
    r = random.Random(seed)
    seen, out, tries = set(), [], 0
    while len(out) < n:
        k = kinds[len(out) % len(kinds)]
        q, ans, key = KINDS[k](r)
        tries += 1
        if tries > 100 * n:
            raise RuntimeError(f"cannot draw {n} distinct problems of kinds {kinds}")
        if key in seen:
            continue
        seen.add(key)
        out.append({"question": q, "answer": ans, "kind": k, "key": repr(key)})
    return out


def splits(n_train: int = 300, n_test: int = 120, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Held-out split first (seed+1), then training problems with every held-out key removed."""
    test = make_problems(n_test, seed + 1)
    test_keys = {p["key"] for p in test}
    train = [p for p in make_problems(n_train + n_test, seed) if p["key"] not in test_keys][:n_train]
    return train, test


def prompt_text(problem: dict) -> str:
    """The model's chat format with a user turn and no system turn.

    The shipped chat template inserts a long default system message when none is given; leaving it out
    keeps prompts ~35 tokens (affordable on CPU) and gives the base a better starting accuracy
    (measured on 15 held-out problems: greedy 0.20 vs 0.13, sampled pass@8 at T=0.7 0.73 vs 0.40).
    """
    return (f"<|im_start|>user\n{problem['question']} {INSTRUCTION}<|im_end|>\n"
            "<|im_start|>assistant\n")


_INT = re.compile(r"-?\d[\d,]*")


def extract(completion: str) -> int | None:
    nums = _INT.findall(completion)
    if not nums:
        return None
    try:
        return int(nums[-1].replace(",", ""))
    except ValueError:
        return None


def reward(completion: str, answer: int) -> float:
    return 1.0 if extract(completion) == int(answer) else 0.0


def accuracy_reward(completions, answer, **kw) -> list[float]:
    """TRL reward function: each completion's reward against its prompt's answer (chat or plain text)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [reward(t, ans) for t, ans in zip(texts, answer)]


def prompt_dataset(problems: list[dict]):
    """The problems as a ``datasets.Dataset`` of prompt and answer, as TRL's GRPOTrainer takes them."""
    from datasets import Dataset  # optional: only the training scripts need it

    return Dataset.from_list([{"prompt": prompt_text(p), "answer": p["answer"]} for p in problems])


if __name__ == "__main__":
    # python benchmarks/smollm_rlvr/task.py --logprob-jsonl heldout_logprob.jsonl --probe-jsonl probe.jsonl
    # writes the held-out prompts with their correct answers as {"prompt", "response"} records, the input of
    # `relex analyze --logprob-prompts` (log-probability of the right answer under every checkpoint)
    import argparse
    import json

    p = argparse.ArgumentParser()
    p.add_argument("--logprob-jsonl", help="the held-out prompts with their answers, for relex analyze")
    p.add_argument("--probe-jsonl", help="the training problems as a relex probe (--probe FILE): the model's exact "
                                         "input, the answer, the last-number verifier of the training reward")
    a = p.parse_args()
    train, test = splits()
    if a.logprob_jsonl:
        with open(a.logprob_jsonl, "w") as f:
            for prob in test:
                f.write(json.dumps({"prompt": prompt_text(prob), "response": str(prob["answer"])}) + "\n")
        print(f"wrote {len(test)} records to {a.logprob_jsonl}")
    if a.probe_jsonl:
        with open(a.probe_jsonl, "w") as f:
            for prob in train:
                f.write(json.dumps({"text": prompt_text(prob), "answer": str(prob["answer"]),
                                    "verifier": "last-number"}) + "\n")
        print(f"wrote {len(train)} training problems to {a.probe_jsonl}")

