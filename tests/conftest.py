import os
from pathlib import Path

import pytest

# Parallel busy processes stall torch's OpenMP threads; tests are small, so one thread each.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def math_data_dir() -> Path:
    """The offline copies of the math benchmarks (``../shared/data/math`` beside the repository)."""
    folder = Path(os.environ.get("RELEX_MATH_DATA", REPO.parent / "shared" / "data" / "math"))
    if not (folder / "aime24.jsonl").is_file():
        pytest.fail(f"math benchmark data not found in {folder}; set RELEX_MATH_DATA")
    return folder
