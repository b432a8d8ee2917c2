"""The lockstep twin check (`bench.twin`) and what the steps table's losses mean."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import ROOT, compose_cfg

import bench.numpy_mlp as numpy_mlp
from bench import twin
from bench.activations import ACTIVATIONS
from bench.init import init_params
from bench.numpy_mlp import NumpyMLP
from bench.spec import NetSpec, TrainSpec
from bench.tasks import make_task
from bench.train import train

DIGITS = make_task("digits")


def _deep_bn(depth=8, activation="relu", norm="batchnorm", steps=40):
    spec = NetSpec(DIGITS.n_in, DIGITS.n_out, (32,) * depth, activation, "softmax", False, norm)
    tspec = TrainSpec(steps=steps, lr=0.05, momentum=0.9, batch_size=64, loss="cross_entropy", log_every=5)
    return spec, tspec


def test_lockstep_agrees_at_every_logged_step_where_free_running_twins_part():
    spec, tspec = _deep_bn(depth=12, steps=60)
    seeds = [3, 4]
    params = init_params(spec, "torch_default", seeds)
    table = twin.lockstep(DIGITS, spec, tspec, params, seeds)
    logged = sorted(set(range(0, 61, 5)))
    assert sorted(table["step"].unique()) == logged
    expected = {"batch_loss", "loss", "accuracy", "test_loss", "test_accuracy", "running_mean", "running_var",
                "output_delta",
                "grad_norm", "grad_mean_abs", "weight_norm", "delta_norm", "act_mean", "act_std", "act_saturation",
                "update_norm", "update_ratio"}
    assert set(table["quantity"]) == expected
    updates = table[table["quantity"] == "update_norm"]["step"]
    assert updates.tolist() == logged[:-1]  # every logged step but the last, which applies no update
    for step, rows in table.groupby("step"):
        # one float64 step, redone by autograd on the same parameters: only rounding order differs,
        # ~1e-15 per operation through 13 layers; 1e-10 is the bound the issue asks for
        assert rows["max_rel_diff"].max() <= 1e-10, (step, rows.sort_values("max_rel_diff").tail(3))


def test_lockstep_catches_a_wrong_derivative(monkeypatch):
    spec, tspec = _deep_bn(depth=3, activation="tanh", norm="none", steps=10)
    params = init_params(spec, "xavier", [0])
    real = ACTIVATIONS["tanh"]

    def off_by_a_little(z, h, xp):  # tanh' with a 1e-6 relative error: a subtle hand-derivation slip
        return real.dphi(z, h, xp) * (1 + 1e-6)

    # the NumPy backward reads phi' from the registry entry; torch differentiates phi and is unaffected
    monkeypatch.setitem(ACTIVATIONS, "tanh", dataclasses.replace(real, dphi=off_by_a_little))
    table = twin.lockstep(DIGITS, spec, tspec, params, [0])
    first = table[table["step"] == 0].set_index("quantity")["max_rel_diff"]
    assert first["grad_norm"] > 1e-7  # the slip shows up in the very first step's gradients
    assert first["loss"] <= 1e-12  # while the forward pass, untouched, still agrees


def test_steps_loss_is_the_whole_training_set_in_evaluation_mode():
    spec = NetSpec(DIGITS.n_in, DIGITS.n_out, (16, 16), "tanh", "softmax")
    tspec = TrainSpec(steps=30, lr=0.1, momentum=0.5, batch_size=50, loss="cross_entropy", log_every=10)
    out = train(DIGITS, spec, tspec, init_params(spec, "xavier", [1, 2]), "numpy", [1, 2])
    last = out.steps["step"] == 30
    net = NumpyMLP(spec, out.params, "cross_entropy")
    loss, y = net.evaluate(DIGITS.x_train[None], DIGITS.y_train[None])
    # the same arithmetic on the same final parameters: equal to the last bit
    np.testing.assert_array_equal(out.steps["loss"][last], loss)
    assert not np.allclose(out.steps["batch_loss"][last], loss)  # a batch of 50 is not the 1,437 cases
    acc = (y.argmax(-1) == DIGITS.y_train.argmax(-1)).mean(1)
    np.testing.assert_array_equal(out.steps["accuracy"][last], acc)


def test_full_batch_loss_equals_batch_loss():
    task = make_task("xor")
    spec = NetSpec(2, 1, (4,), "sigmoid", "sigmoid")
    tspec = TrainSpec(steps=20, lr=0.5, momentum=0.9, log_every=5)
    out = train(task, spec, tspec, init_params(spec, "normal", [0]), "numpy", [0])
    # without batch norm, the full-batch training forward is the evaluation forward
    np.testing.assert_array_equal(out.steps["loss"], out.steps["batch_loss"])


def test_lockstep_from_a_stored_run_config(tmp_path):
    from bench.results import load
    from bench.run import run

    cfg = compose_cfg(["task=digits", "model.depth=3", "model.width=16", "model.norm=batchnorm",
                       "train.batch_size=32", "train.steps=12", "log.every=4", "ensemble=2", "seed=5"],
                      results_dir=tmp_path)
    run(cfg)
    runs = load(tmp_path / "default").runs
    config = json.loads(runs.sort_values("seed")["config_json"].iloc[0])
    table = twin.lockstep_from_run_config(config, ensemble=2)
    assert table["step"].tolist() == [0, 4, 8, 12]
    for _, row in table.iterrows():
        assert row["max_rel_diff"] <= 1e-10, row  # the same float64 bound as above


def _cli(*args):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "bench.twin", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args,code,needle", [
    (["task=digits", "model.depth=4", "model.width=16", "model.norm=batchnorm", "model.residual=true",
      "train.batch_size=64", "train.steps=20", "log.every=5"], 0, "max rel diff "),
    # the newer methods: layer norm, rezero's alpha rows, selu with LeCun-normal weights; full batch
    (["task=digits", "model.depth=4", "model.width=16", "model.norm=layernorm", "model.residual=true",
      "model.residual_scale=rezero", "model.activation=selu", "model.init=lecun", "train.steps=20",
      "log.every=5"], 0, "max rel diff "),
    (["model.activation=swish"], 2, "model.activation"),
    (["train.dtype=float32"], 2, "train.dtype=float32"),
])
def test_cli(args, code, needle):
    p = _cli(*args)
    assert p.returncode == code, p.stderr
    lines = (p.stdout if code == 0 else p.stderr).strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
    if code == 0:  # the contract: the line ends in `max rel diff <number>`
        value = float(lines[0].rsplit("max rel diff ", 1)[1])
        assert 0 <= value <= twin.LIMIT


def test_lockstep_compares_output_deltas_on_the_scale_of_their_terms(monkeypatch):
    spec, tspec = _deep_bn(depth=2, activation="tanh", norm="none", steps=10)
    params = init_params(spec, "xavier", [0])
    table = twin.lockstep(DIGITS, spec, tspec, params, [0])
    ok = table[table["quantity"] == "output_delta"]["max_rel_diff"]
    assert len(ok) == 3 and ok.max() <= 1e-14  # rounding of (p - d) / B on the scale of p and d: a few ulps
    real = numpy_mlp.output_delta

    def slip(loss, out, y, z, d):  # a wrong normalisation of the loss derivative, 1e-6 off
        return real(loss, out, y, z, d) * (1 + 1e-6)

    monkeypatch.setattr(numpy_mlp, "output_delta", slip)
    table = twin.lockstep(DIGITS, spec, tspec, params, [0])
    assert table[table["quantity"] == "output_delta"]["max_rel_diff"].min() > 1e-8
