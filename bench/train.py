"""The training loop and optimizer, shared by both backends.

Step t means "the network after t updates": statistics logged at step t come from the forward and
backward pass on the parameters after t updates, so step 0 is the network at initialisation and the
last logged step, `steps`, is the trained network (its gradient is computed and recorded, not applied).

The optimizer is the 1986 paper's: dw(t) = -lr dE/dw(t) + momentum dw(t-1), then every parameter
shrinks by (1 - weight_decay). It equals torch.optim.SGD(lr, momentum, dampening=0) while lr is
constant, and is written once for both array types (in-place ops that NumPy and torch share).

A member whose loss becomes non-finite or exceeds DIVERGED_LOSS (checked every step) or whose parameters do (checked at
logged steps) is marked diverged at that step, its statistics stop there and
its parameters are zeroed so it cannot spread NaN; the other members go on untouched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from bench.record import Recorder
from bench.spec import NetSpec, TrainSpec
from bench.tasks import Task, correct

BACKENDS = ("numpy", "torch")
# A loss this large has diverged even if it is still finite: it means outputs ~1e15, past float32's
# range once squared, and near float64's, where inf - inf makes the two backends' NaNs differ.
DIVERGED_LOSS = 1e30


def make_network(backend: str, spec: NetSpec, params: dict[str, np.ndarray], train: TrainSpec):
    if backend == "numpy":
        from bench.numpy_mlp import NumpyMLP

        if train.device != "cpu":
            raise ValueError(f"train.device={train.device!r}: the numpy backend runs on cpu only")
        return NumpyMLP(spec, {k: v.astype(train.dtype) for k, v in params.items()}, train.loss)
    if backend == "torch":
        from bench.torch_mlp import TorchMLP

        return TorchMLP(spec, params, train.loss, train.dtype, train.device)
    raise ValueError(f"backend={backend!r}; valid choices: {', '.join(BACKENDS)}")


class SGD:
    """Momentum SGD in the 1986 form; one velocity array per parameter, same type as the parameter."""

    def __init__(self, params: dict):
        self.velocity = {k: p * 0 for k, p in params.items()}

    def step(self, params: dict, grads: dict, lr: float, momentum: float, weight_decay: float) -> None:
        for k, p in params.items():
            v = self.velocity[k]
            v *= momentum
            v -= lr * grads[k]
            p += v
            if weight_decay:
                p *= 1.0 - weight_decay

    def reset_member(self, k: int, grads: dict) -> None:
        for name, v in self.velocity.items():
            v[k] = 0.0
            grads[name][k] = 0.0  # this step's non-finite gradient must not be applied either


class Batches:
    """Full batch (shared by all members, shape (1, N, .)) or per-member shuffled mini-batches.

    Member k draws its batches from its own generator, seeded from its own seed, so an ensemble
    member sees exactly the batches of the solo run with that seed. Each epoch is a fresh
    permutation, cut into floor(N / batch_size) batches (the remainder is left out that epoch).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int | None, seeds):
        self.x, self.y, self.B = x, y, batch_size
        self.N = x.shape[0]
        if batch_size is None or batch_size >= self.N:
            self.full = True
        else:
            self.full = False
            self.rngs = [np.random.default_rng([seed, 2024]) for seed in seeds]  # data stream != init
            self.per_epoch = self.N // batch_size
            self.order = None

    def indices(self, step: int) -> np.ndarray | None:
        """(E, B) row indices of this step's batch, or None for the full batch."""
        if self.full:
            return None
        j = step % self.per_epoch
        if j == 0 or self.order is None:
            self.order = np.stack([rng.permutation(self.N) for rng in self.rngs])
        return self.order[:, j * self.B:(j + 1) * self.B]


@dataclass
class TrainOutput:
    """What one job produced, per member k (arrays of length E) and as table columns."""

    steps: dict[str, np.ndarray]
    layers: dict[str, np.ndarray]
    status: list[str]
    diverged_step: np.ndarray
    solved_step: np.ndarray  # -1 where the task's criterion never held (or the task has none)
    final: dict[str, np.ndarray]  # loss, accuracy, test_loss, test_accuracy at the last step
    wall_time_s: float
    params: dict[str, np.ndarray] = field(default_factory=dict)  # final parameters (NumPy)


def train(task: Task, spec: NetSpec, tspec: TrainSpec, params: dict[str, np.ndarray], backend: str,
          seeds, on_log=None, record: bool = True) -> TrainOutput:
    """Train E = len(seeds) members from initial `params` {name: (E, ...)}; see the module docstring.

    on_log(step, losses) is called at every logged step (progress bars); record=False skips the
    per-layer statistics (the loss is still logged), to measure what recording costs.
    """
    t0 = time.perf_counter()
    E = len(seeds)
    net = make_network(backend, spec, params, tspec)
    dt = tspec.dtype
    X, Y = net.asarray(task.x_train.astype(dt)), net.asarray(task.y_train.astype(dt))
    X1, Y1 = X[None], Y[None]  # (1, N, .): the full batch, broadcast over members
    has_test = task.x_test is not None
    if has_test:
        Xt, Yt = net.asarray(task.x_test.astype(dt))[None], net.asarray(task.y_test.astype(dt))[None]
    batches = Batches(task.x_train, task.y_train, tspec.batch_size, seeds)
    scored = task.kind in ("binary", "classification")
    track_solved = task.kind == "binary" and batches.full  # sweeps to solution, checked every sweep
    opt = SGD(net.params)
    rec = Recorder(spec)
    alive = np.ones(E, bool)
    diverged = np.full(E, -1, np.int64)
    solved = np.full(E, -1, np.int64)
    last = {}
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        for t in range(tspec.steps + 1):
            logged = tspec.logged(t)
            idx = batches.indices(t)
            if idx is None:
                xb, yb = X1, Y1
            else:
                xb, yb = X[net.asarray(idx).long() if backend == "torch" else idx], \
                    Y[net.asarray(idx).long() if backend == "torch" else idx]
            losses, y = net.loss_and_grads(xb, yb, record=logged and record)
            loss_np = net.to_numpy(losses).astype(np.float64)
            finite = np.abs(loss_np) < DIVERGED_LOSS  # False for inf and nan too
            if logged or t == tspec.steps:
                # a loss can stay finite while weights have overflowed (relu passes 0 * inf as 0), so
                # logged steps also check every parameter: a sum over entries is inf/nan if any is
                for p in net.params.values():
                    finite &= np.isfinite(net.to_numpy(p.reshape(E, -1).sum(1)))
            bad = alive & ~finite
            if bad.any():
                diverged[bad] = t
                alive &= ~bad
                for k in np.flatnonzero(bad):
                    net.reset_member(int(k))
                    opt.reset_member(int(k), net.grads)
            if track_solved and (solved < 0).any():
                ok = np.all(correct(task, net.to_numpy(y), task.y_train[None]), axis=1) & alive
                solved[(solved < 0) & ok] = t
            if logged or t == tspec.steps:
                metrics = {"loss": loss_np}
                if scored:
                    metrics["accuracy"] = correct(task, net.to_numpy(y), net.to_numpy(yb)).mean(1)
                if record:  # before the test-set forward below, which overwrites the layers' caches
                    rec.log_layers(t, alive, net.layer_stats())
                if has_test:
                    test_loss, test_y = net.evaluate(Xt, Yt)
                    metrics["test_loss"] = net.to_numpy(test_loss).astype(np.float64)
                    if scored:
                        metrics["test_accuracy"] = correct(task, net.to_numpy(test_y), task.y_test[None]).mean(1)
                rec.log_step(t, alive, **metrics)
                last = metrics
                if on_log is not None:
                    on_log(t, loss_np)
            if not alive.any() or t == tspec.steps:
                break
            with net.no_grad():
                opt.step(net.params, net.grads, tspec.lr_at(t), tspec.momentum_at(t), tspec.weight_decay)
    final = {k: np.where(alive, v, np.nan) for k, v in last.items()}
    return TrainOutput(
        steps=rec.steps_columns(), layers=rec.layers_columns() if record else {},
        status=["ok" if a else "diverged" for a in alive], diverged_step=diverged, solved_step=solved,
        final=final, wall_time_s=time.perf_counter() - t0,
        params={k: net.to_numpy(v).copy() for k, v in net.params.items()})
