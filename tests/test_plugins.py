"""Plug-in activations and inits (bench.plugins): a user's module, loaded by `pkg.module:Name`, checked
before anything is trained (finite differences, autograd, a lockstep twin step), refused in one line
when its derivative is wrong, and found by name everywhere once registered."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import ROOT, compose_cfg

from bench import plugins
from bench.activations import ACTIVATIONS
from bench.config import ConfigError, validate
from bench.init import INITS, init_params
from bench.spec import NetSpec

MODULE = "vgb_scratch_swish"  # a name no other test imports: sys.modules caches it per process
SOURCE = textwrap.dedent('''
    """A scratch module outside the repository: swish and a re-implemented He init."""
    import numpy as np


    class Swish:
        """swish(z) = z sigmoid(z) (Ramachandran et al. 2017; SiLU)."""
        dphi_max = 1.0998393194  # the largest slope, s (1 + z (1 - s)) at z = 2.3994

        def phi(self, z, xp):
            return z / (1.0 + xp.exp(-z))

        def dphi(self, z, h, xp):
            s = 1.0 / (1.0 + xp.exp(-z))
            return s * (1.0 + z * (1.0 - s))


    class WrongSwish(Swish):
        def dphi(self, z, h, xp):
            s = 1.0 / (1.0 + xp.exp(-z))
            return s * (1.0 + z)  # missing the factor (1 - s)


    class NoDphi:
        def phi(self, z, xp):
            return z


    class PhiNotCallable:
        phi = 3.0

        def dphi(self, z, h, xp):
            return z


    class NumpyOnly(Swish):
        def phi(self, z, xp):
            return z / (1.0 + np.exp(-z))  # np, not xp: torch's autograd cannot see it


    class BadSlope(Swish):
        dphi_max = 0.5


    class ScalarSlope:
        def phi(self, z, xp):
            return 1.0 * z

        def dphi(self, z, h, xp):
            return 1.0  # right, but a scalar: the recorder needs phi' per unit and case


    def he_again(rng, shape, fan_in, fan_out, is_bias, scale, bias_scale):
        """He's N(0, 2 g^2 / fan_in) weights and zero biases, drawn as bench.init draws "he"."""
        if is_bias:
            return np.zeros(shape) if bias_scale is None else rng.normal(0.0, bias_scale, shape)
        g = 1.0 if scale is None else scale
        return rng.standard_normal(shape) * g * np.sqrt(2.0 / fan_in)


    he_again.variances = lambda fan_in, fan_out, scale, bias_scale: (2.0 * (scale or 1.0) ** 2, 0.0)


    def wrong_shape(rng, shape, fan_in, fan_out, is_bias, scale, bias_scale):
        return rng.standard_normal(shape[::-1])


    def unseeded(rng, shape, fan_in, fan_out, is_bias, scale, bias_scale):
        return np.random.standard_normal(shape)  # the global generator: not reproducible from the seed
''')


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """The folder holding the scratch module (what a user puts on PYTHONPATH)."""
    folder = tmp_path_factory.mktemp("scratch")
    (folder / f"{MODULE}.py").write_text(SOURCE)
    return folder


@pytest.fixture
def plugin(scratch, monkeypatch):
    """The scratch module importable in this process; the registries as they were afterwards."""
    monkeypatch.syspath_prepend(str(scratch))
    before = dict(ACTIVATIONS), dict(INITS)
    yield
    for registry, saved in zip((ACTIVATIONS, INITS), before):
        registry.clear()
        registry.update(saved)
    sys.modules.pop(MODULE, None)


def test_plugin_activation_is_checked_registered_and_found_by_name(plugin):
    import torch  # noqa: F401  (imported before timing: the check's one-off cost is torch's import)

    from bench import theory

    name = f"{MODULE}:Swish"
    t0 = time.perf_counter()
    act = plugins.resolve_activation(name)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, elapsed  # the whole check (finite differences, autograd, twin step)
    assert ACTIVATIONS[name] is act and act.name == name and act.dphi_max == pytest.approx(1.0998393194)
    assert plugins.resolve_activation(name) is act  # cached: the registry is the cache
    assert theory.get_activation(name) is act  # the mean-field theory sees it too (quadrature of phi)
    assert theory.length_map(1.0, name, 2.0, 0.0) > 0
    NetSpec(2, 1, (4,), name).check()


def test_wrong_derivative_is_refused_in_one_line_naming_the_object_and_z(plugin):
    name = f"{MODULE}:WrongSwish"
    with pytest.raises(plugins.PluginError) as err:
        plugins.resolve_activation(name)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"model.activation={name}: worst at z=") and "finite difference" in msg
    assert name not in ACTIVATIONS  # nothing registered


def test_the_twin_step_alone_refuses_a_wrong_derivative(plugin):
    """The third check on its own: a tiny float64 net's NumPy gradients (dphi 10% too steep) against
    torch's autograd of phi differ, and the line names the pre-activation where phi' is most wrong."""
    from bench.activations import Activation

    swish = plugins.resolve_activation(f"{MODULE}:Swish")
    wrong = Activation("twin_only", swish.phi, lambda z, h, xp: 1.1 * swish.dphi(z, h, xp), None)
    ACTIVATIONS[wrong.name] = wrong
    with pytest.raises(plugins.PluginError, match=r"^model.activation=twin_only: worst at z=\S+ lockstep twin step"):
        plugins._check_twin_step(wrong)


@pytest.mark.parametrize("key,value,needle", [
    ("activation", "nope_no_such_module:Swish", "cannot import module 'nope_no_such_module'"),
    ("activation", f"{MODULE}:Nope", f"module '{MODULE}' has no attribute 'Nope'"),
    ("activation", f"{MODULE}:NoDphi", "has no dphi; a plug-in activation needs dphi(z, h, xp)"),
    ("activation", f"{MODULE}:PhiNotCallable", "phi is not callable"),
    ("activation", f"{MODULE}:NumpyOnly", "phi(z, torch)"),
    ("activation", f"{MODULE}:BadSlope", "exceeds dphi_max=0.5"),
    ("activation", f"{MODULE}:ScalarSlope", "not an array of z's shape"),
    ("activation", "a:b:c", "expected pkg.module:Name"),
    ("activation", "sigmod", "unknown; did you mean sigmoid? valid choices: sigmoid, tanh, relu"),
    ("init", "xavir", "unknown; did you mean xavier? valid choices: uniform, normal"),
    ("init", f"{MODULE}:Swish", "Swish is not callable"),
    ("init", f"{MODULE}:wrong_shape", "returned shape (4, 3), not (3, 4)"),
    ("init", f"{MODULE}:unseeded", "differs between two calls with the same seed"),
])
def test_bad_plugin_strings_give_one_line(plugin, tmp_path, key, value, needle):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg([f"model.{key}={value}"], results_dir=tmp_path))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"model.{key}={value}: ") and needle in msg, msg


def test_plugin_init_draws_like_the_builtin_it_reimplements(plugin):
    from bench.theory import init_variances

    name = f"{MODULE}:he_again"
    assert plugins.resolve_init(name) is INITS[name]
    spec = NetSpec(5, 3, (8, 8), norm="none")
    for scale in (None, 0.7):
        ours, builtin = init_params(spec, name, [3, 4], scale), init_params(spec, "he", [3, 4], scale)
        assert ours.keys() == builtin.keys()
        for k in ours:
            np.testing.assert_array_equal(ours[k], builtin[k], err_msg=k)  # bit for bit: same draws
    assert init_variances(name, 8, 0.7) == init_variances("he", 8, 0.7)


def _cli(module, *args, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(cwd)]))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _user_conf(scratch):
    """A user's own config folder adding a method preset (Hydra's --config-dir)."""
    method = scratch / "myconf" / "method"
    method.mkdir(parents=True, exist_ok=True)
    (method / "swish_he.yaml").write_text(f"# @package _global_\nmodel:\n  activation: {MODULE}:Swish\n"
                                          f"  init: {MODULE}:he_again\n")
    return "myconf"


def test_cli_plugin_trains_on_both_backends_from_a_user_method_preset(scratch, tmp_path):
    from bench import results

    p = _cli("bench.run", "-m", "--config-dir", _user_conf(scratch), "method=swish_he", "backend=numpy,torch",
             "model.depth=2", "train.steps=5", "log.every=5",
             f"results_dir={tmp_path}", "progress=none", cwd=scratch)
    assert p.returncode == 0, p.stderr
    runs = results.load(tmp_path / "default").runs
    assert sorted(runs["backend"]) == ["numpy", "torch"] and set(runs["status"]) == {"ok"}
    assert set(runs["activation"]) == {f"{MODULE}:Swish"} and set(runs["init"]) == {f"{MODULE}:he_again"}
    # same init arrays, same float64 arithmetic but for the backward's engine: the twins agree closely
    a, b = runs.sort_values("backend")["final_loss"]
    assert abs(a - b) <= 1e-9 * abs(a)  # 5 steps from one init in float64: rounding ~1e-15, not 1e-9


def test_cli_twin_passes_the_plugin(scratch):
    p = _cli("bench.twin", "--config-dir", _user_conf(scratch), "method=swish_he", "model.depth=3",
             "train.steps=4", "log.every=2", cwd=scratch)
    assert p.returncode == 0, p.stderr
    line = p.stdout.strip().splitlines()[-1]
    assert float(line.rsplit("max rel diff ", 1)[1]) < 1e-9, line


def test_cli_refuses_a_wrong_derivative_before_writing_anything(scratch, tmp_path):
    results_dir = tmp_path / "results"
    p = _cli("bench.run", f"model.activation={MODULE}:WrongSwish", f"results_dir={results_dir}", cwd=scratch)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: model.activation={MODULE}:WrongSwish: worst at z="), lines
    assert not results_dir.exists()  # not even Hydra's log folder


@pytest.mark.slow
def test_cli_plugin_resolves_in_a_launchers_worker_processes(scratch, tmp_path):
    """joblib runs each job in a worker process, which validates (and so resolves) the config again."""
    p = _cli("bench.run", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
             f"model.activation={MODULE}:Swish,tanh", "train.steps=5", f"results_dir={tmp_path}", "progress=none",
             cwd=scratch)
    assert p.returncode == 0, p.stderr
    from bench import results

    assert set(results.load(tmp_path / "default").runs["activation"]) == {f"{MODULE}:Swish", "tanh"}
