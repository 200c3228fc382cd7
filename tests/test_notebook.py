"""notebooks/linearity.ipynb executes top to bottom (toy run trained inside) within the CI budget."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "linearity.ipynb"
BUDGET_SECONDS = 180


def test_notebook_is_stored_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_executes(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("RELEX_NOTEBOOK_DIR", str(tmp_path))  # the run and the random walk go here
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    started = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    seconds = time.perf_counter() - started
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 8
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "verdict: drift-dominated" in text  # the toy run
    assert "verdict: noise-dominated" in text  # the random walk of the same shape
    assert (tmp_path / "toy-demo-40" / "toy_run.json").is_file()
    assert seconds < BUDGET_SECONDS, f"notebook took {seconds:.0f} s"
