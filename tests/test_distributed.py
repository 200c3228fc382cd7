"""One run split across processes (torch.distributed on gloo, as torchrun launches it) writes the tensors,
verdicts and choices one process writes, and a bad input seen by one rank fails every rank cleanly."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import relex
import relex.distributed
from relex.api import analyze, check
from relex.distributed import Ranks, shares
from relex.io.discover import discover_series
from relex.io.run_readers import RunReaders
from relex.run import open_run
from relex.store import materialize
from relex.synthetic import write_checkpoint
from relex.testing import load_state, save_tiny_model

STEPS = [3, 7, 8, 15, 22, 40]
TARGET = 90
MODES = {"relex": {}, "matrix-rank1": {"method": "matrix-rank1"}, "auto": {"regressor": "auto"},
         "mlp": {"regressor": "mlp"}}
# figures of relex.json that depend on the machine's pace or the pool, not on the values written
PACE = ("seconds", "bytes_read")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny Llama moving along a fixed direction per tensor, linearly in the step, plus a random walk."""
    root = tmp_path_factory.mktemp("distributed") / "run"
    save_tiny_model(root / "checkpoint-0")
    base = load_state(root / "checkpoint-0")
    generator = torch.Generator().manual_seed(3)
    directions = {n: torch.randn(t.shape, generator=generator) for n, t in base.items()}
    walk = {n: torch.zeros_like(t) for n, t in base.items()}
    config = json.loads((root / "checkpoint-0" / "config.json").read_text())
    for step in STEPS:
        for n in walk:
            walk[n] += 2e-4 * torch.randn(walk[n].shape, generator=generator)
        state = {n: (t + 1e-3 * step * directions[n] + walk[n]).to(torch.bfloat16) for n, t in base.items()}
        write_checkpoint(root / f"checkpoint-{step}", state, step=step, config=config)
    return root


@pytest.fixture(scope="module")
def single(run, tmp_path_factory):
    """The oracle: each mode and the verdicts, written by this one process."""
    out = tmp_path_factory.mktemp("single")
    for label, options in MODES.items():
        relex.extrapolate(run, target_step=TARGET, out_dir=out / label, **options)
    write_reports(run, out)
    return out


def write_reports(run, out) -> None:
    (out / "check.json").write_text(json.dumps(_without_pace(check(run, target_step=TARGET).to_dict())))
    (out / "analysis.json").write_text(json.dumps(_without_pace(analyze(run, null_samples=10).summary),
                                                  default=float))


def _without_pace(record):
    if isinstance(record, dict):
        return {k: _without_pace(v) for k, v in record.items() if k not in PACE}
    if isinstance(record, list):
        return [_without_pace(v) for v in record]
    return record


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def identical_tensors(a, b) -> None:
    left, right = load_state(a), load_state(b)
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name
    index = json.loads((b / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(right)  # the index lists every tensor's shard
    for shard in set(index["weight_map"].values()):
        assert (b / shard).is_file()


def same_record(a, b) -> None:
    """relex.json of both: the same verdict, choices and per-tensor figures (shards may be cut otherwise)."""
    left, right = (json.loads((folder / "relex.json").read_text()) for folder in (a, b))
    for key in ("verdict", "selection", "tensors", "rank", "regressor", "scale", "passes", "observed_steps"):
        assert left.get(key) == right.get(key), key
    assert _without_pace(left["summary"]) == _without_pace(right["summary"])
    assert left["verdict"]["verdict"] in {"drift-dominated", "mixed", "noise-dominated"}


def _library_worker(rank: int, world: int, port: int, run, out) -> None:
    """One rank of a script that initialised torch.distributed itself, then joined relex to it."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        relex.distributed.join()
        for label, options in MODES.items():
            seen = []
            relex.extrapolate(run, target_step=TARGET, out_dir=out / label,
                              progress=lambda event: seen.append((event.done, event.total)), **options)
            (out / f"progress-{label}-{rank}.json").write_text(json.dumps(seen))
        relex.fit(run, out / "fit")
        result = check(run, target_step=TARGET).to_dict()
        analysis = analyze(run, null_samples=10).summary
        if rank == 0:
            (out / "check.json").write_text(json.dumps(_without_pace(result)))
            (out / "analysis.json").write_text(json.dumps(_without_pace(analysis), default=float))
        relex.distributed.leave()
        if rank == 0:  # a group relex has not joined (a training job's) leaves relex in the calling process
            relex.extrapolate(run, target_step=TARGET, out_dir=out / "rank-0-alone")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_three_ranks_write_what_one_process_writes(run, single, tmp_path):
    world = 3
    mp.spawn(_library_worker, args=(world, free_port(), run, tmp_path), nprocs=world)
    readers = RunReaders(discover_series(run), allow_pickle=False)
    run_bytes = readers.run_bytes()
    readers.close()
    for label in MODES:
        identical_tensors(single / label, tmp_path / label)
        same_record(single / label, tmp_path / label)
        # rank 0 shows the whole job: its own bytes scaled to the run's; the other ranks show nothing
        progress = [json.loads((tmp_path / f"progress-{label}-{r}.json").read_text()) for r in range(world)]
        passes = json.loads((tmp_path / label / "relex.json").read_text())["passes"]
        assert progress[1:] == [[], []] and progress[0][-1][1] == passes * run_bytes
        assert passes * run_bytes * 0.5 < progress[0][-1][0] <= passes * run_bytes
    shards = json.loads((tmp_path / "relex" / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert len(set(shards)) >= world  # each rank wrote its own shards
    identical_tensors(single / "relex", tmp_path / "rank-0-alone")
    materialize(tmp_path / "fit", target_step=TARGET, out_dir=tmp_path / "from-fit")
    identical_tensors(single / "relex", tmp_path / "from-fit")
    for report in ("check.json", "analysis.json"):
        assert json.loads((tmp_path / report).read_text()) == json.loads((single / report).read_text()), report
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left


def relex_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", **extra)
    return env


@pytest.mark.parametrize("nproc, mode", [(1, "matrix-rank1"), (2, "auto")])
def test_torchrun_command_writes_what_one_process_writes(run, single, tmp_path, nproc, mode):
    out = tmp_path / mode
    options = [f"--{key.replace('_', '-')}={value}" for key, value in MODES[mode].items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "relex_cli", "extrapolate", str(run), "--target-step", str(TARGET), "--out", str(out),
               *options, "--report", str(tmp_path / "report.json")]
    done = subprocess.run(command, env=relex_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    identical_tensors(single / mode, out)
    same_record(single / mode, out)
    assert done.stdout.count("wrote step 90") == 1  # rank 0 alone prints
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["verdict"] == json.loads((out / "relex.json").read_text())["verdict"]
    if nproc > 1:  # every rank refuses the existing output; torchrun does not stop rank 0 before it prints
        again = subprocess.run(command, env=relex_env(), capture_output=True, text=True, timeout=300)
        errors = [line for line in again.stderr.splitlines() if line.startswith("relex: error:")]
        assert again.returncode != 0 and errors == [f"relex: error: {out}: output folder exists (pass --overwrite "
                                                    "to replace it)"], again.stderr


def test_a_bad_file_one_rank_reads_fails_every_rank(run, tmp_path):
    """NaN in a shard file holding one tensor of rank 1's share: both ranks exit 2, rank 0 prints the one line
    naming that file, and neither the output nor its staging folder is left."""
    bad = tmp_path / "run"
    shutil.copytree(run, bad)
    with open_run(bad) as opened:
        opened.ranks = Ranks(1, 2)  # the run as rank 1 of 2 reads it
        name = opened.rank_names()[-1]
    state = load_state(bad / "checkpoint-22")
    state[name].view(-1)[5] = float("nan")
    (bad / "checkpoint-22" / "model.safetensors").unlink()
    write_checkpoint(bad / "checkpoint-22", state, step=22, shard_size=1)  # one file per tensor
    index = json.loads((bad / "checkpoint-22" / "model.safetensors.index.json").read_text())
    file = bad / "checkpoint-22" / index["weight_map"][name]
    out = tmp_path / "outputs" / "out"
    out.parent.mkdir()
    port = free_port()
    ranks = [subprocess.Popen([sys.executable, "-m", "relex_cli", "extrapolate", str(bad), "--target-step",
                               str(TARGET), "--out", str(out), "--regressor", "auto"],
                              env=relex_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                            MASTER_PORT=str(port), RELEX_DIST_TIMEOUT="120"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outcomes = [(p.wait(timeout=300), p.stderr.read().strip().splitlines()) for p in ranks]
    assert [code for code, _ in outcomes] == [2, 2], outcomes
    lines = outcomes[0][1]
    assert len(lines) == 1 and str(file) in lines[0] and "NaN or Inf" in lines[0] and "rank 1 of 2" in lines[0], lines
    assert outcomes[1][1] == []
    assert list(out.parent.iterdir()) == []


def test_shares_are_contiguous_and_balanced():
    sizes = [100, 1, 1, 50, 50, 100, 3, 97]
    for world in (1, 2, 3, 5, 12):
        parts = shares(sizes, world)
        assert len(parts) == world
        assert [i for part in parts for i in part] == list(range(len(sizes)))  # every tensor once, in order
    assert [sum(sizes[i] for i in part) for part in shares(sizes, 2)] == [202, 200]
    assert [list(part) for part in shares([5, 5], 3)] == [[0], [], [1]]
    assert [list(part) for part in shares([0, 0], 2)] == [[0, 1], []]
