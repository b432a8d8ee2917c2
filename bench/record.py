"""Per-layer statistics, computed the same way for both backends, gathered into columnar buffers.

For every parameter (rows of the `layers` table) at a logged step, per ensemble member:
  grad_norm      L2 norm of dLoss/dparam
  grad_mean_abs  mean |dLoss/dparam| over the parameter's entries (the seed's chart plots this size)
  weight_norm    L2 norm of the parameter itself
and for the layer the parameter belongs to (repeated on each of its parameter rows):
  delta_norm     L2 norm of dLoss/dz over the batch and the layer's units (z = a W + b, before norm)
  act_mean/std   mean and standard deviation of the layer's activations h = phi(norm(z))
  act_saturation fraction of units x cases where phi'(z) < 5% of phi's largest slope: a saturated
                 sigmoid/tanh unit, or a dead (inactive) relu unit; NaN for softmax/identity outputs.
and, for the update the optimizer applies after this step's gradient (weight decay included):
  update_norm    ||w(t+1) - w(t)||, the difference of the stored parameters (an update below w's
                 rounding is 0 here); NaN at the last step, which applies no update
  update_ratio   update_norm / weight_norm; NaN where the parameter is 0 (a zero-initialised bias at
                 step 0: no relative size), so that means over rows skip it
Entries of a block-diagonal first layer that do not exist (masked to 0) are not counted in means.
"""

from __future__ import annotations

import numpy as np

from bench.activations import SATURATED

PARAM_STATS = ("grad_norm", "grad_mean_abs", "weight_norm")
LAYER_STATS = ("delta_norm", "act_mean", "act_std", "act_saturation")
UPDATE_STATS = ("update_norm", "update_ratio")
STATS = PARAM_STATS + LAYER_STATS + UPDATE_STATS


def row_layout(spec):
    """(layer, kind) for every parameter, in order: the rows of one logged step for one member."""
    return [(layer, kind) for _, kind, layer, _ in spec.params()]


def layer_stats(net) -> np.ndarray:
    """Statistics of the network's last training backward pass: (n_params, E, len(STATS)) float64.
    The update columns are NaN: `update_stats` fills them once the update has been applied."""
    return numpy_layer_stats(net) if net.xp is np else torch_layer_stats(net)


def snapshot(net):
    """The parameters as they are now, for `update_stats` after the update (a copy of the flat
    buffer in NumPy, one tensor per parameter in torch)."""
    if net.xp is np:
        return net.flat_params.copy()
    import torch

    with torch.no_grad():
        return torch._foreach_mul(list(net.params.values()), 1.0)  # exact copies, one op for all


def update_stats(net, before, stats: np.ndarray) -> None:
    """Fill `stats`' update columns (in place) with ||w(t+1) - w(t)|| against `snapshot`'s w(t)."""
    E = stats.shape[1]
    if net.xp is np:
        np.subtract(net.flat_params, before, out=before)
        np.multiply(before, before, out=before)
        u = np.sqrt(np.add.reduceat(before, _segment_starts(net, E)).reshape(-1, E))
    else:
        import torch

        with torch.no_grad():
            torch._foreach_sub_(before, list(net.params.values()))  # w(t) - w(t+1): the sign goes in the square
            u = torch.stack([torch.linalg.vector_norm(d.reshape(E, -1), dim=1) for d in before])
            u = u.to(torch.float64).cpu().numpy()
    j = STATS.index("update_norm")
    w = stats[:, :, STATS.index("weight_norm")]
    stats[:, :, j] = u
    with np.errstate(divide="ignore", invalid="ignore"):
        stats[:, :, j + 1] = np.where(w > 0, u / w, np.nan)


def _saturated(act, n, h, xp):
    """Per unit and case: is phi'(n) below SATURATED of the largest slope? None where undefined."""
    if act.dphi_max is None:
        return None
    return act.dphi(n, h, xp) < SATURATED * act.dphi_max


def numpy_layer_stats(net) -> np.ndarray:
    """The NumPy network's statistics, from its layers' caches and its flat gradient buffer."""
    spec = net.spec
    E = net.params[net.names[0]].shape[0]
    out = np.full((len(net.names), E, len(STATS)), np.nan)
    per_layer = {}
    for li, layer in enumerate(net.layers):
        h = layer.h.reshape(E, -1)
        delta = layer.delta.reshape(E, -1)
        n = h.shape[1]
        below = _saturated(layer.act, layer.n, layer.h, np)
        if below is None:
            sat = np.full(E, np.nan)
        else:
            sat = np.count_nonzero(below.reshape(E, -1), axis=1) / n  # no float copy of the mask
        mean = h.mean(1)
        centred = h - mean[:, None]
        # two-pass variance as np.std, with the square-and-sum fused (no squared temporary)
        std = np.sqrt(np.vecdot(centred, centred) / n)
        per_layer[li + 1] = (np.sqrt(np.vecdot(delta, delta)), mean, std, sat)
    mask = spec.first_layer_mask()
    layout = row_layout(spec)
    count = np.array([mask.sum() if (layer == 1 and kind == "weight" and mask is not None)
                      else net.grads[name][0].size for name, (layer, kind) in zip(net.names, layout)], float)
    flat_g, flat_w = net.flat_grads, net.flat_params
    # every parameter is a contiguous (E, n) block of the flat buffers: one reduceat per statistic
    # sums all (parameter, member) segments at once instead of a few operations per parameter
    starts = _segment_starts(net, E)
    g2 = np.add.reduceat(flat_g * flat_g, starts).reshape(-1, E)  # (n_params, E)
    g1 = np.add.reduceat(np.abs(flat_g), starts).reshape(-1, E)
    w2 = np.add.reduceat(flat_w * flat_w, starts).reshape(-1, E)
    out[:, :, 0] = np.sqrt(g2)
    out[:, :, 1] = g1 / count[:, None]
    out[:, :, 2] = np.sqrt(w2)
    for r, (layer, _) in enumerate(layout):
        out[r, :, 3:3 + len(LAYER_STATS)] = np.stack(per_layer[layer], 1)
    return out


def _segment_starts(net, E: int) -> np.ndarray:
    """Start of each (parameter, member) row in the network's flat buffers, cached on the network."""
    starts = getattr(net, "_stat_starts", None)
    if starts is None:
        sizes = [net.params[name][0].size for name in net.names]
        starts = np.concatenate([[0], np.cumsum(np.repeat(sizes, E))[:-1]]).astype(np.intp)
        net._stat_starts = starts
    return starts


def torch_layer_stats(net) -> np.ndarray:
    """The same statistics as `numpy_layer_stats`, reduced on the tensors' device, one copy to host."""
    import torch

    spec = net.spec
    E = net.params[net.names[0]].shape[0]
    per_layer = {}
    with torch.no_grad():
        for li, layer in enumerate(net.layers):
            h = layer.h.reshape(E, -1)
            delta = layer.z.grad.reshape(E, -1)
            below = _saturated(layer.act, layer.n, layer.h, torch)
            if below is None:
                sat = torch.full((E,), float("nan"), dtype=h.dtype, device=h.device)
            else:
                sat = below.reshape(E, -1).to(h.dtype).mean(1)
            per_layer[li + 1] = torch.stack([(delta * delta).sum(1).sqrt(), h.mean(1),
                                             h.std(1, correction=0), sat], 1)
        mask = spec.first_layer_mask()
        rows = []
        w0 = net.params[net.names[0]]
        pending = torch.full((E, len(UPDATE_STATS)), float("nan"), dtype=w0.dtype, device=w0.device)  # update_stats
        for name, (layer, kind) in zip(net.names, row_layout(spec)):
            p = net.params[name]
            g, w = p.grad.reshape(E, -1), p.reshape(E, -1)
            count = float(mask.sum()) if (layer == 1 and kind == "weight" and mask is not None) else g.shape[1]
            rows.append(torch.cat([torch.stack([(g * g).sum(1).sqrt(), g.abs().sum(1) / count,
                                                (w * w).sum(1).sqrt()], 1), per_layer[layer], pending], 1))
        return torch.stack(rows).to(torch.float64).cpu().numpy()


class Recorder:
    """Columnar buffers for the `steps` and `layers` tables of one job (E members).

    Rows are kept per logged step as small arrays and turned into columns once, at the end, so
    recording costs a few array copies per logged step and no Python loop over rows.
    """

    def __init__(self, spec):
        layout = row_layout(spec)
        self.row_layer = np.array([layer for layer, _ in layout], np.int64)
        self.row_param = np.array([kind for _, kind in layout], dtype=object)
        self._steps: list[tuple[int, np.ndarray, dict[str, np.ndarray]]] = []
        self._layers: list[tuple[int, np.ndarray, np.ndarray]] = []
        self._rows = 0  # rows held, both tables: bench.checkpoint streams them out past a threshold

    def log_step(self, step: int, alive: np.ndarray, **metrics: np.ndarray) -> None:
        """metrics: name -> (E,) values (loss, accuracy, test_loss, test_accuracy)."""
        self._steps.append((step, alive.copy(), metrics))
        self._rows += int(alive.sum())

    def log_layers(self, step: int, alive: np.ndarray, stats: np.ndarray) -> None:
        self._layers.append((step, alive.copy(), stats))
        self._rows += len(self.row_layer) * int(alive.sum())

    def pending_rows(self) -> int:
        return self._rows

    def drain(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The rows held so far as (steps, layers) columns, and forget them."""
        out = self.steps_columns(), self.layers_columns()
        self._steps, self._layers, self._rows = [], [], 0
        return out

    def steps_columns(self) -> dict[str, np.ndarray]:
        cols: dict[str, list] = {"member": [], "step": []}
        names = sorted({k for _, _, m in self._steps for k in m})
        for k in names:
            cols[k] = []
        for step, alive, metrics in self._steps:
            members = np.flatnonzero(alive)
            cols["member"].append(members)
            cols["step"].append(np.full(len(members), step, np.int64))
            for k in names:
                v = metrics.get(k)
                cols[k].append(np.full(len(members), np.nan) if v is None else np.asarray(v, float)[members])
        return {k: np.concatenate(v) if v else np.array([]) for k, v in cols.items()}

    def layers_columns(self) -> dict[str, np.ndarray]:
        cols: dict[str, list] = {k: [] for k in ("member", "step", "layer", "param", *STATS)}
        P = len(self.row_layer)
        for step, alive, stats in self._layers:  # stats (P, E, S)
            members = np.flatnonzero(alive)
            n = len(members)
            cols["member"].append(np.tile(members, P))
            cols["step"].append(np.full(P * n, step, np.int64))
            cols["layer"].append(np.repeat(self.row_layer, n))
            cols["param"].append(np.repeat(self.row_param, n))
            block = stats[:, members, :].reshape(P * n, len(STATS))
            for j, k in enumerate(STATS):
                cols[k].append(block[:, j])
        return {k: np.concatenate(v) if v else np.array([]) for k, v in cols.items()}
