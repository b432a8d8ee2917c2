"""Mean-field predictions for signal propagation in wide random networks at initialisation.

What it is for: the infinite-width prediction (Poole et al. 2016; Schoenholz et al. 2017) that figures
overlay on the measured per-layer delta norms ||delta^l|| (Nielsen's "speed of learning").

Convention: h^l = W^l phi(h^(l-1)) + b^l,  W_ij ~ N(0, sw2 / fan_in),  b_i ~ N(0, sb2),  z ~ N(0, 1).

    length map    q^l = sw2 * E[phi(sqrt(q^(l-1)) z)^2] + sb2          iterated to its fixed point q*
    slope         chi1(q) = sw2 * E[phi'(sqrt(q) z)^2]                   (default q = q*)
    backprop      E||delta^l||^2 = chi1(q^l) E||delta^(l+1)||^2,  delta^l = dC/dh^l
    ratio         ||delta^l|| / ||delta^(l+1)|| -> sqrt(chi1)           < 1 vanishing, > 1 exploding
    depth scale   xi = -1 / ln chi1

q^0 is the variance of the h^0 that layer 1 reads through phi. A first layer that reads raw inputs x
(no phi) has q^1 = sw2 * mean_j(x_j^2) + sb2 instead: start the sequence there, one layer shorter.

What it is not for: finite width (fluctuations O(1/sqrt(width)), corrections O(1/width); for Nielsen's
30-unit layers this is a guide, not a fit), training dynamics (everything holds at initialisation only),
input correlations (no c-map / chi_c), ReLU weight-gradient norms (they can stay level while delta norms
shrink, see REFERENCES.md), non-Gaussian weights beyond their variance (uniform and orthogonal schemes
are mapped to the Gaussian of the same variance, which is what the wide-layer limit sees).
"""

from __future__ import annotations

import math
from collections import ChainMap
from collections.abc import Callable, Mapping
from functools import lru_cache

import numpy as np
from numpy.polynomial.legendre import leggauss
from scipy.optimize import brentq

from bench import activations
from bench.activations import ACTIVATIONS, LINEAR, Activation
from bench.init import init_variances  # noqa: F401  (the variances beside the draws they describe)

GL_NODES = 32  # Gauss-Legendre nodes per panel in gauss_expect: ~1e-14 relative for q up to 1e4
Z_MAX = 10.0  # integrate z over [-10, 10]: P(|z| > 10) = 1.5e-23, below float64 for bounded integrands
Q_DIVERGED = 1e30  # fixed_point_q: an iterate beyond this is growing without bound (relu-like tails): q* = inf
# Every activation a network can use, and the linear network; each entry's phi, phi' and closed-form
# constants come from bench.activations. At sw2 = 1 tanh/softsign iterates reach q* = 0 only like 1/l.
# A live view, not a copy: plug-ins registered later (bench.plugins) are covered too.
COVERED: Mapping[str, Activation] = ChainMap({LINEAR.name: LINEAR}, ACTIVATIONS)


def get_activation(activation) -> Activation:
    """Look up an activation by name (or a str-valued Enum from the config, or an Activation)."""
    return activations.get(activation, COVERED)


def _phi(act: Activation, x):
    return act.phi(x, np)


def _dphi(act: Activation, x):
    return act.dphi(x, act.phi(x, np), np)


def _check_nonneg(**values) -> None:
    for key, value in values.items():
        if not value >= 0.0:  # also rejects nan
            raise ValueError(f"{key} must be >= 0, got {value!r}")


@lru_cache(maxsize=8)
def _legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    return leggauss(n)


def _gauss_rule(q: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes z, weights w (Gaussian density folded in) on [-Z_MAX, Z_MAX], 2 n per panel pair.

    Panel edges 0, a, 2a, 4a, ..., Z_MAX on each side, a = min(1, 1/sqrt(q)) / 2: an edge at the kink,
    and panels no wider than their distance from 0, near which phi(sqrt(q) z) varies on the scale
    1/sqrt(q) and has its complex poles (tanh: i pi / (2 sqrt(q))); each panel then converges
    geometrically in n.
    """
    x, w = _legendre(n)
    first = 0.5 * min(1.0, 1.0 / math.sqrt(q)) if q > 0 else 0.5
    doublings = math.ceil(math.log2(Z_MAX / first))
    doubling = np.minimum(first * 2.0 ** np.arange(doublings + 1), Z_MAX)
    edges = np.unique(np.concatenate([[0.0], doubling]))  # 0, a, 2a, ..., Z_MAX
    lo, hi = edges[:-1, None], edges[1:, None]  # (panels, 1)
    z = 0.5 * (lo + hi) + 0.5 * (hi - lo) * x  # (panels, n), inside (0, Z_MAX)
    wz = 0.5 * (hi - lo) * w * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    z, wz = z.ravel(), wz.ravel()
    return np.concatenate([-z, z]), np.concatenate([wz, wz])


def gauss_expect(f: Callable[[np.ndarray], np.ndarray], q: float, n: int = GL_NODES) -> float:
    """E[f(sqrt(q) z)], z ~ N(0, 1), for a vectorised f; n = Gauss-Legendre nodes per panel.

    Composite Gauss-Legendre (_gauss_rule), not Gauss-Hermite: hermegauss nodes sit ~0.2 apart in z,
    too coarse for phi'(sqrt(q) z) once q > ~1. With 101 of them E[tanh'^2] is off by 3e-4 at q = 4 and
    2% at q = 10, and softsign's kink at 0 costs 1e-1 at q = 1; this rule agrees with adaptive
    quadrature to ~1e-15 for q from 1e-4 to 1e4 (384 to 800 evaluations of f).
    """
    if not 0.0 <= q < math.inf:
        raise ValueError(f"q must be finite and >= 0, got {q!r}")
    z, w = _gauss_rule(float(q), n)
    return float(w @ f(math.sqrt(q) * z))


def _mean_phi2(act: Activation, q: float) -> float:
    if act.homogeneous_c is not None:
        return act.homogeneous_c * q
    return gauss_expect(lambda x: _phi(act, x) ** 2, q)


def _mean_dphi2(act: Activation, q: float) -> float:
    if act.homogeneous_c is not None:
        return act.homogeneous_c
    return gauss_expect(lambda x: _dphi(act, x) ** 2, q)


def length_map(q: float, activation, sw2: float, sb2: float) -> float:
    """q^l from q^(l-1): sw2 * E[phi(sqrt(q) z)^2] + sb2."""
    _check_nonneg(q=q, sw2=sw2, sb2=sb2)
    return sw2 * _mean_phi2(get_activation(activation), q) + sb2


def fixed_point_q(activation, sw2: float, sb2: float, q0: float = 1.0, tol: float = 1e-12,
                  max_iter: int = 100_000) -> float:
    """q* reached by iterating the length map from q0, to relative change <= tol.

    relu / leaky_relu / linear have the affine map q -> k q + sb2 with k = sw2 c, solved exactly:
    k < 1 gives sb2 / (1 - k); k = 1 (to 1e-12; relu with sw2 = 2) keeps every q, so q0 is returned when
    sb2 = 0 and inf otherwise (q grows by sb2 per layer); k > 1 diverges geometrically: inf (0 when
    q0 = sb2 = 0, the unstable fixed point). The bounded activations always have a finite q*; the
    smooth ones with a linear tail (selu, elu, gelu, silu) return inf once an iterate passes Q_DIVERGED.
    Raises RuntimeError if max_iter is not enough (only near sw2 = 1 with tiny sb2 for tanh/softsign).
    """
    act = get_activation(activation)
    _check_nonneg(sw2=sw2, sb2=sb2, q0=q0)
    if act.homogeneous_c is not None:
        k = sw2 * act.homogeneous_c
        if math.isclose(k, 1.0, rel_tol=1e-12):
            return float(q0) if sb2 == 0 else math.inf
        if k < 1.0:
            return sb2 / (1.0 - k)
        return 0.0 if q0 == 0 and sb2 == 0 else math.inf
    if act.odd_unit_slope and sb2 == 0 and (sw2 <= 1.0 or q0 == 0):
        return 0.0
    q = float(q0)
    for _ in range(max_iter):
        q_next = length_map(q, act, sw2, sb2)
        if abs(q_next - q) <= tol * q_next or q_next == q:  # q_next == q covers q* = 0 (sw2 = sb2 = 0)
            return q_next
        if q_next > Q_DIVERGED:
            return math.inf
        q = q_next
    raise RuntimeError(f"length map of {act.name} at sw2={sw2}, sb2={sb2}: "
                       f"no fixed point within {max_iter} steps")


def input_q(sw2: float, sb2: float, mean_x2: float) -> float:
    """q^1 of a first layer that reads raw inputs x (no phi): sw2 * mean_j(x_j^2) + sb2."""
    _check_nonneg(sw2=sw2, sb2=sb2, mean_x2=mean_x2)
    return sw2 * mean_x2 + sb2


def q_sequence(activation, sw2: float, sb2: float, q0: float, depth: int) -> np.ndarray:
    """q^l for l = 0..depth, shape (depth + 1,); q^0 = q0. At finite depth this is not q* yet."""
    act = get_activation(activation)
    q = np.empty(depth + 1)
    q[0] = q0
    for layer in range(1, depth + 1):
        q[layer] = length_map(q[layer - 1], act, sw2, sb2)
    return q


def chi1(activation, sw2: float, sb2: float, q: float | None = None) -> float:
    """sw2 * E[phi'(sqrt(q) z)^2]; q defaults to q* (from q0 = 1). Exact for relu/leaky_relu/linear."""
    act = get_activation(activation)
    _check_nonneg(sw2=sw2, sb2=sb2)
    if q is None:
        q = fixed_point_q(act, sw2, sb2)
    return sw2 * _mean_dphi2(act, q)


def delta_ratio(activation, sw2: float, sb2: float, q: float | None = None) -> float:
    """Predicted ||delta^l|| / ||delta^(l+1)|| = sqrt(chi1) at q (default q*)."""
    return math.sqrt(chi1(activation, sw2, sb2, q))


def depth_scale(chi):
    """xi = -1 / ln chi: layers over which the delta norm^2 changes by e.

    Convention: inf at chi = 1; negative for chi > 1, where |xi| is the e-folding length of growth.
    """
    chi = np.asarray(chi, dtype=np.float64)
    if np.any(~(chi > 0)):
        raise ValueError(f"chi must be > 0, got {chi!r}")
    with np.errstate(divide="ignore"):  # log(1) = 0 is replaced by inf just below
        xi = np.where(chi == 1.0, np.inf, -1.0 / np.log(chi))
    return float(xi) if xi.ndim == 0 else xi


def predicted_delta_profile(activation, sw2: float, sb2: float, depth: int, q0: float) -> np.ndarray:
    """Predicted ||delta^l|| for hidden layers l = 1..depth, shape (depth,), index 0 next to the input.

    Normalised to 1 at l = depth: prod_{k=l}^{depth-1} sqrt(chi1(q^k)) along the finite-depth q path
    from q0 (see the module docstring for q0 when layer 1 reads raw inputs).
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth!r}")
    act = get_activation(activation)
    q = q_sequence(act, sw2, sb2, q0, depth)
    # ||delta^l|| / ||delta^(l+1)|| uses phi' at layer l, hence q^l, for l = 1..depth-1
    ratios = np.sqrt([chi1(act, sw2, sb2, q[layer]) for layer in range(1, depth)])
    profile = np.ones(depth)
    profile[:-1] = np.cumprod(ratios[::-1])[::-1]
    return profile


def critical_sw2(activation, sb2: float, sw2_max: float = 1e4) -> float:
    """The sw2 with chi1(q*) = 1 at this sb2 (edge of chaos), e.g. tanh at sb2 = 0.05: ~1.76.

    Exact for relu/leaky_relu/linear (1 / c, q-independent) and for tanh/softsign at sb2 = 0 (1: the
    transition happens at q* = 0, where chi1 = sw2 phi'(0)^2). Otherwise brentq on chi1(q*(sw2)) - 1,
    with q* = inf counted as chaotic. gelu, silu and elu with bias: near sw2 = 2 (their relu-like tails'
    critical point) the length map creeps, and fixed_point_q may raise RuntimeError on the way.
    """
    act = get_activation(activation)
    _check_nonneg(sb2=sb2)
    if act.homogeneous_c is not None:
        return 1.0 / act.homogeneous_c
    if act.odd_unit_slope and sb2 == 0:
        return 1.0

    def excess(sw2: float) -> float:
        q = fixed_point_q(act, sw2, sb2)
        # q* = inf (a linear tail, sw2 large): the signal grows without bound, the chaotic side
        return 1.0 if q == math.inf else chi1(act, sw2, sb2, q) - 1.0

    lo, hi = 0.5, 2.0  # phi'^2 <= 1 for the bounded activations, so chi1(0.5) <= 0.5: excess(lo) < 0
    while excess(lo) >= 0.0:  # steeper ones (selu: phi' up to 1.76) can be chaotic at 0.5 already
        lo /= 2.0
        if lo < 1e-6:
            raise RuntimeError(f"no sw2 >= 1e-6 gives chi1(q*) < 1 for {act.name} at sb2={sb2}")
    while excess(hi) <= 0.0:
        hi *= 2.0
        if hi > sw2_max:
            raise RuntimeError(f"no sw2 <= {sw2_max} gives chi1(q*) = 1 for {act.name} at sb2={sb2}")
    return brentq(excess, lo, hi, xtol=1e-10)


# ---- correlations between two inputs: the trainability depth scale of Schoenholz et al. 2017 --------
def _gauss_expect2(f: Callable[[np.ndarray, np.ndarray], np.ndarray], q: float, c: float,
                   n: int = 16) -> float:
    """E[f(u1, u2)] with u1 = sqrt(q) z1, u2 = sqrt(q) (c z1 + sqrt(1 - c^2) z2), z1, z2 ~ N(0, 1) iid.

    A tensor product of gauss_expect's composite rule (n nodes per panel): ~1e-10 relative for the
    bounded activations at the q and c the trainability grid needs (checked against n = 32 in tests).
    """
    z, w = _gauss_rule(float(q), n)
    z1, z2 = z[:, None], z[None, :]
    s = math.sqrt(q)
    u1, u2 = s * z1, s * (c * z1 + math.sqrt(max(0.0, 1.0 - c * c)) * z2)
    return float(np.einsum("i,j,ij->", w, w, f(u1, u2)))


def correlation_map(c: float, activation, sw2: float, sb2: float, q: float | None = None) -> float:
    """c^l from c^(l-1) for two inputs both at length q (default q*): (sw2 E[phi(u1) phi(u2)] + sb2) / q."""
    act = get_activation(activation)
    if q is None:
        q = fixed_point_q(act, sw2, sb2)
    return (sw2 * _gauss_expect2(lambda a, b: _phi(act, a) * _phi(act, b), q, c) + sb2) / q


def fixed_point_c(activation, sw2: float, sb2: float) -> float:
    """c*, the stable fixed point of the correlation map at q*.

    Ordered phase (chi1 <= 1): c* = 1, every pair of inputs ends up at the same point. Chaotic phase
    (chi1 > 1): c = 1 is unstable and c* < 1 is the root of map(c) - c on [0, 1): positive at 0 (map(0) >=
    sb2 / q* >= 0) and negative just below 1 (slope chi1 > 1 there). Found by brentq, not by iterating the
    map, which needs ~1 / (chi1 - 1) steps near the critical line. Returns 1.0 when chi1 is so close to 1
    that no bracket down to 1 - 1e-9 is found (the two fixed points have merged to within that).
    """
    act = get_activation(activation)
    q = fixed_point_q(act, sw2, sb2)
    if q == 0.0 or chi1(act, sw2, sb2, q) <= 1.0:
        return 1.0

    def excess(c: float) -> float:
        return correlation_map(c, act, sw2, sb2, q) - c

    lo = 0.0
    if excess(lo) <= 0.0:  # map(0) = 0 (sb2 = 0, odd phi): 0 is a fixed point; search above it
        lo = 1e-6
    for eps in 10.0 ** -np.arange(1, 10):
        if excess(1.0 - eps) < 0.0:
            return brentq(excess, lo, 1.0 - eps, xtol=1e-13)
    return 1.0


def chi_c(activation, sw2: float, sb2: float) -> float:
    """Slope of the correlation map at c*: sw2 E[phi'(u1) phi'(u2)] at (q*, c*). Equals chi1 where c* = 1."""
    act = get_activation(activation)
    q = fixed_point_q(act, sw2, sb2)
    c = fixed_point_c(act, sw2, sb2)
    if c == 1.0:
        return chi1(act, sw2, sb2, q)
    return sw2 * _gauss_expect2(lambda a, b: _dphi(act, a) * _dphi(act, b), q, c)


def correlation_depth_scale(activation, sw2: float, sb2: float) -> float:
    """xi_c = -1 / ln chi_c: the layers over which two inputs' correlation forgets its start.

    Schoenholz et al. 2017 (eq. 9, fig. 5-6): random nets train only to depths of about 6 xi_c; xi_c
    diverges at the critical line (tanh, sb2 = 0.05: sw2 ~ 1.76) and is finite on both sides of it.
    In the ordered phase xi_c equals the gradient depth scale -1/ln chi1.
    """
    return float(depth_scale(chi_c(activation, sw2, sb2)))


# ---- batch norm: gradient explosion at initialisation (Yang et al. 2019) --------------------------
def bn_delta_ratio(activation) -> float:
    """Large-batch, large-width ||delta^l|| / ||delta^(l+1)|| in a plain Linear-BN-phi net (gamma = 1, beta = 0).

    Derivation (gradient independence, batch B -> inf, width -> inf): batch norm makes every unit's
    pre-activation x_hat ~ N(0, 1) over the batch whatever the weights. Backward through layer l+1's weights
    multiplies E||.||^2 by sw2 E[phi'(x_hat)^2]; through layer l's batch norm by 1 / Var_batch(z^l), and
    Var_batch(z^l) = sw2 Var(phi(x_hat)) (its projection of the batch mean and of x_hat costs O(1/B)). So

        ratio^2 = E[phi'(x)^2] / Var(phi(x)),  x ~ N(0, 1):  sw2 cancels, no init removes it.

    ReLU: (1/2) / (1/2 - 1/(2 pi)) = pi / (pi - 1) ~ 1.467, ratio ~ 1.2113 (Yang et al.'s large-batch rate).
    tanh ~ 1.085; sigmoid ~ 1.02. Finite batches: `bn_delta_ratio_mc`.
    """
    act = get_activation(activation)
    mean = gauss_expect(lambda x: _phi(act, x), 1.0)
    var = gauss_expect(lambda x: _phi(act, x) ** 2, 1.0) - mean * mean
    return math.sqrt(gauss_expect(lambda x: _dphi(act, x) ** 2, 1.0) / var)


def bn_delta_ratio_mc(activation, batch_size: int, width: int = 256, depth: int = 24, nets: int = 4,
                      seed: int = 0, skip: int = 6) -> tuple[float, float]:
    """Monte-Carlo of the finite-batch rate: (geometric-mean ratio, its standard error over nets).

    `nets` random Linear-BN-phi nets (W ~ N(0, 1/width), gamma = 1, beta = 0, batch statistics, eps = 0)
    fed a batch of N(0, 1) inputs; a N(0, 1) gradient enters at the top and is carried down by the exact
    batch-norm backward. The ratio is exp(mean log(||delta^l|| / ||delta^(l+1)||)) over the layers at
    least `skip` away from both ends (the top ones still carry the random start, the bottom ones
    the input's own statistics). This is the same model as the benchmark's networks, written again here
    so that a test can pin bn_delta_ratio's large-batch limit and the report can show the batch-size trend;
    it is not a closed form. Cost ~ nets * depth * batch * width^2.
    """
    act = get_activation(activation)
    if depth <= 2 * skip + 1:
        raise ValueError(f"depth={depth} must exceed 2 * skip + 1 = {2 * skip + 1}")
    rng = np.random.default_rng(seed)
    B = batch_size
    rates = []
    for _ in range(nets):
        Ws = [rng.standard_normal((width, width)) / math.sqrt(width) for _ in range(depth)]
        a = rng.standard_normal((B, width))
        cache = []
        for W in Ws:  # forward: z = a W, x_hat = BN(z), a = phi(x_hat)
            z = a @ W
            inv_std = 1.0 / z.std(0, keepdims=True)
            x_hat = (z - z.mean(0, keepdims=True)) * inv_std
            a = _phi(act, x_hat)
            cache.append((x_hat, inv_std))
        g = rng.standard_normal((B, width))  # dLoss/da at the top
        norms = []
        for W, (x_hat, inv_std) in zip(Ws[::-1], cache[::-1]):
            dn = g * _dphi(act, x_hat)
            dz = inv_std * (dn - dn.mean(0, keepdims=True) - x_hat * (dn * x_hat).mean(0, keepdims=True))
            norms.append(np.linalg.norm(dz))
            g = dz @ W.T
        logs = np.diff(np.log(norms[::-1]))  # log(||delta^(l+1)|| / ||delta^l||), input side first
        rates.append(-logs[skip:-skip].mean())
    rates = np.asarray(rates)
    return float(np.exp(rates.mean())), float(np.exp(rates.mean()) * rates.std(ddof=1) / math.sqrt(nets))
