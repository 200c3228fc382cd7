"""PEFT LoRA runs read in merged weight space (relex.io.lora*), checked against PEFT itself.

Every run here is a real PEFT adapter: a tiny Llama / Qwen2 / GPT-2 wrapped with ``get_peft_model`` and
trained for a few Adam steps on random tokens, saved in TRL's layout (``RUN/checkpoint-N/`` with
``adapter_model.safetensors``, ``adapter_config.json``, ``trainer_state.json`` and the tokenizer). The
oracle for ΔW is PEFT's own merge in float64.
"""

from __future__ import annotations

import json
import math
import warnings
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from packaging.version import Version

from relex.errors import RelexInputError
from relex.io.lora import LoraSource
from relex.io.lora_config import read_adapter_config
from relex.io.lora_factors import factor_gram_matrix, factor_inner, mix_factors
from relex.io.lora_writer import LoraAdapterWriter
from relex.io.reader import CheckpointReader
from relex.testing import byte_level_tokenizer, load_state, tiny_config

STEPS = (2, 4, 6, 8)
ATTENTION = ["q_proj", "v_proj", "o_proj"]

# name -> (architecture, LoraConfig keyword arguments)
VARIANTS = {
    "plain": ("llama", dict(r=4, lora_alpha=8, target_modules=ATTENTION)),
    # rsLoRA with per-module ranks and alphas: s = alpha / √r of each module
    "rslora": ("llama", dict(r=4, lora_alpha=8, target_modules=ATTENTION, use_rslora=True,
                             rank_pattern={"layers.0.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3})),
    "mts": ("llama", dict(r=4, lora_alpha=8, target_modules=ATTENTION, modules_to_save=["lm_head"])),
    # Qwen2 has q/k/v biases: bias="all" trains and saves them whole
    "bias": ("qwen2", dict(r=4, lora_alpha=8, target_modules=ATTENTION, bias="all")),
    # GPT-2's Conv1D stores W as (in, out): ΔW = (s·B A)ᵀ
    "conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
}


PEFT = Version(version("peft"))


def peft_builds(since: str, what: str):
    """Skip a case whose adapter only a newer PEFT builds (nobody with an older one has such an adapter)."""
    return pytest.mark.skipif(PEFT < Version(since), reason=f"PEFT {PEFT} cannot build {what} (PEFT {since} can)")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@contextmanager
def quiet():
    """PEFT and transformers warn about things these tiny models do on purpose."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=259, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                            bos_token_id=256, eos_token_id=256)
    else:
        config = tiny_config(arch)
    return AutoModelForCausalLM.from_config(config)


def save_base(folder: Path, arch: str):
    tiny_model(arch).save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return folder


def load_model(folder: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    # cast after loading: the keyword is torch_dtype before transformers 4.56 and dtype since
    return AutoModelForCausalLM.from_pretrained(folder).to(dtype)


def train_adapter_run(run: Path, base: Path, lora_kwargs: dict, steps=STEPS, seed: int = 0,
                      config_cls=None) -> Path:
    """A TRL-style adapter run: real Adam steps (lr 1e-2) on random token batches, checkpoints at ``steps``."""
    from peft import LoraConfig, get_peft_model

    tokenizer = byte_level_tokenizer()
    with quiet():
        model = get_peft_model(load_model(base), (config_cls or LoraConfig)(**lora_kwargs))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, max(steps) + 1):
        ids = torch.randint(0, 256, (4, 12), generator=generator)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in steps:
            folder = run / f"checkpoint-{step}"
            with quiet():
                model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return run


def save_untrained_adapter(folder: Path, base: Path, config) -> Path:
    """An adapter as PEFT writes it right after ``get_peft_model`` (for the configurations relex refuses)."""
    from peft import get_peft_model

    with quiet():
        get_peft_model(load_model(base), config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> (base folder, run folder) for every variant, trained once for this module."""
    root = tmp_path_factory.mktemp("lora")
    bases = {}
    made = {}
    for name, (arch, kwargs) in VARIANTS.items():
        if arch not in bases:
            bases[arch] = save_base(root / f"base-{arch}", arch)
        made[name] = (bases[arch], train_adapter_run(root / f"run-{name}", bases[arch], kwargs))
    return made


def open_run(base: Path, run: Path):
    reader = CheckpointReader(base)
    return reader, [LoraSource(run / f"checkpoint-{s}", reader) for s in STEPS]


def peft_merge_float64(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The oracle: PEFT's own merge of the adapter into the base, in float64."""
    from peft import PeftModel

    with quiet():
        model = PeftModel.from_pretrained(load_model(base, torch.float64), adapter)
        merged = model.merge_and_unload()
    return {k: v.detach().double().clone() for k, v in merged.state_dict().items()}


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


# -- 1. deltas ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_delta_equals_the_float64_peft_merge(runs, variant):
    base_dir, run = runs[variant]
    base = {k: v.double() for k, v in load_state(base_dir).items()}
    reader, sources = open_run(base_dir, run)
    worst = 0.0
    for step, source in zip(STEPS, sources):
        merged = peft_merge_float64(base_dir, run / f"checkpoint-{step}")
        assert set(source.tensors) == set(base)
        assert source.modules, "no LoRA module found"
        for name, w0 in base.items():
            expected = merged[name] - w0
            delta, nbytes = source.delta(name)
            assert delta.dtype == torch.float32 and delta.shape == w0.shape, name
            if name in source.modules:
                assert expected.norm() > 0, f"{name} did not move"
                worst = max(worst, relative(delta, expected))
                assert relative(delta, expected) <= 1e-4, name
                assert nbytes > 0
                # rows of a block are rows of the whole delta; the merged read agrees with PEFT
                assert torch.equal(source.delta(name, 3, 11)[0], delta[3:11])
                assert relative(source.read(name), merged[name]) < 1e-6
            elif name in source.saved:
                saved = merged[name]
                assert torch.equal(source.read(name).double(), saved), name  # stored whole: exact
                assert torch.equal(delta, (saved - w0).float()), name
                assert expected.norm() > 0, f"{name} did not move"
            else:
                assert nbytes == 0 and not delta.any(), name
                assert not expected.any(), f"PEFT changed {name}, which relex thinks untouched"
    reader.close()
    print(f"{variant}: max relative error of delta vs float64 PEFT merge {worst:.2e}")


def test_what_the_source_found(runs):
    _, run = runs["rslora"]
    base_dir = runs["rslora"][0]
    reader, sources = open_run(base_dir, run)
    source = sources[0]
    q0 = source.modules["model.layers.0.self_attn.q_proj.weight"]
    v1 = source.modules["model.layers.1.self_attn.v_proj.weight"]
    o1 = source.modules["model.layers.1.self_attn.o_proj.weight"]
    assert (q0.rank, q0.scaling) == (2, 8 / math.sqrt(2))  # rank_pattern
    assert (v1.rank, v1.scaling) == (4, 3 / 2)  # alpha_pattern, α/√r
    assert (o1.rank, o1.scaling) == (4, 8 / 2)
    assert q0.a_key == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert len(source.modules) == 6 and not source.saved
    described = source.describe()
    assert described["kind"] == "lora" and described["use_rslora"] is True
    assert described["rank_pattern"] == {"layers.0.self_attn.q_proj": 2}
    assert source.config_folder == run / "checkpoint-2"
    assert source.tensors["model.layers.0.self_attn.q_proj.weight"].file.name == "adapter_model.safetensors"
    assert source.tensors["model.norm.weight"].file == reader.tensors["model.norm.weight"].file

    _, mts_run = runs["mts"]
    mts = LoraSource(mts_run / "checkpoint-2", reader)
    assert mts.saved == {"lm_head.weight"}
    assert mts.describe()["modules_to_save"] == ["lm_head"]
    reader.close()


# -- 2. Gram matrices in factor space ----------------------------------------------------------------
@pytest.mark.parametrize("variant", ["plain", "rslora", "conv1d"])
def test_gram_from_factors_equals_the_dense_gram(runs, variant):
    from safetensors.torch import load_file

    base_dir, run = runs[variant]
    reader, sources = open_run(base_dir, run)
    raw = [load_file(run / f"checkpoint-{s}" / "adapter_model.safetensors") for s in STEPS]
    for name, module in sources[0].modules.items():
        deltas = [s.delta(name)[0].double() for s in sources]
        dense = torch.tensor([[float((x * y).sum()) for y in deltas] for x in deltas])
        factor = torch.tensor(factor_gram_matrix([s.factors(name) for s in sources]))
        assert relative(factor, dense) < 1e-6, name
        for i in range(len(STEPS)):
            for j in range(len(STEPS)):
                a_i, b_i = raw[i][module.a_key].double(), raw[i][module.b_key].double()
                a_j, b_j = raw[j][module.a_key].double(), raw[j][module.b_key].double()
                # s² tr((B_iᵀ B_j)(A_j A_iᵀ)), straight from the adapter files
                textbook = module.scaling**2 * torch.trace((b_i.T @ b_j) @ (a_j @ a_i.T))
                assert math.isclose(sources[i].factor_gram(sources[j], name), float(textbook), rel_tol=1e-9)
                assert math.isclose(float(textbook), float(dense[i, j]), rel_tol=1e-5)
        p0, q0 = sources[0].factors(name)
        p3, q3 = sources[3].factors(name)
        assert math.isclose(factor_inner(p0, q0, p3, q3), float(dense[0, 3]), rel_tol=1e-5)
    reader.close()


# -- 3. mixing factors -------------------------------------------------------------------------------
def random_pairs(m=24, n=20, r=3, t=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(m, r, generator=generator, dtype=torch.float64),
             torch.randn(r, n, generator=generator, dtype=torch.float64)) for _ in range(t)]


def test_mix_factors_exact():
    pairs, weights = random_pairs(), [0.5, -1.0, 2.0, 0.25]
    dense = sum(w * p @ q for (p, q), w in zip(pairs, weights))
    p, q, error = mix_factors(pairs, weights, None)
    assert p.shape == (24, 12) and q.shape == (12, 20) and error == 0.0
    assert torch.allclose(p @ q, dense, rtol=0, atol=1e-12)
    p, q, error = mix_factors(pairs, weights, 15)  # rank ≥ T·r: zero-padded to the planned size
    assert p.shape == (24, 15) and q.shape == (15, 20) and error == 0.0
    assert torch.allclose(p @ q, dense, rtol=0, atol=1e-12)
    p32, q32, _ = mix_factors([(a.float(), b.float()) for a, b in pairs], weights, None)
    assert p32.dtype == torch.float32


def test_mix_factors_truncation_is_the_best_rank_k_approximation():
    pairs, weights = random_pairs(), [0.5, -1.0, 2.0, 0.25]
    dense = sum(w * p @ q for (p, q), w in zip(pairs, weights))
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    errors = []
    for k in range(1, 13):
        p, q, error = mix_factors(pairs, weights, k)
        assert p.shape == (24, k) and q.shape == (k, 20)
        best = (u[:, :k] * s[:k]) @ vh[:k]
        assert torch.allclose(p @ q, best, rtol=0, atol=1e-10 * float(s[0])), k
        assert math.isclose(error, float(s[k:].norm() / s.norm()), rel_tol=1e-9, abs_tol=1e-12)
        errors.append(error)
    assert all(a >= b for a, b in zip(errors, errors[1:]))
    assert errors[0] > 0.1 and errors[-1] < 1e-12


def test_mix_factors_wider_than_the_matrix():
    # T·r = 12 exceeds both dimensions: the core is min(m, n) wide and the product is exact at rank 5
    pairs, weights = random_pairs(m=5, n=7), [1.0, 1.0, -1.0, 0.5]
    dense = sum(w * p @ q for (p, q), w in zip(pairs, weights))
    p, q, error = mix_factors(pairs, weights, 8)
    assert p.shape == (5, 8) and error < 1e-12
    assert torch.allclose(p @ q, dense, atol=1e-12)
    p, q, error = mix_factors(pairs, [0.0] * 4, 2)  # ΔW = 0
    assert error == 0.0 and not (p @ q).any()


def test_mix_factors_on_real_factors(runs):
    base_dir, run = runs["plain"]
    reader, sources = open_run(base_dir, run)
    name = "model.layers.1.self_attn.q_proj.weight"
    pairs = [s.factors(name) for s in sources]
    weights = [-0.4, 0.1, 0.6, 1.5]
    dense = sum(w * s.delta(name)[0].double() for s, w in zip(sources, weights))
    previous = math.inf
    for k in (1, 2, 4, 8, 12, 16):
        p, q, error = mix_factors(pairs, weights, k)
        assert error <= previous + 1e-12
        assert math.isclose(relative(p @ q, dense), error, rel_tol=1e-3, abs_tol=1e-6)
        previous = error
    assert error == 0.0
    reader.close()


# -- 4. writing adapters -----------------------------------------------------------------------------
def write_mixed_adapter(out: Path, reader, sources, weights, rank=None, dtype=torch.float32, order=reversed):
    """The adapter of Σ_i w_i ΔW_i, written tensor by tensor in ``order``; returns the dense update."""
    template = sources[-1]
    ranks = {}
    products = {}
    for name in template.modules:
        p, q, _ = mix_factors([s.factors(name) for s in sources], weights, rank)
        ranks[name] = p.shape[1]
        products[name] = (p, q)
    full = {name: (reader.tensors[name].shape, torch.float32) for name in template.saved}
    updates = {}
    writer = LoraAdapterWriter(out, template, ranks, full, dtype)
    for name in order(sorted(set(products) | set(full))):
        if name in products:
            p, q = products[name]
            writer.write_module(name, p, q)
            updates[name] = p.to(dtype).double() @ q.to(dtype).double()
        else:
            w0 = reader.read(name).double()
            update = sum(w * s.delta(name)[0].double() for s, w in zip(sources, weights))
            writer.write_full(name, (w0 + update).float())
            updates[name] = (w0 + update).float().double() - w0
    writer.finish()
    writer.close()
    return updates, writer


def dense_model(base_dir: Path, updates: dict[str, torch.Tensor]):
    model = load_model(base_dir)
    state = model.state_dict()
    for name, update in updates.items():
        state[name] = (state[name].double() + update).float()
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_written_adapter_loads_in_peft_and_equals_the_dense_update(runs, tmp_path, variant):
    from peft import PeftModel

    base_dir, run = runs[variant]
    reader, sources = open_run(base_dir, run)
    weights = [-0.4, 0.1, 0.6, 1.5]  # like an extrapolation to a later step
    updates, writer = write_mixed_adapter(tmp_path / "out", reader, sources, weights)
    assert set(writer.digests()) == {"adapter_model.safetensors"}
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and config["use_rslora"] is False
    assert config["target_modules"] == sources[-1].config["target_modules"]
    assert config["modules_to_save"] == sources[-1].config["modules_to_save"]
    assert config["base_model_name_or_path"] == sources[-1].config["base_model_name_or_path"]
    if variant == "rslora":  # layer 0's q_proj has rank 4·2, the rest 4·4
        assert config["r"] == 16 and config["rank_pattern"] == {"model.layers.0.self_attn.q_proj": 8}
        assert config["alpha_pattern"] == config["rank_pattern"]
    # relex reads its own output back as the same update
    written = LoraSource(tmp_path / "out", reader)
    for name, update in updates.items():
        assert relative(written.delta(name)[0], update) < 1e-6, name
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    with quiet():
        peft_model = PeftModel.from_pretrained(load_model(base_dir), tmp_path / "out").eval()
    expected = logits(dense_model(base_dir, updates).eval(), ids)
    got = logits(peft_model, ids)
    gap = float((got - expected).abs().max())
    print(f"{variant}: PEFT-loaded adapter vs dense update, max |Δlogit| {gap:.1e}")
    assert torch.allclose(got, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
    reader.close()


def test_truncated_bf16_adapter(runs, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open

    base_dir, run = runs["mts"]
    reader, sources = open_run(base_dir, run)
    updates, _ = write_mixed_adapter(tmp_path / "out", reader, sources, [0.0, 0.0, 0.5, 1.0], rank=3,
                                     dtype=torch.bfloat16, order=list)
    with safe_open(tmp_path / "out" / "adapter_model.safetensors", "pt") as handle:
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        assert handle.get_slice(key).get_dtype() == "BF16" and handle.get_slice(key).get_shape() == [3, 64]
        assert handle.get_slice("base_model.model.lm_head.weight").get_dtype() == "F32"
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 3
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(4))
    with quiet():
        peft_model = PeftModel.from_pretrained(load_model(base_dir), tmp_path / "out").eval()
    expected = logits(dense_model(base_dir, updates).eval(), ids)
    assert torch.allclose(logits(peft_model, ids), expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
    reader.close()


def test_writer_refuses_incomplete_or_mismatched_input(runs, tmp_path):
    base_dir, run = runs["plain"]
    reader, sources = open_run(base_dir, run)
    name = "model.layers.0.self_attn.q_proj.weight"
    writer = LoraAdapterWriter(tmp_path / "out", sources[0], {name: 2}, {}, torch.float32)
    with pytest.raises(ValueError, match="shape"):
        writer.write_module(name, torch.zeros(64, 3), torch.zeros(3, 64))
    with pytest.raises(RuntimeError, match="never written"):
        writer.finish()
    writer.close()
    with pytest.raises(ValueError, match="not a LoRA module"):
        LoraAdapterWriter(tmp_path / "out2", sources[0], {"model.norm.weight": 2}, {}, torch.float32)
    reader.close()


# -- 5. what relex refuses ---------------------------------------------------------------------------
def assert_refused(folder: Path, base: Path, where: str, *fragments: str, allow_pickle=False):
    reader = CheckpointReader(base)
    with pytest.raises(RelexInputError) as caught:
        LoraSource(folder, reader, allow_pickle=allow_pickle)
    reader.close()
    message = str(caught.value)
    assert "\n" not in message, message
    assert str(folder / where) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture(scope="module")
def llama_base(runs):
    return runs["plain"][0]


@pytest.fixture(scope="module")
def qwen_base(runs):
    return runs["bias"][0]


def test_refuses_dora(llama_base, tmp_path):
    from peft import LoraConfig

    folder = save_untrained_adapter(tmp_path / "a", llama_base, LoraConfig(r=4, target_modules=ATTENTION,
                                                                           use_dora=True))
    assert_refused(folder, llama_base, "adapter_config.json", "DoRA")
    # the weights alone also give DoRA away (a config edited to hide it)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    assert_refused(folder, llama_base, "adapter_model.safetensors", "DoRA", "lora_magnitude_vector")


def test_refuses_embedding_lora(llama_base, tmp_path):
    from peft import LoraConfig

    folder = save_untrained_adapter(tmp_path / "a", llama_base,
                                    LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    assert_refused(folder, llama_base, "adapter_model.safetensors", "embedding", "lora_embedding_")


def test_refuses_conv_lora(tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.head = torch.nn.Linear(8, 4)

    torch.manual_seed(0)
    net = Net()
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "base" / "model.safetensors")
    with quiet():
        get_peft_model(net, LoraConfig(r=2, target_modules=["conv"])).save_pretrained(tmp_path / "a")
    assert_refused(tmp_path / "a", tmp_path / "base", "adapter_model.safetensors", "convolution", "4-D")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_refuses_inits_that_rewrite_the_base(llama_base, tmp_path, init):
    from peft import LoraConfig

    folder = save_untrained_adapter(tmp_path / "a", llama_base,
                                    LoraConfig(r=4, target_modules=ATTENTION, init_lora_weights=init))
    assert_refused(folder, llama_base, "adapter_config.json", f"init_lora_weights={init!r}",
                   "rewrites the base weights")


@pytest.mark.parametrize("init", ["loftq", "corda", "lora_ga", "pissa_niter_4", "something_new"])
def test_refuses_other_inits(runs, tmp_path, init):
    # PEFT needs quantisation libraries, calibration data or gradients to make these: edit a real config.
    base_dir, run = runs["plain"]
    folder = tmp_path / "a"
    folder.mkdir()
    for file in (run / "checkpoint-2").iterdir():
        folder.joinpath(file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": init}))
    message = assert_refused(folder, base_dir, "adapter_config.json", f"init_lora_weights={init!r}")
    assert ("unknown" in message) == (init == "something_new")


@pytest.mark.parametrize("init", ["gaussian", pytest.param("orthogonal", marks=peft_builds("0.16", "orthogonal init")),
                                  pytest.param("mica", marks=peft_builds("0.20", "MiCA init")), False])
def test_accepts_inits_that_keep_the_base(llama_base, tmp_path, init):
    from peft import LoraConfig

    reader = CheckpointReader(llama_base)
    folder = save_untrained_adapter(tmp_path / str(init), llama_base,
                                    LoraConfig(r=4, target_modules=ATTENTION, init_lora_weights=init))
    source = LoraSource(folder, reader)
    assert len(source.modules) == 6
    # orthogonal and MiCA start with B₀A₀ = 0 exactly as PEFT builds them
    if init in ("orthogonal", "mica"):
        name = "model.layers.0.self_attn.q_proj.weight"
        assert float(source.delta(name)[0].abs().max()) < 1e-6
    reader.close()


@peft_builds("0.14", "EVA")
def test_accepts_eva(llama_base, tmp_path):
    # EVA initialises A from activations (B₀ = 0) and redistributes ranks: the base stays as saved and the
    # per-module ranks and alphas are in rank_pattern / alpha_pattern, so the merge is exact.
    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights

    config = LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION, init_lora_weights="eva",
                        eva_config=EvaConfig(rho=2.0))
    generator = torch.Generator().manual_seed(0)
    with quiet():
        model = get_peft_model(load_model(llama_base), config, low_cpu_mem_usage=True)
        initialize_lora_eva_weights(model, [{"input_ids": torch.randint(0, 256, (4, 12), generator=generator)}
                                            for _ in range(8)], show_progress_bar=False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        ids = torch.randint(0, 256, (4, 12), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with quiet():
        model.save_pretrained(tmp_path / "eva")
    reader = CheckpointReader(llama_base)
    source = LoraSource(tmp_path / "eva", reader)
    assert source.config["rank_pattern"], "EVA kept every rank: the test no longer covers rank_pattern"
    merged = peft_merge_float64(llama_base, tmp_path / "eva")
    for name in source.modules:
        assert relative(source.delta(name)[0], merged[name] - reader.read(name).double()) < 1e-4, name
    reader.close()


def test_refuses_other_peft_types(llama_base, tmp_path):
    from peft import IA3Config

    config = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    folder = save_untrained_adapter(tmp_path / "a", llama_base, config)
    assert_refused(folder, llama_base, "adapter_config.json", "PEFT type IA3", "not LoRA")


def test_refuses_pickled_adapter_unless_allowed(runs, tmp_path):
    from peft import PeftModel

    base_dir, run = runs["mts"]
    with quiet():
        model = PeftModel.from_pretrained(load_model(base_dir), run / "checkpoint-4")
        model.save_pretrained(tmp_path / "a", safe_serialization=False)
    assert (tmp_path / "a" / "adapter_model.bin").is_file()
    assert_refused(tmp_path / "a", base_dir, "adapter_model.bin", "pickle", "--allow-pickle")
    reader = CheckpointReader(base_dir)
    pickled = LoraSource(tmp_path / "a", reader, allow_pickle=True)
    original = LoraSource(run / "checkpoint-4", reader)
    assert pickled.modules.keys() == original.modules.keys() and pickled.saved == original.saved
    for name in [*original.modules, *original.saved]:
        assert torch.equal(pickled.delta(name)[0], original.delta(name)[0])
    reader.close()


@peft_builds("0.14", "lora_bias")
def test_refuses_lora_bias(qwen_base, tmp_path):
    from peft import LoraConfig

    folder = save_untrained_adapter(tmp_path / "a", qwen_base, LoraConfig(r=4, target_modules=["q_proj"],
                                                                         lora_bias=True))
    assert_refused(folder, qwen_base, "adapter_config.json", "lora_bias")


@peft_builds("0.15", "trainable tokens")
def test_refuses_trainable_tokens(llama_base, tmp_path):
    from peft import LoraConfig

    folder = save_untrained_adapter(tmp_path / "b", llama_base,
                                    LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[1, 2]))
    assert_refused(folder, llama_base, "adapter_config.json", "trainable tokens")


def test_refuses_target_parameters(qwen_base, tmp_path):
    # LoRA on MoE expert parameters needs a model that has them: edit a real config.
    from peft import LoraConfig

    save_untrained_adapter(tmp_path / "a", qwen_base, LoraConfig(r=4, target_modules=["q_proj"]))
    folder = tmp_path / "c"
    folder.mkdir()
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config.update(lora_bias=False, target_parameters=["mlp.experts.gate_up_proj"])
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert_refused(folder, qwen_base, "adapter_config.json", "target_parameters")


def test_refuses_an_adapter_of_another_base(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    _, run = runs["plain"]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", hidden=32)).save_pretrained(tmp_path / "narrow")
    assert_refused(run / "checkpoint-2", tmp_path / "narrow", "adapter_model.safetensors", "shape")
    AutoModelForCausalLM.from_config(tiny_config("llama", layers=1)).save_pretrained(tmp_path / "short")
    assert_refused(run / "checkpoint-2", tmp_path / "short", "adapter_model.safetensors",
                   "model.layers.1.self_attn", "no tensor")


def test_refuses_missing_or_corrupt_config(runs, tmp_path):
    _, run = runs["plain"]
    with pytest.raises(RelexInputError, match="no adapter_config.json"):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(RelexInputError, match="cannot read the adapter config"):
        read_adapter_config(tmp_path)
    assert read_adapter_config(run / "checkpoint-2")["r"] == 4


# -- end to end: relex extrapolate on an adapter run -------------------------------------------------
def naive_merged_relex(base_dir: Path, run: Path, target: int) -> tuple[dict, dict]:
    """RELEX (rank 1, linear) on checkpoints merged by PEFT in float64 first: ``(base, prediction)``."""
    from naive import naive_relex

    base = {k: v.double() for k, v in load_state(base_dir).items()}
    merged = [peft_merge_float64(base_dir, run / f"checkpoint-{s}") for s in STEPS]
    checkpoints = [{name: m[name] for name in base} for m in merged]
    (prediction,) = naive_relex(base, checkpoints, list(STEPS), [target], rank=1)
    return base, {k: torch.from_numpy(v) for k, v in prediction.items()}


@pytest.mark.parametrize("variant", ["mts", "rslora", "bias", "conv1d"])
def test_extrapolated_checkpoint_equals_naive_relex_on_merged_weights(runs, tmp_path, variant):
    from relex.api import extrapolate

    base_dir, run = runs[variant]
    result = extrapolate(run, target_step=20, out_dir=tmp_path / "out", base=base_dir)
    assert result.series.steps == list(STEPS)
    base, expected = naive_merged_relex(base_dir, run, 20)
    out = load_state(tmp_path / "out")
    worst = 0.0
    for name, w0 in base.items():
        update = expected[name] - w0
        if not update.any():
            assert torch.equal(out[name].double(), w0), name
            continue
        error = relative(out[name].double() - w0, update)
        worst = max(worst, error)
        assert error <= 1e-4, (name, error)
    print(f"{variant}: max relative error of the extrapolated update vs naive float64 RELEX {worst:.1e}")


def test_adapter_output_equals_the_merged_checkpoint(runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from relex.api import extrapolate

    base_dir, run = runs["mts"]
    extrapolate(run, target_step=20, out_dir=tmp_path / "merged", base=base_dir)
    extrapolate(run, target_step=20, out_dir=tmp_path / "adapter", base=base_dir, output="lora")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "relex.json", "tokenizer.json"} <= files
    provenance = json.loads((tmp_path / "adapter" / "relex.json").read_text())
    assert provenance["lora"]["exact"] is True and provenance["lora"]["max_truncation_error"] == 0.0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4 * len(STEPS)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(5))
    with quiet():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        adapter = PeftModel.from_pretrained(load_model(base_dir), tmp_path / "adapter").eval()
    expected, got = logits(merged, ids), logits(adapter, ids)
    print(f"adapter output vs merged checkpoint: max |Δlogit| {float((got - expected).abs().max()):.1e}")
    assert torch.allclose(got, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


def test_lora_rank_truncation_errors_decrease_with_the_rank(runs, tmp_path):
    from relex.api import extrapolate

    base_dir, run = runs["mts"]
    reader = CheckpointReader(base_dir)
    exact_dir = tmp_path / "exact"
    extrapolate(run, target_step=20, out_dir=exact_dir, base=base_dir, output="lora")
    exact = LoraSource(exact_dir, reader)
    previous = None
    for k in (1, 2, 4, 8, 16):
        out = tmp_path / f"rank-{k}"
        extrapolate(run, target_step=20, out_dir=out, base=base_dir, output="lora", lora_rank=k)
        lora = json.loads((out / "relex.json").read_text())["lora"]
        errors = lora["truncation_error"]
        assert set(errors) == set(exact.modules)
        assert json.loads((out / "adapter_config.json").read_text())["r"] == k
        truncated = LoraSource(out, reader)
        for name, error in errors.items():
            # the recorded error is the real distance of the written update from the exact one
            measured = relative(truncated.delta(name)[0], exact.delta(name)[0])
            assert math.isclose(measured, error, rel_tol=1e-3, abs_tol=1e-6), (name, measured, error)
            if previous is not None:
                assert error <= previous[name] + 1e-9, (name, k)
        previous = errors
        print(f"lora_rank={k}: truncation error max {max(errors.values()):.3f}, min {min(errors.values()):.3f}")
        if k == 4 * len(STEPS):
            assert lora["exact"] is True and max(errors.values()) == 0.0
        else:
            assert lora["exact"] is False and max(errors.values()) > 0
    reader.close()


def test_cli_refuses_a_dora_run_in_one_line(llama_base, tmp_path, capsys):
    from peft import LoraConfig

    from relex_cli.app import main

    run = tmp_path / "run"
    for step in (2, 4):
        folder = save_untrained_adapter(run / f"checkpoint-{step}", llama_base,
                                        LoraConfig(r=4, target_modules=ATTENTION, use_dora=True))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    capsys.readouterr()  # progress bars of the saves above
    code = main(["extrapolate", str(run), "--base", str(llama_base), "--target-step", "20",
                 "--out", str(tmp_path / "out"), "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert "DoRA" in lines[0] and "adapter_config.json" in lines[0] and "Traceback" not in lines[0]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no output, not even a partial folder
