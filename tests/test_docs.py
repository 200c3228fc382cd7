"""The documentation as it is read: every page is linked, every link resolves, every command runs.

The README and the pages of ``docs/`` show commands a reader copies. Each ``relex ...`` line of their shell
blocks (and each line starting ``python``, ``torchrun`` or ``srun``, or using ``relex`` otherwise) is run here
through the installed ``relex`` command, in a folder of its page where the names the pages use stand for
small real runs built once per session (:data:`NAMES`): ``RUN`` is the demo's toy run, ``trl-run`` a PEFT
LoRA run, ``verl-run`` verl's FSDP shards, and so on. Each page's Python blocks run too. What cannot run here
(a download from the Hub, a GPU, several hosts, another framework's environment, a benchmark of minutes or
hours) is listed in :data:`SKIPPED` with the reason; a command that is neither run nor listed fails the test.

To keep them cheap, commands run with ``--quiet`` and small limits (:func:`cheap`): what they read and
compute is the same, only less of it (fewer problems scored, a shorter toy preset).
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from command import RELEX, environment

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

# Lines of a shell block that are not relex's to run (what the line is for), by a piece of the line.
SKIPPED = {
    # the two set-up commands: CI (.ci/run) runs the test command in a fresh virtual environment
    "python3 -m venv .venv": "creates a virtual environment and installs relex into it: .ci/run runs the "
                             "test command; tests/test_demo.py runs relex demo",
    "hf://": "downloads a run from the Hugging Face Hub (tests/test_hub.py reads Hub runs from a local copy)",
    "--device cuda": "needs CUDA GPUs",
    "--nnodes": "needs several hosts",
    "srun ": "needs a Slurm cluster",
    "OMP_NUM_THREADS=2 torchrun": "starts four processes of two threads each, for eight cores "
                                  "(tests/test_distributed.py runs relex extrapolate under torchrun on CPU)",
    "python3 -m verl.": "runs verl's trainer",
    "relex check \"$RUN\" --base \"$MODEL\"": "the verl job script's loop, around verl's trainer",
    "benchmarks/distributed_speed.py": "a benchmark of minutes on 3.5 GB of checkpoints",
    "benchmarks/extrapolate_speed.py": "a benchmark of minutes on 7 GB of checkpoints",
    "benchmarks/toy_leap.py": "trains toy runs for tens of minutes",
    "--rescore": "rescores the rows benchmarks/calibrate_verdict.py stored while it trained its runs",
    "benchmarks/calibrate_verdict.py": "trains hundreds of toy runs (hours)",
    "benchmarks/smollm_rlvr/": "the SmolLM2-135M benchmark (downloads the model; its GRPO run takes an hour of "
                               "CPU)",
    "benchmarks/trainer_envs/": "builds verl's, TRL's and OpenRLHF's own environments",
    "verl_save.py": "runs in verl's own environment (benchmarks/trainer_envs)",
    "openrlhf_save.py": "runs in OpenRLHF's own environment (benchmarks/trainer_envs)",
    "python -m verl.model_merger": "runs verl's model merger in verl's own environment",
    "zero_to_fp32.py": "runs DeepSpeed's converter in OpenRLHF's own environment",
    "fsdp-float32/": "reads what verl_save.py wrote in verl's own environment",
    "bf16/": "reads what openrlhf_save.py wrote in OpenRLHF's own environment",
    "relex check plain ": "reads the SmolLM2 run of benchmarks/smollm_rlvr",
    "relex extrapolate plain ": "reads the SmolLM2 run of benchmarks/smollm_rlvr",
    "relex check smollm/": "reads the SmolLM2 run of benchmarks/smollm_rlvr",
}

# Python blocks that are not relex's to run, by a piece of the block.
SKIPPED_PYTHON = {
    "GRPOTrainer(": "trains a model with TRL (tests/test_integrations.py and tests/test_leap.py run the callbacks "
                    "in TRL's GRPOTrainer)",
    'device_a="cuda:0"': "needs two GPUs (tests/test_decoding.py runs the decoders on CPU)",
}

# Programs whose lines must be run or skipped; lines of other programs (pip, tail, export, …) are not relex's.
PROGRAMS = {"relex", "python", "python3", "torchrun", "srun"}
# Commands that end in a gate: exit code 3 is the gate's answer on this run, not a fault of the page.
GATES = ("relex check ", "--require", "--fail-if-worse")


def _blocks(page: Path, languages: tuple[str, ...]) -> list[str]:
    text = page.read_text(encoding="utf-8")
    pattern = r"^```(?:" + "|".join(languages) + r")\n(.*?)^```"
    return re.findall(pattern, text, re.S | re.M)


def shell_lines(page: Path) -> list[str]:
    """Every line of the page's shell blocks, continuation lines joined, comments and blank lines left out."""
    lines = []
    for block in _blocks(page, ("bash", "sh", "shell")):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [line.strip() for line in joined.splitlines()
                  if line.strip() and not line.strip().startswith("#")]
    return lines


def program(line: str) -> tuple[dict[str, str], list[str]]:
    """A command line's leading environment assignments and its words (comments dropped)."""
    words = shlex.split(line, comments=True)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    return env, words


def skip_reason(text: str, skipped: dict[str, str]) -> str | None:
    return next((reason for piece, reason in skipped.items() if piece in text), None)


def commands(page: Path) -> list[tuple[str, str | None]]:
    """The page's commands that are relex's to run: (line, the reason it is skipped, or None)."""
    found = []
    for line in shell_lines(page):
        _, words = program(line)
        uses_relex = "relex" in words or any(w.startswith("relex_cli") for w in words)
        if not words or (words[0] not in PROGRAMS and not uses_relex):
            continue
        found.append((line, skip_reason(line, SKIPPED)))
    return found


def python_blocks(page: Path) -> list[tuple[str, str | None]]:
    return [(block, skip_reason(block, SKIPPED_PYTHON)) for block in _blocks(page, ("python",))]


def runnable(line: str) -> bool:
    """A line this test knows how to run: the relex command (or ``python -m relex_cli``)."""
    _, words = program(line)
    return words[:1] == ["relex"] or words[:3] == ["python", "-m", "relex_cli"]


# -- 1. every page is linked, every link resolves ------------------------------------------------------------


def _links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    return re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'src="([^"]+)"', text)


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of the page's headings."""
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / link.split("#")[0]).resolve() for link in _links(README)
              if not re.match(r"[a-z]+:", link)}
    missing = [page.name for page in DOCS.glob("*.md") if page.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_local_link_resolves(page):
    broken = []
    for link in _links(page):
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(link)
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(link)
    assert not broken, f"{page.name}: links that lead nowhere: {broken}"


def test_the_command_reference_is_the_generators_output():
    """docs/commands.md is what ``python -m relex_cli.reference`` writes from the command line itself."""
    from relex_cli.reference import reference

    committed = (DOCS / "commands.md").read_text(encoding="utf-8")
    assert committed == reference(), "docs/commands.md is stale: python -m relex_cli.reference > docs/commands.md"


def test_every_command_of_the_pages_is_run_or_skipped_for_a_reason():
    """No silent skipping: each command line is run by :func:`test_the_commands_of_a_page_run` or listed in
    SKIPPED, and each entry of SKIPPED still matches a command of the pages."""
    lines = [(page, line, reason) for page in PAGES for line, reason in commands(page)]
    unknown = [f"{page.name}: {line}" for page, line, reason in lines if reason is None and not runnable(line)]
    assert not unknown, f"commands neither run nor skipped with a reason: {unknown}"
    texts = [line for _, line, _ in lines]
    stale = [piece for piece in SKIPPED if not any(piece in text for text in texts)]
    assert not stale, f"SKIPPED entries that match no command of the pages: {stale}"
    blocks = [block for page in PAGES for block, _ in python_blocks(page)]
    stale = [piece for piece in SKIPPED_PYTHON if not any(piece in block for block in blocks)]
    assert not stale, f"SKIPPED_PYTHON entries that match no Python block: {stale}"
    assert any(runnable(line) and reason is None for _, line, reason in lines)


# -- 2. every command runs -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def places(toy, small_math_dir, tmp_path_factory) -> dict[str, Path]:
    """What the names of the pages stand for: small real runs and checkpoints, built once."""
    root = tmp_path_factory.mktemp("docs-runs")
    run = root / "toy-run"
    shutil.copytree(toy["demo-final"], run)  # a copy: nothing a page writes can reach the tests' cache
    made = {"RUN": run, "BASE": run / "checkpoint-0", "RL": run / "checkpoint-100",
            "BASE_MODEL": run / "checkpoint-0"}
    # OpenRLHF's layout: global_stepN_hf/ folders, no step 0 (the base is passed as --base)
    openrlhf = root / "openrlhf"
    for folder in run.glob("checkpoint-*"):
        step = int(folder.name.split("-")[1])
        if step:
            (openrlhf / f"global_step{step}_hf").parent.mkdir(parents=True, exist_ok=True)
            (openrlhf / f"global_step{step}_hf").symlink_to(folder, target_is_directory=True)
    made["ckpt/checkpoints_ppo_ray"] = openrlhf
    # TRL + PEFT: a LoRA run over a tiny base, in TRL's layout (checkpoint-N/adapter_model.safetensors)
    from test_lora import VARIANTS, save_base, train_adapter_run

    arch, lora = VARIANTS["plain"]
    lora_base = save_base(root / "lora-base", arch)
    made["trl-run"] = made["run"] = train_adapter_run(root / "trl-run", lora_base, lora)
    made["base"] = lora_base
    # verl: every rank's FSDP2 shard (global_step_N/actor/model_world_size_2_rank_R.pt), written by FSDP itself
    import torch.multiprocessing as mp
    from test_fsdp import WORLD, _free_port, _worker

    mp.spawn(_worker, args=(_free_port(), str(root / "fsdp")), nprocs=WORLD, join=True)
    made["verl-run"] = root / "fsdp" / "fsdp2"
    # two tiny random models for the math pipeline
    from relex.testing import save_tiny_model

    save_tiny_model(root / "tiny" / "base", seed=0)
    save_tiny_model(root / "tiny" / "step-100", seed=1)
    made["tiny"] = root / "tiny"
    made["../shared/data/math"] = small_math_dir
    return made


def workspace(folder: Path, places: dict[str, Path]) -> Path:
    """A page's working folder: each name a link to what it stands for."""
    folder.mkdir()
    for name, target in places.items():
        if name.startswith(".."):
            continue
        link = folder / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target, target_is_directory=True)
    return folder


def cheap(words: list[str], places: dict[str, Path]) -> list[str]:
    """The command with ``--quiet`` and small limits added where it gives none, and the names that stand for a
    folder outside the page's working folder replaced."""
    words = [str(places[w]) if w in places and w.startswith("..") else w for w in words]
    command = words[1]
    added: list[tuple[str, ...]] = []  # each an option and its value, if any
    if command in ("extrapolate", "check", "analyze", "fit", "materialize", "eval"):
        added.append(("--quiet",))
    if command == "analyze":
        added += [("--logprob-limit", "8"), ("--null-samples", "20")]
    if command == "eval":
        added += [("--limit", "1"), ("--max-new-tokens", "8")]
        tasks = words[words.index("--tasks") + 1] if "--tasks" in words else "the math benchmarks"
        if tasks != "toy":
            added.append(("--data-dir", str(places["../shared/data/math"])))
    if command == "demo":
        added += [("--preset", "ci"), ("--samples", "1")]
    assert added, f"relex {command}: no cheap settings known for it"
    return [*words, *(word for option in added if option[0] not in words for word in option)]


# ``relex eval`` lines already run in this session, and how they ended: each scores checkpoints in worker
# processes of their own (seconds each), and no later command of a page reads what one writes, so a line shown
# on two pages (the README's and eval.md's) runs once.
EVALUATED: dict[str, subprocess.CompletedProcess] = {}


def run_line(line: str, cwd: Path, places: dict[str, Path]) -> subprocess.CompletedProcess:
    env_settings, words = program(line)
    if words[:3] == ["python", "-m", "relex_cli"]:
        words = ["relex", *words[3:]]
    words = cheap(words, places)
    return subprocess.run([str(RELEX), *words[1:]], cwd=cwd, capture_output=True, text=True, timeout=900,
                          env=environment(**env_settings))


def run_python(block: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", block], cwd=cwd, capture_output=True, text=True, timeout=900,
                          env=environment())


def _page_params():
    params = []
    for page in PAGES:
        lines = [line for line, reason in commands(page) if reason is None and runnable(line)]
        blocks = [block for block, reason in python_blocks(page) if reason is None]
        if lines or blocks:
            slow = any(program(line)[1][1:2] in (["eval"], ["demo"]) for line in lines)
            marks = [pytest.mark.slow] if slow else []
            params.append(pytest.param(page, id=page.relative_to(REPO).as_posix(), marks=marks))
    return params


@pytest.mark.parametrize("page", _page_params())
def test_the_commands_of_a_page_run(page, places, tmp_path):
    """Each command of the page, in the page's order, in one working folder (a later command may read what an
    earlier one wrote), exits 0 — or 3, the gate's answer, for a gate; then each Python block runs."""
    cwd = workspace(tmp_path / "work", places)
    without_lm_eval = []  # relex eval lines, when the eval extra is not installed
    for line, reason in commands(page):
        if reason is not None or not runnable(line):
            continue
        if program(line)[1][1:2] == ["eval"] and importlib.util.find_spec("lm_eval") is None:
            without_lm_eval.append(line)
            continue
        if line in EVALUATED:
            done = EVALUATED[line]
        else:
            done = run_line(line, cwd, places)
            if program(line)[1][1:2] == ["eval"]:
                EVALUATED[line] = done
        allowed = (0, 3) if any(gate in f"{line} " for gate in GATES) else (0,)
        assert done.returncode in allowed, (f"{page.name}: `{line}` exited {done.returncode}\n"
                                            f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    for block, reason in python_blocks(page):
        if reason is not None:
            continue
        done = run_python(block, cwd)
        assert done.returncode == 0, f"{page.name}: Python block failed\n{block}\n{done.stderr[-3000:]}"
    if without_lm_eval:  # the rest ran and passed; say what did not
        pytest.skip(f"{page.name}: {len(without_lm_eval)} relex eval line(s) need lm-eval, which is not installed "
                    "(pip install 'relex-rlvr[eval]')")
