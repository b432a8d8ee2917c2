"""A real (single-node, loopback-only) SLURM cluster: scripts/slurm_local.sh starts it.

(a) a sweep through hydra/launcher=submitit_slurm writes the same run ids and rows as the basic
    launcher; (b) a run longer than its SLURM time limit gets SLURM's warning signal before the limit,
    checkpoints, is requeued by submitit and resumes from the checkpoint, ending with the same tables
    as an uninterrupted run; (c) a job requeued without warning (`scontrol requeue`: SIGTERM, SIGKILL)
    resumes from its last periodic checkpoint, with the same tables. Slow: run with
    `pytest -m slow tests/test_slurm.py` (about 6 minutes on a loaded 2-core machine).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, run_cli

from bench import results

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("slurmctld") is None and not Path("/usr/sbin/slurmctld").exists(),
                       reason="slurmctld is not installed: apt-get install -y slurmctld slurmd slurm-client munge "
                              "(or run scripts/slurm_local.sh start as root)"),
]
SCRIPT = ROOT / "scripts" / "slurm_local.sh"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Start the local cluster (or use the one already running from the same folder); stop it after
    if this fixture started it."""
    folder = os.environ.get("VGBENCH_SLURM_DIR", "/tmp/vgbench-slurm")
    env = dict(os.environ, VGBENCH_SLURM_DIR=folder)
    pid = Path(folder) / "slurmctld.pid"
    was_up = pid.exists() and subprocess.run(["kill", "-0", pid.read_text().strip()]).returncode == 0
    up = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    yield {"SLURM_CONF": str(Path(folder) / "slurm.conf")}
    if not was_up:
        subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)


def _frames(exp):
    res = results.load(exp)
    # git_commit: the code may be committed between the two launches (it is the version, not a result)
    runs = res.runs.drop(columns=["created_at", "wall_time_s", "job_id", "experiment", "git_commit"])
    runs["config_json"] = [json.dumps({**json.loads(c), "results_dir": None}) for c in runs["config_json"]]
    return runs, res.steps.drop(columns="job_id"), res.layers.drop(columns="job_id")


def _assert_same(a, b):
    for x, y, name in zip(_frames(a), _frames(b), ("runs", "steps", "layers")):
        pd.testing.assert_frame_equal(x, y, check_exact=True, obj=name)


SWEEP = ["-m", "seed=0,5", "ensemble=2", "model.depth=2", "train.steps=40", "log.every=10", "name=s",
         "progress=none"]


def test_sweep_through_slurm_equals_the_basic_launcher(slurm, tmp_path):
    basic = run_cli(*SWEEP, f"results_dir={tmp_path / 'basic'}")
    assert basic.returncode == 0, basic.stderr[-2000:]
    on_slurm = run_cli(*SWEEP, f"results_dir={tmp_path / 'slurm'}", "hydra/launcher=submitit_slurm",
                       "hydra.launcher.partition=debug", "hydra.launcher.timeout_min=5", env=slurm, timeout=600)
    assert on_slurm.returncode == 0, on_slurm.stderr[-3000:]
    a, b = tmp_path / "basic" / "s", tmp_path / "slurm" / "s"
    assert sorted(results.load(a).runs["run_id"]) == sorted(results.load(b).runs["run_id"])
    assert len(results.load(b).runs) == 4
    _assert_same(a, b)
    assert list((b / ".hydra" / "multirun").glob("*/.submitit/*/*_log.out"))  # it did go through SLURM


# a run that takes a while: 8000 steps are ~1 minute of training on a loaded 2-core machine
LONG = ["task=teacher", "task.n_train=256", "model.depth=4", "model.width=32", "log.every=500", "train.lr=0.05",
        "name=t", "progress=log"]


def _logs(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file()
                     and (p.suffix == ".log" or "_log." in p.name))


def _through_slurm(config, results_dir: Path, slurm, *launcher) -> subprocess.Popen:
    """Start a sweep through submitit_slurm in the background (stderr to a file: a pipe nobody reads
    while the sweep waits would fill up with submitit's polling warnings and block it)."""
    env = dict(os.environ, **slurm, PYTHONPATH=str(ROOT))
    results_dir.mkdir(parents=True)
    with open(results_dir / "sweep.err", "w") as err:  # the child has its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "bench.run", "-m", *config, f"results_dir={results_dir}",
                                 "hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug", *launcher],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)


def _wait(sweep: subprocess.Popen, results_dir: Path) -> None:
    rc = sweep.wait(timeout=900)
    assert rc == 0, (results_dir / "sweep.err").read_text()[-3000:]


def _stop(sweep: subprocess.Popen, slurm) -> None:
    """After a failure: stop the sweep and its SLURM job."""
    if sweep.poll() is None:
        sweep.kill()
        subprocess.run(["scancel", "--name=run"], env=dict(os.environ, **slurm), timeout=60)


def _resumed_at(exp: Path) -> int:
    """The step the last resumed attempt of the job started from (its log line is written when it ends)."""
    logs = _logs(exp / ".hydra")
    resumed = [line for line in logs.splitlines() if "resumed from the checkpoint at step" in line]
    assert resumed, f"no attempt resumed from a checkpoint:\n{logs[-3000:]}"
    return int(resumed[-1].rsplit(" ", 1)[1])


def _slurm_job(exp: Path) -> str:
    return next(exp.glob(".hydra/multirun/*/.submitit/*/")).name  # submitit's folder is the SLURM job id


def test_requeued_job_resumes_from_its_checkpoint(slurm, tmp_path):
    """`scontrol requeue` once the job has a checkpoint: SLURM sends SIGTERM (submitit ignores it),
    then SIGKILL; the requeued job resumes from its last periodic checkpoint (every 500 updates) and
    ends with the tables of an uninterrupted run."""
    config = [*LONG, "train.steps=8000", "checkpoint.every_steps=500", "checkpoint.every_minutes=null"]
    whole = run_cli(*config, f"results_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-2000:]
    sweep = _through_slurm(config, tmp_path / "cut", slurm, "hydra.launcher.timeout_min=30")
    exp = tmp_path / "cut" / "t"
    try:
        deadline = time.monotonic() + 300
        while not list(exp.glob("running/*/state.pkl")):  # the first checkpoint is on disk
            assert sweep.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        stop = subprocess.run(["scontrol", "requeue", _slurm_job(exp)], env=dict(os.environ, **slurm),
                              capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0, stop.stderr
        _wait(sweep, tmp_path / "cut")
    finally:
        _stop(sweep, slurm)
    assert _resumed_at(exp) > 0
    assert not (exp / "running").exists()
    _assert_same(tmp_path / "whole" / "t", exp)


# SLURM's own time limit. slurmctld checks time limits every 30 s (PERIODIC_TIMEOUT) and sends the
# warning signal at the first check at or after `limit - signal_delay_s - 30 s`: with a 1-minute limit
# and signal_delay_s=5 that is 25-55 s after the job starts, well after Python has armed its handlers
# (~3 s), and at least 30 s before the check that would kill it. No periodic checkpoint: the only
# checkpoint is the one the warning signal asks for.
TIME_LIMIT = ["hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=5",
              "hydra.launcher.max_num_timeout=10"]
TRAIN_S = 100  # seconds of training at the speed measured first: the first attempt must outlast 55 s


def test_time_limit_stops_the_job_and_the_requeued_job_resumes(slurm, tmp_path):
    """Nothing is sent by the test: SLURM's warning before the job's 1-minute time limit (SIGUSR2,
    `--signal=USR2@5`) makes the job checkpoint at the end of its step; submitit requeues it (the
    limit counts as a time-out, so `max_num_timeout` must allow it) and the next attempt resumes
    from that checkpoint, possibly several times. The tables equal an uninterrupted run's."""
    config = [*LONG, "checkpoint.every_steps=null", "checkpoint.every_minutes=null"]
    probe = run_cli(*config, "train.steps=2000", f"results_dir={tmp_path / 'probe'}")
    assert probe.returncode == 0, probe.stderr[-2000:]
    per_step = results.load(tmp_path / "probe" / "t").runs["wall_time_s"].iloc[0] / 2000
    config.append(f"train.steps={500 * math.ceil(TRAIN_S / per_step / 500)}")  # same length anywhere
    ctld_log = Path(slurm["SLURM_CONF"]).parent / "slurmctld.log"
    seen = ctld_log.stat().st_size  # the log of earlier runs may name the same job id
    sweep = _through_slurm(config, tmp_path / "cut", slurm, *TIME_LIMIT)
    try:
        whole = run_cli(*config, f"results_dir={tmp_path / 'whole'}", timeout=900)  # meanwhile, uninterrupted
        assert whole.returncode == 0, whole.stderr[-2000:]
        _wait(sweep, tmp_path / "cut")
    finally:
        _stop(sweep, slurm)
    exp = tmp_path / "cut" / "t"
    job, logs = _slurm_job(exp), _logs(exp / ".hydra")
    with open(ctld_log, "rb") as f:
        ctld = f.read()[seen:].decode(errors="replace")
    # the controller sent the time-limit warning (logged at SlurmctldDebug=debug) ...
    assert re.search(rf"send_job_warn_signal: warning signal {int(signal.SIGUSR2)} to JobId={job}\b", ctld), \
        f"{config[-1]}: the job ended before SLURM's time-limit warning (a faster machine than measured?)"
    # ... submitit caught it as a time-out and requeued the job, and SLURM counted the restart
    assert "Caught signal SIGUSR2" in logs and "this job is timed-out" in logs and "Requeued job" in logs
    shown = subprocess.run(["scontrol", "show", "job", job], env=dict(os.environ, **slurm), capture_output=True,
                           text=True, timeout=60).stdout
    assert int(re.search(r"Restarts=(\d+)", shown).group(1)) >= 1, shown
    assert _resumed_at(exp) > 0  # from the checkpoint the warning asked for: there is no other
    assert not (exp / "running").exists()
    _assert_same(tmp_path / "whole" / "t", exp)
