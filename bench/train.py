"""The training loop and optimizer, shared by both backends.

Step t means "the network after t updates": statistics logged at step t come from the forward and
backward pass on the parameters after t updates, so step 0 is the network at initialisation and the
last logged step, `steps`, is the trained network (its gradient is computed and recorded, not applied).

The optimizer (train.optimizer) is the 1986 paper's, sgd: dw(t) = -lr dE/dw(t) + momentum dw(t-1),
equal to torch.optim.SGD(lr, momentum, dampening=0) while lr is constant; or adam: torch.optim.Adam's
update, by hand. Either way every parameter then shrinks by (1 - weight_decay) (the 1986 decay, for
both). Each is written for the NumPy network's flat buffers and for torch's `_foreach` ops.
At logged steps the update actually applied, ||w(t+1) - w(t)|| per parameter, is recorded beside that
step's statistics (`bench.record.update_stats`): the parameters are copied before the update, only then.

A member whose loss becomes non-finite or exceeds DIVERGED_LOSS (checked every step) or whose parameters do (checked at
logged steps) is marked diverged at that step, its statistics stop there and
its parameters are zeroed so it cannot spread NaN; the other members go on untouched.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import numpy as np

from bench.record import Recorder, layer_stats, snapshot, update_stats
from bench.spec import OPTIMIZERS, NetSpec, TrainSpec
from bench.tasks import Task, correct

BACKENDS = ("numpy", "torch")
# A loss this large has diverged even if it is still finite: it means outputs ~1e15, past float32's
# range once squared, and near float64's, where inf - inf makes the two backends' NaNs differ.
DIVERGED_LOSS = 1e30


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for reuse (once per process; False where it is not glibc's).

    By default glibc returns the top of its heap to the system once more than a few MB there are free
    (a threshold that follows the largest block freed so far), and a later allocation faults those pages
    back in, zeroed by the kernel, at some microseconds per 4 KiB page on this VM. A wide net frees and
    reallocates tens of MB each training call (the float32 copies of the initial parameters, the flat
    buffers, the optimizer's state) and its per-layer arrays every step: measured at w512 d10, ~10,000 page
    faults per 10-step call, about 3 ms per step. Fixed thresholds keep up to 256 MB of freed heap and
    serve blocks up to 32 MB (glibc's largest mmap threshold) from it; larger blocks are still mapped and
    unmapped on their own, so a large ensemble's memory goes back to the system when it is freed.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): its allocator's defaults stand
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_trim_threshold, 256 << 20)) and bool(mallopt(m_mmap_threshold, 32 << 20))


def make_network(backend: str, spec: NetSpec, params: dict[str, np.ndarray], train: TrainSpec):
    if backend == "numpy":
        from bench.numpy_mlp import NumpyMLP

        if train.device != "cpu":
            raise ValueError(f"train.device={train.device!r}: the numpy backend runs on cpu only")
        return NumpyMLP(spec, params, train.loss, train.dtype)  # cast on the copy into its flat buffers
    if backend == "torch":
        from bench.torch_mlp import TorchMLP

        return TorchMLP(spec, params, train.loss, train.dtype, train.device)
    raise ValueError(f"backend={backend!r}; valid choices: {', '.join(BACKENDS)}")


# The flat update runs over the parameters in chunks of this many bytes per array: each chunk's few
# passes (velocity, gradient, parameter, scratch) then stay in cache, where whole-buffer passes would read
# and write every array from memory once per pass (a wide net's buffers are tens of MB). Every rule is
# elementwise, so chunking changes no bit of the result (tests/test_adam.py checks it).
CHUNK_BYTES = 1 << 19


class Optimizer:
    """Per-parameter state arrays (`SLOTS`, same type and shape as the parameters) and the update.

    Applied in one of two ways: over the NumPy network's flat buffers (every parameter at once, the
    state arrays views of one flat buffer each, laid out like the parameters, in chunks of CHUNK_BYTES),
    or with torch's multi-tensor `_foreach` ops. Every rule here is elementwise, so ensemble members never
    mix. `state` {slot: {name: array}} and `t` (updates applied so far) are what a checkpoint saves.
    """

    SLOTS: tuple[str, ...] = ()

    def __init__(self, net, chunk_bytes: int = CHUNK_BYTES):
        self.flat = net.xp is np
        self.t = 0
        if self.flat:
            self.flat_p, self.flat_g = net.flat_params, net.flat_grads
            n, dtype = self.flat_p.size, self.flat_p.dtype
            # np.zeros, not zeros_like: fresh zero pages from the allocator, not a pass writing zeros
            self.flat_state = {s: np.zeros(n, dtype) for s in self.SLOTS}
            self.state = {s: {k: buf[_offset(self.flat_p, p):][:p.size].reshape(p.shape)
                              for k, p in net.params.items()} for s, buf in self.flat_state.items()}
            size = max(1, chunk_bytes // dtype.itemsize)
            self.tmp = np.empty(min(n, size), dtype)  # scratch for one chunk
            # (parameters, gradients, (state per slot), scratch) of each chunk: views, made once; the
            # buffers are only ever updated in place (here, load_state, reset_member, a checkpoint's restore)
            self.chunks = [(self.flat_p[i:i + size], self.flat_g[i:i + size],
                            tuple(buf[i:i + size] for buf in self.flat_state.values()), self.tmp[:min(size, n - i)])
                           for i in range(0, n, size)]
        else:
            import torch

            self.p_list = list(net.params.values())
            self.state = {s: {k: torch.zeros_like(p.detach()) for k, p in net.params.items()} for s in self.SLOTS}
            self.lists = {s: list(d.values()) for s, d in self.state.items()}

    def step(self, params: dict, grads: dict, lr: float, momentum: float, weight_decay: float) -> None:
        """One update from `grads`, then the 1986 weight decay: every parameter shrinks by (1 - weight_decay)."""
        self.t += 1
        if self.flat:
            scalars = self._flat_scalars(lr, momentum)
            decay = 1.0 - weight_decay
            for p, g, state, tmp in self.chunks:
                self._flat_step(p, g, state, tmp, scalars)
                if weight_decay:
                    p *= decay
            return
        import torch

        with torch.no_grad():
            self._foreach_step([grads[k] for k in params], lr, momentum)
            if weight_decay:
                torch._foreach_mul_(self.p_list, 1.0 - weight_decay)

    def _flat_scalars(self, lr: float, momentum: float) -> tuple:
        """What the update of every chunk needs, computed once per step."""
        return lr, momentum

    def load_state(self, saved: dict) -> None:
        """Set `t` and every state array, in place, from {"t": t, slot: {name: array}}: a checkpoint's
        NumPy copies, or another optimizer's `{"t": opt.t, **opt.state}` (the lockstep twin's)."""
        self.t = saved["t"]
        for s, d in self.state.items():
            for k, v in d.items():
                if self.flat:
                    v[...] = saved[s][k]
                else:
                    import torch

                    with torch.no_grad():
                        v.copy_(torch.as_tensor(saved[s][k]))

    def reset_member(self, k: int, grads: dict) -> None:
        """Member k diverged: its state restarts from zero (its parameters are zeroed by the network)."""
        for slot in self.state.values():
            for v in slot.values():
                v[k] = 0.0
        for g in grads.values():
            g[k] = 0.0  # this step's non-finite gradient must not be applied either


class SGD(Optimizer):
    """Momentum SGD in the 1986 form: v = momentum v - lr g; p += v (then the weight decay)."""

    SLOTS = ("velocity",)

    @staticmethod
    def _flat_step(p, g, state, tmp, scalars) -> None:
        """One chunk: p, g, the velocity and the scratch are equal-length slices of the flat buffers."""
        (v,), (lr, momentum) = state, scalars
        v *= momentum
        np.multiply(g, lr, out=tmp)
        v -= tmp
        p += v

    def _foreach_step(self, g_list: list, lr: float, momentum: float) -> None:
        import torch

        v_list = self.lists["velocity"]
        torch._foreach_mul_(v_list, momentum)
        torch._foreach_add_(v_list, g_list, alpha=-lr)  # v - lr g in one pass, no temporary the size of g
        torch._foreach_add_(self.p_list, v_list)


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) with bias correction, in torch.optim.Adam's order of operations (with
    weight_decay=0; tests/test_adam.py: the torch backend's is torch.optim.Adam's to the bit, the NumPy
    one's within ~1e-14 relative after 50 steps, torch fusing its lerp):

        m += (1 - beta1) (g - m)               (torch's lerp: m = beta1 m + (1 - beta1) g)
        v  = beta2 v + (1 - beta2) g g
        p += -(lr / (1 - beta1^t)) m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    then the 1986 weight decay (p *= 1 - weight_decay), not torch's L2 term in the gradient. The step
    count t is the ensemble's: a diverged member's moments restart from zero, its count does not.
    """

    SLOTS = ("m", "v")

    def __init__(self, net, beta1: float, beta2: float, eps: float, chunk_bytes: int = CHUNK_BYTES):
        super().__init__(net, chunk_bytes)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps

    def _scalars(self, lr: float) -> tuple[float, float]:
        """(-lr / (1 - beta1^t), sqrt(1 - beta2^t)), as torch computes them in Python floats."""
        t = float(self.t)
        return (lr / (1 - self.beta1 ** t)) * -1, (1 - self.beta2 ** t) ** 0.5

    def _flat_scalars(self, lr: float, momentum: float) -> tuple:
        return (*self._scalars(lr), 1 - self.beta1, self.beta2, 1 - self.beta2, self.eps)

    @staticmethod
    def _flat_step(p, g, state, tmp, scalars) -> None:
        """One chunk: p, g, the moments and the scratch are equal-length slices of the flat buffers."""
        (m, v), (neg_step, bc2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps) = state, scalars
        np.subtract(g, m, out=tmp)
        tmp *= one_minus_beta1
        m += tmp
        v *= beta2
        np.multiply(g, one_minus_beta2, out=tmp)
        tmp *= g
        v += tmp
        np.sqrt(v, out=tmp)
        tmp /= bc2_sqrt
        tmp += eps
        np.divide(m, tmp, out=tmp)
        tmp *= neg_step
        p += tmp

    def _foreach_step(self, g_list: list, lr: float, momentum: float) -> None:
        import torch

        m_list, v_list = self.lists["m"], self.lists["v"]
        neg_step, bc2_sqrt = self._scalars(lr)
        torch._foreach_lerp_(m_list, g_list, 1 - self.beta1)
        torch._foreach_mul_(v_list, self.beta2)
        torch._foreach_addcmul_(v_list, g_list, g_list, 1 - self.beta2)
        denom = torch._foreach_sqrt(v_list)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(self.p_list, m_list, denom, neg_step)


def make_optimizer(net, train: TrainSpec) -> Optimizer:
    if train.optimizer == "sgd":
        return SGD(net)
    if train.optimizer == "adam":
        return Adam(net, train.adam_beta1, train.adam_beta2, train.adam_eps)
    raise ValueError(f"train.optimizer={train.optimizer!r}; valid choices: {', '.join(OPTIMIZERS)}")


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
    lockstep(step, net, buffers_before, batch_idx, alive, metrics, stats, opt) is called at every logged
    step, before the update, with what a second network needs to redo the step on exactly these
    parameters and optimizer state (`bench.twin` uses it to check the torch twin in lockstep); `stats`'
    update columns are filled in place once the update is applied (NaN at the last step).
    session (a `bench.checkpoint.Session`) resumes from its last checkpoint, saves new ones and
    streams rows out in parts; the returned steps/layers then hold only the rows not yet streamed.
    """
    t0 = time.perf_counter()
    keep_freed_memory()
    E = len(seeds)
    net = make_network(backend, spec, params, tspec)
    data = LoggedMetrics(net, task, spec, tspec, record)
    batches = Batches(task.x_train, task.y_train, tspec.batch_size, seeds)
    track_solved = task.kind == "binary" and batches.full  # sweeps to solution, checked every sweep
    opt = make_optimizer(net, tspec)
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
    deltas = net.record_deltas
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
            if deltas != (logged and record):  # torch retains dLoss/dz only where statistics are recorded
                deltas = net.record_deltas = logged and record
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
                    rec.log_layers(t, alive, stats)  # the same array: its update columns are filled below
                rec.log_step(t, alive, **metrics)
                last = metrics
                if lockstep is not None:
                    lockstep(t, net, buffers_before, idx, alive, metrics, stats, opt)
                if on_log is not None:
                    on_log(t, metrics["loss"])
            done = t == last_step or not alive.any()
            if not done:
                before = snapshot(net) if logged and record else None
                opt.step(net.params, net.grads, lr_at(t), momentum_at(t), weight_decay)
                if before is not None:
                    update_stats(net, before, stats)
            if logged and session is not None:
                session.maybe_flush(rec)  # after the update: the rows it streams out are complete
            if done:
                break
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
