"""Checkpoint and resume inside a run; rows streamed out in parts; running rows readable.

A run interrupted at any step and rerun must end with steps and layers tables equal, value for
value (exact: the same arithmetic on the same bits), to a run that was never interrupted; runs rows
equal apart from created_at and wall_time_s.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import pandas as pd
import pytest
from conftest import compose_cfg

import bench.checkpoint as ck
from bench import cli, results
from bench.run import run

SGD = "train.momentum=0.9"
ADAM = ["train.optimizer=adam", "train.lr=0.01"]  # Adam's moments and step count must come back too
CASES = {  # every piece of state a resume must restore: optimizer state, batch-norm buffers, data order
    "numpy-minibatch-bn": ["backend=numpy", "model.norm=batchnorm", "model.depth=2", "model.width=3",
                           "train.batch_size=2", "ensemble=3", SGD],
    "torch-minibatch-bn": ["backend=torch", "model.norm=batchnorm", "model.depth=2", "model.width=3",
                           "train.batch_size=2", "ensemble=3", SGD],
    "numpy-teacher-fullbatch": ["backend=numpy", "task=teacher", "task.n_train=64", "model.depth=3",
                                "model.width=8", "ensemble=2", SGD],
    "torch-digits-minibatch": ["backend=torch", "task=digits", "model.depth=2", "model.width=16",
                               "train.batch_size=32", "train.lr=0.1", "ensemble=2", SGD],
    "numpy-adam-minibatch-bn": ["backend=numpy", "model.norm=batchnorm", "model.depth=2", "model.width=3",
                                "train.batch_size=2", "ensemble=3", *ADAM],
    "torch-adam-teacher-fullbatch": ["backend=torch", "task=teacher", "task.n_train=64", "model.depth=3",
                                     "model.width=8", "ensemble=2", *ADAM],
}
STEPS = ["train.steps=60", "log.every=4"]


class Stop(KeyboardInterrupt):
    """Raised from the progress callback: the job dies there as a Ctrl-C (or a kill) would."""


def _interrupt_at(monkeypatch, step: int) -> None:
    real = cli.Progress.__call__

    def call(self, t, losses):
        if t >= step:
            raise Stop
        real(self, t, losses)

    monkeypatch.setattr(cli.Progress, "__call__", call)


def _tables(root):
    res = results.load(root, config_columns=["seed"])
    runs = res.runs.drop(columns=["created_at", "wall_time_s", "job_id"])
    runs["config_json"] = [json.dumps({**json.loads(c), "results_dir": None}) for c in runs["config_json"]]
    return runs, res.steps.drop(columns="job_id"), res.layers.drop(columns="job_id")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("stop_at", [24, 41])  # right after a checkpoint (24), and between two (41)
def test_interrupted_run_resumes_to_identical_tables(case, stop_at, tmp_path, monkeypatch):
    overrides = [*CASES[case], *STEPS, "name=e"]
    run(compose_cfg(overrides, results_dir=tmp_path / "whole"))

    monkeypatch.setattr(ck, "CHUNK_ROWS", 30)  # parts of a few logged steps: several per run
    every = ["checkpoint.every_steps=12"]  # checkpoints after updates 12, 24, 36, 48
    with monkeypatch.context() as m:
        _interrupt_at(m, stop_at)
        with pytest.raises(Stop):
            run(compose_cfg([*overrides, *every], results_dir=tmp_path / "cut"))
    exp = tmp_path / "cut" / "e"
    job_dir = next((exp / ck.RUNNING).iterdir())
    assert (job_dir / "state.pkl").is_file() and list((job_dir / "layers").glob("part-*.parquet"))
    assert not (exp / "runs").exists() or not list((exp / "runs").glob("*.parquet"))  # nothing committed

    # while it is stopped, the rows written so far are readable, marked running, and left out by default
    live = results.load(exp, running=True)
    assert set(live.runs["status"]) == {"running"} and len(live.runs) == len(live.runs["run_id"].unique())
    assert 0 < live.steps["step"].max() < stop_at
    assert len(results.load(exp).runs) == 0

    run(compose_cfg([*overrides, *every], results_dir=tmp_path / "cut"))
    assert not (exp / ck.RUNNING).exists()  # committed: the checkpoint and parts are gone
    for a, b, name in zip(_tables(tmp_path / "whole" / "e"), _tables(exp), ("runs", "steps", "layers")):
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=name)


def _interrupted_then_rerun(tmp_path, monkeypatch, *extra) -> list[int]:
    """Interrupt a checkpointing run at update 41, rerun it (with `extra` overrides): the logged steps seen."""
    overrides = [*CASES["numpy-minibatch-bn"], *STEPS, "name=e", "checkpoint.every_steps=12"]
    with monkeypatch.context() as m:
        _interrupt_at(m, 41)
        with pytest.raises(Stop):
            run(compose_cfg(overrides, results_dir=tmp_path))
    seen = []
    real = cli.Progress.__call__
    monkeypatch.setattr(cli.Progress, "__call__", lambda self, t, losses: (seen.append(t), real(self, t, losses)))
    run(compose_cfg([*overrides, *extra], results_dir=tmp_path))
    return seen


def test_resume_restores_from_the_last_checkpoint_not_the_start(tmp_path, monkeypatch):
    seen = _interrupted_then_rerun(tmp_path, monkeypatch)
    assert seen[0] == 36 and seen[-1] == 60  # the last checkpoint came after update 36: step 36 is next


def test_long_run_streams_rows_in_parts(tmp_path, monkeypatch):
    """Rows leave memory in parts: the recorder never holds more than a part's worth."""
    monkeypatch.setattr(ck, "CHUNK_ROWS", 50)
    held = []
    real = ck.Session.maybe_flush

    def spy(self, rec):
        real(self, rec)
        held.append(rec.pending_rows())

    monkeypatch.setattr(ck.Session, "maybe_flush", spy)
    overrides = ["train.steps=400", "log.every=2", "ensemble=2", "name=e"]
    run(compose_cfg(overrides, results_dir=tmp_path / "a"))
    assert max(held) < 50 and len(held) == 201
    monkeypatch.undo()
    run(compose_cfg(overrides, results_dir=tmp_path / "b"))  # all in memory: the same tables
    for a, b in zip(_tables(tmp_path / "a" / "e"), _tables(tmp_path / "b" / "e")):
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "a" / "e" / "layers").drop(columns="job_id"),
                                  pd.read_parquet(tmp_path / "b" / "e" / "layers").drop(columns="job_id"),
                                  check_exact=True)  # the files, in their order (NaN: the last step's update)


def test_overwrite_discards_an_old_checkpoint(tmp_path, monkeypatch):
    seen = _interrupted_then_rerun(tmp_path, monkeypatch, "overwrite=true")
    assert seen[0] == 0


class NotRequeued(Exception):
    """What submitit's handler raises when it will not requeue the job (e.g. timed out too many times)."""


@pytest.mark.parametrize("requeued", [True, False])
def test_warning_signal_checkpoints_then_hands_over_to_submitit(requeued, tmp_path, monkeypatch):
    """Under submitit, SLURM's warning signal (SIGUSR2, before a time limit) reaches submitit's handler
    only after the step in progress has ended and a checkpoint is saved. Whether the handler requeues
    the job (and exits) or refuses to (and raises), the job ends there with nothing committed and its
    checkpoint kept, not as a `failed` run; the next attempt resumes from that step."""
    overrides = [*CASES["numpy-minibatch-bn"], *STEPS, "name=e", "checkpoint.every_minutes=null"]
    run(compose_cfg(overrides, results_dir=tmp_path / "whole"))
    caught = []

    def submitit_handler(signum, frame):  # stands in for submitit's checkpoint_and_try_requeue
        caught.append(signum)
        if requeued:
            sys.exit(-1)
        raise NotRequeued("Job not requeued because: timed-out too many times.")

    real = cli.Progress.__call__

    def call(self, t, losses):
        if t == 28:
            os.kill(os.getpid(), signal.SIGUSR2)  # SLURM's warning, in the middle of the run
        real(self, t, losses)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with monkeypatch.context() as m:
            m.setattr(cli.Progress, "__call__", call)
            with pytest.raises(SystemExit if requeued else NotRequeued):
                run(compose_cfg(overrides, results_dir=tmp_path / "cut"))
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert caught == [signal.SIGUSR2]
    exp = tmp_path / "cut" / "e"
    assert len(results.load(exp, running=True).runs) == 3 and len(results.load(exp).runs) == 0
    seen = []
    monkeypatch.setattr(cli.Progress, "__call__", lambda self, t, losses: (seen.append(t), real(self, t, losses)))
    run(compose_cfg(overrides, results_dir=tmp_path / "cut"))
    assert 28 < seen[0] <= 32  # resumed right after the step the signal arrived in (no periodic checkpoint)
    for a, b, name in zip(_tables(tmp_path / "whole" / "e"), _tables(exp), ("runs", "steps", "layers")):
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=name)
