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
    The update columns are NaN: `update_stats` fills them once the update has been applied.

    Computed once from what the backward pass left (gradients, deltas, activations): on the host by one
    NumPy code for both networks (a CPU torch network's tensors are read in place, no copies but its
    gradients gathered into one buffer), on a GPU by multi-tensor reductions and one copy to the host."""
    return device_layer_stats(net) if _on_device(net) else host_layer_stats(net)


def snapshot(net):
    """The parameters as they are now, for `update_stats` after the update: one copy of the network's
    flat parameter buffer into a buffer kept on the network (allocated once)."""
    flat = _flat_params(net)
    before = getattr(net, "_before", None)
    if before is None:
        before = net._before = flat.clone() if _on_device(net) else flat.copy()
    elif _on_device(net):
        before.copy_(flat)
    else:
        np.copyto(before, flat)
    return before


def update_stats(net, before, stats: np.ndarray) -> None:
    """Fill `stats`' update columns (in place) with ||w(t+1) - w(t)|| against `snapshot`'s w(t)."""
    E = stats.shape[1]
    flat = _flat_params(net)
    if _on_device(net):  # on a GPU: one subtraction, one multi-tensor norm, one copy to the host
        before.sub_(flat)  # w(t) - w(t+1): the sign goes in the square
        u = _device_norms(_segments(net, before), 2).cpu().numpy()
    else:
        np.subtract(flat, before, out=before)
        u = np.sqrt(np.add.reduceat(np.multiply(before, before, out=before), _segment_starts(net, E)))
    j = STATS.index("update_norm")
    w = stats[:, :, STATS.index("weight_norm")]
    stats[:, :, j] = u.reshape(-1, E)
    stats[:, :, j + 1] = np.nan
    np.divide(stats[:, :, j], w, out=stats[:, :, j + 1], where=w > 0)


def _on_device(net) -> bool:
    """A torch network on a GPU: its statistics are reduced there (everything else is read by NumPy)."""
    return net.xp is not np and net.flat_params.device.type != "cpu"


def _flat_params(net):
    """The flat parameter buffer as NumPy (the NumPy network's; a CPU torch network's, read in place) or,
    on a GPU, as the tensor."""
    if net.xp is np or _on_device(net):
        return net.flat_params
    view = getattr(net, "_flat_np", None)
    if view is None:
        view = net._flat_np = net.flat_params.numpy()  # shares memory: always the current parameters
    return view


def _flat_grads(net) -> np.ndarray:
    """The gradients as one flat NumPy buffer in parameter order: the NumPy network's own; a CPU torch
    network's gathered by one concatenation into a buffer kept on the network."""
    if net.xp is np:
        return net.flat_grads
    buf = _scratch(net, "grads", net.flat_params.shape, _flat_params(net).dtype)
    return np.concatenate([p.grad.numpy().reshape(-1) for p in net.params.values()], out=buf)


def _saturated(act, n, h, xp):
    """Per unit and case: is phi'(n) below SATURATED of the largest slope? None where undefined."""
    if act.dphi_max is None:
        return None
    return act.dphi(n, h, xp) < SATURATED * act.dphi_max


def _scratch(net, key, shape, dtype) -> np.ndarray:
    """A buffer kept on the network for an intermediate of the statistics (no allocation per logged step)."""
    cache = net.__dict__.setdefault("_stat_scratch", {})
    buf = cache.get(key)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = cache[key] = np.empty(shape, dtype)
    return buf


def host_layer_stats(net) -> np.ndarray:
    """The statistics in NumPy, from the layers' caches and the flat parameter and gradient buffers (either
    network on the CPU), in few NumPy calls: per layer raw sums (divided and rooted once for all layers), per
    parameter one `reduceat` over all (parameter, member) segments; intermediates go into buffers kept on
    the network (no allocation per logged step)."""
    E = net.params[net.names[0]].shape[0]
    torch_net = net.xp is not np
    # per layer and member: sum dz^2, sum h, sum (h - mean)^2, saturated count; divided and rooted at the end
    sums, counts = np.empty((4, len(net.layers), E)), np.empty((len(net.layers), 1))
    for li, layer in enumerate(net.layers):
        if torch_net:  # zero-copy NumPy views of the CPU tensors (force: detached, no copy on the CPU)
            n_, h_, delta_ = layer.n.numpy(force=True), layer.h.numpy(force=True), layer.z.grad.numpy()
            dphi_ = None
        else:  # the NumPy layers store (E, width, B): statistics over a member's entries read them as stored;
            # a hidden layer's backward pass kept phi'(n) (None where it did not compute it: the output layer)
            n_, h_, delta_, dphi_ = layer.nT, layer.hT, layer.deltaT, layer.dphiT
        h, delta = h_.reshape(E, -1), delta_.reshape(E, -1)
        counts[li] = h.shape[1]
        sums[0, li] = np.vecdot(delta, delta)
        np.add.reduce(h, axis=1, out=sums[1, li])
        # two-pass variance as np.std, the square-and-sum fused (no squared temporary)
        centred = np.subtract(h, sums[1, li, :, None] / h.shape[1],
                              out=_scratch(net, ("centred", li), h.shape, h.dtype))
        sums[2, li] = np.vecdot(centred, centred)
        act = layer.act
        if act.dphi_max is None:  # NaN where phi has no saturation statistic
            sums[3, li] = np.nan
        else:  # a count of a boolean buffer: no float copy of the mask
            below = np.less(act.dphi(n_, h_, np) if dphi_ is None else dphi_, SATURATED * act.dphi_max,
                            out=_scratch(net, ("below", li), h_.shape, np.bool_))
            # an integer count (exact whatever the order, so its path may follow E): for one member
            # count_nonzero, for many a sum of the boolean rows
            sums[3, li] = (np.count_nonzero(below) if E == 1
                           else np.add.reduce(below.reshape(E, -1), axis=1, dtype=np.intp))
    per_layer = np.empty((len(net.layers), E, len(LAYER_STATS)))
    per_layer[:, :, 0] = np.sqrt(sums[0])
    per_layer[:, :, 1] = sums[1] / counts
    per_layer[:, :, 2] = np.sqrt(sums[2] / counts)
    per_layer[:, :, 3] = sums[3] / counts
    # every (parameter, member) segment of the flat buffers at once: one reduceat per statistic, squares and
    # absolute values through one buffer kept on the network
    starts, flat_g, flat_w = _segment_starts(net, E), _flat_grads(net), _flat_params(net)
    scratch = _scratch(net, "flat", flat_w.shape, flat_w.dtype)
    grad_l1 = np.add.reduceat(np.abs(flat_g, out=scratch), starts)
    grad_norm = np.sqrt(np.add.reduceat(np.multiply(flat_g, flat_g, out=scratch), starts))
    weight_norm = np.sqrt(np.add.reduceat(np.multiply(flat_w, flat_w, out=scratch), starts))
    return _assemble(net, E, grad_norm, grad_l1, weight_norm, per_layer)


def _assemble(net, E: int, grad_norm, grad_l1, weight_norm, per_layer: np.ndarray) -> np.ndarray:
    """(n_params, E, len(STATS)) rows from per-(parameter, member) ||g||, sum |g| and ||w|| (flat, in
    parameter-major order) and the (n_layers, E, 4) layer statistics, repeated on the layer's parameter rows."""
    rows = getattr(net, "_stat_rows", None)
    if rows is None:  # per parameter row: its entries' count (a block-diagonal first layer's only) and layer
        layout = row_layout(net.spec)
        mask = net.spec.first_layer_mask()
        count = np.array([mask.sum() if (layer == 1 and kind == "weight" and mask is not None)
                          else np.prod(net.params[name].shape[1:]) for name, (layer, kind) in zip(net.names, layout)],
                         float)
        rows = net._stat_rows = (count[:, None], np.array([layer - 1 for layer, _ in layout]))
    count, layer_of_row = rows
    out = np.empty((len(net.names), E, len(STATS)))
    out[:, :, 0] = np.reshape(grad_norm, (-1, E))
    out[:, :, 1] = np.reshape(grad_l1, (-1, E)) / count
    out[:, :, 2] = np.reshape(weight_norm, (-1, E))
    out[:, :, 3:3 + len(LAYER_STATS)] = per_layer[layer_of_row]
    out[:, :, 3 + len(LAYER_STATS):] = np.nan  # the update columns: `update_stats` fills them
    return out


def _segment_starts(net, E: int) -> np.ndarray:
    """Start of each (parameter, member) row in the network's flat buffers, cached on the network."""
    starts = getattr(net, "_stat_starts", None)
    if starts is None:
        sizes = [int(np.prod(net.params[name].shape[1:])) for name in net.names]
        starts = np.concatenate([[0], np.cumsum(np.repeat(sizes, E))[:-1]]).astype(np.intp)
        net._stat_starts = starts
    return starts


def _segments(net, flat) -> list:
    """Views of a flat tensor laid out like the parameters, one per (parameter, member) in parameter-major
    order (cached per buffer: views stay valid as the buffer is updated in place)."""
    cache = net.__dict__.setdefault("_segment_views", {})
    key = flat.data_ptr()
    if key not in cache:
        E = net.params[net.names[0]].shape[0]
        ends = list(_segment_starts(net, E)[1:]) + [flat.numel()]
        cache[key] = [flat[a:b] for a, b in zip(_segment_starts(net, E), ends)]
    return cache[key]


def _device_norms(views, ord: int):
    """The `ord`-norms of all `views` in one multi-tensor call (one kernel on a GPU), as one float64 tensor."""
    import torch

    return torch.stack(torch._foreach_norm(views, ord)).to(torch.float64)


def device_layer_stats(net) -> np.ndarray:
    """The same statistics as `host_layer_stats` for a torch network on a GPU: four multi-tensor norms for
    every (parameter | layer, member) at once, a mean/std and a saturation count per layer, one copy to
    the host (no synchronisation per parameter)."""
    import torch

    E = net.params[net.names[0]].shape[0]
    P, L = len(net.names), len(net.layers)

    def members(tensors):
        return [v for t in tensors for v in t.unbind(0)]

    with torch.no_grad():
        grads = members(p.grad for p in net.params.values())
        parts = [_device_norms(grads, 2), _device_norms(grads, 1), _device_norms(_segments(net, net.flat_params), 2),
                 _device_norms(members(layer.z.grad for layer in net.layers), 2)]
        for layer in net.layers:
            h = layer.h.reshape(E, -1)
            centred = h - h.mean(1, keepdim=True)
            below = _saturated(layer.act, layer.n, layer.h, torch)
            saturated = (torch.full_like(h[:, 0], float("nan")) if below is None
                         else below.reshape(E, -1).sum(1, dtype=h.dtype))
            parts += [h.mean(1), torch.linalg.vecdot(centred, centred) / h.shape[1], saturated]
        v = torch.cat([t.to(torch.float64) for t in parts]).cpu().numpy()
    grad_norm, grad_l1, weight_norm = (v[k * P * E:(k + 1) * P * E] for k in range(3))
    rest = v[3 * P * E:]
    per_layer = np.empty((L, E, len(LAYER_STATS)))
    per_layer[:, :, 0] = rest[:L * E].reshape(L, E)
    per_layer[:, :, 1:] = rest[L * E:].reshape(L, 3, E).transpose(0, 2, 1)
    per_layer[:, :, 2] = np.sqrt(per_layer[:, :, 2])  # std from the two-pass variance, as np.std
    per_layer[:, :, 3] /= np.array([layer.h[0].numel() for layer in net.layers])[:, None]  # count -> fraction
    return _assemble(net, E, grad_norm, grad_l1, weight_norm, per_layer)


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
