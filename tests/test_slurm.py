"""A real (single-node, loopback-only) SLURM cluster: scripts/slurm_local.sh starts it.

(a) a sweep through hydra/launcher=submitit_slurm writes the same run ids and rows as the basic
    launcher; (b) a run longer than its SLURM time limit is stopped by SLURM's warning signal,
    checkpoints, is requeued by submitit and resumes from the checkpoint, ending with the same tables
    as an uninterrupted run. Slow: run with `pytest -m slow tests/test_slurm.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
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


# ~1 minute of training on a loaded 2-core machine; a checkpoint every 500 updates
LONG = ["task=teacher", "task.n_train=256", "model.depth=4", "model.width=32", "train.steps=8000",
        "log.every=500", "train.lr=0.05", "name=t", "progress=log", "checkpoint.every_steps=500",
        "checkpoint.every_minutes=null"]


def _logs(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file()
                     and (p.suffix == ".log" or "_log." in p.name))


@pytest.mark.parametrize("how", ["requeue", "warning-signal"])
def test_requeued_job_resumes_from_its_checkpoint(how, slurm, tmp_path):
    """SLURM stops the job once it has a checkpoint: `scontrol requeue` (SIGTERM, then SIGKILL: the
    job resumes from its last periodic checkpoint), or the warning signal SLURM sends before a time
    limit or a preemption (`scancel --signal=USR2`, what `--signal=USR2@signal_delay_s` sends): the job
    checkpoints at the end of its step and submitit requeues it. SLURM holds a requeued job ~2 min.
    (A real time limit is not used: with a 1-2 minute limit SLURM's ~1 minute signal resolution can
    send the warning before submitit's handler exists, which kills the job outright.)"""
    import subprocess
    import sys
    import time

    whole = run_cli(*LONG, f"results_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-2000:]
    env = dict(os.environ, **slurm, PYTHONPATH=str(ROOT))
    sweep = subprocess.Popen([sys.executable, "-m", "bench.run", "-m", *LONG, f"results_dir={tmp_path / 'cut'}",
                              "hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug",
                              "hydra.launcher.timeout_min=30", "hydra.launcher.max_num_timeout=3"],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        exp = tmp_path / "cut" / "t"
        deadline = time.monotonic() + 300
        while not list(exp.glob("running/*/state.pkl")):  # the first checkpoint is on disk
            assert sweep.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        job = next(exp.glob(".hydra/multirun/*/.submitit/*/")).name  # submitit's folder is the SLURM job id
        stop = (["scontrol", "requeue", job] if how == "requeue" else ["scancel", "--signal=USR2", job])
        assert subprocess.run(stop, env=env, capture_output=True, timeout=60).returncode == 0
        _, err = sweep.communicate(timeout=600)
        assert sweep.returncode == 0, err[-3000:]
    finally:
        if sweep.poll() is None:
            sweep.kill()
            subprocess.run(["scancel", "--name=run"], env=env, timeout=60)
    logs = _logs(exp / ".hydra")
    resumed = [line for line in logs.splitlines() if "resumed from the checkpoint at step" in line]
    assert resumed and int(resumed[-1].rsplit(" ", 1)[1]) > 0, logs[-3000:]
    if how == "warning-signal":
        assert "Requeued job" in logs and "Calling checkpoint method" in logs
    assert not (exp / "running").exists()
    _assert_same(tmp_path / "whole" / "t", exp)
