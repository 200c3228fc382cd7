"""Every mode and predictor of the engine against an independent naive implementation (tests/naive.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from naive import naive_elementwise, naive_matrix_rank1, naive_temporal

import relex
from relex.backtest import mixing_weights
from relex.methods import TensorData, get_method
from relex.methods.matrix_rank1 import FactorAccumulator
from relex.model_spec import ModelSpec
from relex.run import open_run
from relex.subspace import top_singular_triple
from relex.synthetic import DEFAULT_SHAPES, make_run, write_checkpoint
from relex.testing import load_state
from relex.trajectory import ModelSelector

STEPS = [3, 7, 8, 15, 22, 40]
TOLERANCE = 1e-3


def saturating(t):
    return 1.0 - np.exp(-np.asarray(t, dtype=np.float64) / 30.0)


def relative(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods") / "run"
    make_run(root, STEPS, coefficients=(saturating,), noise=0.05)
    base = load_state(root / "checkpoint-0")
    observed = [load_state(root / f"checkpoint-{s}") for s in STEPS]
    return root, base, observed


def assert_matches(out_dir, base, reference, names=DEFAULT_SHAPES):
    out = load_state(out_dir)
    for name in names:
        update = out[name].double() - base[name].double()
        expected = torch.from_numpy(reference[name]) - base[name].double()
        assert relative(update, expected) < TOLERANCE, (name, relative(update, expected))


@pytest.mark.parametrize("predictor", ["linear", "poly2", "poly3", "loglinear", "powerlaw", "saturating"])
def test_relex_predictors_match_naive(run, tmp_path, predictor):
    root, base, observed = run
    relex.extrapolate(root, target_step=90, out_dir=tmp_path / "out", regressor=predictor, dtype="float32")
    (naive,) = naive_temporal(base, observed, STEPS, [90], predictor=predictor)
    assert_matches(tmp_path / "out", base, naive)


def test_relex_rank2_scaled_matches_naive(run, tmp_path):
    root, base, observed = run
    relex.extrapolate(root, target_step=70, out_dir=tmp_path / "out", rank=2, regressor="poly2", scale=0.7)
    (naive,) = naive_temporal(base, observed, STEPS, [70], rank=2, predictor="poly2", scale=0.7)
    assert_matches(tmp_path / "out", base, naive)


@pytest.mark.parametrize("spec,shrink", [("anchored", "model"), ("anchored-loglinear@0.4", 0.4),
                                         ("anchored-saturating", "model")])
def test_anchored_matches_naive(run, tmp_path, spec, shrink):
    root, base, observed = run
    predictor = spec.split("@")[0].removeprefix("anchored").removeprefix("-") or "linear"
    relex.extrapolate(root, target_step=[60, 120], out_dir=tmp_path / "out", regressor=spec)
    naive = naive_temporal(base, observed, STEPS, [60, 120], predictor=predictor, anchored=True, shrink=shrink)
    for k, step in enumerate((60, 120)):
        assert_matches(tmp_path / "out" / f"step-{step}", base, naive[k])


@pytest.mark.parametrize("options", [{}, {"from_step": 15, "scale": 0.5}, {"copy_norms": True}])
def test_elementwise_matches_naive(run, tmp_path, options):
    root, base, observed = run
    relex.extrapolate(root, target_step=80, out_dir=tmp_path / "out", method="elementwise", **options)
    (naive,) = naive_elementwise(base, observed, STEPS, [80], first=options.get("from_step"),
                                 copy_norms=options.get("copy_norms", False), scale=options.get("scale", 1.0))
    assert_matches(tmp_path / "out", base, naive)
    if options.get("copy_norms"):
        out, newest = load_state(tmp_path / "out"), observed[-1]
        assert torch.equal(out["model.norm.weight"], newest["model.norm.weight"])


def make_rank1_run(root, steps, coefficient, noise, seed=0):
    """Every 2-D tensor moves along a rank-1 matrix a bᵀ (plus iid noise); 1-D tensors along a vector."""
    generator = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=generator) * 0.02 for n, s in DEFAULT_SHAPES.items()}
    directions = {}
    for name, shape in DEFAULT_SHAPES.items():
        if len(shape) == 2:
            a, b = torch.randn(shape[0], generator=generator), torch.randn(shape[1], generator=generator)
            directions[name] = torch.outer(a / a.norm(), b / b.norm()) * float(np.sqrt(a.numel() * b.numel()))
        else:
            directions[name] = torch.randn(shape, generator=generator)
    write_checkpoint(root / "checkpoint-0", base, step=0)
    for step in steps:
        state = {n: base[n] + 1e-3 * (float(coefficient(step)) * directions[n]
                                       + noise * torch.randn(base[n].shape, generator=generator))
                 for n in base}
        write_checkpoint(root / f"checkpoint-{step}", state, step=step)
    return base, [load_state(root / f"checkpoint-{s}") for s in steps]


@pytest.fixture(scope="module")
def rank1_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank1") / "run"
    base, observed = make_rank1_run(root, STEPS, saturating, noise=0.02)
    return root, base, observed


@pytest.mark.parametrize("predictor,anchored", [("linear", False), ("saturating", False), ("powerlaw", False),
                                                ("poly2", True)])
def test_matrix_rank1_matches_naive(rank1_run, tmp_path, predictor, anchored):
    root, base, observed = rank1_run
    spec = f"anchored-{predictor}@0.6" if anchored else predictor
    relex.extrapolate(root, target_step=75, out_dir=tmp_path / "out", method="matrix-rank1", regressor=spec,
                      scale=0.9)
    (naive,) = naive_matrix_rank1(base, observed, STEPS, [75], predictor=predictor, anchored=anchored,
                                  shrink=0.6, scale=0.9)
    assert_matches(tmp_path / "out", base, naive)


def test_matrix_rank1_blocked_tensors_read_per_checkpoint(rank1_run, tmp_path):
    """Tensors too large for one row block get their singular triples from whole per-checkpoint reads."""
    root, base, observed = rank1_run
    relex.extrapolate(root, target_step=75, out_dir=tmp_path / "whole", method="matrix-rank1")
    relex.extrapolate(root, target_step=75, out_dir=tmp_path / "blocks", method="matrix-rank1", block_bytes=4096)
    whole, blocks = load_state(tmp_path / "whole"), load_state(tmp_path / "blocks")
    for name in whole:
        assert relative(blocks[name], whole[name]) < 1e-6, name


def test_top_singular_triple_is_exact_when_the_gap_is_tiny():
    """σ₂/σ₁ = 0.999: power iteration and svd_lowrank drift toward the second direction, svds does not."""
    rng = np.random.default_rng(0)
    u = np.linalg.qr(rng.standard_normal((300, 2)))[0]
    v = np.linalg.qr(rng.standard_normal((200, 2)))[0]
    a = (u * np.array([1.0, 0.999])) @ v.T + 1e-5 * rng.standard_normal((300, 200))
    reference = np.linalg.svd(a)
    triple = top_singular_triple(a.astype(np.float32))
    assert abs(triple.sigma - reference[1][0]) / reference[1][0] < 1e-5
    assert abs(abs(triple.v.astype(np.float64) @ reference[2][0]) - 1) < 1e-4
    assert triple.residual < 1e-4
    assert triple.v[np.argmax(np.abs(triple.v))] > 0  # deterministic sign
    zero = top_singular_triple(np.zeros((4, 3)))
    assert zero.sigma == 0.0 and not zero.u.any()


def test_matrix_rank1_coefficient_reads_the_newest_direction():
    """c_i = σ_i (u_i·u_T)(v_i·v_T): a direction that rotates away counts less than its σ."""
    rng = np.random.default_rng(1)
    a, b = np.linalg.qr(rng.standard_normal((20, 2)))[0].T
    c, d = np.linalg.qr(rng.standard_normal((10, 2)))[0].T
    accumulator = FactorAccumulator(3, p=2)
    for delta in (2.0 * np.outer(a, c), 3.0 * np.outer(b, d), 4.0 * np.outer(b, d)):
        accumulator.add(delta)
    factors = accumulator.result()
    np.testing.assert_allclose(factors.sigma, [2, 3, 4], rtol=1e-5)
    np.testing.assert_allclose(factors.coef, [0, 3, 4], atol=1e-5)
    np.testing.assert_allclose(factors.coef_fit, [0, 3, 4], atol=1e-5)  # direction of checkpoint 2 = newest


def test_gram_mixing_weights_for_backtests(run):
    """The Gram-only mixing weights of the temporal modes (what backtests use), applied to the run's explicit
    deltas, give the naive implementations' predictions (tests/naive.py: whole tensors, float64, full SVDs);
    and the predictor chosen per tensor by backtest is the run's true one (saturating), fitted on the whole
    window."""
    root, base, observed = run
    with open_run(root) as opened:
        grams = opened.execute().grams
    selector = ModelSelector(ModelSpec(regressor="auto", auto_scope="tensor"), STEPS)
    targets = [50.0, 90.0]
    naive = {"anchored": naive_temporal(base, observed, STEPS, targets, anchored=True, shrink="model"),
             "elementwise": naive_elementwise(base, observed, STEPS, targets),
             "saturating": naive_temporal(base, observed, STEPS, targets, predictor="saturating")}
    methods = {"anchored": get_method("relex", regressor="anchored"), "elementwise": get_method("elementwise"),
               "last": get_method("last")}
    assert set(grams) == set(DEFAULT_SHAPES)
    for name, g in grams.items():
        shape = DEFAULT_SHAPES[name]
        w0 = base[name].double().numpy().reshape(-1)
        deltas = np.stack([c[name].double().numpy().reshape(-1) - w0 for c in observed])  # T x d
        expected = {label: np.stack([out[name].reshape(-1) - w0 for out in naive[label]]) for label in naive}
        expected["last"] = np.stack([deltas[-1]] * len(targets))
        for label, method in methods.items():
            weights = mixing_weights(method, g, STEPS, targets, tensor=name, ndim=len(shape))
            assert weights.shape == (len(targets), len(STEPS))
            assert relative(weights @ deltas, expected[label]) < 1e-5, (name, label)
        chosen = selector.model(TensorData(name, shape, np.array(STEPS, float), g))
        assert chosen.stats["regressor"] == "saturating", (name, chosen.stats["auto"])
        assert relative(chosen.mixing(np.array(targets)) @ deltas, expected["saturating"]) < 1e-4, name


def test_never_moving_matrix_stays_at_base_in_matrix_rank1(tmp_path):
    make_run(tmp_path / "run", [5, 10, 20])
    frozen = load_state(tmp_path / "run" / "checkpoint-0")["model.layers.0.self_attn.q_proj.weight"]
    for step in (5, 10, 20):
        state = load_state(tmp_path / "run" / f"checkpoint-{step}")
        state["model.layers.0.self_attn.q_proj.weight"] = frozen.clone()
        write_checkpoint(tmp_path / "run" / f"checkpoint-{step}", state, step=step)
    relex.extrapolate(tmp_path / "run", target_step=50, out_dir=tmp_path / "out", method="matrix-rank1",
                      regressor="anchored")
    assert torch.equal(load_state(tmp_path / "out")["model.layers.0.self_attn.q_proj.weight"], frozen)
