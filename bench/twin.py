"""`python -m bench.twin [overrides]`: the lockstep twin check, NumPy against PyTorch on the same step.

Why lockstep: two free-running trajectories cannot be compared beyond the first few steps of a chaotic
net. In a deep batch-norm net a 1e-16 rounding difference grows about tenfold every ten steps, so the
twins part ways although both are right. In lockstep the NumPy network trains as usual, and at every
logged step the torch twin is loaded with exactly the NumPy network's current parameters and batch-norm
buffers, takes the same batch, and recomputes the loss, the gradients, every per-layer statistic and the
evaluation metrics. Any difference then comes from that one step's arithmetic, and in float64 it must
stay below 1e-9 relative (the CLI exits 1 above that).

One subtlety: the loss derivative dLoss/dz^L contains y - d, which cancels where a net is confidently
right (softmax p = 1 - 1e-12 on the target), so the two engines' output deltas can differ by 1e-4
relative although both are right to rounding. The twin therefore computes its own output delta and
compares it on the scale of its terms (`output_delta_diff`), then backpropagates the NumPy network's
delta, so every per-layer statistic is compared on one and the same starting point.

The update statistics (update_norm, update_ratio) are compared too: the twin's optimizer is loaded with
the NumPy optimizer's state of that step (SGD's velocities, Adam's moments and step count), applies
the update from the twin's own gradients, and its ||w(t+1) - w(t)|| is compared with the NumPy one once
the NumPy update has been applied (at the next logged step, or when the table is read).

How two numbers are compared (one rule per kind of quantity, each with its reason):
  norms, losses      |a - b| / max(|a|, |b|): sums of squares and positive terms, no cancellation, so
                     relative rounding stays ~1e-15 however small the value (vanishing layers included)
  act_mean           |a - b| / (|a| + act_std): a mean of signed terms can cancel to ~0; its rounding
                     is relative to the size of the terms averaged, which act_std measures
  fractions          |a - b| (accuracy, act_saturation): counts over cases, already on the scale 1
  running mean/var   |a - b| / max(|a|, |b|, 1): batch-norm buffers, O(1) by construction
  update_norm        |a - b| / max(|a|, |b|, 1e-6 ||w||): w(t+1) - w(t) is a difference of stored
                     weights, each rounded to an ulp of w, so the two engines' updates can differ by
                     ~1e-16 ||w|| however small the update; below 1e-6 ||w|| that is the scale (at
                     the 1e-9 limit, a few ulps of w). update_ratio = update_norm / ||w||: the same
                     rule with the floor 1e-6
  output_delta       max |a - b| / max c (|y| + |d|) g(y) per member: see above
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from bench.record import STATS, UPDATE_STATS, row_layout, snapshot, update_stats
from bench.spec import NetSpec, TrainSpec
from bench.tasks import Task
from bench.train import LoggedMetrics, make_network, make_optimizer, train

LIMIT = 1e-9  # float64 lockstep bound: one step's rounding is ~1e-15, so 1e-9 leaves room and still bites
_FRACTIONS = {"accuracy", "test_accuracy", "act_saturation"}
UPDATE_FLOOR = 1e-6  # updates below this fraction of ||w|| are compared on that scale (docstring)


def rel_diff(quantity: str, a: np.ndarray, b: np.ndarray, ref: np.ndarray | None = None) -> np.ndarray:
    """Elementwise difference of two engines' values of `quantity` (see the module docstring); `ref`
    is act_std for act_mean and weight_norm for update_norm."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    diff = np.abs(a - b)
    if quantity in _FRACTIONS:
        out = diff
    elif quantity == "act_mean":
        out = diff / np.maximum(np.abs(a) + np.abs(ref), np.finfo(float).tiny)
    elif quantity.startswith("running_"):
        out = diff / np.maximum(np.maximum(np.abs(a), np.abs(b)), 1.0)
    else:
        scale = np.maximum(np.abs(a), np.abs(b))
        if quantity in UPDATE_STATS:
            scale = np.maximum(scale, UPDATE_FLOOR * (np.abs(ref) if quantity == "update_norm" else 1.0))
        out = np.where(scale > 0, diff / np.where(scale > 0, scale, 1.0), 0.0)
    both_nan = np.isnan(a) & np.isnan(b)  # e.g. act_saturation of a softmax output: undefined in both
    return np.where(both_nan, 0.0, np.where(np.isnan(out), np.inf, out))


def output_delta_diff(spec: NetSpec, loss: str, delta_a, delta_b, y, d) -> np.ndarray:
    """Per member, the largest difference of two output deltas dLoss/dz^L relative to the largest of
    their terms: each entry is c (y - d) g(y), whose rounding is ~1e-16 c (|y| + |d|) g(y) however much
    y - d cancels, so that is the scale (computed with |y| + |d| in place of y - d)."""
    from bench import losses
    from bench.activations import OUTPUTS
    from bench.numpy_mlp import output_delta

    d = np.broadcast_to(d, np.shape(y))
    # z = |y| only stands in for the output's pre-activation: sigmoid's phi' reads y, identity's is 1,
    # softmax's Jacobian is folded into the cross-entropy delta
    scale = np.abs(output_delta(losses.get(loss), OUTPUTS[spec.output], np.abs(y), np.abs(y), -np.abs(d)))
    scale = scale.reshape(len(y), -1).max(1)
    diff = np.abs(np.asarray(delta_a) - np.asarray(delta_b)).reshape(len(y), -1).max(1)
    return np.where(scale > 0, diff / np.where(scale > 0, scale, 1.0), diff)


class Lockstep:
    """The `train(..., lockstep=)` hook: redoes each logged step on the torch twin and keeps the worst
    difference per (step, quantity), with the layer and parameter where it happened."""

    def __init__(self, task: Task, spec: NetSpec, tspec: TrainSpec, params: dict[str, np.ndarray]):
        self.twin = make_network("torch", spec, params, tspec)
        self.opt = make_optimizer(self.twin, tspec)
        self.data = LoggedMetrics(self.twin, task, spec, tspec, record=True)
        self.layout = row_layout(spec)
        self.spec, self.tspec, self.loss = spec, tspec, tspec.loss
        self.rows: list[dict] = []
        self.pending = None  # (step, NumPy stats, twin stats, alive): the updates still to compare

    def __call__(self, step, net, buffers_before, idx, alive, metrics, stats, opt) -> None:
        self._compare_updates()
        twin = self.twin
        twin.load_state(net.params, buffers_before)
        xb, yb = self.data.batch(idx)
        delta_out = net.layers[-1].delta  # (E, B, n_out): the NumPy network's dLoss/dz^L of this step
        losses, y = twin.loss_and_grads(xb, yb, output_delta=delta_out)
        self._add(step, "output_delta", output_delta_diff(self.spec, self.loss, delta_out,
                                                          twin.to_numpy(twin.output_delta), twin.to_numpy(y),
                                                          twin.to_numpy(yb))[alive], (self.spec.n_layers, "weight"))
        metrics_t, stats_t = self.data.measure(twin, twin.to_numpy(losses).astype(np.float64), y)
        for q, v in metrics.items():
            self._add(step, q, rel_diff(q, v[alive], metrics_t[q][alive]), None)
        std = stats[:, alive, STATS.index("act_std")]
        for j, q in enumerate(STATS):
            if q not in UPDATE_STATS:
                self._add_stat(step, q, stats[:, alive, j], stats_t[:, alive, j], std)
        buffers_t = dict(twin.named_buffers())
        for name, b in net.buffers.items():  # after the step: both forwards updated them the same way
            q = name.split(".")[-1]
            d = rel_diff(q, b[alive], twin.to_numpy(buffers_t[name])[alive])
            self._add(step, q, d, (int(name.split(".")[1]) + 1, q))
        if step < self.tspec.steps:  # the NumPy network applies an update after this step: so does the twin
            tspec = self.tspec
            self.opt.load_state({"t": opt.t, **opt.state})
            before = snapshot(twin)
            self.opt.step(twin.params, twin.grads, tspec.lr_at(step), tspec.momentum_at(step), tspec.weight_decay)
            update_stats(twin, before, stats_t)
            self.pending = (step, stats, stats_t, alive.copy())

    def _compare_updates(self) -> None:
        """The update statistics of the pending step, now that the NumPy network has filled its own."""
        if self.pending is None:
            return
        step, stats, stats_t, alive = self.pending
        self.pending = None
        w = stats[:, alive, STATS.index("weight_norm")]
        for q in UPDATE_STATS:
            j = STATS.index(q)
            self._add_stat(step, q, stats[:, alive, j], stats_t[:, alive, j], w)

    def _add_stat(self, step: int, q: str, a: np.ndarray, b: np.ndarray, ref: np.ndarray) -> None:
        d = rel_diff(q, a, b, ref)  # (n_params, alive members)
        self._add(step, q, d, self.layout[int(np.unravel_index(np.argmax(d), d.shape)[0])] if d.size else None)

    def _add(self, step: int, quantity: str, d: np.ndarray, where) -> None:
        worst = float(d.max()) if d.size else 0.0
        prev = next((r for r in self.rows if r["step"] == step and r["quantity"] == quantity), None)
        layer, param = where if where is not None else (None, None)
        if prev is None:
            self.rows.append({"step": step, "quantity": quantity, "max_rel_diff": worst, "layer": layer,
                              "param": param})
        elif worst > prev["max_rel_diff"]:
            prev.update(max_rel_diff=worst, layer=layer, param=param)

    def table(self) -> pd.DataFrame:
        self._compare_updates()
        table = pd.DataFrame(self.rows, columns=["step", "quantity", "max_rel_diff", "layer", "param"])
        return table.sort_values("step", kind="stable", ignore_index=True)  # update rows come a step late


def lockstep(task: Task, spec: NetSpec, tspec: TrainSpec, params: dict[str, np.ndarray], seeds) -> pd.DataFrame:
    """Train in NumPy with the torch twin in lockstep: one row per (logged step, quantity), the worst
    difference over members, layers and parameters (see `rel_diff`)."""
    check = Lockstep(task, spec, tspec, params)
    train(task, spec, tspec, params, "numpy", seeds, lockstep=check)
    return check.table()


def lockstep_cfg(cfg) -> pd.DataFrame:
    """`lockstep` for a composed Hydra config (its `ensemble` members; `backend` is ignored)."""
    from bench.config import ConfigError, _enum, validate
    from bench.init import init_params

    task, spec, tspec = validate(cfg)
    if tspec.dtype != "float64":
        raise ConfigError(f"train.dtype={tspec.dtype}: the lockstep twin check runs in float64 (its 1e-9 "
                          f"bound is float64's); use train.dtype=float64")
    if tspec.device != "cpu":
        raise ConfigError(f"train.device={tspec.device}: the NumPy side of the twin check runs on cpu only")
    seeds = [cfg.seed + k for k in range(cfg.ensemble)]
    params = init_params(spec, _enum(cfg.model.init), seeds, cfg.model.init_scale, cfg.model.init_bias)
    return lockstep(task, spec, tspec, params, seeds)


def config_dir_as_searchpath(argv: list[str]) -> list[str]:
    """bench.run's `--config-dir DIR` (`-cd DIR`, `--config-dir=DIR`): a user's config folder (their
    own method presets, say) added to the config search path, as the override Hydra's compose
    understands: hydra.searchpath=[file://DIR]."""
    out, dirs, args = [], [], iter(argv)
    for a in args:
        if a in ("--config-dir", "-cd"):
            dirs.append(next(args, ""))
        elif a.startswith("--config-dir="):
            dirs.append(a.split("=", 1)[1])
        else:
            out.append(a)
    for d in dirs:
        if not d or not Path(d).is_dir():
            raise ValueError(f"--config-dir {d!r}: not a folder")
    paths = ",".join(f"file://{Path(d).resolve()}" for d in dirs)
    return out + ([f"hydra.searchpath=[{paths}]"] if dirs else [])


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from bench.config import CONF_DIR, register

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def lockstep_from_run_config(config: dict, ensemble: int = 1) -> pd.DataFrame:
    """The lockstep check of a stored run (its runs.config_json, as a dict) and the `ensemble - 1`
    seeds after it: one row per logged step, the worst difference and which quantity it was."""
    cfg = _compose(_overrides(config) + [f"ensemble={ensemble}"])
    return per_step(lockstep_cfg(cfg))


def _overrides(config: dict) -> list[str]:
    """Hydra overrides that rebuild a stored semantic config (`bench.run.semantic_config`)."""
    import json

    out = [f"task={config['task']['name']}"]
    for group in ("task", "model", "train", "log"):
        for k, v in config.get(group, {}).items():
            if not (group == "task" and k == "name"):
                out.append(f"{group}.{k}={json.dumps(v) if v is not None else 'null'}")
    out += [f"{k}={v}" for k, v in config.items() if k == "seed"]
    return out


def per_step(table: pd.DataFrame) -> pd.DataFrame:
    """The worst quantity at each logged step: columns step, max_rel_diff, quantity, layer, param."""
    worst = table.loc[table.groupby("step")["max_rel_diff"].idxmax()]
    return worst[["step", "max_rel_diff", "quantity", "layer", "param"]].reset_index(drop=True)


def summary_line(table: pd.DataFrame) -> str:
    """One line ending in `max rel diff <number>` (the public contract)."""
    w = table.loc[table["max_rel_diff"].idxmax()]
    where = f", layer {int(w['layer'])} {w['param']}" if pd.notna(w["layer"]) else ""
    return (f"lockstep twin check: {table['step'].nunique()} logged steps x {table['quantity'].nunique()} "
            f"quantities, worst {w['quantity']} at step {int(w['step'])}{where}: max rel diff "
            f"{w['max_rel_diff']:.3e}")


def main(argv: list[str] | None = None) -> int:
    from bench.cli import one_line

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip().splitlines()[0])
        print("usage: python -m bench.twin [--config-dir DIR] OVERRIDES (as bench.run's), e.g. "
              "python -m bench.twin task=digits model.depth=16")
        return 0
    try:
        table = lockstep_cfg(_compose(config_dir_as_searchpath(list(argv))))
    except Exception as e:  # bad input: the same one line as bench.run
        print(one_line(e), file=sys.stderr)
        return 2
    print(summary_line(table))
    return 0 if table["max_rel_diff"].max() <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
