"""Issue 12: the theory added to bench.theory against Monte-Carlo wide nets, the hidden-layer Jacobian twins,
and the analysis tables of analysis.extensions on synthetic runs tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from bench import theory

SB2 = 0.05  # Schoenholz et al.'s sigma_b^2


# ------------------------------------------------------------------------------ batch norm rate
def test_bn_ratio_relu_closed_form():
    # relu: E[phi'^2] = 1/2, Var phi = 1/2 - 1/(2 pi): the ratio is sqrt(pi/(pi-1)); quadrature error ~1e-14
    assert theory.bn_delta_ratio("relu") == pytest.approx(math.sqrt(math.pi / (math.pi - 1)), rel=1e-10)
    assert abs(theory.bn_delta_ratio("relu") - 1.211) < 0.003
    # the rate depends on the activation only: tanh ~1.085, sigmoid close to 1
    assert theory.bn_delta_ratio("tanh") == pytest.approx(1.0853, abs=1e-3)
    assert 1.0 < theory.bn_delta_ratio("sigmoid") < theory.bn_delta_ratio("tanh")


@pytest.mark.parametrize("activation", ["relu", pytest.param("tanh", marks=pytest.mark.slow)])
def test_bn_ratio_against_wide_net(activation):
    # A width-512 net with batches of 256: the finite-batch shift measured at B = 256 is ~0.5% (REFERENCES.md:
    # 1.208 vs 1.211 for relu) and two nets of 8 interior layers add ~0.3% noise: 1.5% covers both.
    measured, stderr = theory.bn_delta_ratio_mc(activation, 256, width=512, depth=16, nets=2, skip=4, seed=1)
    assert measured == pytest.approx(theory.bn_delta_ratio(activation), rel=0.015)


def test_bn_ratio_grows_at_small_batch():
    # Yang et al.: smaller batches explode faster. Batch 8 vs 128 differ by ~6% for relu, far above the
    # ~0.5% standard error of these small Monte-Carlos.
    small, _ = theory.bn_delta_ratio_mc("relu", 8, width=128, depth=16, nets=3, skip=4)
    large, _ = theory.bn_delta_ratio_mc("relu", 128, width=128, depth=16, nets=3, skip=4)
    assert small > large * 1.02


# ------------------------------------------------------------------------------ correlation depth scale
def test_correlation_scale_equals_gradient_scale_in_ordered_phase():
    for sw2 in (0.8, 1.2, 1.6):  # below tanh's critical 1.76 at sb2 = 0.05: c* = 1, chi_c = chi_1
        assert theory.fixed_point_c("tanh", sw2, SB2) == 1.0
        expected = theory.depth_scale(theory.chi1("tanh", sw2, SB2))
        assert theory.correlation_depth_scale("tanh", sw2, SB2) == pytest.approx(expected, rel=1e-12)


def test_chi_c_is_the_slope_of_the_correlation_map():
    # chaotic phase: chi_c (an expectation of phi' phi') must equal d c'/d c at c* (Price's theorem); a
    # central difference with h = 1e-4 has error ~h^2 ~ 1e-8, quadrature ~1e-10: 1e-6 relative is safe.
    for sw2 in (2.0, 3.0):
        c = theory.fixed_point_c("tanh", sw2, SB2)
        assert 0 < c < 1
        assert theory.correlation_map(c, "tanh", sw2, SB2) == pytest.approx(c, abs=1e-8)
        h = 1e-4
        up, down = (theory.correlation_map(c + s * h, "tanh", sw2, SB2) for s in (1, -1))
        slope = (up - down) / (2 * h)
        assert theory.chi_c("tanh", sw2, SB2) == pytest.approx(slope, rel=1e-6)


@pytest.mark.slow
def test_fixed_point_c_against_wide_net():
    # Two inputs through a width-2000 tanh net at sw2 = 3 (chaotic): after 30 layers their correlation sits
    # at c* (~0.30). Finite width shifts each layer's c by O(1/sqrt(2000)) ~ 0.02 around it, and 4 nets
    # average that down: 0.03 absolute.
    sw2 = 3.0
    c_star = theory.fixed_point_c("tanh", sw2, SB2)
    rng = np.random.default_rng(0)
    n, measured = 2000, []
    for _ in range(4):
        x = rng.standard_normal((2, n))
        for _layer in range(30):
            W = rng.standard_normal((n, n)) * math.sqrt(sw2 / n)
            b = rng.standard_normal(n) * math.sqrt(SB2)
            x = np.tanh(x @ W + b)
        measured.append(np.corrcoef(np.arctanh(np.clip(x, -1 + 1e-12, 1 - 1e-12)))[0, 1])
    # corrcoef of the pre-activations centres them; their mean is 0 up to O(1/sqrt(n)), well inside 0.03
    assert np.mean(measured) == pytest.approx(c_star, abs=0.03)


def test_correlation_depth_scale_diverges_at_criticality():
    crit = theory.critical_sw2("tanh", SB2)
    assert crit == pytest.approx(1.76, abs=0.01)
    near = theory.correlation_depth_scale("tanh", crit * 1.01, SB2)
    far = theory.correlation_depth_scale("tanh", 3.0, SB2)
    assert near > 20 * far > 0


# ------------------------------------------------------------------------------ Jacobian twins
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid"])
def test_hidden_jacobian_numpy_matches_torch_jacrev(activation, residual):
    from bench.init import init_params
    from bench.numpy_mlp import NumpyMLP
    from bench.numpy_mlp import hidden_jacobian as jac_numpy
    from bench.spec import NetSpec
    from bench.torch_mlp import TorchMLP
    from bench.torch_mlp import hidden_jacobian as jac_torch

    spec = NetSpec(5, 3, (7,) * 4, activation, "softmax", residual)
    params = init_params(spec, "meanfield", [0, 1], 1.3, 0.1)  # two members: the ensemble axis is kept apart
    x = np.random.default_rng(0).standard_normal((3, 5))
    by_hand = jac_numpy(NumpyMLP(spec, params, "cross_entropy"), x)
    autograd = jac_torch(TorchMLP(spec, params, "cross_entropy", "float64"), x)
    assert by_hand.shape == autograd.shape == (2, 3, 7, 7)
    # float64, three 7x7 products: rounding ~1e-15 of the largest entry each; 1e-12 of it leaves room, and a
    # bug (a missing phi', a transposed W) is O(1) of it. Sigmoid's phi' <= 1/4 makes its J small: relative.
    scale = np.abs(autograd).max()
    assert scale > 1e-4  # not a trivially zero Jacobian
    for e in range(2):
        for b in range(3):
            np.testing.assert_allclose(by_hand[e, b], autograd[e, b], rtol=0, atol=1e-12 * scale)


def test_hidden_jacobian_orthogonal_linear_is_orthogonal():
    # With phi' = 1 (relu on all-positive pre-activations is not guaranteed; use tiny weights with tanh:
    # phi'(n) ~ 1 - n^2) the Jacobian of orthogonal layers is a product of near-orthogonal matrices, so its
    # singular values sit at g^(L-1) up to the O(n^2) ~ 1e-6 curvature of tanh at these small inputs.
    from bench.init import init_params
    from bench.numpy_mlp import NumpyMLP, hidden_jacobian
    from bench.spec import NetSpec

    spec = NetSpec(4, 2, (16,) * 5, "tanh", "softmax")
    params = init_params(spec, "orthogonal", [3], 1.0, None)
    x = 1e-3 * np.random.default_rng(1).standard_normal((2, 4))
    sv = np.linalg.svd(hidden_jacobian(NumpyMLP(spec, params, "cross_entropy"), x)[0], compute_uv=False)
    np.testing.assert_allclose(sv, 1.0, atol=1e-4)


# ------------------------------------------------------------------------------ analysis tables
def _synthetic_runs(groups):
    rows, i = [], 0
    for (task, activation, init, residual, norm, lr, depth), solved in groups.items():
        for s in solved:
            rows.append({"run_id": f"r{i}", "task": task, "activation": activation, "init": init,
                         "residual": residual, "norm": norm, "lr": lr, "init_scale": None, "depth": depth,
                         "steps": 100, "solved_step": s})
            i += 1
    runs = pd.DataFrame(rows)
    runs["solved_step"] = runs["solved_step"].astype("Int64")
    return runs


def test_rumelhart_depth_table_is_kaplan_meier_over_all_seeds():
    from scipy.stats import CensoredData, ecdf

    from analysis.extensions import rumelhart_depth_table

    na = pd.NA
    runs = _synthetic_runs({
        ("symmetry", "sigmoid", "uniform", False, "none", 0.1, 1): [10, 20, 30, na],  # KM: 0.25, 0.5 at 20
        ("symmetry", "sigmoid", "uniform", False, "none", 0.1, 4): [5, na, na, na],  # never half: no median
        ("symmetry", "relu", "he", True, "none", 0.03, 1): [40, 50, na, na, 60, 70],
    })
    t = rumelhart_depth_table(runs)
    assert list(t.columns[:8]) == ["problem", "method", "depth", "lr", "init_scale", "seeds", "solved", "median_sweeps"]
    row = t[(t["method"] == "1986 sigmoid") & (t["depth"] == 1)].iloc[0]
    assert (row["seeds"], row["solved"], row["median_sweeps"]) == (4, 3, 20.0)
    row = t[(t["method"] == "1986 sigmoid") & (t["depth"] == 4)].iloc[0]
    assert (row["seeds"], row["solved"]) == (4, 1) and math.isnan(row["median_sweeps"])
    assert row["solved_fraction"] == pytest.approx(0.25)
    # against scipy directly: unsolved seeds censored at the cap (100)
    row = t[t["method"] == "relu/he + residual"].iloc[0]
    res = ecdf(CensoredData(uncensored=[40, 50, 60, 70], right=[100, 100]))
    median = res.cdf.quantiles[np.argmax(res.cdf.probabilities >= 0.5 - 1e-12)]
    assert row["median_sweeps"] == median == 60
    # the 1986 recipe comes first in each problem
    assert t["method"].iloc[0] == "1986 sigmoid"
    # the report's markdown view of "rumelhart*" tables needs the 1986 table's columns: it must render ours
    from analysis.report import shown_table

    shown = shown_table("rumelhart_depth", t)
    assert shown.loc[1, "median_sweeps"] == "not reached" and shown.loc[0, "paper_sweeps"] == "1,425"


def test_bn_layer_rates_recovers_a_geometric_profile():
    from analysis.extensions import BN_SKIP, bn_layer_rates

    depth, r = 24, 1.2
    runs = pd.DataFrame({"run_id": ["a"], "activation": ["relu"], "batch_size": [64], "width": [256], "depth": [depth]})
    layer = np.arange(1, depth + 2)  # hidden layers and the output layer (left out by the rate)
    delta = r ** (depth - layer.astype(float))
    delta[-1] = 123.0  # the output layer's delta is on another scale: must not enter the rate
    delta[0] *= 5.0  # nor must the layers next to the input
    layers = pd.DataFrame({"run_id": "a", "step": 0, "param": "weight", "layer": layer, "delta_norm": delta})
    got = bn_layer_rates(runs, layers)
    assert BN_SKIP >= 1
    assert got["ratio"].iloc[0] == pytest.approx(r, rel=1e-12)


@pytest.mark.slow  # ~15 s alone, ~70 s on a loaded machine (composing the config, digits, torch)
def test_jacobian_statistic_from_a_run_row_both_backends(cfg_factory):
    # The per-run statistic as the report computes it: the run's initial network rebuilt from its config and
    # seed, then the singular values of d a^L / d a^1 by hand (numpy) and by autograd (torch). Float64;
    # singular values are well conditioned (perturbation <= ||dJ||), so the twins' ~1e-15 entry-wise
    # difference stays ~1e-14: 1e-10 relative to the largest leaves a wide margin and still catches any bug.
    import json

    from omegaconf import OmegaConf

    from analysis.extensions import jacobian_singular_values

    cfg = cfg_factory("experiment=dynamical_isometry", "model.depth=6", "model.width=12", "model.init=orthogonal")
    row = {"config_json": json.dumps(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)), "seed": 5}
    by_hand = jacobian_singular_values(row, "numpy", n_inputs=2)
    autograd = jacobian_singular_values(row, "torch", n_inputs=2)
    assert by_hand.shape == (2, 12)
    np.testing.assert_allclose(by_hand, autograd, rtol=0, atol=1e-10 * autograd.max())
    # the rebuilt init is the run's: another seed draws other weights, hence another spectrum
    other = jacobian_singular_values(dict(row, seed=6), "numpy", n_inputs=2)
    assert np.abs(other - by_hand).max() > 1e-3
