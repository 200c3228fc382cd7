"""The installed ``relex`` command, run as a user runs it: a fresh process per call, nothing imported by the tests.

Every source kind (a Hugging Face folder, sharded safetensors, OpenRLHF's ``_hf`` folders, TRL + PEFT LoRA
adapters, verl FSDP rank shards, a Hub cache), every command and every documented exit code goes through the
``relex`` console script beside this interpreter. An import the test process made (``huggingface_hub``'s lazy
submodules, say) cannot hide a failure of the command here.

The trajectories have a known truth: every tensor moves along one fixed direction, linearly in the step, so the
extrapolated checkpoint must equal ``w_0 + t·v`` at the target, computed here from the same seeds without relex.

CI runs it, with the whole suite, on the newest versions the dependency ranges allow and on the oldest; ``pytest -m
installed`` selects it alone.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import zlib
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import command
from relex.synthetic import make_run
from relex.testing import load_state, save_tiny_model, tiny_config

pytestmark = pytest.mark.installed

STEPS = [2, 4, 6, 8]
TARGET = 16
COMMANDS = ("extrapolate", "check", "analyze", "fit", "materialize", "eval", "demo")


def relex(*args, env: dict | None = None, code: int = 0) -> subprocess.CompletedProcess:
    """Run the installed command; assert its exit code (and, for exit 2, one line on stderr)."""
    done = command.relex(*args, env=env or command_env(), timeout=600)
    assert done.returncode == code, (done.returncode, done.stdout[-3000:], done.stderr[-3000:])
    if code == 2:
        command.one_error_line(done)
    return done


def command_env(**extra) -> dict:
    """The tests' environment, without what the test process itself was given (its Hub cache, its paths)."""
    env = command.environment(OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    for name in ("PYTHONPATH", "HF_HUB_CACHE", "HF_HOME", "HUGGINGFACE_HUB_CACHE"):
        env.pop(name, None)
    env.update(extra)
    return env


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rel: float = 1e-5) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        error = (got[name].double() - want[name].double()).norm() / want[name].double().norm()
        assert error < rel, (name, float(error))


def assert_identical(a: Path, b: Path) -> None:
    left, right = load_state(a), load_state(b)
    assert sorted(left) == sorted(right)
    assert all(torch.equal(left[name], right[name]) for name in left)


# --------------------------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("installed")


@pytest.fixture(scope="module")
def line(root):
    """A noise-free linear trajectory in the HF Trainer layout (checkpoint-0 is the base)."""
    return make_run(root / "hf", STEPS)


def truth(line) -> dict[str, torch.Tensor]:
    return line.truth(TARGET)


def test_help_of_every_command():
    assert "extrapolate" in relex("--help").stdout
    for command in COMMANDS:
        assert "Usage: relex " + command in " ".join(relex(command, "--help").stdout.split())


def test_help_imports_no_torch():
    """``relex --help`` answers at once: building the command line imports neither torch nor transformers
    (torch alone takes 2-3 s to import); a command loads torch before it runs (``relex_cli.app``)."""
    for args in (["--help"], ["extrapolate", "--help"], ["check", "--help"]):
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "relex_cli", *args], capture_output=True,
                              text=True, env=command.environment(), timeout=300)
        assert done.returncode in (0, 2), done.stderr[-2000:]
        imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
        assert "relex.options" in imported  # the options the command line is generated from were imported
        assert not {"torch", "transformers"} & imported, args


def test_a_hugging_face_folder(line, root):
    relex("extrapolate", line.root, "--target-step", TARGET, "--out", root / "out-hf", "--quiet")
    assert_close(load_state(root / "out-hf"), truth(line))
    provenance = json.loads((root / "out-hf" / "relex.json").read_text())
    assert provenance["target_step"] == TARGET and provenance["observed_steps"] == STEPS


def test_sharded_safetensors(line, root):
    sharded = make_run(root / "sharded", STEPS, shard_size=20_000)
    assert len(list((root / "sharded" / "checkpoint-2").glob("model-*.safetensors"))) > 1
    relex("extrapolate", sharded.root, "--target-step", TARGET, "--out", root / "out-sharded", "--quiet")
    assert_identical(root / "out-sharded", root / "out-hf")


def test_openrlhf_hf_folders(line, root):
    openrlhf = make_run(root / "openrlhf" / "_actor", STEPS, layout="global_step{step}_hf")
    # DeepSpeed's own folders beside them hold ZeRO partitions, which relex ignores
    (root / "openrlhf" / "_actor" / "global_step4").mkdir()
    relex("extrapolate", openrlhf.root, "--target-step", TARGET, "--out", root / "out-openrlhf", "--quiet")
    assert_identical(root / "out-openrlhf", root / "out-hf")


# -- a Hub trajectory, offline from a cache in the layout huggingface_hub writes


def publish_branch(cache: Path, repo_id: str, folder: Path, ref: str) -> None:
    """One checkpoint folder as a commit of ``repo_id`` under branch ``ref``: snapshot symlinks into blobs."""
    import hashlib

    storage = cache / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in folder.iterdir() if p.is_file())
    commit = hashlib.sha1(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()
    for path in files:
        data = path.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / ref).write_text(commit)


@pytest.fixture(scope="module")
def hub_cache(line, root) -> Path:
    cache = root / "hf-cache"
    for step in [0, *STEPS]:
        publish_branch(cache, "org/trajectory", line.root / f"checkpoint-{step}", f"step_{step}")
    return cache


def test_the_hub_cache_is_the_layout_huggingface_hub_reads(hub_cache, line):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    scanned = scan_cache_dir(hub_cache)
    assert scanned.warnings == []
    (repo,) = scanned.repos
    assert repo.repo_id == "org/trajectory" and len(repo.revisions) == len(STEPS) + 1
    assert {ref for revision in repo.revisions for ref in revision.refs} == {f"step_{s}" for s in [0, *STEPS]}
    found = try_to_load_from_cache("org/trajectory", "model.safetensors", cache_dir=hub_cache, revision="step_4")
    assert Path(found).read_bytes() == (line.root / "checkpoint-4" / "model.safetensors").read_bytes()


def test_a_hub_trajectory_offline(hub_cache, root):
    env = command_env(HF_HUB_CACHE=str(hub_cache))
    relex("extrapolate", "hf://org/trajectory", "--target-step", TARGET, "--out", root / "out-hub", "--quiet", env=env)
    assert_identical(root / "out-hub", root / "out-hf")
    relex("check", "hf://org/trajectory", "--target-step", TARGET, "--quiet", env=env)


def test_a_hub_trajectory_offline_from_python(hub_cache, root):
    """``relex.extrapolate("hf://ORG/REPO", out, target_step=N)`` in a fresh Python process, offline from the cache
    its environment names: the checkpoint of the local run."""
    script = textwrap.dedent("""
        import sys
        import relex
        result = relex.extrapolate("hf://org/trajectory", sys.argv[1], target_step=int(sys.argv[2]))
        print(result.series.steps, result.verdict.drift_class)
    """)
    done = subprocess.run([sys.executable, "-c", script, str(root / "out-hub-python"), str(TARGET)],
                          capture_output=True, text=True, timeout=600, cwd=root,
                          env=command_env(HF_HUB_CACHE=str(hub_cache)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[0] == f"{STEPS} drift-dominated", done.stdout
    assert_identical(root / "out-hub-python", root / "out-hf")


def test_a_missing_hub_revision_is_one_line(hub_cache, root):
    env = command_env(HF_HUB_CACHE=str(hub_cache))
    done = relex("extrapolate", "hf://org/trajectory@no-such-branch", "--subfolder-pattern", "step-{N}",
                 "--target-step", TARGET, "--out", root / "out-missing", env=env, code=2)
    assert "hf://org/trajectory" in done.stderr and "no-such-branch" in done.stderr
    done = relex("extrapolate", "hf://org/not-cached", "--target-step", TARGET, "--out", root / "out-missing",
                 env=env, code=2)
    assert "hf://org/not-cached" in done.stderr and "cache" in done.stderr
    assert not (root / "out-missing").exists()


# -- TRL + PEFT LoRA adapters


LORA_RANK, LORA_ALPHA = 4, 8
LORA_TARGETS = ("q_proj", "v_proj")


def lora_factors(module: str, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed A (r × in) and direction B (out × r) per module: the adapter of step t holds t·B."""
    generator = torch.Generator().manual_seed(zlib.crc32(module.encode()))
    out_features, in_features = shape
    return (torch.randn(LORA_RANK, in_features, generator=generator) * 0.1,
            torch.randn(out_features, LORA_RANK, generator=generator) * 1e-3)


@pytest.fixture(scope="module")
def lora_run(root):
    """PEFT adapters written by ``save_pretrained`` at steps 2..8, with ΔW_t = t·s·B A exactly."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = root / "lora-base"
    save_tiny_model(base)
    run = root / "lora-run"
    for step in STEPS:
        model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                    peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA,
                                                    target_modules=list(LORA_TARGETS)))
        with torch.no_grad():
            for name, module in model.named_modules():
                if name.endswith(LORA_TARGETS) and hasattr(module, "lora_A"):
                    a, b = lora_factors(name.split("base_model.model.")[-1], tuple(module.base_layer.weight.shape))
                    module.lora_A["default"].weight.copy_(a)
                    module.lora_B["default"].weight.copy_(step * b)
        model.save_pretrained(run / f"checkpoint-{step}")
    return base, run


def lora_truth(base: Path) -> dict[str, torch.Tensor]:
    weights = load_state(base)
    scaling = LORA_ALPHA / LORA_RANK
    for name, w in weights.items():
        module = name.removesuffix(".weight")
        if module.endswith(LORA_TARGETS):
            a, b = lora_factors(module, tuple(w.shape))
            weights[name] = w + TARGET * scaling * (b @ a)
    return weights


def test_trl_peft_lora_adapters(lora_run, root):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, run = lora_run
    relex("extrapolate", run, "--base", base, "--target-step", TARGET, "--out", root / "out-lora-merged", "--quiet")
    assert_close(load_state(root / "out-lora-merged"), lora_truth(base))

    relex("extrapolate", run, "--base", base, "--target-step", TARGET, "--out", root / "out-lora", "--output", "lora",
          "--quiet")
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), root / "out-lora")
    merged = AutoModelForCausalLM.from_pretrained(root / "out-lora-merged")
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        got, want = adapter(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), float((got - want).abs().max())


# -- verl FSDP rank shards, written by two gloo processes


WORLD = 2
FSDP_STEPS = [0, 1, 2, 3]
FSDP_TARGET = 8


def fsdp_direction(name: str, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode()))) * 1e-3


def fsdp_model_at(step: float):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.add_(step * fsdp_direction(name, parameter.shape))
    return model


def _write_fsdp_run(rank: int, port: int, root: str) -> None:
    """Each rank saves its FSDP2 shards of the model at every step, in verl's checkpoint layout."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch before 2.6
        from torch.distributed._composable.fsdp import fully_shard

    from relex.testing import byte_level_tokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    mesh = init_device_mesh("cpu", (WORLD,))
    for step in FSDP_STEPS:
        model = fsdp_model_at(step)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        actor = Path(root) / f"global_step_{step}" / "actor"
        actor.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), actor / f"model_world_size_{WORLD}_rank_{rank}.pt")
        if rank == 0:
            (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": WORLD}))
            model.config.save_pretrained(actor / "huggingface")
            byte_level_tokenizer().save_pretrained(actor / "huggingface")
        dist.barrier()
    dist.destroy_process_group()


def test_verl_fsdp_shards(root):
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = root / "verl"
    mp.spawn(_write_fsdp_run, args=(port, str(run)), nprocs=WORLD, join=True)
    relex("extrapolate", run, "--target-step", FSDP_TARGET, "--out", root / "out-verl", "--quiet")
    want = {name: p.detach() for name, p in fsdp_model_at(FSDP_TARGET).named_parameters()}
    assert_close(load_state(root / "out-verl"), want)


# --------------------------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def walk(root):
    """A random walk and nothing else: extrapolating it will hurt, and the gate must say so."""
    return make_run(root / "walk", [2, 4, 6, 8, 10, 12], coefficients=(), noise=1.0, noise_kind="walk")


def test_check_passes_a_line_and_fails_a_random_walk(line, walk, root):
    done = relex("check", line.root, "--target-step", TARGET, "--json", root / "check.json", "--summary",
                 root / "check.md")
    record = json.loads((root / "check.json").read_text())
    assert record["verdict"]["verdict"] == "drift-dominated", record
    assert "passed" in done.stdout and (root / "check.md").read_text().strip()
    done = relex("check", walk.root, "--target-step", 24, code=3)
    assert "failed" in done.stdout


def test_extrapolate_require_refuses_and_writes_nothing(walk, root):
    relex("extrapolate", walk.root, "--target-step", 24, "--out", root / "out-walk", "--require", "plausible",
          "--quiet", code=3)
    assert not (root / "out-walk").exists()


def test_analyze(line, root):
    relex("analyze", line.root, "--out", root / "analysis")
    summary = json.loads((root / "analysis" / "analysis.json").read_text())["summary"]
    # every tensor moves along one direction at a constant speed: rank 1 explains all of it, and it is all drift
    assert summary["whole_model"]["explained_r1"] > 0.9999 and summary["whole_model"]["drift_share"] > 0.999
    assert summary["whole_model_null"]["explained_r1"] < 0.9
    assert sorted(p.name for p in (root / "analysis").glob("*.png"))


def test_fit_then_materialize_equals_extrapolate(line, root):
    relex("fit", line.root, "--out", root / "trajectory", "--quiet")
    relex("materialize", root / "trajectory", "--target-step", TARGET, "--out", root / "out-materialized", "--quiet")
    assert_identical(root / "out-materialized", root / "out-hf")


def test_eval_scores_a_tiny_model(root, small_math_dir):
    pytest.importorskip("lm_eval")
    model = root / "tiny-model"
    save_tiny_model(model)
    relex("eval", model, "--tasks", "aime24,amc23", "--data-dir", small_math_dir, "--limit", "2",
          "--max-new-tokens", "4", "--out", root / "results.json", "--quiet")
    results = json.loads((root / "results.json").read_text())
    assert sorted(results["tasks"]) == ["aime24", "amc23"]
    for task in results["tasks"].values():
        (score,) = task["checkpoints"].values() if isinstance(task.get("checkpoints"), dict) else [task]
        assert score is not None


def test_demo_ci_preset(root):
    done = relex("demo", "--preset", "ci", "--out", root / "demo")
    assert "verdict from the first 20%" in done.stdout
    assert (root / "demo" / "demo.json").is_file() and (root / "demo" / "demo.png").is_file()


# --------------------------------------------------------------------------------------------- exit codes


def test_bad_input_is_exit_2_with_one_line_and_nothing_written(line, root):
    done = relex("extrapolate", root / "no-such-run", "--target-step", TARGET, "--out", root / "out-bad", code=2)
    assert str(root / "no-such-run") in done.stderr
    done = relex("extrapolate", line.root, "--target-step", 3, "--out", root / "out-bad", code=2)
    assert "target" in done.stderr
    done = relex("extrapolate", line.root, "--target-step", TARGET, "--out", root / "out-hf", code=2)
    assert str(root / "out-hf") in done.stderr
    done = relex("no-such-command", code=2)
    assert not (root / "out-bad").exists()


def test_an_internal_error_is_exit_1_and_leaves_nothing(line, root):
    """An unexpected failure (injected where the output is put in place) is exit 1, with no output folder."""
    hook = root / "inject"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent("""
        import os
        _replace = os.replace
        def replace(src, dst, *args, **kwargs):
            if os.path.basename(os.fspath(dst)) == "out-internal":
                raise RuntimeError("injected failure")
            return _replace(src, dst, *args, **kwargs)
        os.replace = replace
    """))
    done = relex("extrapolate", line.root, "--target-step", TARGET, "--out", root / "out-internal", "--quiet",
                 env=command_env(PYTHONPATH=str(hook)), code=1)
    assert "injected failure" in done.stderr
    assert not [p for p in root.iterdir() if "out-internal" in p.name]


def test_an_evaluation_stack_that_cannot_import_is_one_line(root, tmp_path):
    """lm-eval installed beside a dependency that fails to import (pyarrow 26 beside NumPy 1.x does): exit 2."""
    pytest.importorskip("lm_eval")
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        class Broken:
            def find_spec(self, name, path=None, target=None):
                if name == "pyarrow":
                    raise ImportError("pyarrow requires NumPy 2.0 or newer, found 1.24.0")
        sys.meta_path.insert(0, Broken())
    """))
    model = root / "tiny-model-broken-env"
    save_tiny_model(model)
    done = relex("eval", model, "--tasks", "toy", "--limit", "2", env=command_env(PYTHONPATH=str(tmp_path)), code=2)
    assert "lm-eval is installed but cannot be imported" in done.stderr and "NumPy 2.0" in done.stderr
