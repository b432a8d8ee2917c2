"""The network in NumPy: forward and hand-written backward, layer by layer.

Each `Layer` keeps its forward and backward side by side: `forward` caches what `backward` needs and
`backward(grad)` returns the gradient for its input after filling its parameter gradients and its
delta (dLoss/dz, z the pre-activation before any normalisation). Arrays carry a leading ensemble axis:
weights (E, fan_in, fan_out), activations (E, B, width); a batch shared by all members is (1, B, width)
and broadcasts through `np.matmul`.

Notation follows the maths: z = a W + b, n = norm(z), h = phi(n), a' = h (a + s h for residual blocks).
"""

from __future__ import annotations

import contextlib

import numpy as np

from bench import losses
from bench.activations import ACTIVATIONS, OUTPUTS, Activation
from bench.losses import Loss
from bench.spec import BN_MOMENTUM, NORM_EPS, NORMS, NetSpec


def output_delta(loss: Loss, out: Activation, y: np.ndarray, z: np.ndarray, d: np.ndarray) -> np.ndarray:
    """delta_out = dLoss/dz^L = dLoss/dy * out'(z^L), or the loss's own dLoss/dz^L where it folds the
    output's Jacobian in (softmax + cross-entropy: (y - d) / B). y = out(z), all (E, B, n_out)."""
    if loss.fused_output == out.name:
        return loss.dvalue(y, d)
    return loss.dvalue(y, d) * out.dphi(z, y, np)


class Layer:
    """Layer i: z = a W + b (+ x D on the output layer with direct connections), then norm and phi,
    and a' = a + s h in a residual block (s = 1, 1/sqrt(depth), or the learnable alpha of rezero).

    The layer holds its parameter and gradient arrays directly: views into the network's flat
    buffers, which the optimizer updates in place, so the hot loop does no dict lookups.
    """

    def __init__(self, spec: NetSpec, i: int, params: dict, grads: dict, buffers: dict):
        P = f"layers.{i}."
        self.hidden, self.first = i < spec.depth, i == 0
        self.act = ACTIVATIONS[spec.activation] if self.hidden else OUTPUTS[spec.output]
        self.norm = NORMS[spec.norm if self.hidden else "none"]
        self.normed = self.norm.replaces_bias  # a plain attribute: the hot loop reads it twice per step
        self.residual = spec.is_residual(i)
        self.direct = not self.hidden and spec.direct
        self.W, self.dW = params[P + "weight"], grads[P + "weight"]
        self.WT = self.W.transpose(0, 2, 1)  # a view: stays valid as W is updated in place
        mask = spec.first_layer_mask() if self.first else None
        self.mask = None if mask is None else mask.astype(self.W.dtype)
        if self.normed:  # a norm's mean subtraction cancels a bias: gamma and beta instead
            self.gamma, self.beta = params[P + "gamma"], params[P + "beta"]
            self.dgamma, self.dbeta = grads[P + "gamma"], grads[P + "beta"]
        else:
            self.b, self.db = params[P + "bias"], grads[P + "bias"]
        if self.norm.running:
            self.running_mean, self.running_var = P + "running_mean", P + "running_var"
            self.buffers = buffers  # the network's dict: reset_member and the twin read it by name
        if self.direct:
            self.D, self.dD = params[P + "direct"], grads[P + "direct"]
        # the residual branch's scale s: rezero's alpha (E, 1, 1), 1/sqrt(depth), or None for s = 1
        self.alpha = params.get(P + "alpha")
        self.dalpha = grads.get(P + "alpha")
        self.s = self.alpha if self.alpha is not None else spec.branch_scale(i)

    def forward(self, a: np.ndarray, x: np.ndarray, train: bool) -> np.ndarray:
        z = np.matmul(a, self.W)  # (E, B, fan_out)
        if self.direct:
            z += np.matmul(x, self.D)
        if self.normed:
            n = self._norm_forward(z, train)
        else:
            z += self.b
            n = z
        h = self.act.phi(n, np)
        self.a_in, self.x, self.z, self.n, self.h = a, x, z, n, h
        if not self.residual:
            return h
        return a + h if self.s is None else a + self.s * h

    def _norm_forward(self, z, train):
        """Batch norm: statistics over the batch (axis 1, (E, 1, w)), per member; in evaluation the running
        ones. Layer norm: over the units of each case (axis 2, (E, B, 1)), always."""
        norm = self.norm
        if norm.running and not train:
            mu, var = self.buffers[self.running_mean], self.buffers[self.running_var]
        else:
            mu = z.mean(norm.axis, keepdims=True)
            var = z.var(norm.axis, keepdims=True)
        if norm.running and train:
            buf, B, m = self.buffers, z.shape[1], BN_MOMENTUM
            buf[self.running_mean] = (1 - m) * buf[self.running_mean] + m * mu
            # running variance uses the unbiased batch variance (torch's convention)
            buf[self.running_var] = (1 - m) * buf[self.running_var] + m * var * B / (B - 1)
        self.inv_std = 1.0 / np.sqrt(var + NORM_EPS)
        self.xhat = (z - mu) * self.inv_std
        return self.gamma * self.xhat + self.beta

    def backward(self, grad: np.ndarray | None, delta_out: np.ndarray | None = None) -> np.ndarray | None:
        """The README's backward equations, one line each. grad = dLoss/da^l from the layer above
        (hidden layers), or delta_out = dLoss/dz^L (the output layer). Fills this layer's parameter
        gradients (written into the flat gradient buffer with out=) and returns dLoss/da^(l-1)."""
        if self.alpha is not None:
            np.sum(grad * self.h, axis=(1, 2), keepdims=True, out=self.dalpha)  # dalpha = sum_B,units grad * h
        if self.hidden:
            dh = grad if self.s is None else grad * self.s  # dh^l = s grad (s = 1 but in scaled residual blocks)
            dn = dh * self.act.dphi(self.n, self.h, np)  # dn^l = dh^l * phi'(n^l)
        else:
            dn = delta_out  # dn^L = delta_out
        if self.normed:
            xhat, ax = self.xhat, self.norm.axis
            N = dn.shape[ax]  # the count the statistics ran over: the batch B (batch norm) or the units (layer)
            np.sum(dn * xhat, axis=1, keepdims=True, out=self.dgamma)  # dgamma = sum_B dn * xhat
            np.sum(dn, axis=1, keepdims=True, out=self.dbeta)  # dbeta = sum_B dn
            dxhat = dn * self.gamma  # dxhat = dn * gamma
            # dz = inv_std / N * (N dxhat - sum_N dxhat - xhat * sum_N (dxhat * xhat)): the mean and
            # variance depend on every entry they were taken over
            dz = self.inv_std / N * (N * dxhat - dxhat.sum(ax, keepdims=True)
                                     - xhat * (dxhat * xhat).sum(ax, keepdims=True))
        else:
            dz = dn  # dz = dn
            np.sum(dz, axis=1, keepdims=True, out=self.db)  # db = sum_B dz
        self.delta = dz  # delta^l = dz^l, (E, B, fan_out)
        np.matmul(self.a_in.transpose(0, 2, 1), dz, out=self.dW)  # dW = a^(l-1)^T dz, (E, fan_in, fan_out)
        if self.mask is not None:
            self.dW *= self.mask  # weights outside the blocks do not exist: keep them at 0
        if self.direct:
            np.matmul(self.x.transpose(0, 2, 1), dz, out=self.dD)  # dD = x^T dz^L
        if self.first:
            return None  # nothing below the first layer needs dLoss/dx
        grad_in = np.matmul(dz, self.WT)  # dLoss/da^(l-1) = dz W^T
        if self.residual:
            grad_in += grad  # + grad: the identity path of a residual block
        return grad_in


class NumpyMLP:
    """The NumPy network: `params` and `grads` are dicts {name: (E, ...)} in `NetSpec.params()` order.

    Every parameter (and every gradient) is a view into one flat buffer, `flat_params` (`flat_grads`),
    so the optimizer updates all of them with a handful of array operations instead of a few per
    parameter: on tiny nets per-operation overhead, not arithmetic, sets the speed.
    """

    def __init__(self, spec: NetSpec, params: dict[str, np.ndarray], loss: str):
        spec.check()
        self.spec = spec
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
        if NORMS[spec.norm].running:
            for i, w in enumerate(spec.widths):
                self.buffers[f"layers.{i}.running_mean"] = np.zeros((E, 1, w), dtype)
                self.buffers[f"layers.{i}.running_var"] = np.ones((E, 1, w), dtype)
        self.layers = [Layer(spec, i, self.params, self.grads, self.buffers) for i in range(spec.n_layers)]
        self.loss = losses.get(loss)
        out = self.layers[-1].act
        if out.dphi is None and self.loss.fused_output != out.name:
            raise ValueError(f"output {out.name} pairs only with a loss that folds in its Jacobian "
                             f"(cross_entropy), not {loss}")

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """Outputs (E, B, n_out) for inputs x (E | 1, B, n_in)."""
        a = x
        for layer in self.layers:
            a = layer.forward(a, x, train)
        return a

    def loss_and_grads(self, x: np.ndarray, d: np.ndarray):
        """One training forward and backward: returns (loss (E,), outputs (E, B, n_out))."""
        y = self.forward(x, train=True)
        out = self.layers[-1]
        delta_out = output_delta(self.loss, out.act, y, out.n, d)
        grad = None
        for layer in reversed(self.layers):
            grad = layer.backward(grad, delta_out)
        return self.loss.value(y, d, out.n, np), y

    def evaluate(self, x: np.ndarray, d: np.ndarray):
        """Evaluation-mode (running batch-norm statistics) loss (E,) and outputs."""
        y = self.forward(x, train=False)
        return self.loss.value(y, d, self.layers[-1].n, np), y

    # the few array operations the shared training loop needs, in this backend's types
    xp = np
    record_deltas = True  # the backward pass keeps every layer's delta anyway (the torch twin retains them on request)
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
    equal-width hidden layers without a norm (batch norm couples the cases of a batch: not a per-input
    Jacobian; layer norm's is not written here).

    By hand, layer by layer: a^(l+1) = s phi(a^l W + b) (+ a^l), so d a^(l+1) / d a^l = diag(s phi'(n)) W^T (+ I),
    s the residual branch's scale (1 outside residual blocks).
    """
    spec = net.spec
    if spec.norm != "none" or len(set(spec.widths)) != 1:
        raise ValueError("hidden_jacobian needs equal hidden widths and no norm")
    net.forward(np.asarray(x)[None] if np.ndim(x) == 2 else x, train=False)
    first = net.layers[0]
    E, B, N = first.h.shape[0], first.h.shape[1], spec.widths[0]
    J = np.broadcast_to(np.eye(N, dtype=first.h.dtype), (E, B, N, N)).copy()  # (E, B, N, N): d a^1 / d a^1
    for layer in net.layers[1:spec.depth]:
        d = layer.act.dphi(layer.n, layer.h, np)  # (E, B, N) phi'(n) at this layer
        if layer.s is not None:
            d = d * layer.s  # s phi'(n): the branch's scale (alpha (E, 1, 1) or a number)
        step = np.einsum("ejk,ebji->ebki", layer.W, J) * d[..., None]  # diag(phi') W^T J
        J = step + J if layer.residual else step
    return J
