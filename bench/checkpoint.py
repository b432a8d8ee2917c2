"""Checkpoints inside a run, and rows streamed to disk while it trains.

A long job keeps its work in ``results_dir/<name>/running/<job_id>/`` until it ends:

    state.pkl                 the last checkpoint: parameters, optimizer state (SGD's velocities; Adam's
                              moments and step count), batch-norm buffers,
                              the mini-batch generators' states, the loop's bookkeeping (alive, diverged,
                              solved, last metrics), the next step, and how many row parts it covers
    runs/running.parquet      the job's runs rows with status `running` (load(..., running=True) reads them)
    steps/part-NNNNN.parquet  logged rows, streamed out in parts of about CHUNK_ROWS rows, so memory does
    layers/part-NNNNN.parquet not grow with the number of steps; each part sorted, one row group per run

A killed job rerun with the same config finds state.pkl, deletes the parts written after it (their
steps will be redone), restores every array bit for bit and goes on from the next step: the tables it
ends with equal an uninterrupted run's. When the job ends, `bench.results.write_job` merges the parts
into the job's usual files (streaming, one row group at a time), commits, and the folder is removed.
Every file here is written to a hidden temp name and renamed, so a kill leaves whole files only.

Short jobs never touch this folder: rows stay in memory and no checkpoint falls due.
"""

from __future__ import annotations

import pickle
import shutil
import time
from pathlib import Path

import numpy as np

from bench.results import RUNNING, atomic_file  # where running jobs live, and how files are written
from bench.spec import CHUNK_ROWS  # logged rows held in memory before they are streamed out as a part


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy().copy() if _is_torch(x) else np.array(x, copy=True)


def capture(net, opt, batches) -> dict:
    """Every array the next training step reads, as NumPy copies."""
    if hasattr(net, "named_buffers"):  # torch: the batch-norm running statistics are module buffers
        buffers = {k: _np(v) for k, v in net.named_buffers()}
    else:
        buffers = {k: _np(v) for k, v in net.buffers.items()}
    state = {"params": {k: _np(v) for k, v in net.params.items()}, "buffers": buffers,
             "optimizer": {"t": opt.t, **{s: {k: _np(v) for k, v in d.items()} for s, d in opt.state.items()}}}
    if not batches.full:
        state["rngs"] = [rng.bit_generator.state for rng in batches.rngs]
        state["order"] = None if batches.order is None else batches.order.copy()
    return state


def restore(net, opt, batches, state: dict) -> None:
    """Write a `capture` back in place (the optimizer and layers keep views of these arrays)."""
    if hasattr(net, "named_buffers"):
        net.load_state(state["params"], state["buffers"])
    else:
        for k, p in net.params.items():
            p[...] = state["params"][k]
        for k in list(net.buffers):
            net.buffers[k] = state["buffers"][k].copy()  # the layers read the dict entry each step
    opt.load_state(state["optimizer"])
    if not batches.full:
        for rng, s in zip(batches.rngs, state["rngs"]):
            rng.bit_generator.state = s
        batches.order = state["order"]


class Session:
    """One job's checkpoints and streamed rows (see the module docstring).

    `to_tables(steps_cols, layers_cols)` turns Recorder columns (with a `member` column) into
    (steps, layers) pyarrow tables of the results schema; `running_runs` is the job's runs table
    with status `running`, written beside the first part so that a reader can tell what is going on.
    """

    def __init__(self, exp_dir, job: str, to_tables, running_runs, every_steps: int | None,
                 every_minutes: float | None, chunk_rows: int | None = None):
        self.dir = Path(exp_dir) / RUNNING / job
        self.to_tables, self.running_runs = to_tables, running_runs
        self.every_steps, self.every_s = every_steps, None if every_minutes is None else every_minutes * 60
        self.chunk_rows = chunk_rows or CHUNK_ROWS
        self.parts = 0  # parts written so far (part-00000 .. part-{parts-1})
        self.elapsed = 0.0  # training seconds of earlier sessions of this job
        self.last_save = time.monotonic()
        self.resumed_from: int | None = None
        self._signal = None  # (handler, signum) of a preemption signal to pass on after the next save
        self.handed_over = False  # that handler has run: what it raises ends the job, not just a run

    def arm(self) -> None:
        """Under submitit, SLURM's warning signal (USR2 in submitit 1.5, USR1 in older ones; sent before
        a time limit or at preemption) runs submitit's handler, which requeues the job and exits at
        once, in the middle of a step. Wrap that handler: the signal now asks for a checkpoint at the
        end of the current step, and submitit's handler runs right after it is saved. Nothing is
        armed where no handler is installed (any run outside submitit)."""
        import signal

        self._armed = []
        for signum in (signal.SIGUSR1, signal.SIGUSR2):
            handler = signal.getsignal(signum)
            if not callable(handler):
                continue

            def later(sig, frame, handler=handler):
                self._signal = (handler, sig)

            try:
                signal.signal(signum, later)
            except ValueError:  # not the main thread: signals cannot be handled here
                continue
            self._armed.append((signum, handler))

    def disarm(self) -> None:
        import signal

        for signum, handler in getattr(self, "_armed", []):
            signal.signal(signum, handler)
        self._armed = []

    # ---- what train() calls ----------------------------------------------------------------------------
    def resume(self) -> dict | None:
        """The saved loop state, or None (nothing saved: start from step 0). Parts written after the
        checkpoint are deleted: their steps are trained again."""
        path = self.dir / "state.pkl"
        if not path.is_file():
            return None
        with open(path, "rb") as f:
            saved = pickle.load(f)
        self.parts, self.elapsed = saved["parts"], saved["elapsed"]
        for table in ("steps", "layers"):
            for p in (self.dir / table).glob("part-*.parquet"):
                if int(p.stem.split("-")[1]) >= self.parts:
                    p.unlink()
        self.resumed_from = saved["loop"]["t"]
        return saved["loop"]

    def due(self, step: int) -> bool:
        """Whether to checkpoint once `step` is done (after its update)."""
        if self._signal is not None or (self.every_steps is not None and step % self.every_steps == 0):
            return True
        return self.every_s is not None and time.monotonic() - self.last_save >= self.every_s

    def maybe_flush(self, rec) -> None:
        if rec.pending_rows() >= self.chunk_rows:
            self.flush(rec)

    def flush(self, rec) -> None:
        """Stream the recorder's rows out as one part (nothing if it holds none)."""
        self.write_rows(*rec.drain())

    def write_rows(self, steps: dict, layers: dict) -> None:
        if not len(steps.get("step", ())) and not len(layers.get("step", ())):
            return
        from bench import results

        if self.parts == 0:
            (self.dir / "runs").mkdir(parents=True, exist_ok=True)
            results.write_running_runs(self.dir / "runs" / "running.parquet", self.running_runs)
        t_steps, t_layers = self.to_tables(steps, layers)
        for table, t in (("steps", t_steps), ("layers", t_layers)):
            (self.dir / table).mkdir(parents=True, exist_ok=True)
            results.write_part(t, self.dir / table / f"part-{self.parts:05d}.parquet")
        self.parts += 1
        import pyarrow as pa

        pa.default_memory_pool().release_unused()  # hand the part's buffers back: memory stays flat

    def save(self, next_step: int, rec, loop: dict, train_seconds: float) -> None:
        """Flush the rows so far, then write the state atomically: rows and state agree at every kill."""
        self.flush(rec)
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.dir / "state.pkl") as f:
            pickle.dump({"parts": self.parts, "elapsed": self.elapsed + train_seconds,
                         "loop": dict(loop, t=next_step)}, f, protocol=pickle.HIGHEST_PROTOCOL)
        self.last_save = time.monotonic()
        if self._signal is not None:  # saved: now let submitit requeue the job and exit
            handler, sig = self._signal
            self._signal = None
            self.disarm()
            self.handed_over = True
            handler(sig, None)  # requeues and exits, or raises: not requeued (e.g. timed out too many times)

    # ---- what run() calls ------------------------------------------------------------------------------
    def part_files(self, table: str) -> list[Path]:
        return [self.dir / table / f"part-{i:05d}.parquet" for i in range(self.parts)]

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.dir.parent.rmdir()  # running/ itself, once no job is left in it
        except OSError:
            pass
