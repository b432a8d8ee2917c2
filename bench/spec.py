"""Plain descriptions of a network and of its training, shared by both backends.

These are engine-level objects (no Hydra): `bench.run` builds them from the validated config, tests
build them directly. Parameter names and their order are decided here, once, so the NumPy network and
its PyTorch twin cannot disagree about them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bench.activations import ACTIVATIONS, OUTPUTS

NORM_EPS = 1e-5  # batch and layer norm: added to the variance before the square root (torch's default)
OPTIMIZERS = ("sgd", "adam")  # written out in bench.train: the 1986 momentum SGD, and Adam
BN_MOMENTUM = 0.1  # batch norm: running = (1 - m) running + m batch (torch's convention)


# Logged rows a job holds in memory before bench.checkpoint streams them out as a part (~20 MB at the
# peak); here, low in the layers, so that bench.guard's estimate of them imports no pyarrow
CHUNK_ROWS = 50_000

@dataclass(frozen=True)
class Norm:
    """What the code needs to know about a normalisation of a hidden layer's pre-activation z (E, B, width).

    A norm with an `axis` standardises z over that axis, xhat = (z - mean) / sqrt(var + NORM_EPS) with
    the biased variance, then n = gamma * xhat + beta: the mean subtraction cancels a bias, so gamma and
    beta replace it. Each network writes the forward and backward out (bench.numpy_mlp, bench.torch_mlp).
    """

    name: str
    axis: int | None  # the axis of (E, B, width) the statistics run over: 1 the batch, 2 the units; None: no norm
    running: bool = False  # keeps running mean/var buffers (training updates them, evaluation uses them)
    min_batch: int = 1  # the smallest training batch it is defined on
    min_width: int = 1  # the narrowest hidden layer it is useful on (over one unit, layer norm gives beta)
    label: str = ""  # its short name in progress lines

    @property
    def replaces_bias(self) -> bool:  # gamma and beta instead of a bias
        return self.axis is not None


NORMS: dict[str, Norm] = {n.name: n for n in (
    Norm("none", None),
    # batch statistics in training, running ones (momentum BN_MOMENTUM, unbiased variance) in evaluation
    Norm("batchnorm", 1, running=True, min_batch=2, label="bn"),
    # per case over the layer's units, in training and evaluation alike (torch's nn.LayerNorm)
    Norm("layernorm", 2, min_width=2, label="ln"),
)}
# residual blocks a' = a + s f(a): s = 1, 1/sqrt(depth) (fixed), or a learnable scalar alpha per block,
# initialised 0 (SkipInit / ReZero: every block starts as the identity)
RESIDUAL_SCALES = ("one", "inv_sqrt_depth", "rezero")


@dataclass(frozen=True)
class NetSpec:
    """A multilayer perceptron: hidden layers `widths`, then one output layer.

    Layer l (1-based, 1 = next to the input) computes z = a W + b, then for hidden layers
    a' = act(norm(z)) (plus a for residual blocks of equal width: a' = a + s act(norm(z)), s set by
    `residual_scale`). The output layer applies `output`.
    """

    n_in: int
    n_out: int
    widths: tuple[int, ...]  # hidden widths, input side first
    activation: str = "sigmoid"  # a key of bench.activations.ACTIVATIONS
    output: str = "sigmoid"  # a key of bench.activations.OUTPUTS
    residual: bool = False
    norm: str = "none"  # a key of NORMS
    direct: bool = False  # extra input->output weights (the PDP XOR 2-1-1 net)
    input_blocks: tuple[int, ...] | None = None  # block-diagonal first layer: input group sizes ...
    hidden_blocks: tuple[int, ...] | None = None  # ... each wired only to its own hidden group
    residual_scale: str = "one"  # one of RESIDUAL_SCALES: the residual branch's scale s

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
            if hidden and NORMS[self.norm].replaces_bias:
                # a norm subtracts a mean, which cancels a bias: beta takes its place
                out.append((f"layers.{i}.gamma", "gamma", i + 1, (1, fan_out)))
                out.append((f"layers.{i}.beta", "beta", i + 1, (1, fan_out)))
            else:
                out.append((f"layers.{i}.bias", "bias", i + 1, (1, fan_out)))
            if not hidden and self.direct:
                out.append((f"layers.{i}.direct", "direct", i + 1, (self.n_in, self.n_out)))
            if self.is_residual(i) and self.residual_scale == "rezero":
                out.append((f"layers.{i}.alpha", "alpha", i + 1, (1, 1)))  # the branch's scale, one per member
        return out

    def branch_scale(self, i: int) -> float | None:
        """The fixed scale s of residual block i's branch (a' = a + s f(a)): 1 / sqrt(depth) for
        inv_sqrt_depth; None where there is none to apply (s = 1, or rezero's learnable alpha)."""
        if self.is_residual(i) and self.residual_scale == "inv_sqrt_depth":
            return 1.0 / math.sqrt(self.depth)
        return None

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
        if self.residual_scale not in RESIDUAL_SCALES:
            raise ValueError(f"model.residual_scale={self.residual_scale!r}; valid choices: "
                             f"{', '.join(RESIDUAL_SCALES)}")
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
    """How to train: 1986 SGD with momentum, dw(t) = -lr dE/dw + momentum dw(t-1), or Adam.

    The values a run gets come from the config (bench.config holds the defaults); the defaults here
    only switch optional features off (SGD, no momentum, no schedule, no decay, full batch, statistics
    at every step, float64 on cpu). Adam's betas and eps have no default here: give them with adam.
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
    optimizer: str = "sgd"  # a name in OPTIMIZERS
    adam_beta1: float | None = None  # Adam's moment decay rates and denominator guard (adam only)
    adam_beta2: float | None = None
    adam_eps: float | None = None

    def momentum_at(self, step: int) -> float:
        if self.momentum_initial is not None and step < self.initial_steps:
            return self.momentum_initial
        return self.momentum

    def lr_at(self, step: int) -> float:
        if self.lr_initial is not None and step < self.initial_steps:
            return self.lr_initial
        return self.lr
