"""The PyTorch twin: the same layers as `bench.numpy_mlp`, with autograd doing the backward pass.

Built from the same NumPy initial arrays, with the same parameter names in the same order
(`layers.{i}.weight`, `.bias` | `.gamma`, `.beta`, `.direct`, `.alpha`), so gradients are compared by
name without a map. Parameters keep the leading ensemble axis (E, fan_in, fan_out) and `torch.matmul`
broadcasts a shared batch (1, B, n_in) over members. Batch and layer norm are written out (not
nn.BatchNorm1d / nn.LayerNorm, which have no ensemble axis) with the same formulas and running-statistics
convention; autograd differentiates them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bench import losses
from bench.activations import ACTIVATIONS, OUTPUTS
from bench.spec import BN_MOMENTUM, NORM_EPS, NORMS, NetSpec


class TorchLayer(nn.Module):
    def __init__(self, spec: NetSpec, i: int, arrays: dict[str, torch.Tensor]):
        super().__init__()
        self.hidden = i < spec.depth
        self.act = ACTIVATIONS[spec.activation] if self.hidden else OUTPUTS[spec.output]
        self.norm = NORMS[spec.norm if self.hidden else "none"]
        self.residual = spec.is_residual(i)
        self.scale = spec.branch_scale(i)  # a residual branch's fixed scale (None: 1, or rezero's alpha)
        self.keep_delta = True  # retain dLoss/dz (a copy per layer): TorchMLP.record_deltas switches it
        for kind in ("weight", "gamma", "beta", "bias", "direct", "alpha"):  # NetSpec.params() order
            if kind in arrays:
                setattr(self, kind, nn.Parameter(arrays[kind]))
        mask = spec.first_layer_mask() if i == 0 else None
        w = arrays["weight"]
        self.register_buffer("mask", None if mask is None else torch.as_tensor(mask, dtype=w.dtype, device=w.device))
        if self.norm.running:
            E, width = w.shape[0], w.shape[2]
            self.register_buffer("running_mean", torch.zeros(E, 1, width, dtype=w.dtype, device=w.device))
            self.register_buffer("running_var", torch.ones(E, 1, width, dtype=w.dtype, device=w.device))
        if self.mask is not None:
            # weights outside the blocks do not exist: their gradient is held at 0
            self.weight.register_hook(lambda g: g * self.mask)

    def forward(self, a: torch.Tensor, x: torch.Tensor, train: bool) -> torch.Tensor:
        z = torch.matmul(a, self.weight)  # (E, B, fan_out)
        if hasattr(self, "direct"):
            z = z + torch.matmul(x, self.direct)
        norm = self.norm
        if norm.replaces_bias:
            if norm.running and not train:
                mu, var = self.running_mean, self.running_var
            else:  # batch norm over the batch (axis 1), layer norm over each case's units (axis 2)
                mu = z.mean(norm.axis, keepdim=True)
                var = z.var(norm.axis, keepdim=True, correction=0)
            if norm.running and train:
                B, m = z.shape[1], BN_MOMENTUM
                with torch.no_grad():  # running statistics: unbiased variance, as nn.BatchNorm1d
                    self.running_mean.mul_(1 - m).add_(m * mu)
                    self.running_var.mul_(1 - m).add_(m * var * B / (B - 1))
            n = self.gamma * (z - mu) / torch.sqrt(var + NORM_EPS) + self.beta
        else:
            z = z.add_(self.bias)  # in place: the matmul's backward does not need its output
            n = z
        if self.keep_delta and z.requires_grad:
            z.retain_grad()  # for the delta statistic, dLoss/dz: only at steps whose statistics are recorded
        h = self.act.phi(n, torch)  # autograd differentiates phi itself
        self.z, self.n, self.h = z, n, h
        return self.output(a, h)

    def output(self, a: torch.Tensor, h: torch.Tensor, member=slice(None)) -> torch.Tensor:
        """a' = h, or a + s h in a residual block: s = 1, 1/sqrt(depth), or rezero's alpha (of `member`)."""
        if not self.residual:
            return h
        if hasattr(self, "alpha"):
            return a + self.alpha[member] * h
        return a + h if self.scale is None else a + self.scale * h


class TorchMLP(nn.Module):
    def __init__(self, spec: NetSpec, params: dict[str, np.ndarray], loss: str,
                 dtype: str = "float64", device: str = "cpu"):
        super().__init__()
        spec.check()
        self.spec, self.loss = spec, losses.get(loss)
        self.torch_dtype, self.device = getattr(torch, dtype), torch.device(device)
        self.names = [name for name, *_ in spec.params()]
        # every parameter is a view into one flat buffer (as in the NumPy network): statistics and snapshots
        # then read all parameters at once; updates stay in place, so the views stay valid. Each initial
        # array is cast straight into its view: one pass, no intermediate copy in this dtype
        sizes = [np.size(params[name]) for name in self.names]
        self.flat_params = torch.empty(sum(sizes), dtype=self.torch_dtype, device=self.device)
        per_layer: list[dict] = [{} for _ in range(spec.n_layers)]
        off = 0
        for name, size in zip(self.names, sizes):
            _, i, kind = name.split(".")
            src = np.asarray(params[name])
            view = self.flat_params[off:off + size].view(src.shape)
            view.copy_(torch.from_numpy(src if src.flags.writeable else src.copy()))  # from_numpy shares memory
            per_layer[int(i)][kind] = view
            off += size
        self.layers = nn.ModuleList(TorchLayer(spec, i, arrays) for i, arrays in enumerate(per_layer))
        self.params = dict(self.named_parameters())
        assert list(self.params) == self.names, "parameter order must mirror NetSpec.params()"
        assert all(p.untyped_storage().data_ptr() == self.flat_params.untyped_storage().data_ptr()
                   for p in self.params.values()), "parameters must be views of flat_params"

    def asarray(self, a) -> torch.Tensor:
        # always a copy: torch.as_tensor would share memory with the caller's init arrays and train them
        return torch.tensor(np.asarray(a), dtype=self.torch_dtype, device=self.device)

    @staticmethod
    def to_numpy(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy()

    @torch.no_grad()
    def load_state(self, params: dict[str, np.ndarray], buffers: dict[str, np.ndarray]) -> None:
        """Copy another network's parameters and batch-norm buffers in (by name: both nets use the
        names of `NetSpec.params()`), so this twin redoes a step on exactly those values (lockstep)."""
        for name, p in self.params.items():
            p.copy_(self.asarray(params[name]))
        for name, b in self.named_buffers():
            if name in buffers:
                b.copy_(self.asarray(buffers[name]))

    def forward(self, x: torch.Tensor, train: bool = True) -> torch.Tensor:
        a = x
        for layer in self.layers:
            a = layer(a, x, train)
        return a

    def loss_and_grads(self, x: torch.Tensor, d: torch.Tensor, output_delta=None):
        """One training forward and backward: (loss (E,), outputs (E, B, n_out)), grads in `grads`.

        output_delta (lockstep only): backpropagate this dLoss/dz^L (E, B, n_out) instead of autograd's
        own, which is kept in `self.output_delta` for a separate comparison. Where a net is confidently
        right, y - d cancels (p_target = 1 - 1e-12 gives a delta ~1e-12 with rounding ~1e-16), so two
        engines' output deltas differ relatively by ~1e-4 though both are right; starting both backward
        passes from one delta keeps the comparison of the rest of the backward pass sharp.
        """
        for p in self.params.values():
            p.grad = None
        y = self.forward(x, train=True)
        out = self.layers[-1]
        losses = self.loss.value(y, d, out.n, torch)
        # members are independent, so the gradient of the sum is each member's own gradient
        if output_delta is None:
            losses.sum().backward()
        else:
            (self.output_delta,) = torch.autograd.grad(losses.sum(), out.z, retain_graph=True)
            for layer in self.layers:  # autograd.grad also filled the retained z.grad: start them afresh
                layer.z.grad = None
            out.z.backward(self.asarray(output_delta))
        return losses.detach(), y.detach()

    @property
    def record_deltas(self) -> bool:
        return self.layers[0].keep_delta

    @record_deltas.setter
    def record_deltas(self, on: bool) -> None:
        """Whether the next backward pass keeps dLoss/dz of every layer (the delta statistic). The training
        loop switches it off at steps whose statistics are not recorded: retaining costs a copy per layer."""
        for layer in self.layers:
            layer.keep_delta = on

    @property
    def grads(self) -> dict[str, torch.Tensor]:
        return {name: p.grad for name, p in self.params.items()}

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, d: torch.Tensor):
        y = self.forward(x, train=False)
        return self.loss.value(y, d, self.layers[-1].n, torch), y

    xp = torch

    def no_grad(self):
        return torch.no_grad()

    @torch.no_grad()
    def reset_member(self, k: int) -> None:
        for p in self.params.values():
            p[k] = 0.0
        for name, b in self.named_buffers():
            if name.endswith("running_mean") or name.endswith("running_var"):
                b[k] = 1.0 if name.endswith("var") else 0.0


def hidden_jacobian(net: TorchMLP, x) -> np.ndarray:
    """The twin of `bench.numpy_mlp.hidden_jacobian` by autograd (torch.func.jacrev): d a^L / d a^1 for each
    member and input, (E, B, N, N) as a NumPy array. Evaluation mode, no norm."""
    from torch.func import jacrev

    spec = net.spec
    if spec.norm != "none" or len(set(spec.widths)) != 1:
        raise ValueError("hidden_jacobian needs equal hidden widths and no norm")
    x = net.asarray(x)
    x = x[None] if x.ndim == 2 else x
    with torch.no_grad():
        first = net.layers[0]
        a1 = first(x, x, False)  # (E, B, N): the first hidden layer's output
    E, B = net.params[net.names[0]].shape[0], a1.shape[1]
    out = np.empty((E, B, a1.shape[2], a1.shape[2]))
    for e in range(E):
        def upper(a, e=e):  # a^1 of one input, (N,) -> a^L, (N,), through member e's hidden layers 2..L
            a = a[None, None]
            for layer in net.layers[1:spec.depth]:
                n = torch.matmul(a, layer.weight[e]) + layer.bias[e]
                a = layer.output(a, layer.act.phi(n, torch), e)
            return a[0, 0]

        for b in range(B):
            out[e, b] = jacrev(upper)(a1[e if a1.shape[0] > 1 else 0, b]).detach().cpu().numpy()
    return out
