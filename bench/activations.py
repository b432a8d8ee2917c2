"""Non-linearities: one entry per activation holds everything the code needs to know about it.

An entry is an object with `phi(z, xp)`, `dphi(z, h, xp)` and `dphi_max`, where `xp` is the array
module (`numpy` or `torch`), so one definition serves both networks:

  NumPy network   h = phi(n, np) forward; dn = grad * dphi(n, h, np) in the hand-written backward
  torch twin      h = phi(n, torch); autograd differentiates phi itself (dphi is not used for gradients)
  saturation      a unit is saturated (or dead) where dphi < SATURATED * dphi_max  (bench.record)
  mean-field      E[phi(sqrt(q) z)^2], E[phi'(sqrt(q) z)^2] and the closed forms below (bench.theory)
  config          the choices of `model.activation` are the keys of ACTIVATIONS (bench.config)

`dphi` gets both the input z and the output h = phi(z), and uses whichever is cheaper (sigmoid
h (1 - h), tanh 1 - h^2). Adding a built-in activation is one entry in ACTIVATIONS; tests/test_engine.py
then checks its backward against finite differences and torch, tests/test_theory.py its mean-field maps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

LEAKY_SLOPE = 0.01  # leaky_relu: phi(z) = z for z > 0, 0.01 z otherwise (torch's default slope)
# selu (Klambauer et al. 2017): torch.selu's lambda and alpha, chosen so that z ~ N(0, 1) gives
# E[selu(z)] = 0 and E[selu(z)^2] = 1 (the self-normalising fixed point)
SELU_LAMBDA, SELU_ALPHA = 1.0507009873554805, 1.6732632423543772
ELU_ALPHA = 1.0  # elu: alpha (e^z - 1) for z <= 0 (torch's default)
# the largest slopes of gelu and silu, where phi'' = 0: gelu at z = sqrt(2), Phi(sqrt 2) + sqrt(2) N(sqrt 2);
# silu at z = 2.3993572805..., the root of 2 + z (1 - 2 sigmoid(z)) (brentq to 1e-15)
GELU_MAX_SLOPE = 0.5 * (1.0 + math.erf(1.0)) + math.exp(-1.0) / math.sqrt(math.pi)
SILU_MAX_SLOPE = 1.0998393201288668
SATURATED = 0.05  # a unit is saturated (or dead) where phi'(z) < 5% of the largest phi' can be


@dataclass(frozen=True)
class Activation:
    name: str
    phi: Callable  # phi(z, xp) -> h, elementwise, in z's dtype
    dphi: Callable | None  # dphi(z, h, xp) -> phi'(z); None where it is not elementwise (softmax)
    dphi_max: float | None  # the largest slope phi' reaches; None: no saturation statistic (NaN)
    # Mean-field theory (bench.theory). Piecewise-linear, positively homogeneous phi (slopes a_+ for
    # x > 0, a_- for x < 0) has E[phi(sqrt(q) z)^2] = c q and E[phi'(sqrt(q) z)^2] = c with
    # c = (a_+^2 + a_-^2) / 2: no quadrature, an affine length map, closed forms for q* and critical sw2.
    homogeneous_c: float | None = None
    # phi(0) = 0, phi'(0) = 1, |phi(x)| <= |x| (tanh, softsign, and elu, which is not odd but has all three
    # properties, the only ones used): with sb2 = 0 the length map lies below q -> sw2 q, so q* = 0 for sw2 <= 1.
    odd_unit_slope: bool = False


def _relu(z, xp):
    return z * (z > 0)  # not maximum(z, 0): autograd then gives phi'(0) = 0 as torch.relu, NaN stays NaN


def _sigmoid(z, xp):
    """1 / (1 + e^-z) in one pass: scipy's expit in NumPy, torch.sigmoid in torch. Both are accurate to
    about an ulp in both tails and raise no overflow warning for large -z; expit costs about half of
    0.5 (1 + tanh(z / 2)) (one exp against a tanh and three passes), the bulk of a tiny net's step."""
    if xp is np:
        return _expit(z)
    return xp.sigmoid(z)


def _expit(z):
    """scipy.special.expit, imported on first use (a refused config does not pay for importing scipy):
    the import rebinds this module's `_expit` to scipy's ufunc, so later calls go straight to it."""
    global _expit
    from scipy.special import expit as _expit

    return _expit(z)


def _erf(x, xp):
    """erf in either array module: torch.erf for tensors; NumPy has none, so scipy.special.erf."""
    if xp is np:
        from scipy.special import erf  # on first use: a refused config does not pay for importing scipy

        return erf(x)
    return xp.erf(x)


def _normal_cdf(z, xp):  # Phi(z)
    return 0.5 * (1.0 + _erf(z * (1.0 / math.sqrt(2.0)), xp))


def _exp_negative(z, xp):
    """e^z where z <= 0, else 1: elu's exponential branch, never overflowing for large z. Autograd's
    slope at z = 0 is then the z <= 0 side's, alpha e^0, as torch.elu and torch.selu take it."""
    return xp.exp(xp.where(z > 0, 0.0 * z, z))


def _elu(scale: float, alpha: float) -> tuple[Callable, Callable]:
    """phi = scale * (z if z > 0 else alpha (e^z - 1)) and phi' = scale * (1 if z > 0 else alpha e^z)."""
    def phi(z, xp):
        return scale * xp.where(z > 0, z, alpha * (_exp_negative(z, xp) - 1.0))

    def dphi(z, h, xp):
        return scale * xp.where(z > 0, xp.ones_like(z), alpha * _exp_negative(z, xp))
    return phi, dphi


def _sigmoid_tail(z, xp):
    """sigmoid(z) to full relative precision in the negative tail as well: e^z / (1 + e^z) there, with
    e = e^-|z| never overflowing, written once for both array modules (silu multiplies it by z, so its
    relative precision in the tail matters there)."""
    e = xp.exp(-abs(z))
    return xp.where(z >= 0, xp.ones_like(e), e) / (1.0 + e)


def _dsilu(z, h, xp):
    """silu (swish) phi = z s, s = sigmoid(z): phi' = s + z s (1 - s) = s + h (1 - s)."""
    s = _sigmoid_tail(z, xp)
    return s + h * (1.0 - s)


def _softmax(z, xp):
    e = xp.exp(z - xp.amax(z, -1, keepdims=True))  # shift by the max: exp never overflows
    return e / e.sum(-1, keepdims=True)


ACTIVATIONS: dict[str, Activation] = {a.name: a for a in (
    Activation("sigmoid", _sigmoid, lambda z, h, xp: h * (1.0 - h), 0.25),
    Activation("tanh", lambda z, xp: xp.tanh(z), lambda z, h, xp: 1.0 - h * h, 1.0, odd_unit_slope=True),
    # phi'(0) := 0 for relu and := LEAKY_SLOPE for leaky_relu, as torch; a set of measure zero
    Activation("relu", _relu, lambda z, h, xp: xp.where(z > 0, xp.ones_like(z), 0.0), 1.0, homogeneous_c=0.5),
    Activation("softsign", lambda z, xp: z / (1.0 + abs(z)), lambda z, h, xp: 1.0 / (1.0 + abs(z)) ** 2,
               1.0, odd_unit_slope=True),
    Activation("leaky_relu", lambda z, xp: xp.where(z > 0, z, LEAKY_SLOPE * z),
               lambda z, h, xp: xp.where(z > 0, xp.ones_like(z), LEAKY_SLOPE), 1.0,
               homogeneous_c=(1.0 + LEAKY_SLOPE**2) / 2.0),
    # the largest slope of selu is lambda alpha ~ 1.758, just left of 0 (lambda ~ 1.051 right of it)
    Activation("selu", *_elu(SELU_LAMBDA, SELU_ALPHA), SELU_LAMBDA * SELU_ALPHA),
    # gelu: z Phi(z), torch's exact (erf) form; phi' = Phi(z) + z N(z), N the standard normal density
    Activation("gelu", lambda z, xp: z * _normal_cdf(z, xp),
               lambda z, h, xp: _normal_cdf(z, xp) + z * xp.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi)),
               GELU_MAX_SLOPE),
    Activation("silu", lambda z, xp: z * _sigmoid_tail(z, xp), _dsilu, SILU_MAX_SLOPE),
    Activation("elu", *_elu(1.0, ELU_ALPHA), 1.0, odd_unit_slope=True),
)}

# Output non-linearities. Sigmoid outputs are the sigmoid above (with a saturation statistic); softmax
# and identity have none (dphi_max None: the statistic is NaN there). Softmax's Jacobian is not
# elementwise: it is folded into the cross-entropy delta (bench.losses), the only loss it pairs with.
OUTPUTS: dict[str, Activation] = {
    "sigmoid": ACTIVATIONS["sigmoid"],
    "softmax": Activation("softmax", _softmax, None, None),
    "identity": Activation("identity", lambda z, xp: z, lambda z, h, xp: xp.ones_like(z), None),
}

# Theory also covers the linear network (phi(x) = x), the reference point of the homogeneous family.
LINEAR = Activation("linear", lambda z, xp: 1.0 * z, lambda z, h, xp: xp.ones_like(z), 1.0, homogeneous_c=1.0)


def get(name: str, table: dict[str, Activation] = ACTIVATIONS) -> Activation:
    """The entry for `name` (an Activation passes through); ValueError naming the valid choices."""
    if isinstance(name, Activation):
        return name
    name = getattr(name, "value", name)  # a str-valued Enum from the config
    try:
        return table[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown activation {name!r}; valid choices: {', '.join(table)}") from None
