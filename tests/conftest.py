import json
import os
from pathlib import Path

import pytest

# Parallel busy processes stall torch's OpenMP threads; tests are small, so one thread each.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# NumPy's and SciPy's OpenBLAS as well, set before they load, and inherited by every process a test starts: the
# tests that compare processes bit for bit (tests/test_distributed.py) need the same BLAS thread count on both
# sides, as OpenBLAS's last bits depend on it (the OpenBLAS of NumPy 1.24 and SciPy 1.10 even for 6×6 products).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def toy(request, tmp_path_factory) -> dict[str, Path]:
    """The toy runs of tests/toy_runs.py (the demo's whole run, its first 20 steps, the noisy twin's), kept
    in pytest's cache folder across sessions."""
    from toy_runs import toy_runs

    cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    folder = Path(cache.mkdir("relex-toy-runs")) if cache is not None else tmp_path_factory.mktemp("toy-runs")
    return toy_runs(folder)


@pytest.fixture(scope="session")
def math_data_dir() -> Path:
    """The offline copies of the real math benchmarks (``RELEX_MATH_DATA``, default ``../shared/data/math``).

    Tests that check the real problem files skip, saying why, in a clone without them.
    """
    folder = Path(os.environ.get("RELEX_MATH_DATA", REPO.parent / "shared" / "data" / "math"))
    if not (folder / "aime24.jsonl").is_file():
        pytest.skip(f"real math benchmark files not found in {folder} (set RELEX_MATH_DATA to run these tests)")
    return folder


# A few problems per benchmark in each benchmark's own record layout (field names and answer types as in the
# published files), for the pipeline tests: they must run in any clone.
SMALL_MATH = {
    "aime24": [{"id": str(60 + i), "problem": f"Find ${a}+{b}$.", "solution": f"${a}+{b}={a + b}$",
                "answer": str(a + b), "url": "", "question": f"Find ${a}+{b}$."}
               for i, (a, b) in enumerate([(12, 30), (100, 104), (7, 8)])],
    "aime25": [{"id": str(90 + i), "problem": f"Compute ${a}\\cdot {b}$.", "solution": str(a * b),
                "answer": str(a * b), "url": "", "question": f"Compute ${a}\\cdot {b}$."}
               for i, (a, b) in enumerate([(7, 10), (12, 12), (3, 5)])],
    "amc23": [{"id": i, "problem": f"What is ${a}-{b}$?", "answer": float(a - b), "url": "",
               "question": f"What is ${a}-{b}$?"} for i, (a, b) in enumerate([(45, 18), (30, 1), (9, 4)])],
    "math500": [{"problem": f"Simplify $\\frac{{{a}}}{{{b}}}$.", "solution": f"It is $\\boxed{{\\frac{{1}}{{{b // a}}}}}$.",
                 "answer": f"\\frac{{1}}{{{b // a}}}", "subject": "Algebra", "level": "1",
                 "unique_id": f"test/algebra/{i}.json"} for i, (a, b) in enumerate([(2, 6), (3, 12), (5, 10)])],
    "minerva_math": [{"problem": f"A rod is ${a}$ m long and another ${b}$ m. Find the total length in m.",
                      "solution": f"Add them: \\[{a}+{b}=\\boxed{{{a + b}}}\\]", "type": "Physics", "idx": str(i)}
                     for i, (a, b) in enumerate([(2, 3), (10, 5), (1, 1)])],
}


@pytest.fixture(scope="session")
def small_math_dir(tmp_path_factory) -> Path:
    """Three problems per benchmark, written for the tests in the layout of the real files."""
    folder = tmp_path_factory.mktemp("math")
    for task, records in SMALL_MATH.items():
        (folder / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return folder
