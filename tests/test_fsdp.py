"""verl FSDP checkpoints: real per-rank shards written by FSDP1 and FSDP2 on CPU, read back unsharded.

One fixture trains a tiny Llama (vocabulary 259, so the embedding and head split 130 + 129 rows) on two
gloo processes and saves, in verl's layout, ``global_step_{0,2,4,6}/actor/model_world_size_2_rank_R.pt``
plus ``fsdp_config.json`` and ``huggingface/`` (config and tokenizer), and beside each the full model as
plain safetensors (``model.save_pretrained``) gathered with ``DTensor.full_tensor()``.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from relex.errors import RelexInputError
from relex.io.fsdp import FsdpSource, allowed_globals, is_fsdp_folder
from relex.testing import load_state, tiny_config

STEPS = (0, 2, 4, 6)
WORLD = 2


# -- writing real FSDP checkpoints (runs in the spawned workers) ------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_and_save(model, steps, version: int, root, rank: int, tokenizer) -> None:
    """Train between ``steps``; at each, verl's actor folder (``fsdp{version}/global_step_N/actor``) and the
    gathered full state dict (``st{version}/step_N``), which the tests read as the truth."""
    for step in steps:
        if step:
            _train(model, rank)
        state = model.state_dict()
        _save_actor(root / f"fsdp{version}" / f"global_step_{step}" / "actor", state, rank, version, model, tokenizer)
        _save_full(root / f"st{version}" / f"step_{step}", state, rank, tokenizer)


def _save_actor(actor: Path, state: dict, rank: int, version: int, model, tokenizer) -> None:
    """What verl's FSDPCheckpointManager writes for the model: rank files, fsdp_config.json, huggingface/."""
    import torch.distributed as dist

    actor.mkdir(parents=True, exist_ok=True)
    torch.save(state, actor / f"model_world_size_{WORLD}_rank_{rank}.pt")
    if rank == 0:
        (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": version, "world_size": WORLD}))
        model.config.save_pretrained(actor / "huggingface")
        model.generation_config.save_pretrained(actor / "huggingface")
        tokenizer.save_pretrained(actor / "huggingface")
    dist.barrier()


def _save_full(folder: Path, state: dict, rank: int, tokenizer) -> None:
    """The same weights as a plain Hugging Face safetensors checkpoint (every rank joins the gathers)."""
    from transformers import LlamaForCausalLM

    full = {name: value.full_tensor() for name, value in state.items()}
    if rank == 0:
        model = LlamaForCausalLM(tiny_config())
        model.load_state_dict(full)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def _train(model, rank: int) -> None:
    """Two AdamW steps on this rank's batch (gradients are averaged by FSDP over the ranks)."""
    optimizer = getattr(model, "_relex_optimizer", None)
    if optimizer is None:
        optimizer = model._relex_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(100 + rank)
    for _ in range(2):
        ids = torch.randint(0, 259, (2, 12), generator=generator)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


class _Toy(torch.nn.Module):
    """Parameters of 1, 1 and 3 rows, and a scalar buffer (FSDP leaves buffers as plain tensors)."""

    def __init__(self):
        super().__init__()
        self.one = torch.nn.Parameter(torch.randn(1, 3))
        self.bias = torch.nn.Parameter(torch.randn(1))
        self.three = torch.nn.Parameter(torch.randn(3, 5))
        self.register_buffer("count", torch.tensor(7, dtype=torch.int64))


def _worker(rank: int, port: int, root: str) -> None:
    import warnings

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # deprecation notices of FSDP1 and ShardedTensor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardedStateDictConfig, StateDictType, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from relex.testing import byte_level_tokenizer

    root = Path(root)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    tokenizer = byte_level_tokenizer()
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("fsdp",))

    # FSDP2: fully_shard each decoder layer, then the whole model (as verl does); state dicts are DTensors.
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _train_and_save(model, STEPS, 2, root, rank, tokenizer)

    # FSDP1 over a device mesh with SHARDED_STATE_DICT (verl's FSDP1 setting): also DTensors.
    torch.manual_seed(0)
    model = FullyShardedDataParallel(LlamaForCausalLM(tiny_config()), device_mesh=mesh,
                                     auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                                     device_id=torch.device("cpu"))
    config = model.module.config
    model.config, model.generation_config = config, model.module.generation_config
    FullyShardedDataParallel.set_state_dict_type(model, StateDictType.SHARDED_STATE_DICT,
                                                 ShardedStateDictConfig())
    _train_and_save(model, STEPS[:2], 1, root, rank, tokenizer)

    # FSDP1 without a device mesh: ShardedTensor values.
    torch.manual_seed(0)
    model = FullyShardedDataParallel(LlamaForCausalLM(tiny_config()), device_id=torch.device("cpu"))
    with FullyShardedDataParallel.state_dict_type(model, StateDictType.SHARDED_STATE_DICT, ShardedStateDictConfig()):
        state = model.state_dict()
    (root / "sharded_tensor").mkdir(exist_ok=True)
    torch.save(state, root / "sharded_tensor" / f"model_world_size_{WORLD}_rank_{rank}.pt")

    # Uneven and hybrid sharding on a toy module: 1-row parameters leave rank 1 an empty shard; a 2×1
    # ("ddp", "fsdp") mesh gives placements (Replicate(), Shard(0)).
    for name, shape in (("uneven", (WORLD,)), ("hsdp", (WORLD, 1))):
        torch.manual_seed(1)
        toy = _Toy()
        if rank == 0:
            (root / name).mkdir(exist_ok=True)
            torch.save({k: v.detach().clone() for k, v in toy.state_dict().items()}, root / name / "expected.pt")
        names = ("fsdp",) if len(shape) == 1 else ("ddp", "fsdp")
        fully_shard(toy, mesh=init_device_mesh("cpu", shape, mesh_dim_names=names))
        dist.barrier()
        torch.save(toy.state_dict(), root / name / f"model_world_size_{WORLD}_rank_{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(_free_port(), str(root)), nprocs=WORLD, join=True)
    return root


@pytest.fixture
def actor(runs, tmp_path) -> Path:
    """A private copy of the FSDP2 step-2 actor folder, for tests that damage it."""
    shutil.copytree(runs / "fsdp2" / "global_step_2" / "actor", tmp_path / "actor")
    return tmp_path / "actor"


def one_line_error(excinfo, *fragments) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


class _Touched(dict):
    """A rank → local-shard map that records which ranks were read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.touched = set()

    def __getitem__(self, rank):
        self.touched.add(rank)
        return super().__getitem__(rank)


# -- reading --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version, steps", [(2, STEPS), (1, STEPS[:2])])
def test_reads_every_tensor_unsharded(runs, version, steps):
    for step in steps:
        actor = runs / f"fsdp{version}" / f"global_step_{step}" / "actor"
        full = load_state(runs / f"st{version}" / f"step_{step}")
        assert is_fsdp_folder(actor) and not is_fsdp_folder(actor / "huggingface")
        with FsdpSource(actor) as source:
            assert sorted(source.tensors) == sorted(full)  # Hugging Face names
            for position, (name, info) in enumerate(source.tensors.items()):
                assert (info.shape, info.dtype) == (tuple(full[name].shape), full[name].dtype), name
                assert info.file == actor / "model_world_size_2_rank_0.pt" and info.offset == position
                tensor = source.read(name)
                assert torch.equal(tensor, full[name]), (step, name)
                assert tensor.is_contiguous() and tensor.data_ptr() != source.read(name).data_ptr()
            assert source.config_folder == actor / "huggingface"
            assert source.describe() == {"kind": "fsdp", "folder": str(actor), "world_size": 2,
                                         "fsdp_version": version, "mesh_shape": [2], "mesh_dim_names": ["fsdp"]}


def test_step0_equals_the_unsharded_model(runs):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    reference = LlamaForCausalLM(tiny_config()).state_dict()
    for version in (1, 2):
        with FsdpSource(runs / f"fsdp{version}" / "global_step_0" / "actor") as source:
            assert list(source.tensors) == list(reference)  # the model's state-dict order
            for name, tensor in reference.items():
                assert torch.equal(source.read(name), tensor), (version, name)


def test_training_moved_the_weights(runs):
    with FsdpSource(runs / "fsdp2" / "global_step_0" / "actor") as first, \
            FsdpSource(runs / "fsdp2" / "global_step_6" / "actor") as last:
        assert all(not torch.equal(first.read(n), last.read(n)) for n in first.tensors if n.endswith("proj.weight"))


@pytest.mark.parametrize("version", [1, 2])
def test_row_ranges_touch_only_overlapping_ranks(runs, version):
    full = load_state(runs / f"st{version}" / "step_2")
    with FsdpSource(runs / f"fsdp{version}" / "global_step_2" / "actor") as source:
        name = "model.embed_tokens.weight"  # 259 rows: rank 0 holds 0:130, rank 1 holds 130:259
        cases = {(0, 100): {0}, (120, 140): {0, 1}, (130, 259): {1}, (200, 400): {1}, (50, 50): set(),
                 (0, 259): {0, 1}}
        for (start, stop), ranks in cases.items():
            source._locals[name] = _Touched(source._locals[name])
            rows = source.read(name, start, stop)
            assert torch.equal(rows, full[name][start:stop]), (start, stop)
            assert source._locals[name].touched == ranks, (start, stop)
        for name, tensor in full.items():
            for start, stop in ((0, 1), (3, 17), (tensor.shape[0] - 5, tensor.shape[0] + 5)):
                assert torch.equal(source.read(name, start, stop), tensor[start:stop]), (name, start, stop)


@pytest.mark.parametrize("layout", ["uneven", "hsdp"])
def test_empty_shards_scalars_and_hybrid_sharding(runs, layout):
    expected = torch.load(runs / layout / "expected.pt")
    with FsdpSource(runs / layout) as source:
        assert source.describe()["mesh_shape"] == ([2] if layout == "uneven" else [2, 1])
        for name, tensor in expected.items():
            assert source.tensors[name].shape == tuple(tensor.shape)
            assert torch.equal(source.read(name), tensor), name
            if tensor.ndim:
                assert torch.equal(source.read(name, 1, 3), tensor[1:3]), name
        assert source.tensors["count"].shape == () and source._layouts["count"].dim is None
        if layout == "uneven":
            # torch.chunk semantics: 1 row → rank 0 has it, rank 1 an empty shard; 3 rows → 2 + 1.
            assert [(p.start, p.stop) for p in source._layouts["one"].pieces] == [(0, 1), (1, 1)]
            assert [(p.start, p.stop) for p in source._layouts["bias"].pieces] == [(0, 1), (1, 1)]
            assert [(p.start, p.stop) for p in source._layouts["three"].pieces] == [(0, 2), (2, 3)]
        else:
            # Replicated over "ddp": only the ranks at ddp coordinate 0 (here rank 0 alone) are read.
            assert {p.rank for p in source._layouts["three"].pieces} == {0}


def test_wrapper_prefixes_are_removed(actor):
    reference = FsdpSource(actor)
    expected = {name: reference.read(name) for name in reference.tensors}
    reference.close()
    for rank in range(WORLD):
        path = actor / f"model_world_size_2_rank_{rank}.pt"
        state = torch.load(path, weights_only=True)
        renamed = {}
        for key, value in state.items():
            parts = key.split(".")
            if parts[:2] == ["model", "layers"]:  # FSDP1 wraps each decoder layer, compile the model
                parts.insert(3, "_checkpoint_wrapped_module")
                parts.insert(3, "_fsdp_wrapped_module")
            renamed["_orig_mod." + ".".join(parts)] = value
        torch.save(renamed, path)
    assert "_orig_mod.model.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.self_attn.q_proj.weight" in renamed
    with FsdpSource(actor) as source:
        assert list(source.tensors) == list(expected)
        for name, tensor in expected.items():
            assert torch.equal(source.read(name), tensor), name


def test_allow_list_is_sufficient(runs):
    # torch registers the DTensor classes globally when torch.distributed.tensor is imported; clear that
    # registration to check the explicit allow-list alone loads real rank files.
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        with FsdpSource(runs / "fsdp2" / "global_step_2" / "actor") as source:
            assert len(source.tensors) == 21
        with FsdpSource(runs / "hsdp") as source:
            assert source.describe()["mesh_dim_names"] == ["ddp", "fsdp"]
    finally:
        torch.serialization.add_safe_globals(saved)
    # Loading leaves the process's allow-list as it was (torch's own safe_globals context would not).
    before = set(torch.serialization.get_safe_globals())
    FsdpSource(runs / "fsdp2" / "global_step_2" / "actor").close()
    assert set(torch.serialization.get_safe_globals()) == before
    names = {f"{c.__module__}.{c.__qualname__}" for c in allowed_globals()}
    assert {"torch.distributed.tensor.DTensor", "torch.distributed.device_mesh.DeviceMesh",
            "torch.distributed.tensor.placement_types.Shard"} <= names


# -- bad input: one line naming the file ------------------------------------------------------------------
def test_missing_rank(actor):
    (actor / "model_world_size_2_rank_1.pt").unlink()
    with pytest.raises(RelexInputError) as excinfo:
        FsdpSource(actor)
    one_line_error(excinfo, str(actor), "missing shard of rank 1 (world size 2)")


def test_world_sizes_disagree(actor):
    shutil.copy(actor / "model_world_size_2_rank_1.pt", actor / "model_world_size_4_rank_3.pt")
    with pytest.raises(RelexInputError) as excinfo:
        FsdpSource(actor)
    one_line_error(excinfo, str(actor), "two world sizes (2 and 4)")


def test_fsdp_config_disagrees(actor):
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 8}))
    with pytest.raises(RelexInputError) as excinfo:
        FsdpSource(actor)
    one_line_error(excinfo, "fsdp_config.json", "world_size is 8")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_rank_file(actor, damage):
    path = actor / "model_world_size_2_rank_1.pt"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x80\x02not a checkpoint" * 50,
                      "empty": b""}[damage])
    with pytest.raises(RelexInputError) as excinfo:
        FsdpSource(actor)
    one_line_error(excinfo, str(path), "rank file")


def test_unrestricted_pickle_needs_allow_pickle(actor):
    expected = {}
    with FsdpSource(actor) as source:
        expected = {name: source.read(name) for name in source.tensors}
    for rank in range(WORLD):
        path = actor / f"model_world_size_2_rank_{rank}.pt"
        # A UserDict is an ordinary Python class, not on the weights_only allow-list.
        torch.save(collections.UserDict(torch.load(path, weights_only=True)), path)
    with pytest.raises(RelexInputError) as excinfo:
        FsdpSource(actor)
    one_line_error(excinfo, "model_world_size_2_rank_0.pt", "collections.UserDict", "--allow-pickle")
    with FsdpSource(actor, allow_pickle=True) as source:
        for name, tensor in expected.items():
            assert torch.equal(source.read(name), tensor), name


def test_sharded_tensor_is_refused_by_type(runs):
    for allow_pickle in (False, True):
        with pytest.raises(RelexInputError) as excinfo:
            FsdpSource(runs / "sharded_tensor", allow_pickle=allow_pickle)
        one_line_error(excinfo, "model_world_size_2_rank_0.pt", "ShardedTensor")


def test_ranks_disagree_on_names(actor):
    path = actor / "model_world_size_2_rank_1.pt"
    state = torch.load(path, weights_only=True)
    state.pop("lm_head.weight")
    torch.save(state, path)
    with pytest.raises(RelexInputError) as excinfo:
        FsdpSource(actor)
    one_line_error(excinfo, str(path), "'lm_head.weight'")


def test_shards_do_not_add_up(actor):
    path = actor / "model_world_size_2_rank_1.pt"
    state = torch.load(path, weights_only=True)
    from torch.distributed.tensor import DTensor

    head = state["lm_head.weight"]
    state["lm_head.weight"] = DTensor.from_local(head._local_tensor[:-1].clone(), head.device_mesh, head.placements,
                                                 run_check=False, shape=head.shape, stride=head.stride())
    torch.save(state, path)
    with pytest.raises(RelexInputError) as excinfo:
        FsdpSource(actor)
    one_line_error(excinfo, str(path), "hold 258 of its 259 entries")


def _reshard(actor: Path, name: str, placements, split) -> torch.Tensor:
    """Rewrite tensor ``name`` of both rank files with ``placements``; ``split(full)`` gives each rank's
    local tensor. Returns the full tensor."""
    from torch.distributed.tensor import DTensor

    with FsdpSource(actor) as source:
        full = source.read(name)
    for rank, local in enumerate(split(full)):
        path = actor / f"model_world_size_2_rank_{rank}.pt"
        state = torch.load(path, weights_only=True)
        mesh = state[name].device_mesh
        state[name] = DTensor.from_local(local.clone(), mesh, placements, run_check=False, shape=full.shape,
                                         stride=full.stride())
        torch.save(state, path)
    return full


def test_shards_along_another_dimension(actor):
    from torch.distributed.tensor import Shard

    # Uneven columns (33 + 31), unlike torch.chunk: sizes are taken from the local shards.
    full = _reshard(actor, "lm_head.weight", (Shard(1),), lambda t: (t[:, :33], t[:, 33:]))
    with FsdpSource(actor) as source:
        assert source._layouts["lm_head.weight"].dim == 1
        assert torch.equal(source.read("lm_head.weight"), full)
        for start, stop in ((0, 5), (100, 259), (250, 300)):
            assert torch.equal(source.read("lm_head.weight", start, stop), full[start:stop])


def test_partial_placement_is_refused(actor):
    from torch.distributed.tensor import Partial

    _reshard(actor, "lm_head.weight", (Partial(),), lambda t: (t / 2, t / 2))
    with pytest.raises(RelexInputError) as excinfo:
        FsdpSource(actor)
    one_line_error(excinfo, "model_world_size_2_rank_0.pt", "'lm_head.weight'", "Partial")


# -- the engine and the command line ----------------------------------------------------------------------
def test_extrapolation_from_fsdp_equals_safetensors(runs, tmp_path):
    import relex

    relex.extrapolate(runs / "fsdp2", target_step=20, out_dir=tmp_path / "from_fsdp")
    relex.extrapolate(runs / "st2", target_step=20, out_dir=tmp_path / "from_st")
    a, b = load_state(tmp_path / "from_fsdp"), load_state(tmp_path / "from_st")
    assert list(a) and set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    base = load_state(runs / "st2" / "step_0")
    assert any(not torch.equal(a[n], base[n]) for n in a)
    record = json.loads((tmp_path / "from_fsdp" / "relex.json").read_text())
    sources = record["sources"]
    assert sources["base"]["kind"] == "fsdp" and sources["observed_kind"] == "fsdp"
    assert [s["world_size"] for s in sources["observed"]] == [2, 2, 2]


def test_cli_missing_rank(runs, tmp_path, capsys):
    from typer.testing import CliRunner

    from relex_cli.app import app, main

    shutil.copytree(runs / "fsdp2", tmp_path / "run")
    (tmp_path / "run" / "global_step_4" / "actor" / "model_world_size_2_rank_1.pt").unlink()
    args = ["extrapolate", str(tmp_path / "run"), "--target-step", "20", "--out", str(tmp_path / "out")]
    # ``main`` is the installed entry point: it turns RelexInputError into one line and exit code 2.
    code = main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert "global_step_4/actor" in lines[0] and "missing shard of rank 1 (world size 2)" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
    # The bare typer app (commands registered by ``main`` above) lets the same error through to ``main``.
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, RelexInputError) and str(result.exception) == lines[0].removeprefix(
        "relex: error: ")


def test_a_probe_compares_with_the_last_checkpoint_reassembled_from_its_shards(runs, tmp_path):
    """``relex check --probe`` on verl shards: the last observed checkpoint is written whole from its shards for the
    probe, and scores what the gathered full model of that step scores (the oracle: ``DTensor.full_tensor()``,
    scored by the naive log-probability of ``tests/naive.py``)."""
    from naive import naive_answer_logprob, sums
    from transformers import AutoModelForCausalLM

    from command import relex
    from relex.testing import byte_level_tokenizer

    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps({"text": f"{a}+{b}=", "answer": str(a + b), "verifier": "last-number"}) + "\n"
                             for a, b in sums()[:32]))
    done = relex("check", runs / "fsdp2", "--target-step", 12, "--probe", probe, "--probe-mode", "logprob",
                 "--probe-looks", 1, "--json", tmp_path / "check.json", "--quiet")
    assert done.returncode in (0, 3), done.stdout[-2000:] + done.stderr[-2000:]
    check = json.loads((tmp_path / "check.json").read_text())
    curve = check["probe"]["curve"]
    assert check["sources"]["observed_kind"] == "fsdp" and curve["reference_step"] == 6
    truth = AutoModelForCausalLM.from_pretrained(runs / "st2" / "step_6").eval()
    expected = naive_answer_logprob(truth, byte_level_tokenizer(), sums()[:32])
    assert curve["reference_mean"] == pytest.approx(expected, abs=1e-4)
    assert [c["step"] for c in curve["candidates"]] == [12] and curve["candidates"][0]["problems"] == 32
