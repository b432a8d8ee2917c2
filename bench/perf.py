"""`python -m bench.perf`: the speed suite, measured side by side in one process.

What it is for: ratios that hold on a shared machine. Every case times its variants interleaved
(A B A B ...) over `repeats` rounds and reports the median and interquartile range per variant, so a
neighbour's job slows all variants of a round alike and the ratio of medians stays meaningful.
What it is not for: absolute speeds to compare across machines (the table says which machine).

Cases (targets from the issue; `met` is judged on the medians of this run):
  P1  tiny nets (XOR 2-2-1, symmetry 6-2-1): NumPy vs torch steps/s, and NumPy vs a hand-inlined floor
  P2  wide nets (width 512, depth 10, batch 256, float32) vs a bare matmul loop of the same shapes
  P3  recording per-layer statistics every step vs record=False, at several widths
  P4  a 100-seed ensemble vs 100 solo runs (both backends, CPU time, interleaved), largest ensemble
  P5  wall time of the quickstart sweep and of the reproduction presets (subprocesses; minutes)
  P6  layers rows on disk (real statistics, float32/float64) and load() of 10M compacted rows

    python -m bench.perf                       # everything (P5 takes minutes)
    python -m bench.perf --quick               # tiny sizes, P5 left out unless named in --cases
    python -m bench.perf --cases P1,P3 --repeats 7
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bench.init import init_params
from bench.record import STATS
from bench.spec import NetSpec, TrainSpec
from bench.tasks import Task, make_task
from bench.train import train

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["case", "variant", "backend", "metric", "value", "unit", "repeats", "median", "iqr",
           "ratio", "target", "met", "note"]
ALL_CASES = ("P1", "P2", "P3", "P4", "P5", "P6")
REPRODUCTION = ("seed_xor", "rumelhart_xor", "rumelhart_parity", "rumelhart_encoder",
                "rumelhart_symmetry", "rumelhart_family_trees")


@dataclass
class Suite:
    quick: bool
    repeats: int
    out_dir: Path
    rows: list[dict] = field(default_factory=list)

    def add(self, case, variant, backend, metric, value, unit, times=None, ratio=None, target=None,
            met=None, note=""):
        t = np.asarray(times if times is not None else [np.nan], float)
        q1, med, q3 = np.percentile(t, [25, 50, 75]) if len(t) else (np.nan,) * 3
        self.rows.append({"case": case, "variant": variant, "backend": backend, "metric": metric,
                          "value": float(value), "unit": unit, "repeats": int(np.isfinite(t).sum()),
                          "median": float(med), "iqr": float(q3 - q1),
                          "ratio": np.nan if ratio is None else float(ratio), "target": target or "",
                          "met": None if met is None else bool(met), "note": note})


def interleaved(fns: dict, repeats: int, warmup: bool = True, clock=time.perf_counter) -> dict[str, list[float]]:
    """Seconds of each callable by `clock` (wall by default; time.process_time for CPU seconds, which
    a neighbour's job on a shared machine does not add to; None: each callable returns its own seconds),
    `repeats` rounds, variants interleaved within each round, in reverse order every other round (so that
    going first or last in a round favours no variant). times[k][r] of two variants come from the same
    round r: a pair."""
    if warmup:
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for r in range(repeats):
        for k, f in (fns.items() if r % 2 == 0 else reversed(fns.items())):
            if clock is None:
                times[k].append(f())
                continue
            t0 = clock()
            f()
            times[k].append(clock() - t0)
    return times


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Set torch's intra-op threads for a block (tiny ops: one thread; a second one only waits)."""
    import torch

    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _with_threads(n: int, fn) -> None:
    with torch_threads(n):
        fn()


def _trainer(task, spec, tspec, params, backend, record=True):
    """A zero-argument callable that trains seed 0 once: what `interleaved` times."""
    return functools.partial(train, task, spec, tspec, params, backend, [0], record=record)


def _steps_timer(task, spec, tspec, params, backend, record=True):
    """A zero-argument callable that trains seed 0 once and returns the CPU seconds of its steps 1 .. N: from
    the log at step 0 to the log at the last step (tspec logs every step), N whole steps, without the
    set-up (building the network, casting the data) that both variants of a pair share."""
    def run() -> float:
        stamps = []
        train(task, spec, tspec, params, backend, [0], record=record,
              on_log=lambda step, loss: stamps.append(time.process_time()))
        return stamps[-1] - stamps[0]
    return run


# ---------------------------------------------------------------------------------------------- P1

def floor_step_loop(x, d, params, steps, lr, momentum):
    """The hand-inlined floor: a sigmoid 1-hidden-layer net, sse_half, momentum SGD, 2-D arrays.

    Same arithmetic as bench's NumPy network for member 0 (sigmoid as bench computes it: expit), no
    layers, no ensemble axis, no recording; `steps` updates and steps + 1 forward/backward passes,
    as `train` does. Returns the last loss (the network after `steps` updates).
    """
    from scipy.special import expit  # bench's sigmoid in NumPy (bench.activations)

    W1, b1, W2, b2 = (params[k][0].copy() for k in
                      ("layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"))
    ps = (W1, b1, W2, b2)
    vs = [np.zeros_like(p) for p in ps]
    xT = x.T
    for t in range(steps + 1):
        h = expit(x @ W1 + b1)  # (N, hidden)
        y = expit(h @ W2 + b2)  # (N, n_out)
        e = y - d
        loss = 0.5 * (e * e).sum()
        if t == steps:
            break
        d2 = e * (y * (1.0 - y))
        d1 = (d2 @ W2.T) * (h * (1.0 - h))
        for p, v, g in zip(ps, vs, (xT @ d1, d1.sum(0, keepdims=True), h.T @ d2, d2.sum(0, keepdims=True))):
            v *= momentum
            v -= lr * g
            p += v
    return loss


TINY = {"xor 2-2-1": ("xor", NetSpec(2, 1, (2,), "sigmoid", "sigmoid")),
        "symmetry 6-2-1": ("symmetry", NetSpec(6, 1, (2,), "sigmoid", "sigmoid"))}


def p1(s: Suite):
    steps = 300 if s.quick else 3000
    tspec = TrainSpec(steps=steps, lr=0.5, momentum=0.9, log_every=steps)  # statistics at 2 steps only
    import torch

    default_threads = torch.get_num_threads()
    for net_name, (task_name, spec) in TINY.items():
        task = make_task(task_name)
        params = init_params(spec, "uniform", [0], scale=0.3)
        x, d = task.x_train, task.y_train

        with torch_threads(1):
            fns = {"numpy": _trainer(task, spec, tspec, params, "numpy"),
                   "torch": _trainer(task, spec, tspec, params, "torch"),
                   "floor": functools.partial(floor_step_loop, x, d, params, steps, 0.5, 0.9)}
            if not s.quick:
                fns["torch-threads"] = functools.partial(_with_threads, default_threads, fns["torch"])
            times = interleaved(fns, s.repeats)
        sps = {k: (steps + 1) / np.median(v) for k, v in times.items()}
        for k, v in times.items():
            backend = "numpy" if k in ("numpy", "floor") else "torch"
            note = {"torch": "torch.set_num_threads(1) (tiny ops: the second thread only waits)",
                    "torch-threads": f"torch with its default {default_threads} threads",
                    "floor": "hand-inlined NumPy step, 2-D arrays, no layers/recording"}.get(k, "")
            if k == "numpy":
                s.add("P1", f"{net_name} numpy", backend, "steps/s", sps[k], "steps/s", v,
                      ratio=sps["numpy"] / sps["torch"], target="numpy >= 4x torch",
                      met=sps["numpy"] >= 4 * sps["torch"], note="ratio = numpy / torch (1 thread)")
                s.add("P1", f"{net_name} numpy vs floor", backend, "floor/numpy", sps["floor"] / sps["numpy"],
                      "x", v, ratio=sps["floor"] / sps["numpy"], target="floor/numpy <= 1.5",
                      met=sps["floor"] / sps["numpy"] <= 1.5)
            else:
                s.add("P1", f"{net_name} {k}", backend, "steps/s", sps[k], "steps/s", v, note=note)


# ---------------------------------------------------------------------------------------------- P2

def _wide_task(width, batch, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, width))
    y = rng.standard_normal((batch, width))
    return Task("wide", x, y, None, None, "identity", "mse", "regression")


def bare_matmul_loop(backend, width, depth, batch, dtype, device="cpu"):
    """One step's matmuls with no network around them: per layer a W, a^T dz and dz W^T (3 GEMMs).

    Each layer has its own matrices, as a network's layers do: one W and one a shared by all layers
    would stay in cache from GEMM to GEMM (1 MB at width 512 in float32), where a network's 11 weight
    matrices and their activations (about 38 MB at w512 d10 B256) do not; measured on this VM, the
    shared-matrix loop ran 2-4% faster in one thread, a speed no network of these shapes could reach.
    """
    n_layers = depth + 1
    rng = np.random.default_rng(0)
    a = [rng.standard_normal((batch, width)).astype(dtype) for _ in range(n_layers)]
    W = [rng.standard_normal((width, width)).astype(dtype) for _ in range(n_layers)]
    xp, sync = np, None
    if backend == "torch":
        import torch

        xp, sync = torch, (torch.cuda.synchronize if device == "cuda" else None)
        a, W = [torch.as_tensor(x, device=device) for x in a], [torch.as_tensor(x, device=device) for x in W]
    z, gW, gin = ([xp.empty_like(x) for x in like] for like in (a, W, a))
    layers = list(zip(a, W, z, gW, gin))

    def step():
        for a_l, W_l, z_l, gW_l, gin_l in layers:
            xp.matmul(a_l, W_l, out=z_l)
            xp.matmul(a_l.T, z_l, out=gW_l)
            xp.matmul(z_l, W_l.T, out=gin_l)
        if sync is not None:
            sync()
    return step


def p2(s: Suite):
    width, depth, batch = (128, 4, 64) if s.quick else (512, 10, 256)
    steps = 3 if s.quick else 10
    dtype = "float32"
    task = _wide_task(width, batch)
    spec = NetSpec(width, width, (width,) * depth, "tanh", "identity")
    flops_step = 3 * (depth + 1) * 2 * batch * width * width
    devices = ["cpu"] + (["cuda"] if cuda_available() else [])
    if not cuda_available():
        s.add("P2", "cuda", "torch", "skipped", np.nan, "", note="no CUDA device in this session: cuda cases skipped")
    for device in devices:
        tspec = TrainSpec(steps=steps, lr=1e-3, loss="mse", log_every=steps, dtype=dtype, device=device)
        params = init_params(spec, "xavier", [0])
        backends = ("numpy", "torch") if device == "cpu" else ("torch",)
        fns = {}
        for b in backends:
            fns[f"train {b}"] = _trainer(task, spec, tspec, params, b, record=False)
            bare = bare_matmul_loop(b, width, depth, batch, dtype, device)
            fns[f"bare {b}"] = (lambda bare=bare: [bare() for _ in range(steps + 1)])
        times = interleaved(fns, min(s.repeats, 5))  # seconds per round at full size
        rate = {k: (steps + 1) * flops_step / np.median(v) for k, v in times.items()}
        for b in backends:
            r = rate[f"train {b}"] / rate[f"bare {b}"]
            shape = f"w{width} d{depth} B{batch} {dtype} {device}"
            s.add("P2", f"bare matmul {shape}", b, "GEMM FLOP/s", rate[f"bare {b}"] / 1e9, "GFLOP/s",
                  times[f"bare {b}"], note=f"{3 * (depth + 1)} GEMMs per step, (steps+1) per repeat")
            s.add("P2", f"train {shape}", b, "GEMM FLOP/s", rate[f"train {b}"] / 1e9, "GFLOP/s",
                  times[f"train {b}"], ratio=r, target="train >= 70% of bare matmul", met=r >= 0.7,
                  note="record=False; ratio = train / bare (same backend)")


# ---------------------------------------------------------------------------------------------- P3

def p3(s: Suite):
    """Recording statistics at every step vs not (the loss, accuracy and test metrics are measured at every
    step either way), in CPU seconds of one thread: the difference is small against the step, so wall time
    on a shared machine would drown it. Short runs in many rounds, on and off side by side in each, timed
    from the first logged step to the last (the set-up they share left out, where it would dilute the
    difference): the overhead is the median over rounds of on / off - 1, so a slow stretch of the machine,
    which slows both runs of its round alike, cancels; short runs keep the two of a pair close in time."""
    from threadpoolctl import threadpool_limits

    widths = (16, 64) if s.quick else (16, 64, 256)
    rounds = s.repeats if s.quick else max(6 * s.repeats, 15)
    task = make_task("digits")
    for width in widths:
        steps = 10 if (s.quick or width >= 256) else 20
        spec = NetSpec(64, 10, (width,) * 4, "tanh", "softmax")
        tspec = TrainSpec(steps=steps, lr=0.05, momentum=0.9, batch_size=128, loss="cross_entropy", log_every=1)
        params = init_params(spec, "xavier", [0])
        for backend in ("numpy", "torch"):
            with torch_threads(1), threadpool_limits(1):
                times = interleaved({"on": _steps_timer(task, spec, tspec, params, backend, record=True),
                                     "off": _steps_timer(task, spec, tspec, params, backend, record=False)},
                                    rounds, clock=None)
            paired = np.asarray(times["on"]) / np.asarray(times["off"])
            over = np.median(paired) - 1
            q1, q3 = np.percentile(paired, [25, 75])
            target, met = ("overhead <= 5%", over <= 0.05) if width >= 64 else ("", None)
            s.add("P3", f"digits 64-{width}x4-10 B128, record every step", backend, "overhead",
                  100 * over, "%", times["on"], ratio=1 + over, target=target, met=met,
                  note=f"median of {rounds} paired on/off rounds (quartiles {100 * (q1 - 1):+.1f}%, "
                       f"{100 * (q3 - 1):+.1f}%); CPU on {1e3 * np.median(times['on']) / steps:.2f} ms vs off "
                       f"{1e3 * np.median(times['off']) / steps:.2f} ms per step ({steps}-step runs); 1 thread")


# ---------------------------------------------------------------------------------------------- P4

def _train_seconds(task, spec, tspec, backend, seeds) -> float:
    """CPU seconds of one training of `seeds` (process time: on a shared machine a neighbour's load
    does not count, as waiting for the CPU would in wall time)."""
    params = init_params(spec, "uniform", seeds)
    t0 = time.process_time()
    train(task, spec, tspec, params, backend, seeds)
    return time.process_time() - t0


def largest_ensemble(task, spec, tspec, fraction=0.7):
    """Members that fit in `fraction` of available memory: by bench.config.estimate_bytes, and measured."""
    import tracemalloc

    from bench.config import estimate_bytes
    from bench.guard import available_memory_bytes

    avail = available_memory_bytes()
    per_member_est = estimate_bytes(spec, tspec, task, 1)
    sizes = (1000, 4000)
    peaks = []
    short = dataclasses.replace(tspec, steps=3, log_every=1)
    for E in sizes:
        tracemalloc.start()
        train(task, spec, short, init_params(spec, "uniform", range(E)), "numpy", list(range(E)))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    per_member_meas = (peaks[1] - peaks[0]) / (sizes[1] - sizes[0])  # slope: fixed costs cancel
    return avail, per_member_est, per_member_meas, int(fraction * avail / per_member_est), \
        int(fraction * avail / per_member_meas)


def p4(s: Suite):
    """An E-seed ensemble against E solo runs (that members equal solo runs is tests/test_perf.py's and
    tests/test_ensemble.py's job)."""
    from threadpoolctl import threadpool_limits

    E, steps = (10, 200) if s.quick else (100, 2000)
    task_name, spec = TINY["symmetry 6-2-1"]
    task = make_task(task_name)
    tspec = TrainSpec(steps=steps, lr=0.1, momentum=0.9, log_every=max(1, steps // 10))
    seeds = list(range(E))
    for backend in ("numpy", "torch"):
        t_ens, t_solo = [], 0.0
        with torch_threads(1), threadpool_limits(1):  # 1 thread: torch's ops and NumPy's BLAS
            # `repeats` ensembles (median), the E solo runs (summed) spread between them: interleaved, so
            # that load from a neighbour slows both alike
            for r in range(s.repeats):
                t_ens.append(_train_seconds(task, spec, tspec, backend, seeds))
                t_solo += sum(_train_seconds(task, spec, tspec, backend, [seed]) for seed in seeds[r::s.repeats])
        speed = t_solo / np.median(t_ens)
        s.add("P4", f"symmetry 6-2-1 x{E} seeds, {steps} sweeps, ensemble", backend, "cpu", np.median(t_ens),
              "s", t_ens, ratio=speed, target=f"ensemble >= 30x faster than {E} solo runs",
              met=speed >= 30, note="ratio = solo loop / ensemble, CPU time; 1 thread")
        s.add("P4", f"symmetry 6-2-1 {E} solo runs", backend, "cpu", t_solo, "s", [t_solo])
    avail, est, meas, e_est, e_meas = largest_ensemble(task, spec, tspec)
    s.add("P4", "largest ensemble (estimate_bytes)", "numpy", "members", e_est, "members",
          note=f"70% of available {avail / 2**30:.1f} GiB / {est:.0f} B per member (bench.config.estimate_bytes)")
    s.add("P4", "largest ensemble (measured peak)", "numpy", "members", e_meas, "members",
          note=f"tracemalloc peak slope {meas:.0f} B per member (E=1000 vs 4000), same 70% budget")


# ---------------------------------------------------------------------------------------------- P5

def _bench_run(args, results_dir, timeout):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "bench.run", "-m", *args, "report=false",
                          f"results_dir={results_dir}", "progress=none"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"bench.run {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return time.perf_counter() - t0


def p5(s: Suite):
    tmp = Path(tempfile.mkdtemp(prefix="vgbench-perf-p5-"))
    try:
        t = _bench_run(["experiment=quickstart"], tmp / "q", 3600)
        layers = tmp / "q" / "quickstart" / "layers"
        n = len(pd.read_parquet(layers, columns=["step"]))
        size = sum(p.stat().st_size for p in layers.glob("*.parquet"))
        s.add("P5", "quickstart sweep (72 jobs)", "both", "wall", t, "s", [t], ratio=t / 60,
              target="<= 60 s", met=t <= 60, note=f"{os.cpu_count()} cores; subprocess, report=false")
        s.add("P6", "quickstart layers on disk (real statistics)", "both", "bytes/row", size / n, "B/row",
              note=f"{n} rows, {size / 2**20:.1f} MiB")
        total, parts = 0.0, []
        for name in REPRODUCTION:
            ti = _bench_run([f"experiment={name}"], tmp / "r", 3600)
            total += ti
            s.add("P5", f"reproduction: {name}", "both", "wall", ti, "s", [ti])
            parts.append(f"{name} {ti:.0f}s")
        s.add("P5", "reproduction set (all presets above)", "both", "wall", total, "s", [total],
              ratio=total / 600, target="<= 600 s", met=total <= 600)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- P6

def synthetic_layers(n_rows, n_runs, seed=0, job=0):
    """A realistic-shaped layers table: runs x logged steps x (layer, param), random statistics."""
    rng = np.random.default_rng(seed)
    rows_per_step = 20  # 10 layers x (weight, bias)
    per_run = n_rows // n_runs
    n_steps = per_run // rows_per_step
    runs = np.array([f"{job:04x}{k:012x}" for k in range(n_runs)], dtype=object)
    run_idx = np.repeat(np.arange(n_runs), n_steps * rows_per_step)
    n = len(run_idx)
    cols = {"run_id": runs[run_idx],
            "step": np.tile(np.repeat(np.arange(n_steps) * 10, rows_per_step), n_runs).astype(np.int64),
            "layer": np.tile(np.repeat(np.arange(1, 11), 2), n_runs * n_steps).astype(np.int64),
            "param": np.tile(np.array(["weight", "bias"], dtype=object), n // 2)}
    for k in STATS:
        cols[k] = rng.lognormal(0.0, 2.0, n)
    return cols


def _runs_and_steps(run_ids):
    """Minimal valid runs rows for `run_ids` (load() keeps only layers rows whose run it knows) and no steps."""
    import pyarrow as pa

    from bench import results

    n = len(run_ids)
    runs = {}
    for f in results.RUNS_SCHEMA:
        if f.name in ("job_id", "schema_version", "created_at"):
            continue
        t = f.type
        value = (0.0 if pa.types.is_floating(t) else 0 if pa.types.is_integer(t) else False if pa.types.is_boolean(t)
                 else "ok" if f.name == "status" else "x")
        runs[f.name] = [value] * n
    runs["run_id"] = list(run_ids)
    steps = {f.name: [] for f in results.STEPS_SCHEMA if f.name != "job_id"}
    return runs, steps


def real_layers(quick: bool) -> list[tuple[dict, dict, dict]]:
    """(runs, steps, layers) columns of real trainings: digits nets of three activations (an ensemble
    each), statistics at every step, as bench.run would write them."""
    from threadpoolctl import threadpool_limits

    from bench import results

    task = make_task("digits")
    steps, E = (10, 2) if quick else (60, 4)
    jobs = []
    for k, act in enumerate(("sigmoid", "tanh", "relu")):
        spec = NetSpec(64, 10, (32,) * 8, act, "softmax")
        tspec = TrainSpec(steps=steps, lr=0.05, momentum=0.9, batch_size=64, loss="cross_entropy", log_every=1)
        seeds = list(range(E))
        with threadpool_limits(1):
            out = train(task, spec, tspec, init_params(spec, "xavier", seeds), "numpy", seeds)
        rid = np.array([f"{k:04x}{m:012x}" for m in seeds], dtype=object)
        runs, steps_cols = _runs_and_steps(rid)
        layers = {"run_id": rid[out.layers["member"]], **{k: v for k, v in out.layers.items() if k != "member"}}
        jobs.append((runs, steps_cols, layers))
    assert all(set(j[2]) == set(results.SCHEMAS["layers"].names) - {"job_id"} for j in jobs)
    return jobs


def _layers_bytes(exp) -> int:
    return sum(p.stat().st_size for p in (exp / "layers").glob("*.parquet"))


def p6(s: Suite):
    """Layers rows on disk (real statistics, float32 and float64) and load() of a compacted folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench import results

    tmp = Path(tempfile.mkdtemp(prefix="vgbench-perf-p6-"))
    try:
        jobs = real_layers(s.quick)
        n_real = sum(len(j[2]["step"]) for j in jobs)
        for dtype in ("float32", "float64"):
            exp = tmp / f"real-{dtype}"
            for j, (runs, steps, layers) in enumerate(jobs):
                results.write_job(exp, f"real{j}", runs, steps, layers, stats_dtype=dtype)
            results.compact(exp)  # one file: what a finished experiment holds after `compact`
            b = _layers_bytes(exp) / n_real
            (path,) = (exp / "layers").glob("*.parquet")
            stored = {f"float{f.type.bit_width}" for f in pq.read_schema(path) if pa.types.is_floating(f.type)}
            s.add("P6", f"layers on disk, real statistics, {dtype}", "pandas", "bytes/row", b, "B/row",
                  ratio=b / 26, target="<= 26 B/row" if dtype == "float32" else "",
                  met=b <= 26 if dtype == "float32" else None,
                  note=f"{n_real} rows: digits 64-32x8-10 sigmoid/tanh/relu, every step (log.stats_dtype={dtype}, "
                       f"stored {'/'.join(sorted(stored))}); one compacted file, its footer included")

        n_total = 200_000 if s.quick else 10_000_000
        n_jobs, n_runs = (4, 10) if s.quick else (10, 1000)  # compacted: what load() meets in a big sweep
        exp = tmp / "synthetic"
        t_write = 0.0
        for j in range(n_jobs):
            cols = synthetic_layers(n_total // n_jobs, n_runs, seed=j, job=j)
            runs, steps = _runs_and_steps(np.unique(cols["run_id"]))
            t0 = time.perf_counter()
            results.write_job(exp, f"job{j:04d}", runs, steps, cols)
            t_write += time.perf_counter() - t0
        t0 = time.perf_counter()
        results.compact(exp)
        t_compact = time.perf_counter() - t0
        size = _layers_bytes(exp)
        times = interleaved({"pd.read_parquet": lambda: pd.read_parquet(exp / "layers"),
                             "bench.results.load": lambda: results.load(exp)},
                            max(1, min(s.repeats, 3)), warmup=False)
        n = n_total
        tag = f"{n / 1e6:g}M rows"
        s.add("P6", f"write_job {tag} ({n_jobs} jobs)", "pandas", "wall", t_write, "s", [t_write])
        s.add("P6", f"compact {tag} ({n_jobs} jobs, {n_jobs * n_runs} runs)", "pandas", "wall", t_compact, "s",
              [t_compact])
        for k, v in times.items():
            per10m = np.median(v) * 1e7 / n
            s.add("P6", f"{k} {tag}, compacted", "pandas", "s/10M rows", per10m, "s", v, target="<= 3 s for 10M rows",
                  met=per10m <= 3, ratio=per10m / 3, note="value and ratio: median time scaled to 10M rows; / 3 s")
        c0 = time.process_time()
        results.load(exp)
        cpu = (time.process_time() - c0) * 1e7 / n
        s.add("P6", f"bench.results.load {tag}, compacted: CPU", "pandas", "cpu s/10M rows", cpu, "s", [cpu],
              note="CPU seconds of all threads (wall is CPU / cores used where the machine is idle; on a "
                   "shared machine wall also counts waiting for a core)")
        s.add("P6", f"layers on disk {tag}, random float32 statistics", "pandas", "bytes/row", size / n, "B/row",
              note="lognormal random statistics: mantissas incompressible, an upper bound")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- main

CASES = {"P1": p1, "P2": p2, "P3": p3, "P4": p4, "P5": p5, "P6": p6}


def run_suite(cases=None, quick=False, repeats=None, out_dir=None) -> pd.DataFrame:
    """Run the named cases (default: all, P5 only when not quick) and write the table as parquet."""
    cases = list(cases) if cases else [c for c in ALL_CASES if not (quick and c == "P5")]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ValueError(f"--cases {','.join(unknown)}: valid choices: {', '.join(ALL_CASES)}")
    out_dir = Path(out_dir or ROOT / "results" / "perf")
    s = Suite(quick, repeats or (3 if quick else 7), out_dir)
    for c in cases:
        t0 = time.perf_counter()
        CASES[c](s)
        print(f"[perf] {c} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    df = pd.DataFrame(s.rows, columns=COLUMNS)
    df["met"] = df["met"].astype("boolean")
    df.attrs["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"perf-{stamp}{'-quick' if quick else ''}.parquet"
    tmp = path.with_name("." + path.name + ".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    df.attrs["path"] = str(path)
    return df


def to_markdown(df: pd.DataFrame) -> str:
    from analysis.report import md_table  # the report's table writer: one markdown format

    cols = ["case", "variant", "backend", "metric", "value", "unit", "repeats", "iqr", "ratio", "target",
            "met", "note"]
    return md_table(df[cols].astype(object).where(df[cols].notna(), ""))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes and 3 repeats; P5 only if named")
    ap.add_argument("--cases", default=None, help=f"comma-separated subset of {','.join(ALL_CASES)}")
    ap.add_argument("--repeats", type=int, default=None, help="rounds per case (default 3 quick, 7 full)")
    ap.add_argument("--out", default=None, help="output folder (default results/perf)")
    a = ap.parse_args(argv)
    cases = [c.strip().upper() for c in a.cases.split(",")] if a.cases else None
    try:
        df = run_suite(cases, a.quick, a.repeats, a.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(to_markdown(df))
    print(f"\nwritten: {df.attrs['path']}  ({df.attrs['machine']})")


if __name__ == "__main__":
    main()
