"""The network in NumPy: forward and hand-written backward, layer by layer.

Each `Layer` keeps its forward and backward side by side: `forward` caches what `backward` needs and
`backward(grad)` returns the gradient for its input after filling its parameter gradients and its
delta (dLoss/dz, z the pre-activation before any normalisation).

Notation follows the maths: z = a W + b, n = norm(z), h = phi(n), a' = h (a + s h for residual blocks).

Layout. Arrays carry a leading ensemble axis: weights (E, fan_in, fan_out). Activations are stored
unit-major, each member's transpose: aT (E, width, B) holds a (B, width), so the layers compute
zT = W^T aT + b, dW = aT dzT^T and (dLoss/da)^T = W dzT. In this layout a sum over the batch (db)
runs along contiguous memory, in the same order for every member whatever E, and the first layer's
product with a batch shared by all members (the full batch, (1, B, n_in)) is one GEMM for all of them.
The layers expose the maths' (E, B, width) views as `z`, `n`, `h` and `delta` (what bench.record, the
lockstep twin and the plug-in checks read); `NumpyMLP.forward` takes and returns (E, B, width).

Each product's path follows from the layer's shape and whether its input is shared, never from the
ensemble size E, so that a member does the arithmetic of its solo run, bit for bit:
  - the first layer with a shared batch and an even fan_out: one GEMM, all members' W^T stacked,
    (E fan_out, n_in) @ (n_in, B), and one for all dW^T, (E fan_out, B) @ (B, n_in). A member's rows
    of it equal its solo run's (fan_out, ...) product only if the BLAS computes a row alike wherever
    it falls in its blocks: so measured with NumPy's OpenBLAS for rows in pairs, not for a lone last
    row (an odd fan_out differed in the last bit), so odd widths take the per-member path;
  - a contraction over one unit (z = a W with fan_in = 1 above the first layer, dz W^T with
    fan_out = 1) is an outer product per member: one broadcast multiply for all members, where
    np.matmul would make a GEMM call with K = 1 for each;
  - otherwise np.matmul, one BLAS call per member (~0.1 us each for matrices of a few entries).
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
        E, fan_in, fan_out = self.W.shape
        # the paths of the products (module docstring): one GEMM for all members where the first layer's
        # input is shared and its width even; outer products where a contraction runs over one unit
        self.gemm = self.first and fan_out % 2 == 0
        self.outer_in, self.outer_out = fan_in == 1 and not self.first, fan_out == 1
        self.elementwise = self.act.dphi is not None  # phi acts entry by entry (softmax: over the units)
        mask = spec.first_layer_mask() if self.first else None
        self.mask = None if mask is None else mask.astype(self.W.dtype)
        if self.normed:  # a norm's mean subtraction cancels a bias: gamma and beta instead
            self.gamma, self.beta = params[P + "gamma"], params[P + "beta"]
            self.dgamma, self.dbeta = grads[P + "gamma"], grads[P + "beta"]
        else:
            self.b, self.db = params[P + "bias"], grads[P + "bias"]
            self.bT, self.dbT = self.b.transpose(0, 2, 1), self.db.transpose(0, 2, 1)  # (E, fan_out, 1) views
        if self.norm.running:
            self.running_mean, self.running_var = P + "running_mean", P + "running_var"
            self.buffers = buffers  # the network's dict: reset_member and the twin read it by name
        if self.direct:
            self.D, self.dD = params[P + "direct"], grads[P + "direct"]
            self.DT = self.D.transpose(0, 2, 1)
        # the residual branch's scale s: rezero's alpha (E, 1, 1), 1/sqrt(depth), or None for s = 1
        self.alpha = params.get(P + "alpha")
        self.dalpha = grads.get(P + "alpha")
        self.s = self.alpha if self.alpha is not None else spec.branch_scale(i)

    # the maths' (E, B, width) views of the unit-major caches
    z = property(lambda self: self.zT.transpose(0, 2, 1))
    n = property(lambda self: self.nT.transpose(0, 2, 1))
    h = property(lambda self: self.hT.transpose(0, 2, 1))
    delta = property(lambda self: self.deltaT.transpose(0, 2, 1))

    def forward(self, aT: np.ndarray, xT: np.ndarray, train: bool) -> np.ndarray:
        """aT: this layer's input (E | 1, fan_in, B); xT: the network's input (direct connections).
        Returns a'T (E, fan_out, B)."""
        if self.gemm and aT.shape[0] == 1:  # a batch shared by all members: (E fan_out, n_in) @ (n_in, B)
            E, fan_out, n_in = self.WT.shape
            zT = np.matmul(self.WT.reshape(1, E * fan_out, n_in), aT).reshape(E, fan_out, -1)
        elif self.outer_in:
            zT = self.WT * aT  # zT = W^T aT with fan_in = 1: an outer product per member
        else:
            zT = np.matmul(self.WT, aT)  # zT = W^T aT (z = a W), one matmul per member
        if self.direct:
            zT += np.matmul(self.DT, xT)
        if self.normed:
            nT = self._norm_forward(zT, train)
        else:
            zT += self.bT
            nT = zT
        if self.elementwise:
            hT = self.act.phi(nT, np)
        else:  # softmax normalises over the units: the (E, B, w) view
            hT = self.act.phi(nT.transpose(0, 2, 1), np).transpose(0, 2, 1)
        self.aT, self.xT, self.zT, self.nT, self.hT, self.dphiT = aT, xT, zT, nT, hT, None
        if not self.residual:
            return hT
        return aT + hT if self.s is None else aT + self.s * hT

    def _norm_forward(self, zT, train):
        """Batch norm: statistics over the batch (axis 1 of (E, B, w), (E, 1, w)), per member; in evaluation
        the running ones. Layer norm: over the units of each case (axis 2, (E, B, 1)), always. Written on
        the (E, B, w) views; returns nT."""
        norm, z = self.norm, zT.transpose(0, 2, 1)
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
        return (self.gamma * self.xhat + self.beta).transpose(0, 2, 1)

    def backward(self, gradT: np.ndarray | None, delta_outT: np.ndarray | None = None) -> np.ndarray | None:
        """The README's backward equations, one line each, on the unit-major arrays. gradT = (dLoss/da^l)^T
        from the layer above (hidden layers), or delta_outT = (dLoss/dz^L)^T (the output layer). Fills this
        layer's parameter gradients (written into the flat gradient buffer with out=) and returns
        (dLoss/da^(l-1))^T, (E, fan_in, B)."""
        if self.alpha is not None:
            np.sum(gradT * self.hT, axis=(1, 2), keepdims=True, out=self.dalpha)  # dalpha = sum_B,units grad * h
        if self.hidden:
            dhT = gradT if self.s is None else gradT * self.s  # dh^l = s grad (s = 1 but in scaled residual blocks)
            # dn^l = dh^l * phi'(n^l); phi'(n^l) is kept for the saturation statistic (bench.record)
            self.dphiT = self.act.dphi(self.nT, self.hT, np)
            dnT = dhT * self.dphiT
        else:
            dnT = delta_outT  # dn^L = delta_out
        if self.normed:
            dzT = self._norm_backward(dnT)
        else:
            dzT = dnT  # dz = dn
            np.add.reduce(dzT, axis=2, keepdims=True, out=self.dbT)  # db = sum_B dz (np.sum without its wrapper)
        self.deltaT = dzT  # delta^l = dz^l, stored (E, fan_out, B)
        if self.direct:
            np.matmul(self.xT, dzT.transpose(0, 2, 1), out=self.dD)  # dD = x^T dz^L
        if self.first:
            self._first_dW(dzT)  # dW = x^T dz, by way of its transpose (see there)
            return None  # nothing below the first layer needs dLoss/dx
        np.matmul(self.aT, dzT.transpose(0, 2, 1), out=self.dW)  # dW = a^(l-1)^T dz = aT dzT^T
        # dLoss/da^(l-1) = dz W^T, stored (dLoss/da^(l-1))^T = W dzT
        grad_inT = self.W * dzT if self.outer_out else np.matmul(self.W, dzT)  # (fan_out = 1: an outer product)
        if self.residual:
            grad_inT += gradT  # + grad: the identity path of a residual block
        return grad_inT

    def _first_dW(self, dzT):
        """dW = x^T dz by way of dW^T = dzT x, (E, fan_out, n_in): for a batch shared by all members one
        GEMM, (E fan_out, B) @ (B, n_in), whose member rows are a solo run's (fan_out, B) @ (B, n_in)."""
        xT, (E, n_in, fan_out) = self.aT, self.dW.shape
        if self.gemm and xT.shape[0] == 1:
            dWT = np.matmul(dzT.reshape(1, E * fan_out, -1), xT.transpose(0, 2, 1)).reshape(E, fan_out, n_in)
        else:
            dWT = np.matmul(dzT, xT.transpose(0, 2, 1))
        self.dW[...] = dWT.transpose(0, 2, 1)  # dW = x^T dz
        if self.mask is not None:
            self.dW *= self.mask  # weights outside the blocks do not exist: keep them at 0

    def _norm_backward(self, dnT):
        """dgamma, dbeta and dz from dn, on the (E, B, w) views; returns dzT."""
        dn, xhat, ax = dnT.transpose(0, 2, 1), self.xhat, self.norm.axis
        N = dn.shape[ax]  # the count the statistics ran over: the batch B (batch norm) or the units (layer)
        np.sum(dn * xhat, axis=1, keepdims=True, out=self.dgamma)  # dgamma = sum_B dn * xhat
        np.sum(dn, axis=1, keepdims=True, out=self.dbeta)  # dbeta = sum_B dn
        dxhat = dn * self.gamma  # dxhat = dn * gamma
        # dz = inv_std / N * (N dxhat - sum_N dxhat - xhat * sum_N (dxhat * xhat)): the mean and
        # variance depend on every entry they were taken over
        dz = self.inv_std / N * (N * dxhat - dxhat.sum(ax, keepdims=True)
                                 - xhat * (dxhat * xhat).sum(ax, keepdims=True))
        return dz.transpose(0, 2, 1)


class NumpyMLP:
    """The NumPy network: `params` and `grads` are dicts {name: (E, ...)} in `NetSpec.params()` order.

    Every parameter (and every gradient) is a view into one flat buffer, `flat_params` (`flat_grads`),
    so the optimizer updates all of them with a handful of array operations instead of a few per
    parameter: on tiny nets per-operation overhead, not arithmetic, sets the speed.
    """

    def __init__(self, spec: NetSpec, params: dict[str, np.ndarray], loss: str, dtype=None):
        """`params` are copied into the flat buffers, cast to `dtype` on the way (default: theirs)."""
        spec.check()
        self.spec = spec
        self.names = [name for name, *_ in spec.params()]
        dtype = np.dtype(dtype) if dtype is not None else np.asarray(params[self.names[0]]).dtype
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
        """Outputs (E, B, n_out) for inputs x (E | 1, B, n_in) (the layers work on the transposes)."""
        xT = aT = x.transpose(0, 2, 1)
        for layer in self.layers:
            aT = layer.forward(aT, xT, train)
        return aT.transpose(0, 2, 1)

    def loss_and_grads(self, x: np.ndarray, d: np.ndarray):
        """One training forward and backward: returns (loss (E,), outputs (E, B, n_out))."""
        y = self.forward(x, train=True)
        out = self.layers[-1]
        delta_out = output_delta(self.loss, out.act, y, out.n, d)
        # unit-major and contiguous whatever layout the loss's arithmetic chose: every member's sums over
        # the batch then run in the same order
        delta_outT = np.ascontiguousarray(delta_out.transpose(0, 2, 1))
        gradT = None
        for layer in reversed(self.layers):
            gradT = layer.backward(gradT, delta_outT)
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
