"""Initial weights: the one place they are drawn, as NumPy arrays with a leading ensemble axis.

Member k of an ensemble is drawn from its own generator `np.random.default_rng(seeds[k])`, parameter
by parameter in `NetSpec.params()` order, so member k equals the solo run with that seed by
construction. Both backends are built from these arrays.

Schemes (W: weights (fan_in, fan_out); b: biases; `scale` and `bias_scale` override the defaults):
  uniform        W, b ~ U(-r, r), r = scale (default 0.3, the 1986 paper's symmetry net)
  normal         W, b ~ N(0, s^2), s = scale (default 1: the N(0, 1) of Nielsen's text)
  nielsen        W ~ N(0, 1/fan_in), b ~ N(0, 1) (Nielsen's code, network2.py default_weight_initializer)
  xavier         W ~ U(+-g sqrt(6/(fan_in+fan_out))), b = 0 (Glorot & Bengio's normalised init), g = scale
  he             W ~ N(0, g^2 2/fan_in), b = 0, g = scale (default 1)
  torch_default  W, b ~ U(+-1/sqrt(fan_in)) (nn.Linear's reset_parameters), times scale for W
  orthogonal     W = g Q with Q orthogonal (QR of a Gaussian, signs fixed), b = 0, g = scale
  meanfield      W ~ N(0, sigma_w^2/fan_in), b ~ N(0, sigma_b^2), sigma_w = scale (1), sigma_b = bias_scale (0)
Batch norm's gamma starts at 1 and beta at 0 in every scheme. In a block-diagonal first layer the
fan_in of a unit is the size of the input block that feeds it, and weights outside the blocks are 0.

The registry INITS {name: Init} holds every scheme a run can name: the built-ins above, and plug-ins
(`model.init=pkg.module:fn`, bench.plugins) registered under their full string once loaded and checked.
An Init's `draw(rng, shape, fan_in, fan_out, is_bias, scale, bias_scale)` returns one parameter of one
member; its `variances(fan_in, fan_out, scale, bias_scale)` returns (sw2, sb2) for the mean-field theory,
or is None where the scheme does not say (no prediction then).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bench.spec import NetSpec

UNIFORM_RANGE = 0.3  # uniform's default r: the 1986 paper's symmetry net
NORMAL_STD = 1.0  # normal's default s: the N(0, 1) of Nielsen's text


@dataclass(frozen=True)
class Init:
    name: str
    draw: Callable  # draw(rng, shape, fan_in, fan_out, is_bias, scale, bias_scale) -> ndarray of `shape`
    variances: Callable | None = None  # variances(fan_in, fan_out, scale, bias_scale) -> (sw2, sb2), or None


def _orthogonal(rng: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
    a = rng.standard_normal((max(fan_in, fan_out), min(fan_in, fan_out)))
    q, r = np.linalg.qr(a)
    q = q * np.sign(np.diag(r))  # make the distribution uniform (Haar), as torch.nn.init.orthogonal_
    return q if fan_in >= fan_out else q.T


def _draw(rng, scheme, shape, fan_in, fan_out, is_bias, scale, bias_scale):
    """One parameter of one member. `fan_in` may be an array (per column) for block layers."""
    if scheme == "uniform":
        r = bias_scale if (is_bias and bias_scale is not None) else (UNIFORM_RANGE if scale is None else scale)
        return rng.uniform(-r, r, shape)
    if scheme == "normal":
        s = bias_scale if (is_bias and bias_scale is not None) else (NORMAL_STD if scale is None else scale)
        return rng.normal(0.0, s, shape)
    g = 1.0 if scale is None else scale
    if scheme == "nielsen":
        return rng.normal(0.0, 1.0 if bias_scale is None else bias_scale, shape) if is_bias \
            else rng.standard_normal(shape) * g / np.sqrt(fan_in)
    if scheme == "meanfield":
        return rng.normal(0.0, 1.0, shape) * (bias_scale or 0.0) if is_bias \
            else rng.standard_normal(shape) * g / np.sqrt(fan_in)
    if scheme == "torch_default":
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-1.0, 1.0, shape) * bound * (1.0 if is_bias else g)
    if is_bias:  # xavier, he, orthogonal: zero biases (still no draw, so the stream stays simple)
        return np.zeros(shape) if bias_scale is None else rng.normal(0.0, bias_scale, shape)
    if scheme == "xavier":
        return rng.uniform(-1.0, 1.0, shape) * g * np.sqrt(6.0 / (fan_in + fan_out))
    if scheme == "he":
        return rng.standard_normal(shape) * g * np.sqrt(2.0 / fan_in)
    if scheme == "orthogonal":
        return g * _orthogonal(rng, *shape)
    raise ValueError(f"model.init={scheme!r}; valid choices: {', '.join(SCHEMES)}")


def _builtin(name: str) -> Init:
    return Init(name, lambda rng, shape, fan_in, fan_out, is_bias, scale, bias_scale:
                _draw(rng, name, shape, fan_in, fan_out, is_bias, scale, bias_scale),
                lambda fan_in, fan_out, scale, bias_scale: _variances(name, fan_in, fan_out, scale, bias_scale))


INITS: dict[str, Init] = {name: _builtin(name) for name in (
    "uniform", "normal", "nielsen", "xavier", "he", "torch_default", "orthogonal", "meanfield")}
SCHEMES = tuple(INITS)  # the built-in schemes (plug-ins join INITS, not this tuple)


def get(scheme) -> Init:
    """The entry for `scheme` (a name, a str-valued Enum or an Init); ValueError naming the choices."""
    if isinstance(scheme, Init):
        return scheme
    name = getattr(scheme, "value", scheme)
    try:
        return INITS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown init scheme {scheme!r}; valid choices: {', '.join(SCHEMES)}") from None


def init_variances(scheme, fan_in: int, scale: float | None = None, bias_scale: float | None = None,
                   fan_out: int | None = None) -> tuple[float, float]:
    """(sw2, sb2) = (fan_in Var(W_ij), Var(b_i)) of a layer drawn by `_draw` with these arguments:
    what the mean-field theory (bench.theory) sees of a scheme.

    scheme         draws (g = scale, default 1)                    sw2                         sb2
    uniform        W, b ~ U(+-r), r = scale (0.3)                  r^2 fan_in / 3              r_b^2 / 3
    normal         W, b ~ N(0, s^2), s = scale (1)                 s^2 fan_in                  s_b^2
    nielsen        W ~ N(0, g^2/fan_in), b ~ N(0, s_b^2), s_b=1    g^2                         s_b^2
    meanfield      W ~ N(0, g^2/fan_in), b ~ N(0, s_b^2), s_b=0    g^2                         s_b^2
    xavier         W ~ U(+-g sqrt(6/(fan_in+fan_out)))             2 g^2 fan_in/(fan_in+fan_out)
    he             W ~ N(0, 2 g^2/fan_in)                          2 g^2
    orthogonal     W = g Q, Q with orthonormal rows or columns     g^2 fan_in/max(fan_in,fan_out)
    torch_default  W ~ g U(+-1/sqrt(fan_in)), b ~ U(same bound)    g^2 / 3                     1/(3fan_in)

    bias_scale sets r_b (uniform) or s_b, defaulting to r and s; xavier, he and orthogonal have b = 0 or
    N(0, bias_scale^2); torch_default ignores bias_scale, as `_draw` does. fan_out defaults to fan_in.
    """
    entry = get(scheme)
    if entry.variances is None:
        raise ValueError(f"init {entry.name!r} has no variances(fan_in, fan_out, scale, bias_scale): "
                         f"no mean-field prediction for it")
    if not fan_in >= 1:
        raise ValueError(f"fan_in must be >= 1, got {fan_in!r}")
    return entry.variances(fan_in, fan_in if fan_out is None else fan_out, scale, bias_scale)


def _variances(name: str, fan_in, fan_out, scale, bias_scale) -> tuple[float, float]:
    """init_variances of a built-in scheme (its table)."""
    g2 = 1.0 if scale is None else scale**2

    def bias_var(default_std: float) -> float:
        return (default_std if bias_scale is None else bias_scale) ** 2

    if name == "uniform":  # Var U(+-r) = r^2 / 3
        r = UNIFORM_RANGE if scale is None else scale
        return r * r * fan_in / 3.0, bias_var(r) / 3.0
    if name == "normal":
        s = NORMAL_STD if scale is None else scale
        return s * s * fan_in, bias_var(s)
    if name == "nielsen":
        return g2, bias_var(1.0)
    if name == "meanfield":
        return g2, bias_var(0.0)
    if name == "xavier":
        return 2.0 * g2 * fan_in / (fan_in + fan_out), bias_var(0.0)
    if name == "he":
        return 2.0 * g2, bias_var(0.0)
    if name == "orthogonal":  # unit-norm columns (fan_in >= fan_out) or rows: Var = 1/max(fan_in, fan_out)
        return g2 * fan_in / max(fan_in, fan_out), bias_var(0.0)
    return g2 / 3.0, 1.0 / (3.0 * fan_in)  # torch_default: nn.Linear's U(+-1/sqrt(fan_in))


def init_params(spec: NetSpec, scheme: str, seeds, scale: float | None = None,
                bias_scale: float | None = None, dtype: str = "float64") -> dict[str, np.ndarray]:
    """Initial parameters {name: (E, *shape)} for members with the given seeds (E = len(seeds))."""
    name = getattr(scheme, "value", scheme)
    if name not in INITS:
        raise ValueError(f"model.init={scheme!r}; valid choices: {', '.join(SCHEMES)}")
    draw = INITS[name].draw
    spec.check()
    mask = spec.first_layer_mask()
    members = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        arrays = {}
        for name, kind, layer, shape in spec.params():
            fan_in, fan_out = spec.fan(layer - 1) if kind != "direct" else (spec.n_in, spec.n_out)
            if kind == "gamma":
                arrays[name] = np.ones(shape)
            elif kind == "beta":
                arrays[name] = np.zeros(shape)
            else:
                if layer == 1 and mask is not None:  # each unit's fan_in is its own input block
                    fan_in = mask.sum(0, keepdims=True)
                is_bias = kind == "bias"
                value = draw(rng, shape, fan_in, fan_out, is_bias, scale, bias_scale)
                arrays[name] = value * mask if (layer == 1 and mask is not None and not is_bias) else value
        members.append(arrays)
    return {name: np.stack([m[name] for m in members]).astype(dtype) for name in members[0]}
