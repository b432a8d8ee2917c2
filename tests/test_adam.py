"""Adam beside the 1986 SGD (bench.train), and the update statistics update_norm / update_ratio.

Adam is checked against torch.optim.Adam itself, on both backends; members against solo runs; the two
backends against each other; update_norm against the parameters it is the difference of; the lockstep
twin against an optimizer that is a little off.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import twin
from bench.init import init_params
from bench.record import STATS
from bench.spec import NetSpec, TrainSpec
from bench.tasks import make_task
from bench.torch_mlp import TorchMLP
from bench.train import Adam, train

BETAS = dict(adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8)  # torch.optim.Adam's defaults
DIGITS = make_task("digits")


def _adam(**kw) -> TrainSpec:
    return TrainSpec(**{"optimizer": "adam", **BETAS, **kw})


def _close(a, b, rtol, atol=0.0) -> bool:
    """Elementwise within rtol (or atol); NaN in both or the same infinity in both also agree."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    with np.errstate(invalid="ignore"):  # inf - inf: settled by a == b
        near = np.abs(a - b) <= rtol * np.maximum(np.abs(a), np.abs(b)) + atol
    return bool(np.all((np.isnan(a) & np.isnan(b)) | (a == b) | near))


# ---- Adam is torch.optim.Adam --------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_equals_torch_optim_adam_over_50_steps(backend, weight_decay):
    """50 full-batch Adam steps of a 3-member tanh net, against torch.optim.Adam on autograd's gradients
    (our weight decay, p *= 1 - wd after the update, applied by hand beside it: torch's weight_decay
    is an L2 term in the gradient, another rule). torch.optim.Adam sees the (E, ...) parameters whole:
    Adam is elementwise, so members cannot mix."""
    task = make_task("teacher", n_train=32)
    spec = NetSpec(task.n_in, task.n_out, (8, 8), "tanh", "identity")
    lr, seeds, steps = 0.01, [0, 1, 2], 50
    params = init_params(spec, "xavier", seeds)
    out = train(task, spec, _adam(steps=steps, lr=lr, weight_decay=weight_decay, loss="mse", log_every=steps),
                params, backend, seeds)

    ref = TorchMLP(spec, params, "mse", "float64", "cpu")  # autograd only: the update is torch.optim.Adam's
    opt = torch.optim.Adam(ref.parameters(), lr=lr, betas=(BETAS["adam_beta1"], BETAS["adam_beta2"]),
                           eps=BETAS["adam_eps"])
    x, d = torch.from_numpy(task.x_train)[None], torch.from_numpy(task.y_train)[None]
    for _ in range(steps):
        ref.loss_and_grads(x, d)
        opt.step()
        with torch.no_grad():
            for p in ref.parameters():
                p.mul_(1.0 - weight_decay)
    for name, p in ref.params.items():
        # float64, the same formula in the same order: the engines differ only in rounding (BLAS sums,
        # torch's fused lerp), ~1e-16 relative per step. Adam divides by sqrt(v), so a relative change of
        # the gradient moves the step by as much, not more; 50 steps of this smooth net amplify it far
        # less than 1e4, so 1e-12 relative is agreement to rounding. A slip in the formula (eps inside
        # the square root, a missing bias correction) moves parameters by >= 1e-8 relative.
        assert _close(out.params[name], p.detach().numpy(), 1e-12, 1e-12 * lr), name
    assert not np.allclose(out.params["layers.0.weight"], params["layers.0.weight"], atol=10 * lr)  # it trained


def test_adam_state_is_per_member_and_resets_with_a_diverged_member():
    spec = NetSpec(2, 1, (3,), "sigmoid", "sigmoid")
    from bench.numpy_mlp import NumpyMLP

    net = NumpyMLP(spec, init_params(spec, "normal", [0, 1]), "sse_half")
    opt = Adam(net, **{k.removeprefix("adam_"): v for k, v in BETAS.items()})
    net.flat_grads[...] = 1.0
    opt.step(net.params, net.grads, 0.1, 0.0, 0.0)
    assert all(np.all(m != 0) for m in opt.state["m"].values())
    opt.reset_member(1, net.grads)
    for slot in ("m", "v"):
        for name, a in opt.state[slot].items():
            assert np.all(a[1] == 0) and np.all(a[0] != 0), (slot, name)
            assert np.shares_memory(a, opt.flat_state[slot])  # views of the flat buffer the update uses
    assert all(np.all(g[1] == 0) for g in net.grads.values())


# ---- members, backends -----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_ensemble_member_equals_solo_run_under_adam(backend):
    task = make_task("symmetry")
    spec = NetSpec(6, 1, (4, 4), "tanh", "sigmoid", residual=True, norm="batchnorm")
    tspec = _adam(steps=40, lr=0.01, batch_size=8, weight_decay=1e-3, log_every=10)
    seeds = list(range(11, 15))
    ens = train(task, spec, tspec, init_params(spec, "xavier", seeds), backend, seeds)
    for k, seed in enumerate(seeds):
        solo = train(task, spec, tspec, init_params(spec, "xavier", [seed]), backend, [seed])
        m = ens.layers["member"] == k
        # members are independent slices of batched matmuls and of elementwise Adam: the solo run's
        # arithmetic up to BLAS blocking, so 1e-12 relative leaves room only for last-bit differences
        # (update_ratio included: NaN where a bias starts at 0, in both)
        for col in STATS:
            assert _close(ens.layers[col][m], solo.layers[col], 1e-12, 1e-15), (seed, col)
        for name, p in solo.params.items():
            assert _close(ens.params[name][k], p[0], 1e-12, 1e-15), (seed, name)


def test_numpy_and_torch_backends_agree_under_adam():
    task = make_task("teacher", n_train=24)
    spec = NetSpec(task.n_in, task.n_out, (6, 6, 6), "tanh", "identity", norm="batchnorm")
    tspec = _adam(steps=20, lr=0.01, batch_size=8, weight_decay=1e-3, loss="mse", log_every=1)
    params = init_params(spec, "xavier", [3, 4])
    out_np, out_t = (train(task, spec, tspec, params, b, [3, 4]) for b in ("numpy", "torch"))
    assert np.array_equal(out_np.layers["step"], out_t.layers["step"])
    assert np.array_equal(out_np.layers["param"], out_t.layers["param"])
    # float64 twins differ by rounding order only; 20 Adam steps amplify it by far less than 1e7, so
    # 1e-9 relative is agreement (the bound test_engine uses for SGD over 50 steps). Statistics that can
    # be exactly 0 get an absolute floor of 1e-14, a few ulps of the O(1) quantities they are made of.
    for col in STATS:
        if col != "update_norm":
            assert _close(out_np.layers[col], out_t.layers[col], 1e-9, 1e-14), col
    # update_norm is a difference of stored weights, each rounded to an ulp of w: the engines' can
    # differ by ~1e-16 ||w|| however small the update, so that is its floor (1e-9 of 1e-6 ||w||)
    w = out_np.layers["weight_norm"]
    assert _close(out_np.layers["update_norm"], out_t.layers["update_norm"], 1e-9, 1e-15 * np.nanmax(w))
    assert _close(out_np.steps["loss"], out_t.steps["loss"], 1e-9)


# ---- update_norm, update_ratio ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_update_norm_is_the_difference_of_consecutive_parameters(backend, optimizer):
    task = make_task("xor")
    spec = NetSpec(2, 1, (3, 3), "sigmoid", "sigmoid")
    seeds = [5, 6]
    params = init_params(spec, "normal", seeds)
    kw = dict(steps=1, lr=0.3, weight_decay=0.01, log_every=1)  # the decay is part of the applied update
    tspec = _adam(**kw) if optimizer == "adam" else TrainSpec(momentum=0.5, **kw)
    out = train(task, spec, tspec, params, backend, seeds)  # w(0) = params, w(1) = out.params
    for r, name in enumerate(params):
        for k in range(len(seeds)):
            row = (out.layers["step"] == 0) & (out.layers["member"] == k)
            w0, w1 = params[name][k], out.params[name][k]
            # the same subtraction of the same stored numbers; only the order of the sum of squares
            # differs (a reduceat against np.linalg.norm): a few ulps
            assert _close(out.layers["update_norm"][row][r], np.linalg.norm(w1 - w0), 1e-14), (name, k)
            assert _close(out.layers["update_ratio"][row][r], np.linalg.norm(w1 - w0) / np.linalg.norm(w0),
                          1e-14), (name, k)
    last = out.layers["step"] == 1
    assert np.isnan(out.layers["update_norm"][last]).all() and np.isnan(out.layers["update_ratio"][last]).all()
    assert (out.layers["update_norm"][~last] > 0).all()


def test_update_norm_of_sgd_without_decay_is_lr_times_the_gradient_norm():
    """The first SGD step without momentum or decay moves w by -lr g: update_norm = lr grad_norm up to
    the rounding of w(t+1) - w(t) (an ulp of w per entry, ~1e-16 ||w||; 1e-12 relative covers it)."""
    task = make_task("xor")
    spec = NetSpec(2, 1, (4,), "sigmoid", "sigmoid")
    out = train(task, spec, TrainSpec(steps=3, lr=0.5, log_every=1), init_params(spec, "normal", [0]), "numpy", [0])
    s0 = out.layers["step"] == 0
    assert _close(out.layers["update_norm"][s0], 0.5 * out.layers["grad_norm"][s0], 1e-12)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_recording_off_leaves_training_unchanged(backend):
    """Recording must not change the run: record=False trains to the same bits (the copy taken for
    update_norm; in torch also the dLoss/dz retained at recorded steps)."""
    task = make_task("xor")
    spec = NetSpec(2, 1, (4,), "sigmoid", "sigmoid")
    tspec = _adam(steps=30, lr=0.05, log_every=7)
    a, b = (train(task, spec, tspec, init_params(spec, "normal", [0, 1]), backend, [0, 1], record=r)
            for r in (True, False))
    for name in a.params:
        assert np.array_equal(a.params[name], b.params[name]), name


# ---- the lockstep twin ----------------------------------------------------------------------------------
def _lockstep(optimizer, steps=15):
    spec = NetSpec(DIGITS.n_in, DIGITS.n_out, (32,) * 4, "relu", "softmax", False, "batchnorm")
    kw = dict(steps=steps, lr=0.01, batch_size=64, weight_decay=1e-3, loss="cross_entropy", log_every=5)
    tspec = _adam(**kw) if optimizer == "adam" else TrainSpec(momentum=0.9, **kw)
    params = init_params(spec, "he", [0, 1])
    return twin.lockstep(DIGITS, spec, tspec, params, [0, 1])


def test_lockstep_compares_adam_updates():
    table = _lockstep("adam")
    upd = table[table["quantity"].isin(["update_norm", "update_ratio"])]
    assert sorted(upd["step"].unique()) == [0, 5, 10]  # every logged step but the last
    # the twin's Adam starts from the NumPy one's moments and step count: one float64 update apart,
    # on the update's own scale (or 1e-6 ||w|| below it, see bench.twin): the 1e-10 bound of test_twin
    assert table["max_rel_diff"].max() <= 1e-10, table.sort_values("max_rel_diff").tail(3)


def test_lockstep_catches_an_optimizer_slip(monkeypatch):
    """An Adam with eps 1e-5 in place of 1e-8 in the NumPy engine alone: the gradients still agree,
    the updates do not."""
    real_init = Adam.__init__

    def off(self, net, beta1, beta2, eps):
        real_init(self, net, beta1, beta2, 1e-5 if net.xp is np else eps)

    monkeypatch.setattr(Adam, "__init__", off)
    table = _lockstep("adam").set_index(["step", "quantity"])["max_rel_diff"]
    assert table[(0, "grad_norm")] <= 1e-12
    assert table.xs("update_norm", level="quantity").max() > 1e-9


# ---- the flat update in chunks -------------------------------------------------------------------------
def _whole_buffer_step(rule, p, g, state, lr, momentum, weight_decay, scalars):
    """The update over whole buffers, as the flat step was written before it ran in chunks."""
    if rule == "sgd":
        (v,) = state
        v *= momentum
        v -= g * lr
        p += v
    else:
        m, v = state
        neg_step, bc2_sqrt = scalars
        m += (g - m) * (1 - BETAS["adam_beta1"])
        v *= BETAS["adam_beta2"]
        v += g * (1 - BETAS["adam_beta2"]) * g
        p += m / (np.sqrt(v) / bc2_sqrt + BETAS["adam_eps"]) * neg_step
    if weight_decay:
        p *= 1.0 - weight_decay


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_chunked_flat_step_equals_whole_buffer_step_bit_for_bit(dtype, rule):
    """The NumPy update runs over the flat buffers in chunks (bench.train.CHUNK_BYTES); every rule is
    elementwise, so the result must be the whole-buffer arithmetic's to the bit, in either dtype, with a
    last chunk shorter than the others, and the state views must still be the flat state's."""
    from types import SimpleNamespace

    from bench.train import SGD

    rng = np.random.default_rng(7)
    shapes = {"a": (2, 7, 13), "b": (2, 1, 13), "c": (2, 13, 3)}  # 286 entries: 8 chunks of 32 and one of 30
    n = sum(int(np.prod(s)) for s in shapes.values())

    def fake_net():
        flat_p, flat_g = rng.standard_normal(n).astype(dtype), np.zeros(n, dtype)
        offs = np.cumsum([0] + [int(np.prod(s)) for s in shapes.values()])
        params = {k: flat_p[o:o + int(np.prod(s))].reshape(s) for (k, s), o in zip(shapes.items(), offs)}
        return SimpleNamespace(xp=np, flat_params=flat_p, flat_grads=flat_g, params=params)

    net = fake_net()
    betas = {k.removeprefix("adam_"): v for k, v in BETAS.items()}
    make = (lambda chunk: SGD(net, chunk)) if rule == "sgd" else (lambda chunk: Adam(net, **betas, chunk_bytes=chunk))
    opt = make(32 * np.dtype(dtype).itemsize)
    assert len(opt.chunks) == 9 and opt.chunks[-1][0].size == 30
    p_ref = net.flat_params.copy()
    state_ref = [np.zeros(n, dtype) for _ in opt.SLOTS]
    lr, momentum, weight_decay = 0.05, 0.9, 1e-3
    for _ in range(6):
        net.flat_grads[...] = rng.standard_normal(n).astype(dtype)
        opt.step(net.params, None, lr, momentum, weight_decay)
        scalars = opt._scalars(lr) if rule == "adam" else None
        _whole_buffer_step(rule, p_ref, net.flat_grads, state_ref, lr, momentum, weight_decay, scalars)
    uint = np.uint64 if dtype == np.float64 else np.uint32
    assert np.array_equal(net.flat_params.view(uint), p_ref.view(uint))  # bits, not values: -0 == 0 too
    for slot, ref in zip(opt.SLOTS, state_ref):
        assert np.array_equal(opt.flat_state[slot].view(uint), ref.view(uint)), slot
        for name, view in opt.state[slot].items():
            assert np.shares_memory(view, opt.flat_state[slot]) and view.shape == shapes[name]
