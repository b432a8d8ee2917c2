"""Tests for bench/theory.py: known closed forms, quadrature against scipy, and Monte-Carlo agreement
with wide random networks written here in plain float64 NumPy."""

import math
from enum import Enum
from functools import cache

import numpy as np
import pytest
from scipy.integrate import quad

from bench import theory
from bench.activations import ACTIVATIONS, LEAKY_SLOPE
from bench.init import SCHEMES

SMOOTH = ("sigmoid", "tanh", "softsign")  # the bounded activations whose expectations need quadrature
LINEAR_TAIL = ("selu", "gelu", "silu", "elu")  # quadrature too; linear for large z, so q* can be inf


def _quad_expect(f, q):
    """E[f(u)], u ~ N(0, q), by adaptive quadrature split at 0 (softsign's kink) and +-8.

    epsabs 1e-15: the tails of tanh'^2 are ~1e-14, and asking for relative accuracy there only makes
    quad report roundoff; every expectation tested is >= 9e-4, so 1e-15 absolute is ~1e-12 relative.
    """

    def integrand(u):
        return f(u) * math.exp(-u * u / (2.0 * q)) / math.sqrt(2.0 * math.pi * q)

    pieces = [(-math.inf, -8.0), (-8.0, 0.0), (0.0, 8.0), (8.0, math.inf)]
    return sum(quad(integrand, a, b, epsabs=1e-15, epsrel=1e-12, limit=200)[0] for a, b in pieces)


# --- activations and quadrature -------------------------------------------------------------

def _phi(act, x):
    return act.phi(x, np)


def _dphi(act, x):
    return act.dphi(x, act.phi(x, np), np)


@pytest.mark.parametrize("name", list(theory.COVERED))
def test_dphi_is_derivative_of_phi(name):
    act = theory.get_activation(name)
    x = np.concatenate([np.linspace(-6.0, -0.1, 60), np.linspace(0.1, 6.0, 60)])  # clear of kinks at 0
    eps = 1e-6
    numeric = (_phi(act, x + eps) - _phi(act, x - eps)) / (2.0 * eps)
    # central difference: truncation O(eps^2 phi''') ~ 1e-12, rounding O(1e-16 / eps) ~ 1e-10
    np.testing.assert_allclose(_dphi(act, x), numeric, rtol=0, atol=1e-8)


def test_theory_reads_the_networks_activations():
    for name, act in ACTIVATIONS.items():  # every activation a network can use has a prediction ...
        assert theory.get_activation(name) is act, name  # ... from the very entry the networks use


@pytest.mark.parametrize("name", SMOOTH + LINEAR_TAIL)
@pytest.mark.parametrize("q", [1e-3, 0.5, 2.0, 10.0, 100.0])
def test_gauss_expect_matches_scipy_quad(name, q):
    act = theory.get_activation(name)
    for label, f in (("phi^2", lambda x: _phi(act, x) ** 2), ("phi'^2", lambda x: _dphi(act, x) ** 2)):
        # both sides are converged to ~1e-14; 1e-10 leaves room for quad's own error estimate
        assert theory.gauss_expect(f, q) == pytest.approx(_quad_expect(f, q), rel=1e-10), label


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "linear"])
@pytest.mark.parametrize("q", [0.1, 1.0, 7.0])
def test_exact_forms_agree_with_quadrature(name, q):
    act = theory.get_activation(name)
    # the rule has a panel edge at 0, so the kink costs nothing: agreement to rounding
    assert theory.length_map(q, name, 1.0, 0.0) == pytest.approx(
        theory.gauss_expect(lambda x: _phi(act, x) ** 2, q), rel=1e-12)
    assert theory.chi1(name, 1.0, 0.0, q) == pytest.approx(
        theory.gauss_expect(lambda x: _dphi(act, x) ** 2, q), rel=1e-12)


# --- known values ---------------------------------------------------------------------------

@pytest.mark.parametrize("sw2", [0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("sb2", [0.0, 0.1])
def test_chi1_closed_forms(sw2, sb2):
    a = LEAKY_SLOPE
    for q in (None, 0.3, 5.0):  # piecewise-linear phi: chi1 does not depend on q
        assert theory.chi1("relu", sw2, sb2, q) == pytest.approx(sw2 / 2.0, rel=1e-15)
        assert theory.chi1("leaky_relu", sw2, sb2, q) == pytest.approx(sw2 * (1 + a * a) / 2, rel=1e-15)
        assert theory.chi1("linear", sw2, sb2, q) == pytest.approx(sw2, rel=1e-15)
    assert theory.delta_ratio("relu", sw2, sb2) == pytest.approx(math.sqrt(sw2 / 2.0), rel=1e-15)


@pytest.mark.parametrize("sw2", [0.5, 1.0, 4.0, 16.0, 64.0])
@pytest.mark.parametrize("sb2", [0.0, 1.0])
def test_sigmoid_chi1_bounded_by_sw2_over_16(sw2, sb2):
    for q in (None, 1e-6, 1.0, 30.0):
        assert theory.chi1("sigmoid", sw2, sb2, q) <= sw2 / 16.0  # phi' <= 1/4 everywhere
    # the bound is reached as q -> 0, where phi'(0)^2 = 1/16; q = 1e-6 shifts it by O(q)
    assert theory.chi1("sigmoid", sw2, sb2, 1e-6) == pytest.approx(sw2 / 16.0, rel=1e-5)


def test_critical_sw2():
    sw2 = theory.critical_sw2("tanh", 0.05)
    assert abs(sw2 - 1.76) < 0.02  # REFERENCES.md: tanh critical line passes sw2 ~ 1.76 at sb2 = 0.05
    assert theory.chi1("tanh", sw2, 0.05) == pytest.approx(1.0, abs=1e-9)
    assert theory.critical_sw2("relu", 0.0) == 2.0
    assert theory.critical_sw2("relu", 0.3) == 2.0
    assert theory.critical_sw2("leaky_relu", 0.0) == pytest.approx(2.0 / (1 + LEAKY_SLOPE**2))
    assert theory.critical_sw2("linear", 0.1) == 1.0
    assert theory.critical_sw2("tanh", 0.0) == 1.0
    # bias moves the edge of chaos to larger weight variance (Poole et al. fig. 1)
    lines = [theory.critical_sw2("tanh", sb2) for sb2 in (0.01, 0.05, 0.1, 0.5)]
    assert np.all(np.diff(lines) > 0)
    assert theory.critical_sw2("sigmoid", 1.0) > 16.0  # chi1 <= sw2 / 16
    for name in SMOOTH:  # brentq's root: chi1(q*) = 1 to the fixed point's 1e-12
        sw2 = theory.critical_sw2(name, 0.3)
        assert theory.chi1(name, sw2, 0.3) == pytest.approx(1.0, abs=1e-9), name


def test_fixed_point_q():
    q_star = theory.fixed_point_q("tanh", 1.76, 0.05)
    assert theory.length_map(q_star, "tanh", 1.76, 0.05) == pytest.approx(q_star, rel=1e-10)
    # the stable fixed point does not depend on where we start
    assert theory.fixed_point_q("tanh", 1.76, 0.05, q0=1e-3) == pytest.approx(q_star, rel=1e-10)
    assert theory.fixed_point_q("sigmoid", 1.0, 1.0, q0=50.0) == pytest.approx(
        theory.fixed_point_q("sigmoid", 1.0, 1.0), rel=1e-10)
    assert theory.fixed_point_q("relu", 2.0, 0.0, q0=0.7) == 0.7  # He: every q is a fixed point
    assert theory.fixed_point_q("relu", 2.0, 0.1) == math.inf  # q grows by sb2 per layer
    assert theory.fixed_point_q("relu", 3.0, 0.0) == math.inf  # q grows by 3/2 per layer
    assert theory.fixed_point_q("relu", 1.0, 0.5) == pytest.approx(1.0)  # sb2 / (1 - sw2/2)
    assert theory.fixed_point_q("linear", 0.5, 0.1) == pytest.approx(0.2)  # sb2 / (1 - sw2)
    assert theory.fixed_point_q("tanh", 0.9, 0.0) == 0.0  # ordered phase without bias
    assert theory.fixed_point_q("tanh", 2.0, 0.0) > 0.0  # chaotic phase: nonzero q*


def test_selu_self_normalising_fixed_point():
    """Klambauer et al. 2017: lambda and alpha make E[selu(z)] = 0 and E[selu(z)^2] = 1 for z ~ N(0, 1),
    so with LeCun-normal weights (sw2 = 1, sb2 = 0) q = 1 maps to itself and attracts."""
    act = theory.get_activation("selu")
    # the constants carry 17 digits; the quadrature ~1e-14: 1e-9 is a check of the constants' meaning
    assert theory.gauss_expect(lambda x: _phi(act, x), 1.0) == pytest.approx(0.0, abs=1e-9)
    assert theory.length_map(1.0, "selu", 1.0, 0.0) == pytest.approx(1.0, rel=1e-9)
    sw2, sb2 = theory.init_variances("lecun", 64)
    assert (sw2, sb2) == (1.0, 0.0)
    for q0 in (0.3, 3.0):  # attracting from both sides
        assert theory.fixed_point_q("selu", sw2, sb2, q0=q0) == pytest.approx(1.0, rel=1e-9)


def test_linear_tails_diverge_to_inf_and_critical_lines():
    # selu at sw2 = 2: q grows by ~sw2 lambda^2 / 2 = 1.1 per layer, without bound
    assert theory.fixed_point_q("selu", 2.0, 0.0) == math.inf
    # elu has phi(0) = 0, phi'(0) = 1, |phi| <= |x|: ordered (q* = 0) up to sw2 = 1 without bias
    assert theory.fixed_point_q("elu", 0.9, 0.0) == 0.0
    assert theory.critical_sw2("elu", 0.0) == 1.0
    # selu's slope reaches 1.76: chaotic at sw2 = 0.5 without bias (critical_sw2's first bracket end)
    assert theory.chi1("selu", 0.5, 0.0) > 1.0
    sw2 = theory.critical_sw2("selu", 0.3)  # brentq's root, where the bracket's upper end has q* = inf
    assert theory.chi1("selu", sw2, 0.3) == pytest.approx(1.0, abs=1e-9)


def test_q_sequence():
    q = theory.q_sequence("relu", 1.0, 0.1, 2.0, depth=6)
    assert q.shape == (7,) and q[0] == 2.0
    for layer in range(1, 7):  # affine map q -> q/2 + 0.1, summed in closed form
        expected = 0.5**layer * 2.0 + 0.1 * (1 - 0.5**layer) / 0.5
        assert q[layer] == pytest.approx(expected, rel=1e-14), layer
    q = theory.q_sequence("tanh", 1.76, 0.05, 5.0, depth=40)
    assert q[-1] == pytest.approx(theory.fixed_point_q("tanh", 1.76, 0.05), rel=1e-6)


def test_predicted_delta_profile():
    profile = theory.predicted_delta_profile("relu", 1.0, 0.0, depth=5, q0=1.0)
    np.testing.assert_allclose(profile, math.sqrt(0.5) ** np.arange(4, -1, -1), rtol=1e-14)
    # Nielsen's sigmoid nets (weights N(0, 1/fan_in), biases N(0, 1)): REFERENCES.md reports
    # layer-to-layer ratios of about 0.2; the infinite-width prediction gives 0.20-0.21
    sw2, sb2 = theory.init_variances("nielsen", 30)
    profile = theory.predicted_delta_profile("sigmoid", sw2, sb2, depth=4, q0=1.0)
    assert profile[-1] == 1.0
    np.testing.assert_allclose(profile[1:] / profile[:-1], 1 / 0.2, rtol=0.1)


def test_depth_scale():
    assert theory.depth_scale(math.exp(-1 / 10)) == pytest.approx(10.0)
    assert theory.depth_scale(1.0) == math.inf
    assert theory.depth_scale(math.e) == pytest.approx(-1.0)  # growth: negative by convention
    np.testing.assert_allclose(theory.depth_scale([math.exp(-0.5), 1.0]), [2.0, math.inf])
    with pytest.raises(ValueError, match="chi"):
        theory.depth_scale(0.0)


def test_init_variances():
    assert theory.init_variances("normal", 100, scale=0.1) == pytest.approx((1.0, 0.01))
    assert theory.init_variances("normal", 100, scale=0.1, bias_scale=0.0) == pytest.approx((1.0, 0.0))
    assert theory.init_variances("nielsen", 30) == (1.0, 1.0)
    assert theory.init_variances("meanfield", 9, scale=1.5, bias_scale=0.2) == pytest.approx((2.25, 0.04))
    assert theory.init_variances("xavier", 64) == pytest.approx((1.0, 0.0))
    assert theory.init_variances("xavier", 100, fan_out=300) == pytest.approx((0.5, 0.0))
    assert theory.init_variances("he", 64) == (2.0, 0.0)
    assert theory.init_variances("torch_default", 50) == pytest.approx((1 / 3, 1 / 150))
    assert theory.init_variances("uniform", 6, scale=0.3) == pytest.approx((0.18, 0.03))
    assert theory.init_variances("orthogonal", 64, scale=2.0) == pytest.approx((4.0, 0.0))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_init_variances_match_bench_init_draws(scheme):
    from bench.init import init_params
    from bench.spec import NetSpec

    spec = NetSpec(n_in=200, n_out=50, widths=(1000,))  # fan_in < fan_out, then fan_in > fan_out
    params = init_params(spec, scheme, seeds=[0])
    for i in range(spec.n_layers):
        fan_in, fan_out = spec.fan(i)
        sw2, sb2 = theory.init_variances(scheme, fan_in, fan_out=fan_out)
        w, b = params[f"layers.{i}.weight"][0], params[f"layers.{i}.bias"][0]
        # mean of M squared zero-mean draws: relative sd sqrt(Var(w^2)) / E(w^2) / sqrt(M) <= sqrt(2 / M)
        # 5 sd of room for a fixed seed
        assert fan_in * np.mean(w * w) == pytest.approx(sw2, rel=5 * math.sqrt(2 / w.size)), (i, "W")
        assert np.mean(b * b) == pytest.approx(sb2, rel=5 * math.sqrt(2 / b.size)), (i, "b")


def test_torch_default_matches_nn_linear():
    torch = pytest.importorskip("torch")
    fan_in = 1000
    with torch.random.fork_rng():
        torch.manual_seed(0)
        layer = torch.nn.Linear(fan_in, 500, dtype=torch.float64)
    sw2, sb2 = theory.init_variances("torch_default", fan_in)
    # 5e5 weights: relative sd of the sample variance of a uniform is sqrt(0.8 / 5e5) ~ 1.3e-3
    assert layer.weight.var().item() * fan_in == pytest.approx(sw2, rel=0.01)
    # 500 biases: relative sd sqrt(0.8 / 500) = 0.04
    assert layer.bias.var().item() == pytest.approx(sb2, rel=0.2)


class _Act(Enum):  # what the config schema hands us: bench.config's Enums are plain Enums with str values
    TANH = "tanh"


def test_bad_names_list_valid_choices():
    for call in (lambda: theory.chi1("sigmod", 1.0, 0.0),
                 lambda: theory.length_map(1.0, "swish", 1.0, 0.0),
                 lambda: theory.critical_sw2("mish", 0.0)):
        with pytest.raises(ValueError) as err:
            call()
        assert all(name in str(err.value) for name in theory.COVERED)
    with pytest.raises(ValueError) as err:
        theory.init_variances("kaiming", 10)
    assert all(name in str(err.value) for name in SCHEMES)
    assert theory.chi1(_Act.TANH, 1.0, 0.1) == theory.chi1("tanh", 1.0, 0.1)


# --- Monte Carlo: wide random networks against the predictions ------------------------------

WIDTH = 1000  # finite-width fluctuations are O(1/sqrt(WIDTH)); mean-field corrections O(1/WIDTH)
DEPTH = 10  # hidden layers
BATCH = 32  # inputs per net, each with its own random delta at the top
NETS = 4  # independent nets per case: fluctuations average down as 1/sqrt(WIDTH * NETS)
N_EFF = WIDTH * NETS
# Per-layer relative sd, in units of 1/sqrt(WIDTH), measured over 12 seeds at widths 1000 and
# 2000 (same in both units, so the 1/sqrt(N) law holds and no O(1/N) bias is visible), all cases:
S_Q = 2.1  # q^l: all inputs share W, so the chi-square row-norm part (sd sqrt(2/N)) survives the batch
S_R = 1.0  # delta ratio: independent deltas per input average out much of it (measured <= 0.85)
Z = 5.0  # tolerance in standard deviations: a fixed seed, and room to change it

CASES = [  # (activation, sw2, sb2, q0)
    ("sigmoid", 1.0, 0.0, 1.0),  # strong vanishing: ratio <= 1/4
    ("sigmoid", 1.0, 1.0, 1.0),  # Nielsen's init
    ("tanh", 1.76, 0.05, 1.0),  # near the edge of chaos
    ("tanh", 1.0, 0.0, 4.0),  # q decays like 1/l: the finite-depth path, not q*, sets chi1
    ("tanh", 4.0, 0.1, 0.05),  # chaotic, q grows from a small start
    ("relu", 2.0, 0.0, 1.0),  # He: chi1 = 1, every q is a fixed point
    ("relu", 1.0, 0.1, 1.0),  # chi1 = 1/2
    ("softsign", 2.0, 0.1, 1.0),
    ("selu", 1.0, 0.0, 1.0),  # LeCun normal: the self-normalising fixed point q* = 1, chi1 ~ 1.07
    ("gelu", 2.0, 0.0, 1.0),  # He: q decays, chi1 -> 1/2
    ("silu", 2.0, 0.1, 1.0),
    ("elu", 1.5, 0.0, 1.0),
]


@cache
def _simulate(activation, sw2, sb2, q0, seed=0):
    """Measured q^l (l = 0..DEPTH) and sum of ||delta^l||^2 (l = 1..DEPTH) over NETS nets x BATCH inputs.

    One net's weights are kept for its backward pass: DEPTH * WIDTH^2 * 8 bytes = 80 MB at most.
    """
    act = theory.get_activation(activation)
    q_hat = np.zeros(DEPTH + 1)
    delta_sq = np.zeros(DEPTH + 1)  # index l; index 0 unused
    for net_seed in np.random.SeedSequence(seed).spawn(NETS):
        input_seed, bias_seed, top_seed, weight_seed = net_seed.spawn(4)
        rng = np.random.default_rng(weight_seed)
        # W[l] is W^l, (fan_out, fan_in), N(0, sw2 / fan_in); W[0] unused
        W = [None] + [rng.standard_normal((WIDTH, WIDTH)) * math.sqrt(sw2 / WIDTH) for _ in range(DEPTH)]
        # h^0 ~ N(0, q0) so that layer 1 sees phi(h^0), the theory's q^0 convention
        h = [np.random.default_rng(input_seed).standard_normal((BATCH, WIDTH)) * math.sqrt(q0)]
        biases = np.random.default_rng(bias_seed).standard_normal((DEPTH + 1, WIDTH)) * math.sqrt(sb2)
        for layer in range(1, DEPTH + 1):
            h.append(_phi(act, h[-1]) @ W[layer].T + biases[layer])  # (BATCH, WIDTH)
        q_hat += [np.mean(h_l * h_l) / NETS for h_l in h]
        # a random delta at the top, as if from an output layer, then
        # delta^l = phi'(h^l) * (W^(l+1)^T delta^(l+1)), written for row vectors
        delta = _dphi(act, h[DEPTH]) * np.random.default_rng(top_seed).standard_normal((BATCH, WIDTH))
        delta_sq[DEPTH] += np.sum(delta * delta)
        for layer in range(DEPTH - 1, 0, -1):
            delta = _dphi(act, h[layer]) * (delta @ W[layer + 1])
            delta_sq[layer] += np.sum(delta * delta)
    return q_hat, delta_sq


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_monte_carlo_length_map(case):
    activation, sw2, sb2, q0 = case
    q_hat, _ = _simulate(*case)
    q_path = theory.q_sequence(activation, sw2, sb2, q0, DEPTH)
    for layer in range(1, DEPTH + 1):
        # one step from the measured q^(l-1): only this layer's fluctuation, sd S_Q / sqrt(N_EFF)
        one_step = theory.length_map(q_hat[layer - 1], activation, sw2, sb2)
        tol = Z * S_Q / math.sqrt(N_EFF)
        assert abs(q_hat[layer] / one_step - 1) < tol, (layer, q_hat[layer], one_step, tol)
        # the whole path from q0: at worst (relu at sw2 = 2, where no q is preferred) the layers'
        # fluctuations add up as a random walk, hence sqrt(layer)
        tol = Z * S_Q * math.sqrt(layer / N_EFF)
        assert abs(q_hat[layer] / q_path[layer] - 1) < tol, (layer, q_hat[layer], q_path[layer], tol)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_monte_carlo_delta_ratios(case):
    activation, sw2, sb2, q0 = case
    _, delta_sq = _simulate(*case)
    q_path = theory.q_sequence(activation, sw2, sb2, q0, DEPTH)
    for layer in range(1, DEPTH):
        measured = math.sqrt(delta_sq[layer] / delta_sq[layer + 1])
        predicted = math.sqrt(theory.chi1(activation, sw2, sb2, q_path[layer]))
        tol = Z * S_R / math.sqrt(N_EFF)
        assert abs(measured / predicted - 1) < tol, (layer, measured, predicted, tol)
    # the profile is a product of per-layer ratios: log errors add, sd S_R sqrt(DEPTH - l) / sqrt(N_EFF)
    measured_profile = np.sqrt(delta_sq[1:] / delta_sq[DEPTH])
    profile = theory.predicted_delta_profile(activation, sw2, sb2, DEPTH, q0)
    for layer in range(1, DEPTH + 1):
        tol = Z * S_R * math.sqrt((DEPTH - layer) / N_EFF) + 1e-12
        log_err = math.log(measured_profile[layer - 1] / profile[layer - 1])
        assert abs(log_err) < tol, (layer, measured_profile[layer - 1], profile[layer - 1], tol)
