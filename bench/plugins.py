"""Plug-in activations and initialisers: `model.activation=pkg.module:Name`, `model.init=pkg.module:fn`.

A plug-in is named by the string `pkg.module:Name` (imported with importlib, so `pkg` must be on
sys.path / PYTHONPATH). `resolve_activation(name)` and `resolve_init(name)` return a registry entry:
a built-in name is looked up; a plug-in string is loaded, checked, and registered in the registry dict
(bench.activations.ACTIVATIONS, bench.init.INITS) under the full string, so that every later lookup by
name in this process (NetSpec.check, both networks, the recorder, bench.theory, the twin) finds it.
bench.config.validate calls both, so every process that validates a config (the launching one, a
launcher's worker, `python -m bench.twin`) resolves the plug-in before anything is trained or written.
Resolution is cached per process: the registry is the cache.

An activation plug-in is an object (or a class, instantiated with no arguments) with
  phi(z, xp) -> h            elementwise, xp the array module (numpy or torch); no in-place changes of z
  dphi(z, h, xp) -> phi'(z)  h = phi(z); the NumPy network's backward uses it, torch differentiates phi
  dphi_max (optional)        the largest slope phi' reaches: the saturation statistic's scale
                             (absent: act_saturation is NaN for this activation)
  homogeneous_c, odd_unit_slope (optional): bench.activations.Activation's mean-field flags

Before it is registered, `check_activation` refuses a wrong derivative (float64 throughout):
  1. finite differences: dphi(z) against (phi(z + e) - phi(z - e)) / 2e on a grid of z in [-8, 8]
     (offset so that no grid point sits on 0 or an integer, where piecewise activations have kinks;
     points whose one-sided differences disagree are kinks and are skipped);
  2. autograd: dphi(z) against torch's derivative of phi(z, torch) on the same grid, and phi(z, torch)
     against phi(z, np);
  3. a lockstep twin step: a tiny two-member net (3-5-5-2, identity output, mse) takes one forward
     and backward in NumPy (hand backward with dphi) and in torch (autograd of phi); every gradient
     must agree to TWIN_TOL.
The first failure is one line naming the object and the worst z (ValueError: PluginError).

An init plug-in is a function with the signature of `bench.init.Init.draw`,
  fn(rng, shape, fan_in, fan_out, is_bias, scale, bias_scale) -> ndarray of `shape`
(one parameter of one ensemble member: rng is that member's np.random.Generator, to be used for every
random number so that a seed gives the same net; scale and bias_scale are model.init_scale and
model.init_bias, None when unset; fan_in is an array (per column) in a block-diagonal first layer), or
an object with such a `draw` and optionally `variances(fan_in, fan_out, scale, bias_scale) -> (sw2,
sb2)` (fan_in Var(W_ij), Var(b_i): what bench.theory needs; a function may carry it as an attribute).
`check_init` draws a weight and a bias twice from the same seed: right shape, finite, the same both
times; and where variances are given, they must match a large draw's (weights, to VARIANCE_RTOL).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math

import numpy as np

from bench.activations import ACTIVATIONS, Activation
from bench.init import INITS, Init

PLUGIN_FORM = "pkg.module:Name"
# Finite differences: central, step e = FD_STEP max(1, |z|). Truncation e^2 phi'''/6 ~ 1e-12 and rounding
# ~ 1e-16 |phi| / e ~ 1e-10 at |z| = 8 for phi ~ z, so 1e-6 relative to (1 + |phi'|) leaves 1e4 x room
# and still catches any derivative wrong by a factor, a sign or a term (errors of ~1e-1).
FD_STEP = 1e-6
FD_TOL = 1e-6
# One-sided differences disagreeing by more than this (relative to 1 + |phi'|) mark a kink inside the
# step: smooth phi gives e phi'' ~ 1e-6 there.
KINK_TOL = 1e-3
# dphi vs autograd, phi(torch) vs phi(numpy), and the twin step's gradients: float64 rounding of the
# same formulas (~1e-15), bounded like the lockstep twin check (bench.twin.LIMIT).
TWIN_TOL = 1e-9
GRID = np.linspace(-8.0, 8.0, 321) + 0.01234567  # step 0.05, off 0 and off the integers
VARIANCE_RTOL = 0.1  # a 400 x 400 draw estimates Var to ~0.35% (sqrt(2/n)): 10% is ~30 standard errors


class PluginError(ValueError):
    """A plug-in string that cannot be used: the message is the one line a user sees."""


def is_plugin(name) -> bool:
    return isinstance(name, str) and ":" in name


def _unknown(key: str, name, choices) -> PluginError:
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return PluginError(f"{key}={name}: unknown; {hint}valid choices: {', '.join(choices)}, "
                       f"or a plug-in {PLUGIN_FORM}")


def _load(key: str, name: str):
    """The object `pkg.module:Name` names (a class is instantiated with no arguments)."""
    module, _, attr = name.partition(":")
    if not module or not attr or ":" in attr or not all(p.isidentifier() for p in (*module.split("."), attr)):
        raise PluginError(f"{key}={name}: not a plug-in string; expected {PLUGIN_FORM} (a module path, a colon, "
                          f"an attribute)")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise PluginError(f"{key}={name}: cannot import module {module!r} ({e}); put its folder on "
                          f"PYTHONPATH") from None
    except Exception as e:  # noqa: BLE001 - the module's own error, as one line
        raise PluginError(f"{key}={name}: importing {module!r} failed: {type(e).__name__}: {e}") from None
    if not hasattr(mod, attr):
        raise PluginError(f"{key}={name}: module {module!r} has no attribute {attr!r}")
    obj = getattr(mod, attr)
    if inspect.isclass(obj) and not issubclass(obj, (Activation, Init)):
        try:
            obj = obj()
        except Exception as e:  # noqa: BLE001
            raise PluginError(f"{key}={name}: {attr} is a class and {attr}() failed: {type(e).__name__}: "
                              f"{e}") from None
    return obj


def _registered_or_loaded(key: str, name, registry: dict):
    """(name, its registry entry, None), or (name, None, the object loaded) for a new plug-in string."""
    name = getattr(name, "value", name)  # a str-valued Enum
    if name in registry:
        return name, registry[name], None
    if not is_plugin(name):
        raise _unknown(key, name, [k for k in registry if not is_plugin(k)])
    return name, None, _load(key, name)


def _method(key: str, name: str, obj, attr: str, signature: str, required: bool = True):
    f = getattr(obj, attr, None)
    if f is None and not required:
        return None
    if f is None:
        raise PluginError(f"{key}={name}: has no {attr}; a plug-in {key.split('.')[1]} needs {signature}")
    if not callable(f):
        raise PluginError(f"{key}={name}: {attr} is not callable ({type(f).__name__}); expected {signature}")
    return f


# ---- activations --------------------------------------------------------------------------------
def resolve_activation(name) -> Activation:
    """The registry entry for a built-in name or a (loaded, checked, registered) plug-in string."""
    key = "model.activation"
    name, entry, obj = _registered_or_loaded(key, name, ACTIVATIONS)
    if entry is not None:
        return entry
    phi = _method(key, name, obj, "phi", "phi(z, xp)")
    dphi = _method(key, name, obj, "dphi", "dphi(z, h, xp)")
    dphi_max = getattr(obj, "dphi_max", None)
    if dphi_max is not None and not (isinstance(dphi_max, (int, float)) and math.isfinite(dphi_max) and dphi_max > 0):
        raise PluginError(f"{key}={name}: dphi_max={dphi_max!r} must be a finite number > 0 (phi's largest slope), "
                          f"or absent")
    act = Activation(name, phi, dphi, None if dphi_max is None else float(dphi_max),
                     homogeneous_c=getattr(obj, "homogeneous_c", None),
                     odd_unit_slope=bool(getattr(obj, "odd_unit_slope", False)))
    ACTIVATIONS[name] = act  # the twin step builds networks, which look the activation up by name
    try:
        check_activation(act)
    except Exception:
        del ACTIVATIONS[name]
        raise
    return act


def _fail(act: Activation, what: str, z=None) -> PluginError:
    where = f" worst at z={float(z):.6g}:" if z is not None else ""
    return PluginError(f"model.activation={act.name}:{where} {what}")


def _call(act: Activation, what: str, f, *args):
    try:
        out = f(*args)
    except Exception as e:  # noqa: BLE001
        raise _fail(act, f"{what} raised {type(e).__name__}: {e}") from None
    return out


def _as_grid(act: Activation, what: str, value, z: np.ndarray) -> np.ndarray:
    """`value` as a float64 array, which must have z's shape (the recorder reduces dphi over units and
    cases), else a refusal."""
    try:
        out = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        out = None
    if out is None or out.shape != z.shape:
        raise _fail(act, f"{what} returned {type(value).__name__} of shape {np.shape(value)}, not an array of "
                         f"z's shape {z.shape} (e.g. xp.ones_like(z) for a constant)")
    return out


def _worst(act: Activation, err: np.ndarray, z: np.ndarray, tol: float, what) -> None:
    """Refuse at the z with the largest err (NaN counts as worst) when it is above tol."""
    err = np.where(np.isnan(err), np.inf, err)
    i = int(np.argmax(err))
    if err[i] > tol:
        raise _fail(act, what(i), z[i])


def check_activation(act: Activation) -> None:
    """Refuse (PluginError, one line) an activation whose dphi is not phi's derivative: finite
    differences, autograd on the same grid, then a lockstep twin step (module docstring)."""
    z = GRID.copy()
    phi = lambda x: _as_grid(act, "phi(z, np)", _call(act, "phi(z, np)", act.phi, x, np), x)  # noqa: E731
    h = phi(z)
    bad = ~np.isfinite(h)
    if bad.any():
        raise _fail(act, f"phi(z, np) is {h[bad][0]}", z[bad][0])
    d = _as_grid(act, "dphi(z, h, np)", _call(act, "dphi(z, h, np)", act.dphi, z, h, np), z)
    e = FD_STEP * np.maximum(1.0, np.abs(z))
    zp, zm = z + e, z - e
    hp, hm = phi(zp), phi(zm)
    fd = (hp - hm) / (zp - zm)
    smooth = np.abs((hp - h) / (zp - z) - (h - hm) / (z - zm)) <= KINK_TOL * (1.0 + np.abs(fd))
    _worst(act, np.where(smooth, np.abs(d - fd) / (1.0 + np.abs(fd)), 0.0), z, FD_TOL,
           lambda i: f"dphi={d[i]:.6g} but phi's finite difference is {fd[i]:.6g}: dphi is not phi's derivative")
    if act.dphi_max is not None:
        _worst(act, d / act.dphi_max - 1.0, z, 1e-9,
               lambda i: f"dphi={d[i]:.6g} exceeds dphi_max={act.dphi_max:.6g} (the largest slope phi' reaches)")
    _check_autograd(act, z, h, d, smooth)
    _check_twin_step(act)


def _check_autograd(act, z, h, d, smooth) -> None:
    import torch

    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    ht = _call(act, "phi(z, torch)", act.phi, zt, torch)
    if not isinstance(ht, torch.Tensor) or ht.shape != zt.shape or not ht.requires_grad:
        raise _fail(act, "phi(z, torch) must return a tensor of z's shape that autograd can differentiate "
                         "(use xp.*, not np.*, inside phi)")
    hn = ht.detach().numpy()
    _worst(act, np.abs(hn - h) / (1.0 + np.abs(h)), z, TWIN_TOL,
           lambda i: f"phi(z, torch)={hn[i]:.6g} but phi(z, np)={h[i]:.6g}")
    (g,) = torch.autograd.grad(ht.sum(), zt)
    g = g.numpy()
    _worst(act, np.where(smooth, np.abs(d - g) / (1.0 + np.abs(g)), 0.0), z, TWIN_TOL,
           lambda i: f"dphi={d[i]:.6g} but torch's autograd of phi gives {g[i]:.6g}")
    dt = _call(act, "dphi(z, h, torch)", act.dphi, zt.detach(), ht.detach(), torch)
    if not isinstance(dt, torch.Tensor) or dt.shape != zt.shape:  # the recorder's saturation, torch side
        raise _fail(act, f"dphi(z, h, torch) returned {type(dt).__name__}, not a tensor of z's shape (use xp.*, "
                         f"not np.*)")


def _check_twin_step(act: Activation) -> None:
    """One forward and backward of a tiny float64 net in NumPy (dphi) and torch (autograd of phi)."""
    import torch

    from bench.numpy_mlp import NumpyMLP
    from bench.spec import NetSpec
    from bench.torch_mlp import TorchMLP

    spec = NetSpec(3, 2, (5, 5), act.name, "identity")
    rng = np.random.default_rng(0)
    # weights ~ N(0, 1.5^2) and inputs ~ N(0, 1): pre-activations spread over about [-6, 6]
    params = {n: rng.normal(0.0, 1.5 if kind == "weight" else 0.5, (2, *shape)) for n, kind, _, shape in spec.params()}
    x, y = rng.normal(0.0, 1.0, (1, 8, 3)), rng.normal(0.0, 1.0, (1, 8, 2))
    numpy_net, torch_net = NumpyMLP(spec, params, "mse"), TorchMLP(spec, params, "mse")
    _call(act, "the NumPy network's step", numpy_net.loss_and_grads, x, y)
    _call(act, "the torch network's step", torch_net.loss_and_grads, torch.tensor(x), torch.tensor(y))
    worst, where = 0.0, None
    for n, g in numpy_net.grads.items():
        gt = torch_net.grads[n].numpy()
        r = np.linalg.norm(g - gt) / max(np.linalg.norm(g), np.linalg.norm(gt), np.finfo(float).tiny)
        if not r <= worst:  # NaN included
            worst, where = (np.inf if np.isnan(r) else r), n
    if worst > TWIN_TOL:
        # the pre-activations where the hand-written phi' and autograd's disagree most
        n_all = np.concatenate([layer.n.ravel() for layer in numpy_net.layers[:spec.depth]])
        zt = torch.tensor(n_all, requires_grad=True)
        (g,) = torch.autograd.grad(act.phi(zt, torch).sum(), zt)
        d = act.dphi(n_all, act.phi(n_all, np), np)
        i = int(np.argmax(np.abs(d - g.numpy())))
        raise _fail(act, f"lockstep twin step on a tiny float64 net: {where} gradient differs by {worst:.3g} "
                         f"(relative) between NumPy (dphi) and torch (autograd of phi)", n_all[i])


# ---- initialisers -------------------------------------------------------------------------------
def resolve_init(name) -> Init:
    """The registry entry for a built-in scheme or a (loaded, checked, registered) plug-in string."""
    key = "model.init"
    name, entry, obj = _registered_or_loaded(key, name, INITS)
    if entry is not None:
        return entry
    sig = "fn(rng, shape, fan_in, fan_out, is_bias, scale, bias_scale)"
    draw = _method(key, name, obj, "draw", sig) if hasattr(obj, "draw") else obj
    if not callable(draw):
        raise PluginError(f"{key}={name}: {type(obj).__name__} is not callable; expected a function {sig} or an "
                          f"object with such a draw")
    variances = _method(key, name, obj, "variances", "variances(fan_in, fan_out, scale, bias_scale)", required=False)
    init = Init(name, draw, variances)
    check_init(init)
    INITS[name] = init
    return init


def check_init(init: Init) -> None:
    """Refuse (PluginError, one line) an initialiser that does not draw what init_params needs."""
    key = f"model.init={init.name}"
    for shape, is_bias in (((3, 4), False), ((1, 4), True)):
        what = f"draw(rng, {shape}, 3, 4, is_bias={is_bias}, None, None)"
        out = []
        for _ in range(2):
            try:
                out.append(np.asarray(init.draw(np.random.default_rng(0), shape, 3, 4, is_bias, None, None),
                                      dtype=np.float64))
            except Exception as e:  # noqa: BLE001
                raise PluginError(f"{key}: {what} raised {type(e).__name__}: {e}") from None
        a = out[0]
        if a.shape != shape:
            raise PluginError(f"{key}: {what} returned shape {a.shape}, not {shape}")
        if not np.isfinite(a).all():
            raise PluginError(f"{key}: {what} returned non-finite values")
        if not np.array_equal(a, out[1]):
            raise PluginError(f"{key}: {what} differs between two calls with the same seed: draw every random "
                              f"number from rng (ensemble members and reruns must get the same weights)")
    if init.variances is None:
        return
    try:
        sw2, sb2 = (float(v) for v in init.variances(400, 400, None, None))
    except Exception as e:  # noqa: BLE001
        raise PluginError(f"{key}: variances(400, 400, None, None) failed ({type(e).__name__}: {e}); expected "
                          f"(sw2, sb2) = (fan_in Var(W_ij), Var(b_i))") from None
    w = np.asarray(init.draw(np.random.default_rng(0), (400, 400), 400, 400, False, None, None), dtype=np.float64)
    measured = 400 * w.var()
    if not abs(measured - sw2) <= VARIANCE_RTOL * max(sw2, measured):
        raise PluginError(f"{key}: variances says sw2 = fan_in Var(W) = {sw2:.4g}, but a 400x400 draw has "
                          f"{measured:.4g}")
    if not (math.isfinite(sb2) and sb2 >= 0):
        raise PluginError(f"{key}: variances says sb2 = Var(b) = {sb2!r}; expected a finite number >= 0")
