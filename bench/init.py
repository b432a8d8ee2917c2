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
  lecun          W ~ N(0, g^2/fan_in), b = 0, g = scale (LeCun normal: SELU's self-normalising init)
Each scheme is one `Init` entry in INITS: its draw and the variances the mean-field theory sees of it,
side by side; the config's choices are INITS' keys. Normalisation's gamma starts at 1, beta at 0 and a
rezero branch scale alpha at 0 in every scheme, drawing nothing (CONSTANT_KINDS). In a block-diagonal
first layer the fan_in of a unit is the size of the input block that feeds it, and weights outside the
blocks are 0. Plug-ins (`model.init=pkg.module:fn`, bench.plugins) are registered in INITS under their
full string once loaded and checked; a plug-in without `variances` gets no mean-field prediction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bench.spec import NetSpec

UNIFORM_RANGE = 0.3  # uniform's default r: the 1986 paper's symmetry net
NORMAL_STD = 1.0  # normal's default s: the N(0, 1) of Nielsen's text
CONSTANT_KINDS = {"gamma": 1.0, "beta": 0.0, "alpha": 0.0}  # parameters that start at a value, drawn nothing


@dataclass(frozen=True)
class Init:
    """One initialisation scheme. `draw` makes one parameter of one member from that member's generator
    (`fan_in` may be an array, per column, in a block-diagonal first layer); `variances` says what
    the mean-field theory sees: (sw2, sb2) = (fan_in Var(W_ij), Var(b_i)), or None where it has no
    Gaussian description."""

    name: str
    draw: Callable  # draw(rng, shape, fan_in, fan_out, is_bias, scale, bias_scale) -> ndarray
    variances: Callable | None  # variances(fan_in, fan_out, scale, bias_scale) -> (sw2, sb2) | None


def _gain(scale) -> float:  # g: the gain of the fan-scaled schemes, default 1
    return 1.0 if scale is None else scale


def _bias_var(bias_scale, default_std: float) -> float:
    return (default_std if bias_scale is None else bias_scale) ** 2


def _fan_normal(rng, shape, fan_in, g):  # N(0, g^2 / fan_in)
    return rng.standard_normal(shape) * g / np.sqrt(fan_in)


def _orthogonal(rng: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
    a = rng.standard_normal((max(fan_in, fan_out), min(fan_in, fan_out)))
    q, r = np.linalg.qr(a)
    q = q * np.sign(np.diag(r))  # make the distribution uniform (Haar), as torch.nn.init.orthogonal_
    return q if fan_in >= fan_out else q.T


def _draw_uniform(rng, shape, fan_in, fan_out, is_bias, scale, bias_scale):  # W, b ~ U(+-r)
    r = bias_scale if (is_bias and bias_scale is not None) else (UNIFORM_RANGE if scale is None else scale)
    return rng.uniform(-r, r, shape)


def _var_uniform(fan_in, fan_out, scale, bias_scale):  # Var U(+-r) = r^2 / 3
    r = UNIFORM_RANGE if scale is None else scale
    return r * r * fan_in / 3.0, _bias_var(bias_scale, r) / 3.0


def _draw_normal(rng, shape, fan_in, fan_out, is_bias, scale, bias_scale):  # W, b ~ N(0, s^2)
    s = bias_scale if (is_bias and bias_scale is not None) else (NORMAL_STD if scale is None else scale)
    return rng.normal(0.0, s, shape)


def _var_normal(fan_in, fan_out, scale, bias_scale):
    s = NORMAL_STD if scale is None else scale
    return s * s * fan_in, _bias_var(bias_scale, s)


def _draw_nielsen(rng, shape, fan_in, fan_out, is_bias, scale, bias_scale):  # W ~ N(0, g^2/fan_in), b ~ N(0, 1)
    if is_bias:
        return rng.normal(0.0, 1.0 if bias_scale is None else bias_scale, shape)
    return _fan_normal(rng, shape, fan_in, _gain(scale))


def _draw_meanfield(rng, shape, fan_in, fan_out, is_bias, scale, bias_scale):  # b ~ N(0, sigma_b^2), sigma_b 0
    if is_bias:  # drawn even when sigma_b = 0: the stream (hence every recorded run) depends on it
        return rng.normal(0.0, 1.0, shape) * (bias_scale or 0.0)
    return _fan_normal(rng, shape, fan_in, _gain(scale))


def _draw_torch_default(rng, shape, fan_in, fan_out, is_bias, scale, bias_scale):  # U(+-1/sqrt(fan_in))
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-1.0, 1.0, shape) * bound * (1.0 if is_bias else _gain(scale))


def _zero_bias(weights: Callable, sw2: Callable) -> tuple[Callable, Callable]:
    """(draw, variances) of a scheme that draws weights by `weights(rng, shape, fan_in, fan_out, g)`
    and has zero biases, or N(0, bias_scale^2) ones where bias_scale is given (a bias of 0 draws
    nothing from the generator). sw2(fan_in, fan_out, g^2) is fan_in Var(W_ij)."""
    def draw(rng, shape, fan_in, fan_out, is_bias, scale, bias_scale):
        if is_bias:
            return np.zeros(shape) if bias_scale is None else rng.normal(0.0, bias_scale, shape)
        return weights(rng, shape, fan_in, fan_out, _gain(scale))

    def variances(fan_in, fan_out, scale, bias_scale):
        return sw2(fan_in, fan_out, _gain(scale) ** 2), _bias_var(bias_scale, 0.0)
    return draw, variances


# scheme         draws (g = scale, default 1)                    sw2 = fan_in Var(W_ij)      sb2 = Var(b_i)
# uniform        W, b ~ U(+-r), r = scale (0.3)                  r^2 fan_in / 3              r_b^2 / 3
# normal         W, b ~ N(0, s^2), s = scale (1)                 s^2 fan_in                  s_b^2
# nielsen        W ~ N(0, g^2/fan_in), b ~ N(0, s_b^2), s_b=1    g^2                         s_b^2
# meanfield      W ~ N(0, g^2/fan_in), b ~ N(0, s_b^2), s_b=0    g^2                         s_b^2
# torch_default  W ~ g U(+-1/sqrt(fan_in)), b ~ U(same bound)    g^2 / 3                     1/(3fan_in)
# xavier         W ~ U(+-g sqrt(6/(fan_in+fan_out)))             2 g^2 fan_in/(fan_in+fan_out)
# he             W ~ N(0, 2 g^2/fan_in)                          2 g^2
# orthogonal     W = g Q, Q with orthonormal rows or columns     g^2 fan_in/max(fan_in,fan_out)
# lecun          W ~ N(0, g^2/fan_in)                            g^2
# bias_scale sets r_b (uniform) or s_b, defaulting to r and s; xavier, he, orthogonal and lecun have b = 0
# or N(0, bias_scale^2); torch_default ignores bias_scale. The order is the config's list of choices.
INITS: dict[str, Init] = {i.name: i for i in (
    Init("uniform", _draw_uniform, _var_uniform),
    Init("normal", _draw_normal, _var_normal),
    Init("nielsen", _draw_nielsen,
         lambda fan_in, fan_out, scale, bias_scale: (_gain(scale) ** 2, _bias_var(bias_scale, 1.0))),
    Init("xavier", *_zero_bias(lambda rng, shape, fan_in, fan_out, g:
                               rng.uniform(-1.0, 1.0, shape) * g * np.sqrt(6.0 / (fan_in + fan_out)),
                               lambda fan_in, fan_out, g2: 2.0 * g2 * fan_in / (fan_in + fan_out))),
    Init("he", *_zero_bias(lambda rng, shape, fan_in, fan_out, g:
                           rng.standard_normal(shape) * g * np.sqrt(2.0 / fan_in),
                           lambda fan_in, fan_out, g2: 2.0 * g2)),
    Init("torch_default", _draw_torch_default,
         lambda fan_in, fan_out, scale, bias_scale: (_gain(scale) ** 2 / 3.0, 1.0 / (3.0 * fan_in))),
    # unit-norm columns (fan_in >= fan_out) or rows: Var(W_ij) = 1 / max(fan_in, fan_out)
    Init("orthogonal", *_zero_bias(lambda rng, shape, fan_in, fan_out, g: g * _orthogonal(rng, *shape),
                                   lambda fan_in, fan_out, g2: g2 * fan_in / max(fan_in, fan_out))),
    Init("meanfield", _draw_meanfield,
         lambda fan_in, fan_out, scale, bias_scale: (_gain(scale) ** 2, _bias_var(bias_scale, 0.0))),
    Init("lecun", *_zero_bias(lambda rng, shape, fan_in, fan_out, g: _fan_normal(rng, shape, fan_in, g),
                              lambda fan_in, fan_out, g2: g2)),
)}
SCHEMES = tuple(INITS)  # the built-in schemes' names, in the config's order


def get(scheme) -> Init:
    """The entry for `scheme` (a name, a str-valued Enum from the config, or an Init); ValueError naming
    the valid choices."""
    if isinstance(scheme, Init):
        return scheme
    name = getattr(scheme, "value", scheme)
    try:
        return INITS[name]
    except (KeyError, TypeError):
        raise ValueError(f"model.init={name!r}: unknown init scheme; valid choices: {', '.join(INITS)}") from None


def init_variances(scheme, fan_in: int, scale: float | None = None, bias_scale: float | None = None,
                   fan_out: int | None = None) -> tuple[float, float]:
    """(sw2, sb2) = (fan_in Var(W_ij), Var(b_i)) of a layer drawn by the scheme with these arguments
    (the table above INITS): what the mean-field theory (bench.theory) sees of it. fan_out defaults
    to fan_in. ValueError for a scheme without a Gaussian description."""
    init = get(scheme)
    if not fan_in >= 1:
        raise ValueError(f"fan_in must be >= 1, got {fan_in!r}")
    if init.variances is None:
        raise ValueError(f"init {init.name!r} gives no mean-field variances (sw2, sb2)")
    return init.variances(fan_in, fan_in if fan_out is None else fan_out, scale, bias_scale)


def init_params(spec: NetSpec, scheme: str, seeds, scale: float | None = None,
                bias_scale: float | None = None, dtype: str = "float64") -> dict[str, np.ndarray]:
    """Initial parameters {name: (E, *shape)} for members with the given seeds (E = len(seeds))."""
    init = get(scheme)
    spec.check()
    mask = spec.first_layer_mask()
    members = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        arrays = {}
        for name, kind, layer, shape in spec.params():
            fan_in, fan_out = spec.fan(layer - 1) if kind != "direct" else (spec.n_in, spec.n_out)
            if kind in CONSTANT_KINDS:
                arrays[name] = np.full(shape, CONSTANT_KINDS[kind])
            else:
                if layer == 1 and mask is not None:  # each unit's fan_in is its own input block
                    fan_in = mask.sum(0, keepdims=True)
                is_bias = kind == "bias"
                value = init.draw(rng, shape, fan_in, fan_out, is_bias, scale, bias_scale)
                arrays[name] = value * mask if (layer == 1 and mask is not None and not is_bias) else value
        members.append(arrays)
    return {name: np.stack([m[name] for m in members]).astype(dtype) for name in members[0]}
