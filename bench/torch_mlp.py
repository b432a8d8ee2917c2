"""The PyTorch twin: the same layers as `bench.numpy_mlp`, with autograd doing the backward pass.

Built from the same NumPy initial arrays, with the same parameter names in the same order
(`layers.{i}.weight`, `.bias` | `.gamma`, `.beta`, `.direct`), so gradients are compared by name
without a map. Parameters keep the leading ensemble axis (E, fan_in, fan_out) and `torch.matmul`
broadcasts a shared batch (1, B, n_in) over members. Batch norm is written out (not nn.BatchNorm1d,
which has no ensemble axis) with the same formulas and running-statistics convention.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bench.spec import BN_EPS, BN_MOMENTUM, LEAKY_SLOPE, NetSpec

_PHI = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "leaky_relu": lambda z: nn.functional.leaky_relu(z, LEAKY_SLOPE),
    "softsign": nn.functional.softsign,
    "identity": lambda z: z,
    "softmax": lambda z: torch.softmax(z, -1),
}


def dphi(name: str, n: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """phi'(n) for the saturation statistic (never used for gradients: autograd does those)."""
    if name == "sigmoid":
        return h * (1 - h)
    if name == "tanh":
        return 1 - h * h
    if name == "relu":
        return (n > 0).to(n.dtype)
    if name == "leaky_relu":
        return torch.where(n > 0, 1.0, LEAKY_SLOPE).to(n.dtype)
    if name == "softsign":
        return 1 / (1 + n.abs()) ** 2
    raise ValueError(name)


def loss_value(loss: str, y: torch.Tensor, d: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-member loss (E,); the same definitions as the NumPy network's."""
    if loss == "sse_half":
        return 0.5 * ((y - d) ** 2).sum((1, 2))
    if loss == "mse":
        return ((y - d) ** 2).mean((1, 2))
    if loss == "cross_entropy":
        return -(d * torch.log_softmax(logits, -1)).sum(2).mean(1)
    raise ValueError(loss)


class TorchLayer(nn.Module):
    def __init__(self, spec: NetSpec, i: int, arrays: dict[str, torch.Tensor]):
        super().__init__()
        self.hidden = i < spec.depth
        self.act = spec.activation if self.hidden else spec.output
        self.bn = self.hidden and spec.norm == "batchnorm"
        self.residual = spec.is_residual(i)
        for kind in ("weight", "gamma", "beta", "bias", "direct"):  # NetSpec.params() order
            if kind in arrays:
                setattr(self, kind, nn.Parameter(arrays[kind]))
        mask = spec.first_layer_mask() if i == 0 else None
        w = arrays["weight"]
        self.register_buffer("mask", None if mask is None else torch.as_tensor(mask, dtype=w.dtype, device=w.device))
        if self.bn:
            E, width = w.shape[0], w.shape[2]
            self.register_buffer("running_mean", torch.zeros(E, 1, width, dtype=w.dtype, device=w.device))
            self.register_buffer("running_var", torch.ones(E, 1, width, dtype=w.dtype, device=w.device))
        if self.mask is not None:
            # weights outside the blocks do not exist: their gradient is held at 0
            self.weight.register_hook(lambda g: g * self.mask)

    def forward(self, a: torch.Tensor, x: torch.Tensor, train: bool, record: bool) -> torch.Tensor:
        z = torch.matmul(a, self.weight)  # (E, B, fan_out)
        if hasattr(self, "direct"):
            z = z + torch.matmul(x, self.direct)
        if self.bn:
            if train:
                mu = z.mean(1, keepdim=True)
                var = z.var(1, keepdim=True, correction=0)
                B, m = z.shape[1], BN_MOMENTUM
                with torch.no_grad():  # running statistics: unbiased variance, as nn.BatchNorm1d
                    self.running_mean.mul_(1 - m).add_(m * mu)
                    self.running_var.mul_(1 - m).add_(m * var * B / (B - 1))
            else:
                mu, var = self.running_mean, self.running_var
            n = self.gamma * (z - mu) / torch.sqrt(var + BN_EPS) + self.beta
        else:
            z = z + self.bias
            n = z
        if record and z.requires_grad:
            z.retain_grad()  # for the delta statistic, dLoss/dz
        h = _PHI[self.act](n)
        self.z, self.n, self.h = z, n, h
        return a + h if self.residual else h


class TorchMLP(nn.Module):
    def __init__(self, spec: NetSpec, params: dict[str, np.ndarray], loss: str,
                 dtype: str = "float64", device: str = "cpu"):
        super().__init__()
        spec.check()
        self.spec, self.loss = spec, loss
        self.torch_dtype, self.device = getattr(torch, dtype), torch.device(device)
        self.names = [name for name, *_ in spec.params()]
        per_layer: list[dict] = [{} for _ in range(spec.n_layers)]
        for name in self.names:
            _, i, kind = name.split(".")
            per_layer[int(i)][kind] = self.asarray(params[name])
        self.layers = nn.ModuleList(TorchLayer(spec, i, arrays) for i, arrays in enumerate(per_layer))
        self.params = dict(self.named_parameters())
        assert list(self.params) == self.names, "parameter order must mirror NetSpec.params()"

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

    def forward(self, x: torch.Tensor, train: bool = True, record: bool = False) -> torch.Tensor:
        a = x
        for layer in self.layers:
            a = layer(a, x, train, record)
        return a

    def loss_and_grads(self, x: torch.Tensor, d: torch.Tensor, record: bool = False):
        """One training forward and backward: (loss (E,), outputs (E, B, n_out)), grads in `grads`."""
        for p in self.params.values():
            p.grad = None
        y = self.forward(x, train=True, record=record)
        losses = loss_value(self.loss, y, d, self.layers[-1].n)
        # members are independent, so the gradient of the sum is each member's own gradient
        losses.sum().backward()
        return losses.detach(), y.detach()

    @property
    def grads(self) -> dict[str, torch.Tensor]:
        return {name: p.grad for name, p in self.params.items()}

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, d: torch.Tensor):
        y = self.forward(x, train=False)
        return loss_value(self.loss, y, d, self.layers[-1].n), y

    def layer_stats(self):
        from bench.record import torch_layer_stats

        return torch_layer_stats(self)

    def no_grad(self):
        return torch.no_grad()

    @torch.no_grad()
    def reset_member(self, k: int) -> None:
        for p in self.params.values():
            p[k] = 0.0
        for name, b in self.named_buffers():
            if name.endswith("running_mean") or name.endswith("running_var"):
                b[k] = 1.0 if name.endswith("var") else 0.0
