"""The network in NumPy: forward and hand-written backward, layer by layer.

Each `Layer` keeps its forward and backward side by side: `forward` caches what `backward` needs and
`backward(grad)` returns the gradient for its input after filling its parameter gradients and its
delta (dLoss/dz, z the pre-activation before any normalisation). Arrays carry a leading ensemble axis:
weights (E, fan_in, fan_out), activations (E, B, width); a batch shared by all members is (1, B, width)
and broadcasts through `np.matmul`.

Notation follows the maths: z = a W + b, n = norm(z), h = phi(n), a' = h (+ a for residual blocks).
"""

from __future__ import annotations

import contextlib

import numpy as np

from bench.spec import BN_EPS, BN_MOMENTUM, DEADZONE_BAND, LEAKY_SLOPE, NetSpec


def phi(name: str, z: np.ndarray) -> np.ndarray:
    if name == "sigmoid":
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1/(1+e^-z) without overflow warnings for large -z
    if name == "tanh":
        return np.tanh(z)
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, z, LEAKY_SLOPE * z)
    if name == "softsign":
        return z / (1.0 + np.abs(z))
    if name == "identity":
        return z
    raise ValueError(name)


def dphi(name: str, z: np.ndarray, h: np.ndarray) -> np.ndarray:
    """phi'(z), from the cached input z and output h = phi(z), whichever is cheaper."""
    if name == "sigmoid":
        return h * (1.0 - h)
    if name == "tanh":
        return 1.0 - h * h
    if name == "relu":
        return (z > 0).astype(z.dtype)
    if name == "leaky_relu":
        return np.where(z > 0, 1.0, LEAKY_SLOPE).astype(z.dtype)
    if name == "softsign":
        return 1.0 / (1.0 + np.abs(z)) ** 2
    raise ValueError(name)


def _sigmoid(z):
    t = z * 0.5
    np.tanh(t, out=t)
    t += 1.0
    t *= 0.5  # = phi("sigmoid", z) bit for bit, with one temporary instead of three
    return t


def _tanh(z):
    return np.tanh(z)


def _dphi_sigmoid_times(grad, h):
    t = 1.0 - h
    t *= h
    t *= grad  # = grad * (h * (1 - h)), the same roundings as grad * dphi("sigmoid", z, h)
    return t


def _dphi_tanh_times(grad, h):
    t = h * h
    np.subtract(1.0, t, out=t)
    t *= grad
    return t


def phi_fn(name: str):
    """phi as a one-argument function, looked up once per layer instead of once per call."""
    return {"sigmoid": _sigmoid, "tanh": _tanh, "softmax": softmax}.get(name) or (lambda z: phi(name, z))


def grad_times_dphi_fn(name: str):
    """(grad, z, h) -> grad * phi'(z), in place where the activation allows it."""
    if name == "sigmoid":
        return lambda grad, z, h: _dphi_sigmoid_times(grad, h)
    if name == "tanh":
        return lambda grad, z, h: _dphi_tanh_times(grad, h)
    return lambda grad, z, h: grad * dphi(name, z, h)


DPHI_MAX = {"sigmoid": 0.25, "tanh": 1.0, "relu": 1.0, "leaky_relu": 1.0, "softsign": 1.0}
SATURATED = 0.05  # a unit is saturated (or dead) where phi'(z) < 5% of the largest phi' can be


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))  # shift by the max: exp never overflows
    return e / e.sum(-1, keepdims=True)


def in_deadzone(y: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Outputs that count as no error in sse_half_deadzone: target 1 (on) and y > 1 - band, or
    target 0 (off) and y < band (1986). Targets above 1/2 count as "on"; the test is one-sided, so an
    identity output past its target is inside too. The loss jumps by band^2 / 2 at the band's edge."""
    return np.where(d > 0.5, y > d - DEADZONE_BAND, y < d + DEADZONE_BAND)


def deadzone_error(y: np.ndarray, d: np.ndarray) -> np.ndarray:
    """y - d, with 0 for outputs inside their band (a new array)."""
    e = y - d
    e[in_deadzone(y, d)] = 0.0
    return e


def loss_value(loss: str, y: np.ndarray, d: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Per-member loss (E,) of outputs y (logits z for softmax) against targets d, (E | 1, B, n_out)."""
    if loss == "sse_half":  # 1986: 1/2 sum over cases AND outputs
        return 0.5 * ((y - d) ** 2).sum((1, 2))
    if loss == "sse_half_deadzone":  # 1986 family trees: sse_half without the outputs already right
        return 0.5 * (deadzone_error(y, d) ** 2).sum((1, 2))
    if loss == "mse":
        return ((y - d) ** 2).mean((1, 2))
    if loss == "cross_entropy":  # mean over cases of -log p(target), with a stable log-softmax
        shifted = logits - logits.max(-1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        return -(d * log_p).sum(2).mean(1)
    raise ValueError(loss)


def loss_and_delta(loss: str, output: str, y: np.ndarray, d: np.ndarray, logits: np.ndarray):
    """(loss_value, output_delta) with y - d computed once; the same roundings as the two functions."""
    if loss == "sse_half_deadzone":
        e = deadzone_error(y, d)
    else:
        e = y - d
    if loss in ("sse_half", "sse_half_deadzone"):
        losses = 0.5 * (e * e).sum((1, 2))
    elif loss == "mse":
        losses = (e * e).mean((1, 2))
    else:
        return loss_value(loss, y, d, logits), output_delta(loss, output, y, d)
    if loss == "mse":
        e *= 2.0 / (y.shape[1] * y.shape[2])
    if output == "sigmoid":
        t = 1.0 - y
        t *= y
        t *= e  # e * (y * (1 - y))
        return losses, t
    return losses, e


def output_delta(loss: str, output: str, y: np.ndarray, d: np.ndarray) -> np.ndarray:
    """dLoss/dz for the output layer: loss derivative times the output non-linearity's."""
    if loss == "cross_entropy":  # softmax + cross-entropy: the Jacobians cancel to (p - d)
        return (y - d) / y.shape[1]
    if loss == "sse_half":
        g = y - d
    elif loss == "sse_half_deadzone":  # zero inside the band: those outputs get no gradient
        g = deadzone_error(y, d)
    else:
        g = (2.0 / (y.shape[1] * y.shape[2])) * (y - d)
    return g * (y * (1.0 - y)) if output == "sigmoid" else g


class Layer:
    """Layer i: z = a W + b (+ x D on the output layer with direct connections), then norm/phi.

    The layer holds its parameter and gradient arrays directly (views into the network's flat
    buffers, updated in place), so the hot loop does no dict lookups; gradients are written in place.
    """

    def __init__(self, spec: NetSpec, i: int, params: dict, grads: dict, buffers: dict):
        # params/grads/buffers are the network's dicts, shared: the optimizer updates params in place
        self.i, self.p, self.buf, self.g, self.buffers = i, f"layers.{i}.", params, grads, buffers
        self.hidden = i < spec.depth
        self.act = spec.activation if self.hidden else spec.output
        self.bn = self.hidden and spec.norm == "batchnorm"
        self.residual = spec.is_residual(i)
        self.direct = not self.hidden and spec.direct
        self.mask = spec.first_layer_mask() if i == 0 else None
        self.phi = phi_fn(self.act)
        self.grad_times_dphi = grad_times_dphi_fn(self.act) if self.hidden else None
        P = self.p
        self.W, self.gW = params[P + "weight"], grads[P + "weight"]
        self.WT = self.W.transpose(0, 2, 1)  # a view: stays valid as W is updated in place
        if self.mask is not None:
            self.mask = self.mask.astype(self.W.dtype)
        if self.bn:
            self.gamma, self.beta = params[P + "gamma"], params[P + "beta"]
            self.g_gamma, self.g_beta = grads[P + "gamma"], grads[P + "beta"]
        else:
            self.b, self.gb = params[P + "bias"], grads[P + "bias"]
        if self.direct:
            self.D, self.gD = params[P + "direct"], grads[P + "direct"]

    def forward(self, a: np.ndarray, x: np.ndarray, train: bool) -> np.ndarray:
        z = np.matmul(a, self.W)  # (E, B, fan_out)
        if self.direct:
            z += np.matmul(x, self.D)
        if self.bn:
            n = self._bn_forward(z, train)
        else:
            z += self.b
            n = z
        h = self.phi(n)
        self.a_in, self.x, self.z, self.n, self.h = a, x, z, n, h
        return a + h if self.residual else h

    def _bn_forward(self, z, train):
        P = self.p
        if train:
            mu = z.mean(1, keepdims=True)  # (E, 1, w): statistics over the batch, per member
            var = z.var(1, keepdims=True)
            B = z.shape[1]
            m = BN_MOMENTUM
            self.buffers[P + "running_mean"] = (1 - m) * self.buffers[P + "running_mean"] + m * mu
            # running variance uses the unbiased batch variance (torch's convention)
            self.buffers[P + "running_var"] = (1 - m) * self.buffers[P + "running_var"] + m * var * B / (B - 1)
        else:
            mu, var = self.buffers[P + "running_mean"], self.buffers[P + "running_var"]
        self.inv_std = 1.0 / np.sqrt(var + BN_EPS)
        self.xhat = (z - mu) * self.inv_std
        return self.gamma * self.xhat + self.beta

    def backward(self, grad: np.ndarray, need_input_grad: bool, delta_out: np.ndarray | None = None):
        """grad = dLoss/d(layer output); returns dLoss/d(layer input). Output layer: pass delta_out."""
        if delta_out is not None:
            dn = delta_out
        else:
            dn = self.grad_times_dphi(grad, self.n, self.h)
        if self.bn:
            xhat, B = self.xhat, dn.shape[1]
            np.sum(dn * xhat, axis=1, keepdims=True, out=self.g_gamma)
            np.sum(dn, axis=1, keepdims=True, out=self.g_beta)
            dxhat = dn * self.gamma
            # the usual batch-norm backward: mean and variance depend on every case in the batch
            dz = self.inv_std / B * (B * dxhat - dxhat.sum(1, keepdims=True)
                                     - xhat * (dxhat * xhat).sum(1, keepdims=True))
        else:
            dz = dn
            np.sum(dz, axis=1, keepdims=True, out=self.gb)
        self.delta = dz  # (E, B, fan_out)
        np.matmul(self.a_in.transpose(0, 2, 1), dz, out=self.gW)  # (E, fan_in, fan_out)
        if self.mask is not None:
            self.gW *= self.mask  # weights outside the blocks do not exist: keep them at 0
        if self.direct:
            np.matmul(self.x.transpose(0, 2, 1), dz, out=self.gD)
        if not need_input_grad:
            return None
        grad_in = np.matmul(dz, self.WT)
        if self.residual:
            grad_in += grad
        return grad_in


class NumpyMLP:
    """The NumPy network: `params` and `grads` are dicts {name: (E, ...)} in `NetSpec.params()` order.

    Every parameter (and every gradient) is a view into one flat buffer, `flat_params` (`flat_grads`),
    so the optimizer updates all of them with a handful of array operations instead of a few per
    parameter: on tiny nets per-operation overhead, not arithmetic, sets the speed.
    """

    def __init__(self, spec: NetSpec, params: dict[str, np.ndarray], loss: str):
        spec.check()
        self.spec, self.loss = spec, loss
        self.names = [name for name, *_ in spec.params()]
        dtype = np.asarray(params[self.names[0]]).dtype
        sizes = [np.asarray(params[name]).size for name in self.names]
        self.flat_params = np.empty(sum(sizes), dtype)
        self.flat_grads = np.zeros(sum(sizes), dtype)
        self.params, self.grads = {}, {}
        off = 0
        for name, size in zip(self.names, sizes):
            shape = np.shape(params[name])
            self.params[name] = self.flat_params[off:off + size].reshape(shape)
            self.params[name][...] = params[name]  # own copies
            self.grads[name] = self.flat_grads[off:off + size].reshape(shape)
            off += size
        E = self.params[self.names[0]].shape[0]
        self.buffers = {}
        if spec.norm == "batchnorm":
            for i, w in enumerate(spec.widths):
                self.buffers[f"layers.{i}.running_mean"] = np.zeros((E, 1, w), dtype)
                self.buffers[f"layers.{i}.running_var"] = np.ones((E, 1, w), dtype)
        self.layers = [Layer(spec, i, self.params, self.grads, self.buffers) for i in range(spec.n_layers)]
        self.output_layer = self.layers[-1]
        self.hidden_reversed = self.layers[-2::-1]

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """Outputs (E, B, n_out) for inputs x (E | 1, B, n_in)."""
        a = x
        for layer in self.layers:
            a = layer.forward(a, x, train)
        return a

    def loss_and_grads(self, x: np.ndarray, d: np.ndarray, record: bool = False):
        """One training forward and backward: returns (loss (E,), outputs (E, B, n_out))."""
        y = self.forward(x, train=True)
        out = self.output_layer
        losses, delta = loss_and_delta(self.loss, self.spec.output, y, d, out.n)
        grad = out.backward(None, True, delta_out=delta)
        last = self.hidden_reversed[-1]
        for layer in self.hidden_reversed:
            grad = layer.backward(grad, layer is not last)
        return losses, y

    def evaluate(self, x: np.ndarray, d: np.ndarray):
        """Evaluation-mode (running batch-norm statistics) loss (E,) and outputs."""
        y = self.forward(x, train=False)
        return loss_value(self.loss, y, d, self.layers[-1].n), y

    def layer_stats(self) -> dict[tuple[int, str], dict[str, np.ndarray]]:
        """Per-layer statistics of the last `loss_and_grads`, each (E,): see `bench.record`."""
        from bench.record import numpy_layer_stats

        return numpy_layer_stats(self)

    # the few array operations the shared training loop needs, in this backend's types
    asarray = staticmethod(np.asarray)
    to_numpy = staticmethod(np.asarray)

    def no_grad(self):
        return contextlib.nullcontext()

    def reset_member(self, k: int) -> None:
        """Zero member k's parameters (after it diverged), so it stays finite and costs nothing."""
        for p in self.params.values():
            p[k] = 0.0
        for name, b in self.buffers.items():
            b[k] = 1.0 if name.endswith("var") else 0.0


def hidden_jacobian(net: NumpyMLP, x: np.ndarray) -> np.ndarray:
    """J = d a^L / d a^1, the Jacobian of the last hidden layer's output with respect to the first's, for each
    member and input: (E, B, N, N) with J[e, b, k, j] = d a^L_k / d a^1_j (Pennington et al. 2017's
    input-output Jacobian of the L - 1 square layers above the first). Evaluation mode; plain or residual
    equal-width hidden layers (batch norm couples the cases of a batch: not a per-input Jacobian).

    By hand, layer by layer: a^(l+1) = phi(a^l W + b) (+ a^l), so d a^(l+1) / d a^l = diag(phi'(n)) W^T (+ I).
    """
    spec = net.spec
    if spec.norm != "none" or len(set(spec.widths)) != 1:
        raise ValueError("hidden_jacobian needs equal hidden widths and no batch norm")
    net.forward(np.asarray(x)[None] if np.ndim(x) == 2 else x, train=False)
    first = net.layers[0]
    E, B, N = first.h.shape[0], first.h.shape[1], spec.widths[0]
    J = np.broadcast_to(np.eye(N, dtype=first.h.dtype), (E, B, N, N)).copy()  # (E, B, N, N): d a^1 / d a^1
    for layer in net.layers[1:spec.depth]:
        d = dphi(layer.act, layer.n, layer.h)  # (E, B, N) phi'(n) at this layer
        step = np.einsum("ejk,ebji->ebki", layer.W, J) * d[..., None]  # diag(phi') W^T J
        J = step + J if layer.residual else step
    return J
