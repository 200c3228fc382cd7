"""The CI recipe of docs/ci.md, run step by step as its workflow runs it, on the toy run.

The workflow is read from the page itself (its one YAML block), so the page and this test cannot drift
apart: the ``relex ...`` steps run in bash with the job's environment, and the job stops at the first step
that fails, as GitHub Actions does. Only the run and the settings of the toy are substituted.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from toy_runs import WINDOW

DOC = Path(__file__).resolve().parents[1] / "docs" / "ci.md"
TOY = {"MAX_STEP": str(WINDOW), "TARGET": "60", "TASKS": "toy"}  # see tests/test_check.py for the horizon


def _workflow() -> dict:
    blocks = re.findall(r"^```yaml\n(.*?)^```", DOC.read_text(encoding="utf-8"), re.S | re.M)
    assert len(blocks) == 1, "docs/ci.md holds one workflow"
    return yaml.safe_load(blocks[0])


def _job() -> tuple[dict, list[dict]]:
    (job,) = _workflow()["jobs"].values()
    return job, [step for step in job["steps"] if "run" in step and step.get("name", "").startswith("relex ")]


def _run_job(work: Path, run: Path, summary: Path) -> list[subprocess.CompletedProcess]:
    """The job's relex steps in order, until one fails; the run linked in as ``$RUN``."""
    job, steps = _job()
    env = {**os.environ, **{k: str(v) for k, v in job["env"].items()}, **TOY, "GITHUB_STEP_SUMMARY": str(summary)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the relex command
    work.mkdir()
    (work / env["RUN"]).symlink_to(run, target_is_directory=True)
    done = []
    for step in steps:
        # GitHub runs each `run:` with `bash -e {0}`.
        done.append(subprocess.run(["bash", "-e", "-c", step["run"]], cwd=work, env=env, capture_output=True,
                                   text=True, timeout=1800))
        if done[-1].returncode:
            break
    return done


def _uploaded(work: Path) -> set[str]:
    """The files the upload step's paths match."""
    job, _ = _job()
    (upload,) = [s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert upload["if"] == "always()"  # the figures are uploaded after a failed gate too
    patterns = upload["with"]["path"].replace("${{ env.OUT }}", job["env"]["OUT"]).split()
    return {str(p.relative_to(work)) for pattern in patterns for p in work.glob(pattern)}


def test_the_workflow_installs_the_right_package_and_runs_check_extrapolate_eval():
    job, steps = _job()
    assert [s["name"] for s in steps] == ["relex check", "relex extrapolate", "relex eval and gate"]
    assert all("${{" not in s["run"] for s in steps)  # plain shell: what the test runs is what CI runs
    (install,) = [s for s in job["steps"] if s.get("name") == "Install relex"]
    assert 'pip install "relex-rlvr[eval]"' in install["run"]
    assert not re.search(r"pip install ['\"]?relex(\[|['\"]?\s|$)", install["run"], re.M)
    assert set(TOY) <= set(job["env"]) and "RUN" in job["env"] and "OUT" in job["env"]


@pytest.mark.slow
def test_recipe_on_the_toy_run(toy, tmp_path):
    # the workflow installs relex-rlvr[eval]: its last step is relex eval
    pytest.importorskip("lm_eval", reason="relex eval needs lm-eval (pip install 'relex-rlvr[eval]')")
    pytest.importorskip("math_verify", reason="relex eval needs math-verify (pip install 'relex-rlvr[eval]')")
    out = "relex-out"
    summary = tmp_path / "step_summary.md"
    work = tmp_path / "drift"
    steps = _run_job(work, toy["demo"], summary)
    codes = [p.returncode for p in steps]
    assert codes == [0, 0, 0], "\n".join(p.stdout + p.stderr for p in steps)

    check = json.loads((work / out / "relex.json").read_text())
    assert check["verdict"]["verdict"] == "drift-dominated" and check["gate"]["passed"] and check["target_step"] == 60
    extrapolated = work / out / "step-60"
    assert (extrapolated / "model.safetensors.index.json").is_file()
    assert json.loads((extrapolated / "relex.json").read_text())["target_steps"] == [60]
    results = json.loads((work / out / "results.json").read_text())
    assert [c["label"] for c in results["checkpoints"]] == ["last", "relex"]
    gain = results["tasks"]["toy"]["comparison"]["differences"]["relex"]
    assert gain["ci_high"] > -0.01  # not worse than the last checkpoint by more than MARGIN (1 point)
    assert "gate: passed (exit 0)" in " ".join(steps[2].stdout.split())
    for name, headline in (("check.md", "### ✅ relex check"), ("eval.md", "### ✅ relex eval"),
                           ("extrapolate.md", "### relex extrapolate: verdict drift-dominated")):
        assert (work / out / name).read_text().startswith(headline)
    headings = [line for line in summary.read_text().splitlines() if line.startswith("### ")]
    assert [h.split(":")[0] for h in headings] == ["### ✅ relex check", "### relex extrapolate",
                                                   "### ✅ relex eval"]
    assert _uploaded(work) == {f"{out}/relex.json", f"{out}/results.json", f"{out}/check.md",
                               f"{out}/extrapolate.md", f"{out}/eval.md", f"{out}/step-60/relex.json"}

    # The noisy twin stops at relex check: exit 3, nothing extrapolated, the figures still uploaded.
    summary = tmp_path / "noisy_summary.md"
    work = tmp_path / "noisy"
    steps = _run_job(work, toy["noisy"], summary)
    assert [p.returncode for p in steps] == [3], "\n".join(p.stdout + p.stderr for p in steps)
    check = json.loads((work / out / "relex.json").read_text())
    assert not check["gate"]["passed"] and "will likely hurt" in check["verdict"]["message"]
    assert not (work / out / "step-60").exists()
    assert summary.read_text().startswith("### ❌ relex check: extrapolation to step 60 will likely hurt")
    assert _uploaded(work) == {f"{out}/relex.json", f"{out}/check.md"}
