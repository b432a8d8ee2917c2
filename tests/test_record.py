"""The fused per-layer statistics (bench.record) against a reference written from their definitions.

`layer_stats` reduces every (parameter, member) segment of flat buffers at once, gathers a CPU torch
network's gradients into one buffer, and on a GPU uses multi-tensor norms; the reference here takes each
parameter, member and layer one at a time with np.linalg.norm / np.mean / np.std, in float64. Both sum the
same float64 numbers in different orders, so they agree to rounding: 1e-12 relative is ~1e4 ulps, room
for the different summation orders of up to a few thousand terms, and far below any real discrepancy
(a wrong member, layer or count is off by O(1)).
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.activations import SATURATED
from bench.init import init_params
from bench.record import STATS, device_layer_stats, host_layer_stats, layer_stats, row_layout, snapshot, update_stats
from bench.spec import NetSpec, TrainSpec
from bench.train import make_network, make_optimizer

torch = pytest.importorskip("torch")

RTOL = 1e-12  # see the module docstring

NETS = {
    "tanh plain": (NetSpec(5, 3, (6, 4), "tanh", "identity"), "mse"),
    "sigmoid batchnorm": (NetSpec(5, 2, (6, 6, 6), "sigmoid", "sigmoid", norm="batchnorm"), "sse_half"),
    "relu residual rezero": (NetSpec(4, 3, (5, 5, 5), "relu", "softmax", residual=True, residual_scale="rezero"),
                             "cross_entropy"),
    "gelu layernorm": (NetSpec(4, 2, (5, 5), "gelu", "identity", norm="layernorm"), "mse"),
    "block-diagonal first layer": (NetSpec(6, 2, (4, 3), "sigmoid", "sigmoid", input_blocks=(3, 3),
                                           hidden_blocks=(2, 2)), "sse_half"),
}


def reference_stats(net, E: int) -> np.ndarray:
    """The statistics from their definitions (bench.record's docstring), one parameter/member/layer at a time."""
    spec = net.spec
    to_np = net.to_numpy
    mask = spec.first_layer_mask()
    layers = []
    for layer in net.layers:
        h = to_np(layer.h)
        n = to_np(layer.n)
        delta = to_np(layer.delta if net.xp is np else layer.z.grad)
        act = layer.act
        per_member = []
        for k in range(E):
            hk = h[k].ravel()
            if act.dphi_max is None:
                sat = np.nan
            else:
                sat = np.mean(act.dphi(n[k], h[k], np).ravel() < SATURATED * act.dphi_max)
            per_member.append((np.linalg.norm(delta[k].ravel()), hk.mean(), hk.std(), sat))
        layers.append(per_member)
    out = np.full((len(net.names), E, len(STATS)), np.nan)
    for r, (name, (layer, kind)) in enumerate(zip(net.names, row_layout(spec))):
        g, w = to_np(net.grads[name]), to_np(net.params[name])
        for k in range(E):
            gk = g[k].ravel()
            count = mask.sum() if (layer == 1 and kind == "weight" and mask is not None) else gk.size
            out[r, k, :3] = np.linalg.norm(gk), np.abs(gk).sum() / count, np.linalg.norm(w[k].ravel())
            out[r, k, 3:7] = layers[layer - 1][k]
    return out


def _net_after_a_step(backend: str, name: str, E: int, rng_seed: int = 0):
    spec, loss = NETS[name]
    tspec = TrainSpec(steps=1, lr=0.1, momentum=0.9, loss=loss)
    params = init_params(spec, "xavier" if spec.activation != "relu" else "he", list(range(E)))
    net = make_network(backend, spec, params, tspec)
    rng = np.random.default_rng(rng_seed)
    x = rng.standard_normal((E, 8, spec.n_in))
    if loss == "cross_entropy":
        d = np.eye(spec.n_out)[rng.integers(0, spec.n_out, (E, 8))]
    elif spec.output == "sigmoid":
        d = rng.uniform(0.1, 0.9, (E, 8, spec.n_out))
    else:
        d = rng.standard_normal((E, 8, spec.n_out))
    net.loss_and_grads(net.asarray(x), net.asarray(d))
    if "rezero" in name:  # alpha starts at 0 (the branches give no gradient to their weights): move it
        with torch.no_grad() if net.xp is not np else _nullcontext():
            for k, p in net.params.items():
                if k.endswith("alpha"):
                    p[...] = 0.3 if net.xp is np else torch.full_like(p, 0.3)
        net.loss_and_grads(net.asarray(x), net.asarray(d))
    return net, tspec


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("E", [1, 3])
def test_fused_statistics_equal_the_reference(backend, name, E):
    net, _ = _net_after_a_step(backend, name, E)
    got, want = layer_stats(net), reference_stats(net, E)
    assert got.shape == want.shape == (len(net.names), E, len(STATS))
    for j, stat in enumerate(STATS[:7]):
        for r in range(got.shape[0]):
            np.testing.assert_allclose(got[r, :, j], want[r, :, j], rtol=RTOL, atol=0, equal_nan=True,
                                       err_msg=f"{backend} {name} E={E}: {stat} of row {r}")
    assert np.isnan(got[:, :, 7:]).all()  # update columns: filled by update_stats only
    if backend == "torch":
        # the GPU path (multi-tensor norms, one copy to the host) is device-agnostic: run on CPU tensors it
        # must give the same numbers as the host path
        dev = device_layer_stats(net)
        for j, stat in enumerate(STATS[:7]):
            np.testing.assert_allclose(dev[:, :, j], want[:, :, j], rtol=RTOL, atol=0, equal_nan=True,
                                       err_msg=f"device path, {name} E={E}: {stat}")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("E", [1, 3])
def test_update_statistics_equal_the_parameter_difference(backend, E):
    net, tspec = _net_after_a_step(backend, "tanh plain", E)
    stats = layer_stats(net)
    w0 = {k: net.to_numpy(v).copy() for k, v in net.params.items()}
    before = snapshot(net)
    make_optimizer(net, tspec).step(net.params, net.grads, 0.1, 0.9, 0.01)
    update_stats(net, before, stats)
    for r, name in enumerate(net.names):
        diff = net.to_numpy(net.params[name]) - w0[name]
        for k in range(E):
            u = np.linalg.norm(diff[k].ravel())
            # the difference of the stored parameters, summed in another order: rounding only (see RTOL)
            np.testing.assert_allclose(stats[r, k, STATS.index("update_norm")], u, rtol=RTOL, atol=0)
            w = stats[r, k, STATS.index("weight_norm")]
            want = u / w if w > 0 else np.nan
            np.testing.assert_allclose(stats[r, k, STATS.index("update_ratio")], want, rtol=RTOL, equal_nan=True)


def test_the_host_path_reads_a_torch_network_in_place():
    """A CPU torch network's statistics are read from its own memory: changing a parameter in place
    changes the next statistics (no stale copy), and the flat buffer is the parameters' storage."""
    net, _ = _net_after_a_step("torch", "tanh plain", 2)
    first = host_layer_stats(net)
    with torch.no_grad():
        net.params["layers.0.weight"].mul_(2.0)
    second = host_layer_stats(net)
    np.testing.assert_allclose(second[0, :, 2], 2 * first[0, :, 2], rtol=RTOL)  # ||2 w|| = 2 ||w||
    np.testing.assert_array_equal(second[1:, :, 2], first[1:, :, 2])
    flat = net.flat_params
    assert all(p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in net.params.values())


def test_numpy_saturation_reads_the_backward_passes_phi_prime():
    """A NumPy hidden layer's backward pass keeps phi'(n), which the saturation statistic reads instead of
    computing it again; a forward pass clears it (no stale phi' next to new activations), and the output
    layer, whose phi' the backward does not form, has none. The statistics equal the reference either way."""
    net, _ = _net_after_a_step("numpy", "sigmoid batchnorm", 2)
    for layer in net.layers[:-1]:
        np.testing.assert_array_equal(layer.dphiT, layer.act.dphi(layer.nT, layer.hT, np))
    assert net.layers[-1].dphiT is None
    got = layer_stats(net)
    j = STATS.index("act_saturation")
    np.testing.assert_allclose(got[:, :, j], reference_stats(net, 2)[:, :, j], rtol=RTOL, atol=0, equal_nan=True)
    for layer in net.layers[:-1]:
        layer.dphiT = np.zeros_like(layer.dphiT)  # phi' = 0 everywhere: every unit saturated
    hidden_rows = [r for r, (layer, _) in enumerate(row_layout(net.spec)) if layer <= net.spec.depth]
    assert (layer_stats(net)[hidden_rows, :, j] == 1).all()  # the kept phi' is what the statistic reads
    net.forward(np.zeros((2, 8, net.spec.n_in)))
    assert all(layer.dphiT is None for layer in net.layers)
