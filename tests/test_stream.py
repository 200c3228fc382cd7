"""The streaming pass: spans and windows give the numbers of a whole-tensor pass, memory stays in the pool,
the output's disk is checked before reading, and staging folders of killed runs do not stay behind."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import relex
import relex.io.staging
import relex.io.writer
import relex.sinks
import relex.stream
import relex.stream.executor
from relex.errors import RelexInputError
from relex.run import open_run
from relex.subspace import GRAM_CHUNK
from relex.synthetic import make_run
from relex.testing import load_state
from relex_cli.app import main

STEPS = [3, 7, 8, 15, 22, 40]
# 96,000 and 80,000 entries: more than one 65,536-entry Gram chunk, and more than one span of a small pool
SHAPES = {
    "model.embed_tokens.weight": (600, 160),
    "model.layers.0.mlp.up_proj.weight": (500, 160),
    "model.layers.0.self_attn.q_proj.weight": (160, 160),
    "model.layers.0.input_layernorm.weight": (160,),
    "lm_head.weight": (600, 160),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream") / "run"
    make_run(root, STEPS, shapes=SHAPES, noise=0.2, noise_kind="walk", dtype=torch.bfloat16)
    return root


def read_pass(run, **options):
    """One pass over ``run``, into no sink: its Gram matrices, base norms and verdict."""
    with open_run(run, **options) as opened:
        return opened.execute()


def identical(a, b):
    left, right = load_state(a), load_state(b)
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


@pytest.mark.parametrize("options", [{}, {"regressor": "anchored", "target_step": [60, 90]},
                                     {"method": "matrix-rank1"}, {"method": "elementwise"},
                                     {"regressor": "auto", "scale": "auto"}])
def test_tensors_larger_than_the_pool_give_the_same_bits(run, tmp_path, options):
    """A pool far smaller than one tensor's T + 1 copies: its Gram pass keeps what fits, the mixing re-reads the
    rest; the numbers are those of a pass holding every tensor whole."""
    options = {"target_step": 90, **options}
    relex.extrapolate(run, out_dir=tmp_path / "whole", **options)
    result = relex.extrapolate(run, out_dir=tmp_path / "windows", block_bytes=4096, **options)
    identical(tmp_path / "whole", tmp_path / "windows")
    whole_bytes = sum(os.path.getsize(run / f"checkpoint-{s}" / "model.safetensors") for s in [0, *STEPS])
    assert result.bytes_read > whole_bytes * (0.95 if result.result.passes == 1 else 1.9)  # windows read twice


def test_results_do_not_depend_on_the_number_of_threads(run, tmp_path):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        relex.extrapolate(run, target_step=90, out_dir=tmp_path / "one", rank=2)
        torch.set_num_threads(2)
        relex.extrapolate(run, target_step=90, out_dir=tmp_path / "two", rank=2)
    finally:
        torch.set_num_threads(threads)
    identical(tmp_path / "one", tmp_path / "two")


def test_converting_and_mixing_several_gram_chunks_at_a_time_changes_no_bit(tmp_path, monkeypatch):
    """Spans of several Gram chunks are converted and mixed a few chunks at a time (``mix_chunk``), the Gram
    products still taken chunk by chunk; one chunk at a time must give the same Gram matrices and the same
    checkpoints, through both predictors (basis vectors and per-matrix factors)."""
    root = tmp_path / "run"
    # 4M entries: spans of four Gram chunks, converted and mixed three and one at a time
    shapes = {"model.layers.0.mlp.up_proj.weight": (4096, 1024), "model.norm.weight": (1024,)}
    make_run(root, STEPS, shapes=shapes, noise=0.2, noise_kind="walk", dtype=torch.bfloat16)
    monkeypatch.setattr(relex.stream.executor, "MIX_SHARE", 1)  # this run is small: let its chunks grow anyway
    assert relex.stream.mix_chunk(len(STEPS) + 1, relex.stream.executor.MIX_BYTES) == 3 * GRAM_CHUNK
    grams = read_pass(root).grams
    for method in ("relex", "matrix-rank1"):
        relex.extrapolate(root, target_step=90, method=method, out_dir=tmp_path / f"{method}-large")
    with monkeypatch.context() as patch:
        patch.setattr(relex.stream.executor, "MIX_BYTES", 1)
        for name, g in read_pass(root).grams.items():
            assert np.array_equal(g, grams[name]), name
        for method in ("relex", "matrix-rank1"):
            relex.extrapolate(root, target_step=90, method=method, out_dir=tmp_path / f"{method}-one")
    for method in ("relex", "matrix-rank1"):
        identical(tmp_path / f"{method}-large", tmp_path / f"{method}-one")


def test_gram_matrices_do_not_depend_on_the_pool(run):
    whole = read_pass(run)
    windows = read_pass(run, block_bytes=4096)
    for name, g in whole.grams.items():
        assert np.array_equal(g, windows.grams[name]), name
        assert windows.base_norms[name] == whole.base_norms[name]


def test_a_full_disk_is_refused_before_reading(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(relex.io.staging, "free_bytes", lambda path: 10_000)
    read = []
    with pytest.raises(RelexInputError, match="not enough free disk space"):
        relex.extrapolate(run, target_step=90, out_dir=tmp_path / "out", progress=lambda *a: read.append(a))
    assert read == [] and sorted(p.name for p in tmp_path.iterdir()) == []
    code = main(["extrapolate", str(run), "--target-step", "90", "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "not enough free disk space" in lines[0], lines


def test_a_disk_that_fills_while_writing_gives_one_line(run, tmp_path, monkeypatch, capsys):
    real = os.pwrite
    written = []

    def pwrite(fd, data, offset):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(len(data))
        return real(fd, data, offset)

    monkeypatch.setattr(relex.io.writer.os, "pwrite", pwrite)
    code = main(["extrapolate", str(run), "--target-step", "90", "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "disk is full" in lines[0] and "Traceback" not in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_staging_folders_of_killed_runs_are_removed(run, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.relex-partial-{int(dead.stdout)}"
    (stale / "step-9").mkdir(parents=True)
    alive = tmp_path / f".out.relex-partial-{os.getppid()}"  # a running process: left alone
    alive.mkdir()
    relex.extrapolate(run, target_step=90, out_dir=tmp_path / "out")
    assert not stale.exists() and alive.exists() and (tmp_path / "out" / "relex.json").is_file()


def test_progress_counts_every_byte_once_and_ends_at_the_total(run, tmp_path):
    seen = []
    result = relex.extrapolate(run, target_step=90, out_dir=tmp_path / "out", progress=seen.append)
    assert seen[-1].done == result.bytes_read and all(a.done <= b.done for a, b in zip(seen, seen[1:]))
    inputs = sum(os.path.getsize(run / f"checkpoint-{s}" / "model.safetensors") for s in [0, *STEPS])
    assert result.bytes_read <= inputs
    assert json.loads((tmp_path / "out" / "relex.json").read_text())["summary"]["bytes_read"] == result.bytes_read


def test_the_next_tensor_goes_on_while_a_tensor_is_mixed_and_the_sink_sees_the_layout_order(run, tmp_path,
                                                                                            monkeypatch):
    """While the spans of one tensor are mixed, the pass reads the next tensor and decides its model (a
    tensor of one span would otherwise leave every compute thread but one idle); the sink still gets each
    tensor's spans in order, then its end, tensor after tensor, and the checkpoint is the same."""
    relex.extrapolate(run, target_step=90, out_dir=tmp_path / "reference")
    events = []
    sink = relex.sinks.CheckpointSink
    slow = "lm_head.weight"  # the first tensor of the pass (layout order), two spans

    def on_model(self, state, original=sink.on_model):
        events.append(("model", state.name, None))
        original(self, state)

    def fill(self, state, span, lo, chunk, original=sink.fill):
        if state.name == slow:
            time.sleep(0.3)
        original(self, state, span, lo, chunk)

    def emit(self, state, span, original=sink.emit):
        events.append(("emit", state.name, None))
        original(self, state, span)

    def on_tensor_done(self, state, original=sink.on_tensor_done):
        events.append(("done", state.name, None))
        original(self, state)

    for name, method in [("on_model", on_model), ("fill", fill), ("emit", emit), ("on_tensor_done", on_tensor_done)]:
        monkeypatch.setattr(sink, name, method)
    relex.extrapolate(run, target_step=90, out_dir=tmp_path / "out")
    identical(tmp_path / "reference", tmp_path / "out")
    names = [name for kind, name, _ in events if kind == "model"]
    assert names[0] == slow and sorted(names) == sorted(SHAPES)
    # the second tensor's model came before the first tensor's end: the pass did not wait for its mixing
    assert events.index(("model", names[1], None)) < events.index(("done", slow, None))
    handed = [(kind, name) for kind, name, _ in events if kind != "model"]
    expected = []
    for name in names:
        spans = sum(1 for kind, n in handed if kind == "emit" and n == name)
        assert spans >= (2 if name == slow else 1), name
        expected += [("emit", name)] * spans + [("done", name)]
    assert handed == expected
