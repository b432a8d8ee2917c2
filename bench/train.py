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

from bench.record import Recorder, layer_stats
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
    """Momentum SGD in the 1986 form; one velocity array per parameter, same type as the parameter.

    v = momentum v - lr g; p += v; p *= 1 - weight_decay, applied in one of two ways: over the NumPy
    network's flat buffers (all parameters at once) or with torch's multi-tensor `_foreach` ops.
    """

    def __init__(self, net):
        self.flat = net.xp is np
        if self.flat:  # velocities as views of one flat buffer laid out like the parameters
            self.flat_p, self.flat_g = net.flat_params, net.flat_grads
            self.flat_v, self.tmp = np.zeros_like(self.flat_p), np.empty_like(self.flat_p)
            self.velocity = {k: self.flat_v[_offset(self.flat_p, p):][:p.size].reshape(p.shape)
                             for k, p in net.params.items()}
        else:
            self.velocity = {k: p.detach() * 0 for k, p in net.params.items()}
            self.p_list, self.v_list = list(net.params.values()), list(self.velocity.values())

    def step(self, params: dict, grads: dict, lr: float, momentum: float, weight_decay: float) -> None:
        if self.flat:
            v = self.flat_v
            v *= momentum
            np.multiply(self.flat_g, lr, out=self.tmp)
            v -= self.tmp
            self.flat_p += v
            if weight_decay:
                self.flat_p *= 1.0 - weight_decay
            return
        import torch

        with torch.no_grad():
            g_list = [grads[k] for k in params]
            torch._foreach_mul_(self.v_list, momentum)
            torch._foreach_sub_(self.v_list, torch._foreach_mul(g_list, lr))
            torch._foreach_add_(self.p_list, self.v_list)
            if weight_decay:
                torch._foreach_mul_(self.p_list, 1.0 - weight_decay)

    def reset_member(self, k: int, grads: dict) -> None:
        for name, v in self.velocity.items():
            v[k] = 0.0
            grads[name][k] = 0.0  # this step's non-finite gradient must not be applied either


def _offset(flat: np.ndarray, view: np.ndarray) -> int:
    """Index in `flat` where the contiguous `view` of it starts."""
    return (view.__array_interface__["data"][0] - flat.__array_interface__["data"][0]) // flat.itemsize


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


class LoggedMetrics:
    """What a logged step measures on one network, and the batches it trains on, in that network's
    array type (so the torch twin can measure the same step the same way).

    batch_loss     the training-mode loss of this step's batch (what the gradient is of)
    loss           the whole training set's loss in evaluation mode (batch norm: running statistics);
                   the same number as batch_loss for full-batch nets without batch norm, reused then
    accuracy       on the whole training set, evaluation mode (binary and classification tasks)
    test_loss, test_accuracy  on the test set, evaluation mode (tasks with one)
    Per-layer statistics (`bench.record.layer_stats`) come from this step's training backward pass.
    """

    def __init__(self, net, task: Task, spec: NetSpec, tspec: TrainSpec, record: bool = True):
        dt = tspec.dtype
        self.task, self.record, self.to_numpy = task, record, net.to_numpy
        self.X, self.Y = net.asarray(task.x_train.astype(dt)), net.asarray(task.y_train.astype(dt))
        self.X1, self.Y1 = self.X[None], self.Y[None]  # (1, N, .): the full batch, broadcast over members
        self.test = None
        if task.x_test is not None:
            self.test = (net.asarray(task.x_test.astype(dt))[None], net.asarray(task.y_test.astype(dt))[None])
        self.full = tspec.batch_size is None or tspec.batch_size >= task.n_train
        # a full-batch training forward without batch norm IS the evaluation forward: reuse its loss
        self.reuse = self.full and spec.norm == "none"
        self.scored = task.kind in ("binary", "classification")
        self.torch_idx = type(self.X).__module__.startswith("torch")
        self.asarray = net.asarray

    def batch(self, idx):
        """(inputs, targets) for `Batches.indices` (None: the full batch)."""
        if idx is None:
            return self.X1, self.Y1
        if self.torch_idx:
            idx = self.asarray(idx).long()
        return self.X[idx], self.Y[idx]

    def measure(self, net, batch_loss: np.ndarray, y) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """(metrics {name: (E,) float64}, per-layer statistics) right after a training backward pass."""
        to_numpy, task = self.to_numpy, self.task
        # statistics first: the evaluation forwards below overwrite the layers' caches
        stats = layer_stats(net) if self.record else None
        metrics = {"batch_loss": batch_loss}
        if self.reuse:
            metrics["loss"], y_train = batch_loss, y
        else:
            loss, y_train = net.evaluate(self.X1, self.Y1)
            metrics["loss"] = to_numpy(loss).astype(np.float64)
        if self.scored:
            metrics["accuracy"] = correct(task, to_numpy(y_train), task.y_train[None]).mean(1)
        if self.test is not None:
            test_loss, test_y = net.evaluate(*self.test)
            metrics["test_loss"] = to_numpy(test_loss).astype(np.float64)
            if self.scored:
                metrics["test_accuracy"] = correct(task, to_numpy(test_y), task.y_test[None]).mean(1)
        return metrics, stats


def train(task: Task, spec: NetSpec, tspec: TrainSpec, params: dict[str, np.ndarray], backend: str,
          seeds, on_log=None, record: bool = True, lockstep=None, session=None) -> TrainOutput:
    """Train E = len(seeds) members from initial `params` {name: (E, ...)}; see the module docstring.

    on_log(step, losses) is called at every logged step (progress bars); record=False skips the
    per-layer statistics (the loss is still logged), to measure what recording costs.
    lockstep(step, net, buffers_before, batch_idx, alive, metrics, stats) is called at every logged
    step, before the update, with what a second network needs to redo the step on exactly these
    parameters (`bench.twin` uses it to check the torch twin in lockstep).
    session (a `bench.checkpoint.Session`) resumes from its last checkpoint, saves new ones and
    streams rows out in parts; the returned steps/layers then hold only the rows not yet streamed.
    """
    t0 = time.perf_counter()
    E = len(seeds)
    net = make_network(backend, spec, params, tspec)
    data = LoggedMetrics(net, task, spec, tspec, record)
    batches = Batches(task.x_train, task.y_train, tspec.batch_size, seeds)
    track_solved = task.kind == "binary" and batches.full  # sweeps to solution, checked every sweep
    opt = SGD(net)
    rec = Recorder(spec)
    alive = np.ones(E, bool)
    diverged = np.full(E, -1, np.int64)
    solved = np.full(E, -1, np.int64)
    # The solve check (every output within solve_tol) implies sum (y - d)^2 < N n_out tol^2, a bound
    # on the loss we already have: members above it cannot be solved, so most sweeps skip the check.
    solve_bound = None
    if track_solved:
        n_terms, tol2 = task.n_train * task.n_out, task.solve_tol ** 2
        solve_bound = {"sse_half": 0.5 * n_terms * tol2, "mse": tol2}.get(tspec.loss)
        if solve_bound is not None:
            solve_bound *= 1.01  # margin for rounding in the loss (a looser bound is still safe)
    unsolved = track_solved
    y_solve = task.y_train[None]  # (1, N, n_out) float64 targets, as `correct` compares them
    loss_and_grads, to_numpy, last_step = net.loss_and_grads, net.to_numpy, tspec.steps
    lr_at, momentum_at, weight_decay = tspec.lr_at, tspec.momentum_at, tspec.weight_decay
    logged_every = tspec.log_every
    last = {}
    start = 0
    if session is not None and (saved := session.resume()) is not None:
        from bench.checkpoint import restore

        restore(net, opt, batches, saved["arrays"])
        start, alive, diverged, solved = saved["t"], saved["alive"], saved["diverged"], saved["solved"]
        unsolved, last = saved["unsolved"], saved["last"]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        for t in range(start, last_step + 1):
            logged = t % logged_every == 0 or t == last_step
            idx = batches.indices(t)
            xb, yb = data.batch(idx)
            if logged and lockstep is not None:
                # the twin must start from the buffers this step's training forward is about to update
                buffers_before = {k: v.copy() for k, v in net.buffers.items()}
            losses, y = loss_and_grads(xb, yb)
            loss_np = to_numpy(losses)
            if loss_np.dtype != np.float64:
                loss_np = loss_np.astype(np.float64)
            finite = np.abs(loss_np) < DIVERGED_LOSS  # False for inf and nan too
            if logged:
                # a loss can stay finite while weights have overflowed (relu passes 0 * inf as 0), so
                # logged steps also check every parameter: a sum over entries is inf/nan if any is
                for p in net.params.values():
                    finite &= np.isfinite(to_numpy(p.reshape(E, -1).sum(1)))
            if not finite.all():
                bad = alive & ~finite
                if bad.any():
                    diverged[bad] = t
                    alive &= ~bad
                    for k in np.flatnonzero(bad):
                        net.reset_member(int(k))
                        opt.reset_member(int(k), net.grads)
            if unsolved and (solve_bound is None or (loss_np < solve_bound).any()):
                # = all(correct(task, y, targets)) per member: every |y - d| < tol iff the largest is
                ok = np.abs(to_numpy(y) - y_solve).max((1, 2)) < task.solve_tol
                if ok.any():
                    solved[(solved < 0) & ok & alive] = t
                    unsolved = bool(((solved < 0) & alive).any())
            if logged:
                metrics, stats = data.measure(net, loss_np, y)
                if record:
                    rec.log_layers(t, alive, stats)
                rec.log_step(t, alive, **metrics)
                last = metrics
                if lockstep is not None:
                    lockstep(t, net, buffers_before, idx, alive, metrics, stats)
                if on_log is not None:
                    on_log(t, metrics["loss"])
                if session is not None:
                    session.maybe_flush(rec)
            if t == last_step or (not alive.all() and not alive.any()):
                break
            opt.step(net.params, net.grads, lr_at(t), momentum_at(t), weight_decay)
            if session is not None and session.due(t + 1):
                from bench.checkpoint import capture

                session.save(t + 1, rec, {"arrays": capture(net, opt, batches), "alive": alive.copy(),
                                          "diverged": diverged.copy(), "solved": solved.copy(),
                                          "unsolved": unsolved, "last": last}, time.perf_counter() - t0)
    final = {k: np.where(alive, v, np.nan) for k, v in last.items()}
    return TrainOutput(
        steps=rec.steps_columns(), layers=rec.layers_columns() if record else {},
        status=["ok" if a else "diverged" for a in alive], diverged_step=diverged, solved_step=solved,
        final=final, wall_time_s=time.perf_counter() - t0 + (session.elapsed if session is not None else 0.0),
        params={k: net.to_numpy(v).copy() for k, v in net.params.items()})
