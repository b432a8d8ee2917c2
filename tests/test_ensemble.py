"""Ensembles in the NumPy network: a member equals its solo run on every path `bench.numpy_mlp` picks.

The paths (bench.numpy_mlp's module docstring): the first layer's one GEMM for a batch shared by all
members (even widths), its one matmul per member (odd widths, mini-batches), the outer products where a
layer has one input or one output, and around them the residual, batch-norm and layer-norm nets that
these paths leave as they were. All in float64.
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.activations import ACTIVATIONS
from bench.init import init_params
from bench.numpy_mlp import NumpyMLP
from bench.spec import NetSpec, TrainSpec
from bench.tasks import make_task
from bench.train import train

# name: (task, spec, batch_size (None: the full batch, shared by all members), loss)
CASES = {
    "shared GEMM 6-2-1": ("symmetry", NetSpec(6, 1, (2,), "sigmoid", "sigmoid"), None, "sse_half"),
    "shared GEMM 6-4-4-1 tanh": ("symmetry", NetSpec(6, 1, (4, 4), "tanh", "sigmoid"), None, "sse_half"),
    "per-member odd width 6-3-1": ("symmetry", NetSpec(6, 1, (3,), "sigmoid", "sigmoid"), None, "sse_half"),
    "mini-batches 6-2-1": ("symmetry", NetSpec(6, 1, (2,), "sigmoid", "sigmoid"), 8, "sse_half"),
    "direct 2-1-1": ("xor", NetSpec(2, 1, (1,), "sigmoid", "sigmoid", direct=True), None, "sse_half"),
    "block-diagonal family trees": ("family_trees", NetSpec(36, 24, (12, 12, 6), "sigmoid", "sigmoid",
                                                            input_blocks=(24, 12), hidden_blocks=(6, 6)),
                                    None, "sse_half"),
    "residual batchnorm full batch": ("symmetry", NetSpec(6, 1, (4, 4), "tanh", "sigmoid", residual=True,
                                                          norm="batchnorm"), None, "sse_half"),
    "residual batchnorm mini-batches": ("symmetry", NetSpec(6, 1, (4, 4), "tanh", "sigmoid", residual=True,
                                                            norm="batchnorm"), 8, "sse_half"),
    "rezero layernorm mini-batches": ("symmetry", NetSpec(6, 1, (5, 5), "relu", "sigmoid", residual=True,
                                                          norm="layernorm", residual_scale="rezero"), 8, "sse_half"),
    "softmax 64-16-16-10 mini-batches": ("digits", NetSpec(64, 10, (16, 16), "relu", "softmax"), 32,
                                         "cross_entropy"),
}


def _close(a, b, rtol, atol):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return bool(np.all((np.isnan(a) & np.isnan(b)) | (np.abs(a - b) <= rtol * np.abs(b) + atol)))


@pytest.mark.parametrize("case", list(CASES))
def test_members_equal_solo_runs(case):
    task_name, spec, batch_size, loss = CASES[case]
    task = make_task(task_name)
    tspec = TrainSpec(steps=150, lr=0.1, momentum=0.9, batch_size=batch_size, loss=loss, log_every=15)
    seeds = [3, 4, 5, 6]
    ens = train(task, spec, tspec, init_params(spec, "xavier", seeds), "numpy", seeds)
    for k, seed in enumerate(seeds):
        solo = train(task, spec, tspec, init_params(spec, "xavier", [seed]), "numpy", [seed])
        # a member runs its solo run's arithmetic; 1e-12 relative leaves room only for a BLAS kernel
        # rounding a member's block of a batched product differently (on the machine this was written
        # on every case here is equal bit for bit)
        ms = ens.steps["member"] == k
        for col in ("batch_loss", "loss"):
            assert _close(ens.steps[col][ms], solo.steps[col], 1e-12, 0.0), (case, k, col)
        m = ens.layers["member"] == k
        for col in ("grad_norm", "grad_mean_abs", "weight_norm", "delta_norm", "act_mean", "act_std"):
            assert _close(ens.layers[col][m], solo.layers[col], 1e-12, 1e-15), (case, k, col)
        for name in solo.params:
            assert _close(ens.params[name][k], solo.params[name][0], 1e-12, 1e-15), (case, k, name)
        assert ens.solved_step[k] == solo.solved_step[0], (case, k)


def test_cases_cover_the_paths():
    """Each path named above is taken by a case: the first layer's one GEMM and its per-member matmul, and
    the outer products (the cases would otherwise test less than their names say)."""
    def layers(case):
        _, spec, *_ = CASES[case]
        return NumpyMLP(spec, init_params(spec, "xavier", [0, 1]), "sse_half").layers

    assert layers("shared GEMM 6-2-1")[0].gemm and layers("shared GEMM 6-4-4-1 tanh")[0].gemm
    assert not layers("per-member odd width 6-3-1")[0].gemm
    assert layers("shared GEMM 6-2-1")[-1].outer_out and not layers("shared GEMM 6-4-4-1 tanh")[1].outer_out
    assert layers("direct 2-1-1")[-1].outer_in and not layers("direct 2-1-1")[0].gemm
    assert layers("block-diagonal family trees")[0].mask is not None and layers("block-diagonal family trees")[0].gemm
    assert layers("residual batchnorm full batch")[0].gemm


@pytest.mark.parametrize("width", [1, 2, 3])
@pytest.mark.parametrize("shared", [True, False])
def test_forward_and_backward_are_the_layer_equations(width, shared):
    """Every member's z, h, delta and gradients against the equations written out per member in 2-D
    (z = a W + b, h = sigmoid(z), delta_out = (y - d) y (1 - y), dW = a^T delta, db = sum_B delta,
    delta = (delta' W'^T) h (1 - h)), for a shared batch (1, B, n_in) and per-member batches."""
    E, B = 3, 7
    spec = NetSpec(6, 1, (width,), "sigmoid", "sigmoid")
    rng = np.random.default_rng(0)
    params = init_params(spec, "normal", list(range(E)), scale=0.8)
    x = rng.standard_normal((1 if shared else E, B, 6))
    d = rng.random((E, B, 1))
    net = NumpyMLP(spec, params, "sse_half")
    assert net.layers[0].gemm == (width % 2 == 0) and net.layers[1].outer_in == (width == 1)
    net.loss_and_grads(x, d)
    sig = ACTIVATIONS["sigmoid"].phi
    for e in range(E):
        W0, b0, W1, b1 = (params[f"layers.{i}.{kind}"][e] for i in (0, 1) for kind in ("weight", "bias"))
        a0 = x[0 if shared else e]
        h0 = sig(a0 @ W0 + b0, np)
        y = sig(h0 @ W1 + b1, np)
        delta1 = (y - d[e]) * y * (1 - y)
        delta0 = (delta1 @ W1.T) * h0 * (1 - h0)
        want = {"layers.0.weight": a0.T @ delta0, "layers.0.bias": delta0.sum(0, keepdims=True),
                "layers.1.weight": h0.T @ delta1, "layers.1.bias": delta1.sum(0, keepdims=True)}
        # the same equations, summed in another order (BLAS blocks, pairwise sums): rounding only
        np.testing.assert_allclose(net.layers[0].h[e], h0, rtol=1e-14)
        np.testing.assert_allclose(net.layers[1].h[e], y, rtol=1e-14)
        np.testing.assert_allclose(net.layers[1].delta[e], delta1, rtol=1e-12, atol=1e-16)
        np.testing.assert_allclose(net.layers[0].delta[e], delta0, rtol=1e-12, atol=1e-16)
        for name, g in want.items():
            np.testing.assert_allclose(net.grads[name][e], g, rtol=1e-12, atol=1e-16, err_msg=name)
    for layer, w in zip(net.layers, (width, 1)):
        assert layer.z.shape == layer.h.shape == layer.delta.shape == (E, B, w)  # the maths' views
