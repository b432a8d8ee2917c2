"""Plain descriptions of a network and of its training, shared by both backends.

These are engine-level objects (no Hydra): `bench.run` builds them from the validated config, tests
build them directly. Parameter names and their order are decided here, once, so the NumPy network and
its PyTorch twin cannot disagree about them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.activations import ACTIVATIONS, OUTPUTS

NORMS = ("none", "batchnorm")  # batch norm's forward and backward are written out in each network
BN_EPS = 1e-5  # batch norm: added to the batch variance before the square root (torch's default)
BN_MOMENTUM = 0.1  # batch norm: running = (1 - m) running + m batch (torch's convention)


# Logged rows a job holds in memory before bench.checkpoint streams them out as a part (~20 MB at the
# peak); here, low in the layers, so that bench.guard's estimate of them imports no pyarrow
CHUNK_ROWS = 50_000

@dataclass(frozen=True)
class NetSpec:
    """A multilayer perceptron: hidden layers `widths`, then one output layer.

    Layer l (1-based, 1 = next to the input) computes z = a W + b, then for hidden layers
    a' = act(norm(z)) (plus a for residual blocks of equal width). The output layer applies `output`.
    """

    n_in: int
    n_out: int
    widths: tuple[int, ...]  # hidden widths, input side first
    activation: str = "sigmoid"  # a key of bench.activations.ACTIVATIONS
    output: str = "sigmoid"  # a key of bench.activations.OUTPUTS
    residual: bool = False
    norm: str = "none"
    direct: bool = False  # extra input->output weights (the PDP XOR 2-1-1 net)
    input_blocks: tuple[int, ...] | None = None  # block-diagonal first layer: input group sizes ...
    hidden_blocks: tuple[int, ...] | None = None  # ... each wired only to its own hidden group

    @property
    def depth(self) -> int:
        return len(self.widths)

    @property
    def n_layers(self) -> int:
        return len(self.widths) + 1

    def fan(self, i: int) -> tuple[int, int]:
        """(fan_in, fan_out) of layer i (0-based)."""
        sizes = (self.n_in, *self.widths, self.n_out)
        return sizes[i], sizes[i + 1]

    def is_residual(self, i: int) -> bool:
        """Residual blocks: hidden layers after the first whose input width equals their output width."""
        return self.residual and 0 < i < self.depth and self.widths[i - 1] == self.widths[i]

    def params(self) -> list[tuple[str, str, int, tuple[int, ...]]]:
        """(name, kind, layer, shape without the ensemble axis) for every parameter, in order."""
        out = []
        for i in range(self.n_layers):
            fan_in, fan_out = self.fan(i)
            hidden = i < self.depth
            out.append((f"layers.{i}.weight", "weight", i + 1, (fan_in, fan_out)))
            if hidden and self.norm == "batchnorm":
                # batch norm subtracts the batch mean, which cancels a bias: beta takes its place
                out.append((f"layers.{i}.gamma", "gamma", i + 1, (1, fan_out)))
                out.append((f"layers.{i}.beta", "beta", i + 1, (1, fan_out)))
            else:
                out.append((f"layers.{i}.bias", "bias", i + 1, (1, fan_out)))
            if not hidden and self.direct:
                out.append((f"layers.{i}.direct", "direct", i + 1, (self.n_in, self.n_out)))
        return out

    def first_layer_mask(self) -> np.ndarray | None:
        """(n_in, widths[0]) 0/1 mask of the block-diagonal first layer, or None when it is dense."""
        if self.input_blocks is None:
            return None
        mask = np.zeros((self.n_in, self.widths[0]))
        r = c = 0
        for rows, cols in zip(self.input_blocks, self.hidden_blocks):
            mask[r:r + rows, c:c + cols] = 1.0
            r, c = r + rows, c + cols
        return mask

    def check(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation={self.activation!r}; valid choices: {', '.join(ACTIVATIONS)}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output={self.output!r}; valid choices: {', '.join(OUTPUTS)}")
        if self.norm not in NORMS:
            raise ValueError(f"model.norm={self.norm!r}; valid choices: {', '.join(NORMS)}")
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"model widths {list(self.widths)}: need at least one hidden layer, each >= 1 wide")
        if (self.input_blocks is None) != (self.hidden_blocks is None):
            raise ValueError("model.first_layer_blocks needs a task with input blocks (e.g. family_trees)")
        if self.input_blocks is not None:
            if sum(self.input_blocks) != self.n_in or len(self.input_blocks) != len(self.hidden_blocks):
                raise ValueError(f"model.first_layer_blocks={list(self.hidden_blocks)} must give one hidden "
                                 f"group per input group {list(self.input_blocks)}")
            if sum(self.hidden_blocks) != self.widths[0]:
                raise ValueError(f"model.first_layer_blocks={list(self.hidden_blocks)} must sum to the "
                                 f"first hidden width {self.widths[0]}")


@dataclass(frozen=True)
class TrainSpec:
    """How to train: 1986 SGD with momentum, dw(t) = -lr dE/dw + momentum dw(t-1).

    The values a run gets come from the config (bench.config holds the defaults); the defaults here
    only switch optional features off (no momentum, no schedule, no decay, full batch, statistics at
    every step, float64 on cpu).
    """

    steps: int
    lr: float
    momentum: float = 0.0
    momentum_initial: float | None = None  # momentum for the first `initial_steps` steps (None: momentum)
    initial_steps: int = 0
    lr_initial: float | None = None  # learning rate for the first `initial_steps` steps (None: lr)
    weight_decay: float = 0.0  # after each update every parameter is multiplied by (1 - weight_decay)
    batch_size: int | None = None  # None: full batch (a 1986 "sweep")
    loss: str = "sse_half"  # a key of bench.losses.LOSSES
    log_every: int = 1  # statistics at steps 0, k, 2k, ... and always the last step (1: every step)
    dtype: str = "float64"
    device: str = "cpu"

    def momentum_at(self, step: int) -> float:
        if self.momentum_initial is not None and step < self.initial_steps:
            return self.momentum_initial
        return self.momentum

    def lr_at(self, step: int) -> float:
        if self.lr_initial is not None and step < self.initial_steps:
            return self.lr_initial
        return self.lr
