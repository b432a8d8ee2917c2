"""Robustness: bad input, divergence, kills, full disks, parallel writers, determinism, memory limits.

Each bad input is checked for three things: the exit code (2 bad config, 1 results cannot be
written), one line on stderr that names the problem and the fix, and an unchanged results tree
(a small real experiment is written first and every file's bytes compared after the bad command).
Most cases call `bench.run.main()` in-process (argv patched, SystemExit caught): the same code path
as the CLI without ~1.5 s of interpreter start each; a handful run as real subprocesses.

Choices these tests pin down:
- A corrupt, truncated or foreign parquet file in a results folder does not stop a sweep or a
  load(): the loader warns with the file's path and reads the rest (bench.results.load_table), and
  the sweep leaves the bad file as it is. One stray file should not hide a whole experiment.
- A file of another schema_version is skipped the same way, except when it holds the very job a
  rerun would write: then the job is refused (rewriting would replace results older code can read).
- A SIGKILL can leave a hidden temp file (".<job>.parquet.tmp-<pid>"); readers ignore hidden names,
  so it is litter, never a partial result. Visible files are always whole.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, compose_cfg, run_cli

import bench.run as br
from bench import results
from bench.config import ConfigError, estimate_bytes, validate
from bench.run import run

TINY = ["train.steps=10", "log.every=5"]


# ---- helpers --------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def results_files(snap: dict[str, bytes]) -> dict[str, bytes]:
    """Leave out Hydra's per-job log folders (under .hydra/): they are logs, not results."""
    return {k: v for k, v in snap.items() if ".hydra" not in Path(k).parts}


def cli(monkeypatch, capsys, *args) -> tuple[int, list[str]]:
    """`python -m bench.run ARGS` in this process: (exit code, non-empty stderr lines)."""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # main() sets it; restored after the test
    monkeypatch.setattr(sys, "argv", ["bench.run", *args])
    capsys.readouterr()
    saved = {name: (lg.handlers[:], lg.level, lg.propagate)
             for name, lg in (("", logging.getLogger()), ("bench", logging.getLogger("bench")))}
    try:
        br.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:  # Hydra configured logging onto this test's captured stderr: undo it for the next test
        for name, (handlers, level, propagate) in saved.items():
            lg = logging.getLogger(name)
            for h in lg.handlers:
                if h not in handlers:
                    h.close()
            lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate
    err = capsys.readouterr().err
    # Hydra's own log lines go to stderr too; the error is what is left
    return code, [line for line in err.splitlines() if line.strip() and not line.startswith("[20")]


@pytest.fixture
def exp(tmp_path):
    """A real 2-member experiment `x` under tmp_path/results; returns (results_dir, snapshot)."""
    root = tmp_path / "results"
    run(compose_cfg([*TINY, "ensemble=2", "name=x"], results_dir=root))
    return root, snapshot(root)


def visible_parquets(exp_dir: Path) -> list[Path]:
    return sorted(p for p in exp_dir.rglob("*.parquet") if not p.name.startswith((".", "_"))
                  and ".hydra" not in p.parts)


def assert_all_whole(exp_dir: Path) -> None:
    """Every visible parquet file reads in full; no visible temp file anywhere."""
    for p in visible_parquets(exp_dir):
        pq.read_table(p)  # raises on a partial file
    for table in ("runs", "steps", "layers"):
        folder = exp_dir / table
        if folder.exists():
            names = [p.name for p in folder.iterdir()]
            assert all(n.endswith(".parquet") or n.startswith(".") for n in names), names


# ---- 1. the catalogue of bad inputs -----------------------------------------------------------
# (overrides, exit code, words the one line must contain: the problem and the fix)
CATALOGUE = [
    # unknown keys and typos
    (["model.activaton=relu"], 2, ["unknown key model.activaton", "did you mean model.activation?"]),
    (["foo=1"], 2, ["unknown key foo", "valid keys there: task, method_name, model"]),
    (["+model.colour=red"], 2, ["unknown key model.colour", "valid keys there"]),
    (["+seeds=3"], 2, ["unknown key seeds", "did you mean seed?"]),
    (["task=parity", "task.bitz=3"], 2, ["unknown key task.bitz", "did you mean task.bits?"]),
    # wrong types
    (["model.depth=two"], 2, ["model.depth", "could not be converted to Integer"]),
    (["ensemble=1.5"], 2, ["ensemble", "could not be converted to Integer"]),
    (["model.residual=maybe"], 2, ["model.residual", "not a valid bool"]),
    (["train.lr=fast"], 2, ["train.lr", "could not be converted to Float"]),
    # unknown choices
    (["backend=jax"], 2, ["backend", "expected one of [numpy, torch]"]),
    (["model.activation=swish"], 2, ["model.activation", "sigmoid, tanh, relu"]),
    (["model.norm=groupnorm"], 2, ["model.norm", "[none, batchnorm, layernorm]"]),
    (["model.residual_scale=half"], 2, ["model.residual_scale", "[one, inv_sqrt_depth, rezero]"]),
    (["train.dtype=float16"], 2, ["train.dtype", "[float64, float32]"]),
    (["train.optimizer=adamw"], 2, ["train.optimizer", "'adamw'", "[sgd, adam]"]),
    (["task=mnist"], 2, ["task/mnist", "valid choices: digits"]),
    (["experiment=nope"], 2, ["experiment/nope", "valid choices:", "quickstart"]),
    # out-of-range numbers
    (["model.depth=0"], 2, ["model.depth=0", "must be >= 1"]),
    (["model.width=-1"], 2, ["model.width=-1", "must be >= 1"]),
    (["model.widths=[4,0]"], 2, ["model.widths=[4, 0]", "each >= 1 wide"]),
    (["train.lr=0"], 2, ["train.lr=0", "must be a finite number > 0"]),
    (["train.lr=nan"], 2, ["train.lr=nan", "must be a finite number > 0"]),
    (["train.lr=inf"], 2, ["train.lr=inf", "must be a finite number > 0"]),
    (["train.momentum=1.0"], 2, ["train.momentum=1.0", "must be in [0, 1)"]),
    (["train.momentum=-0.1"], 2, ["train.momentum=-0.1", "must be in [0, 1)"]),
    (["train.batch_size=0"], 2, ["train.batch_size=0", "1..4"]),
    (["train.batch_size=5"], 2, ["train.batch_size=5", "task xor has 4 training cases"]),
    (["train.steps=0"], 2, ["train.steps=0", "must be >= 1"]),
    (["log.every=0"], 2, ["log.every=0", "must be >= 1"]),
    (["seed=-1"], 2, ["seed=-1", "must be >= 0"]),
    (["train.weight_decay=1"], 2, ["train.weight_decay=1.0", "must be in [0, 1)"]),
    (["model.init_scale=nan"], 2, ["model.init_scale=nan", "finite number >= 0"]),
    (["train.adam_beta1=1"], 2, ["train.adam_beta1=1.0", "must be in [0, 1)"]),
    (["train.adam_beta2=-0.5"], 2, ["train.adam_beta2=-0.5", "must be in [0, 1)"]),
    (["train.adam_eps=0"], 2, ["train.adam_eps=0", "must be a finite number > 0"]),
    (["max_memory_gb=0"], 2, ["max_memory_gb=0", "must be a number > 0"]),
    # impossible combinations
    (["train.device=cuda"], 2, ["train.device=cuda", "needs backend=torch"]),
    (["train.loss=cross_entropy"], 2, ["cross_entropy", "use sse_half or mse"]),
    (["model.norm=batchnorm", "train.batch_size=1"], 2, ["batchnorm", "batches of >= 2"]),
    (["model.residual_scale=rezero"], 2, ["model.residual_scale=rezero has no effect", "model.residual=true"]),
    (["model.norm=layernorm", "model.width=1"], 2, ["model.norm=layernorm", ">= 2 units wide"]),
    (["model.first_layer_blocks=[2,2]"], 2, ["first_layer_blocks", "family_trees"]),
    (["task=family_trees", "model.width=12", "model.first_layer_blocks=[6,5]"], 2, ["must sum to", "12"]),
    (["train.optimizer=adam", "train.momentum=0.9"], 2, ["train.momentum=0.9", "must be 0 with train.optimizer=adam",
                                                        "train.adam_beta1"]),
    (["train.optimizer=adam", "train.momentum_initial=0.5", "train.initial_steps=5"], 2,
     ["train.momentum_initial=0.5", "must be null with train.optimizer=adam"]),
    (["train.lr_initial=0.01"], 2, ["train.lr_initial=0.01 has no effect", "set train.initial_steps > 0"]),
    # where results go
    (["name=a/b"], 2, ["name='a/b'", "plain folder name", "results_dir"]),
    # a job that would not fit in memory
    (["max_memory_gb=1e-6", "model.width=64"], 2, ["needs about", "over the 1.0", "KiB limit",
                                                   "raise max_memory_gb"]),
]


def _args(case: list[str], root: Path, name: str = "x") -> list[str]:
    base = {"results_dir": str(root), "name": name, "train.steps": "10", "log.every": "5", "ensemble": "2",
            "progress": "none"}
    keys = {a.lstrip("+").split("=")[0] for a in case}
    return [*case, *(f"{k}={v}" for k, v in base.items() if k not in keys)]


def assert_one_line(code, lines, want_code, needles):
    assert code == want_code, (code, lines)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("case,want_code,needles", CATALOGUE, ids=[" ".join(c[0]) for c in CATALOGUE])
def test_bad_input_catalogue(case, want_code, needles, exp, monkeypatch, capsys):
    root, before = exp
    code, lines = cli(monkeypatch, capsys, *_args(case, root))
    assert_one_line(code, lines, want_code, needles)
    assert snapshot(root) == before  # not even Hydra's log folder for the refused job is left


def test_results_dir_is_a_file(exp, monkeypatch, capsys):
    root, before = exp
    blocker = root / "x" / "notes.txt"
    blocker.write_text("a file where a folder would go")
    before = snapshot(root)
    for bad in (blocker, blocker / "sub"):  # the path itself, and a path under a file
        code, lines = cli(monkeypatch, capsys, *_args([f"results_dir={bad}"], root))
        assert_one_line(code, lines, 1, [str(blocker), "is a file, not a directory", "choose another results_dir"])
        assert snapshot(root) == before


def test_results_dir_not_writable(exp, monkeypatch, capsys):
    # tests run as root, for whom chmod changes nothing: simulate the permission check failing
    root, before = exp
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p).startswith(str(root)) else
                        real_access(p, mode, **kw))
    code, lines = cli(monkeypatch, capsys, *_args(["seed=7"], root))
    assert_one_line(code, lines, 2, ["is not writable", "choose a writable results_dir"])
    assert snapshot(root) == before


def test_a_file_named_like_a_table_folder(exp, monkeypatch, capsys):
    root, _ = exp
    (root / "y").mkdir()
    (root / "y" / "layers").write_text("not a folder")
    before = snapshot(root)
    code, lines = cli(monkeypatch, capsys, *_args([], root, name="y"))
    assert_one_line(code, lines, 2, [str(root / "y" / "layers"), "is a file, not a directory", "move it away"])
    assert snapshot(root) == before


@pytest.mark.parametrize("how", ["write_table", "replace", "fsync"])
def test_full_or_read_only_disk_is_one_line(how, exp, monkeypatch, capsys):
    """A failing write (ENOSPC/EROFS) -> exit 1, one line naming the folder and the OS reason; the
    results already there are untouched, no partial file, and a rerun once the disk is fixed works."""
    root, before = exp
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    ro = OSError(errno.EROFS, os.strerror(errno.EROFS))

    def fail(*a, **k):
        raise ro if how == "replace" else full

    target = {"write_table": (pq, "write_table"), "replace": (os, "replace"), "fsync": (os, "fsync")}[how]
    with monkeypatch.context() as m:
        m.setattr(*target, fail)
        code, lines = cli(monkeypatch, capsys, *_args(["seed=5"], root))
    reason = "Read-only file system" if how == "replace" else "No space left on device"
    assert_one_line(code, lines, 1, [f"could not write results to {root / 'x'}: {reason}"])
    assert results_files(snapshot(root)) == results_files(before)
    assert_all_whole(root / "x")
    code, _ = cli(monkeypatch, capsys, *_args(["seed=5"], root))
    assert code == 0 and len(results.load(root / "x").runs) == 4


def test_corrupt_and_foreign_files_are_named_and_the_rest_is_read(exp, monkeypatch, capsys):
    """Documented choice: a bad file is skipped with a warning naming it; the sweep goes on, skips
    the complete runs and leaves the bad files as they are. The sweep reads no table to find the
    complete runs (the done/ index), so the warnings come from load()."""
    root, _ = exp
    x = root / "x"
    good = next((x / "runs").glob("*.parquet"))
    (x / "runs" / "truncated.parquet").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (x / "layers" / "garbage.parquet").write_bytes(b"not parquet" * 20)
    pq.write_table(pa.table({"a": [1]}), x / "steps" / "foreign.parquet")
    (x / "runs" / "README.txt").write_text("notes")  # not *.parquet: not even looked at
    before = snapshot(root)
    code, lines = cli(monkeypatch, capsys, *_args([], root))
    assert code == 0 and not lines
    assert results_files(snapshot(root)) == results_files(before)  # both runs skipped, nothing rewritten
    with pytest.warns(UserWarning) as caught:
        res = results.load(x)
    said = "\n".join(str(w.message) for w in caught)
    assert "truncated.parquet: unreadable" in said and "garbage.parquet" in said
    assert len(res.runs) == 2 and len(res.layers) == 2 * 3 * 4


def test_older_schema_files_of_the_same_job_are_not_replaced(exp, monkeypatch, capsys):
    root, _ = exp
    x = root / "x"
    for table in ("runs", "steps", "layers"):  # as if an older version of the code had written the job
        p = next((x / table).glob("*.parquet"))
        t = pq.read_table(p)
        pq.write_table(t.replace_schema_metadata({**t.schema.metadata, b"vgbench.schema_version": b"0"}), p)
    shutil.rmtree(x / results.DONE)  # older code wrote no done/ index (the next writer rebuilds it)
    before = snapshot(root)
    with pytest.warns(UserWarning, match=f"schema_version 0, this code reads {results.SCHEMA_VERSION}"):
        code, lines = cli(monkeypatch, capsys, *_args([], root))
    assert_one_line(code, lines, 2, ["schema_version 0", "rerunning would replace them", "choose another name"])
    assert snapshot(root) == before
    # the same runs under another name, or another job beside the old files, are fine
    with pytest.warns(UserWarning, match="schema_version 0"):
        code, _ = cli(monkeypatch, capsys, *_args(["seed=9"], root))
    assert code == 0 and results_files(snapshot(root)).items() >= results_files(before).items()


def test_multirun_flag_after_overrides(exp, monkeypatch, capsys):
    root, before = exp
    code, lines = cli(monkeypatch, capsys, *_args(["model.depth=0"], root), "-m")
    assert_one_line(code, lines, 2, ["model.depth=0: must be >= 1"])  # not argparse's usage block


def test_validate_is_the_same_check_in_process(tmp_path):
    # run() refuses exactly as the CLI does (tests and notebooks call it directly)
    with pytest.raises(ConfigError, match="unknown key model.colour"):
        run(compose_cfg(["+model.colour=red"], results_dir=tmp_path))
    assert not any(tmp_path.iterdir())


SUBPROCESS_CASES = [  # a few as real processes (the rest of the catalogue is in-process)
    (["+foo=1"], 2, ["unknown key foo"]),
    (["max_memory_gb=1e-6", "seed=7"], 2, ["needs about", "raise max_memory_gb"]),  # seed 0, 1 are done
    (["train.lr=nan"], 2, ["train.lr=nan"]),
]


@pytest.mark.parametrize("case,want_code,needles", SUBPROCESS_CASES, ids=[c[0][0] for c in SUBPROCESS_CASES])
def test_bad_input_subprocess(case, want_code, needles, exp):
    root, before = exp
    proc = run_cli(*_args(case, root))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert_one_line(proc.returncode, lines, want_code, needles)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert snapshot(root) == before


def test_disk_full_subprocess(exp, tmp_path):
    root, before = exp
    prelude = """
        import errno, os, pyarrow.parquet as pq
        def full(*a, **k):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        pq.write_table = full
    """
    proc = run_patched(prelude, _args(["seed=3"], root), tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("[20")]
    assert_one_line(proc.returncode, lines, 1, ["could not write results to", "No space left on device"])
    assert results_files(snapshot(root)) == results_files(before)


# ---- 2. divergence ----------------------------------------------------------------------------
# a relu net on the teacher task at lr 0.3: member 5 of 6 blows up at step 3, the others train
DIVERGE = ["task=teacher", "model.activation=relu", "model.width=8", "model.depth=2", "train.lr=0.3",
           "train.steps=30", "log.every=1"]


def test_diverging_member_is_recorded_and_the_others_are_untouched(tmp_path):
    counts = run(compose_cfg([*DIVERGE, "ensemble=6", "name=d"], results_dir=tmp_path / "ens"))
    assert counts == {"trained": 6, "skipped": 0, "failed": 0}  # diverged is a finished run, not a failure
    res = results.load(tmp_path / "ens" / "d")
    runs = res.runs.set_index("seed").sort_index()
    assert set(runs["status"]) == {"ok", "diverged"}, runs["status"].tolist()
    diverged = runs.index[runs["status"] == "diverged"].tolist()
    ok = runs.index[runs["status"] == "ok"].tolist()
    assert runs.loc[ok, "diverged_step"].isna().all() and np.isfinite(runs.loc[ok, "final_loss"]).all()
    for k in diverged:
        bad = runs.loc[k]
        d = int(bad["diverged_step"])
        assert 0 < d < 30 and np.isnan(bad["final_loss"])
        # statistics up to the step where it happened: every logged step before it, all finite
        st = res.steps[res.steps.run_id == bad["run_id"]]
        assert st["step"].tolist() == list(range(d)) and np.isfinite(st["loss"]).all()
        lay = res.layers[res.layers.run_id == bad["run_id"]]
        assert sorted(set(lay["step"])) == list(range(d))
        assert np.isfinite(lay[["grad_norm", "delta_norm"]]).all().all()
        assert results.completed_run_ids(tmp_path / "ens" / "d")[bad["run_id"]] == "diverged"  # not retried
    ok_steps = res.steps[res.steps.run_id.isin(runs.loc[ok, "run_id"])]
    assert ok_steps.groupby("run_id")["step"].max().eq(30).all()

    # each member equals its solo run (seed k alone): the diverging one spread nothing to the others
    for k in (diverged[0], ok[0], ok[-1]):
        run(compose_cfg([*DIVERGE, f"seed={k}", "name=d"], results_dir=tmp_path / f"solo{k}"))
        solo = results.load(tmp_path / f"solo{k}" / "d")
        rid = runs.loc[k, "run_id"]
        assert solo.runs["run_id"].tolist() == [rid]
        assert solo.runs["status"].tolist() == [runs.loc[k, "status"]]
        assert solo.runs["diverged_step"].tolist() == [runs.loc[k, "diverged_step"]]
        for table in ("steps", "layers"):
            a = getattr(res, table)
            a = a[a.run_id == rid].drop(columns="job_id").reset_index(drop=True)
            b = getattr(solo, table).drop(columns="job_id").reset_index(drop=True)
            # batched (E, ...) matmuls and solo ones may take different BLAS paths: last-bit differences
            pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-10, atol=1e-14)


def test_a_diverging_job_does_not_stop_the_sweep(tmp_path):
    proc = run_cli("-m", *DIVERGE[:-3], "train.steps=20", "log.every=5", "train.lr=0.01,100,0.02",
                   "ensemble=2", f"results_dir={tmp_path}", "name=s", "progress=none")
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = results.load(tmp_path / "s").runs
    assert sorted(runs["lr"].tolist()) == [0.01, 0.01, 0.02, 0.02, 100, 100]
    by_lr = runs.groupby("lr")["status"].apply(set).to_dict()
    assert by_lr == {0.01: {"ok"}, 0.02: {"ok"}, 100: {"diverged"}}
    assert runs.loc[runs.lr == 100, "diverged_step"].notna().all()
    assert "diverged" in proc.stderr + proc.stdout


# ---- 3. interruption --------------------------------------------------------------------------
KILLER = """
    # SIGKILL this process the n-th time it reaches POINT (set by the test in VGBENCH_KILL_AT)
    import os, signal
    from pathlib import Path
    import pyarrow.parquet as pq
    import bench.run as br
    point, n = os.environ["VGBENCH_KILL_AT"].split("@")
    seen = {"n": 0}

    def reach(where):
        if where == point:
            seen["n"] += 1
            if seen["n"] == int(n):
                os.kill(os.getpid(), signal.SIGKILL)

    real_write, real_replace, real_train = pq.write_table, os.replace, br.train

    def write_table(table, where, **kw):
        name = table.schema.metadata[b"vgbench.table"].decode()
        where.write(b"PAR1 half a file")  # a temp file with partial content, then the kill
        where.flush()
        reach("tmp:" + name)
        where.seek(0)
        where.truncate()
        real_write(table, where, **kw)

    def replace(src, dst):
        real_replace(src, dst)
        reach("written:" + Path(dst).parent.name)  # after layers: before the runs file (the commit)

    def train(*a, **k):
        reach("train")
        return real_train(*a, **k)

    pq.write_table, os.replace, br.train = write_table, replace, train
"""


def _default_sigint():
    """In the child before exec: SIGINT unblocked and at its default disposition. A signal mask and an
    ignored disposition are inherited through exec, and this pytest worker may carry either (joblib's
    loky blocks SIGINT in the thread that spawns its resource tracker): the child would then never see
    the Ctrl-C this file sends it, and finish its sweep instead."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_patched(prelude: str, args: list[str], tmp_path: Path, env=None, popen=False):
    """`python -m bench.run ARGS` in a subprocess with `prelude` run first (monkeypatches)."""
    code = textwrap.dedent(prelude) + textwrap.dedent(f"""
        import sys
        sys.argv = ["bench.run", *{args!r}]
        br_main = __import__("bench.run", fromlist=["main"]).main
        br_main()
    """)
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-c", code]
    if popen:  # the child gets Ctrl-C as from a terminal, whatever this test process did to SIGINT
        return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=_default_sigint)
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)


SWEEP = ["-m", "seed=0,10,20,30", "ensemble=2", "train.steps=20", "log.every=5", "progress=none", "name=k"]


def committed(exp_dir: Path) -> dict[str, dict[str, bytes]]:
    """job_id -> {table: file bytes} for jobs whose runs file (the commit marker) exists."""
    jobs = [p.stem for p in (exp_dir / "runs").glob("*.parquet")] if (exp_dir / "runs").exists() else []
    return {j: {t: (exp_dir / t / f"{j}.parquet").read_bytes() for t in ("runs", "steps", "layers")} for j in jobs}


@pytest.mark.parametrize("point,done_before", [
    pytest.param("tmp:layers@2", 1, id="mid-temp-write"),
    pytest.param("written:layers@2", 1, id="between-layers-and-runs"),
    pytest.param("train@3", 2, id="mid-training", marks=pytest.mark.slow),
    pytest.param("written:runs@4", 4, id="after-last-commit", marks=pytest.mark.slow),
])
def test_sigkill_then_rerun_trains_each_run_once(point, done_before, tmp_path):
    args = [*SWEEP, f"results_dir={tmp_path}"]
    exp_dir = tmp_path / "k"
    proc = run_patched(KILLER, args, tmp_path, env={"VGBENCH_KILL_AT": point})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert_all_whole(exp_dir)
    kept = committed(exp_dir)
    assert len(kept) == done_before
    if point.startswith("tmp:"):  # the killed temp file is left hidden: litter, invisible to readers
        assert list((exp_dir / "layers").glob(".*.tmp-*"))
    t_rerun = pd.Timestamp.now(tz="UTC")

    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert_all_whole(exp_dir)
    for job, files in kept.items():  # finished jobs: byte-identical, i.e. not retrained nor rewritten
        assert committed(exp_dir)[job] == files
    res = results.load(exp_dir)
    raw = results.load_table(exp_dir, "runs").to_pandas()
    assert len(res.runs) == len(raw) == 8 and res.runs["run_id"].is_unique  # each run exactly once
    assert sorted(res.runs["seed"]) == [0, 1, 10, 11, 20, 21, 30, 31]
    assert (res.runs["created_at"] >= t_rerun).sum() == 8 - 2 * done_before  # trained once, in the rerun
    assert res.steps.groupby("run_id").size().eq(5).all() and len(res.layers) == 8 * 5 * 4


def test_ctrl_c_stops_cleanly_with_how_to_resume(tmp_path):
    exp_dir = tmp_path / "c"
    # each job trains ~4 s on an idle machine: interrupt as soon as the first one is committed, in the second
    proc = run_patched("", ["-m", "seed=0,1,2", "train.steps=100000", "log.every=25000", "progress=none",
                            f"results_dir={tmp_path}", "name=c"], tmp_path, popen=True)
    deadline = time.monotonic() + 60
    while not list((exp_dir / "runs").glob("*.parquet")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err[-2000:])
    assert err.strip().splitlines()[-1] == ("interrupted: finished runs are saved; run the same command again "
                                            "to resume (complete runs are skipped)")
    assert "Traceback" not in err
    assert_all_whole(exp_dir)
    runs = results.load(exp_dir).runs
    assert runs["seed"].tolist() == [0] and runs["status"].tolist() == ["ok"]


# ---- 4. parallel writers ----------------------------------------------------------------------
def test_two_sweeps_at_once_on_one_directory(tmp_path):
    """Both ask for the same runs: each run is present once after load(), every file whole.

    Both write the same job ids, hence the same file names; each file lands by an atomic rename,
    so the last writer wins whole files. Mixing two writers' steps and runs files of one job is
    harmless because the same config and seed give the same values (see the determinism test).
    """
    args = ["-m", "seed=0,10,20", "ensemble=2", "train.steps=200", "log.every=20", "progress=none",
            f"results_dir={tmp_path}", "name=p"]
    procs = [run_patched("", args, tmp_path, popen=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    exp_dir = tmp_path / "p"
    assert_all_whole(exp_dir)
    res = results.load(exp_dir)
    assert len(res.runs) == 6 and res.runs["run_id"].is_unique
    assert len(results.load_table(exp_dir, "runs")) == 6  # one file per job: the loser was replaced
    assert res.steps.groupby("run_id").size().eq(11).all()
    assert set(res.steps["job_id"]) == set(res.runs["job_id"])


@pytest.mark.slow
def test_joblib_workers_lose_nothing_and_duplicate_nothing(tmp_path):
    proc = run_cli("-m", "seed=0,10,20,30,40,50", "ensemble=2", "train.steps=50", "log.every=10",
                   "backend=numpy,torch", "hydra/launcher=joblib", "hydra.launcher.n_jobs=3",
                   f"results_dir={tmp_path}", "name=j", "progress=none")
    assert proc.returncode == 0, proc.stderr[-2000:]
    exp_dir = tmp_path / "j"
    assert_all_whole(exp_dir)
    res = results.load(exp_dir)
    assert len(res.runs) == len(results.load_table(exp_dir, "runs")) == 24
    assert res.runs["run_id"].is_unique and set(res.runs["status"]) == {"ok"}
    assert len(res.steps) == 24 * 6 and len(res.layers) == 24 * 6 * 4
    assert len(list((exp_dir / "runs").glob("*.parquet"))) == 12


# ---- 5. determinism ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_same_config_and_seed_give_identical_results(backend, tmp_path):
    """On CPU a config and seed fix every number written: steps and layers files are byte-identical,
    runs rows equal apart from created_at and wall_time_s.

    On cuda this does not hold by default: cuBLAS may pick different GEMM algorithms (split-K
    reductions in another order) and some kernels reduce with atomics, so float sums can differ in
    the last bits from run to run, and a near-diverging run can then diverge on one try and not on
    another. torch.use_deterministic_algorithms(True) with CUBLAS_WORKSPACE_CONFIG=:4096:8 (set before
    CUDA starts) makes cuBLAS deterministic on the same GPU, driver and library versions; results
    still differ between GPU models and from CPU. The engine sets neither today.
    """
    overrides = [f"backend={backend}", "ensemble=3", "model.depth=2", "train.batch_size=2", "train.momentum=0.9",
                 "train.steps=30", "log.every=3", "name=det"]
    for where in ("a", "b"):
        run(compose_cfg(overrides, results_dir=tmp_path / where))
    a, b = (snapshot(tmp_path / w / "det") for w in ("a", "b"))
    assert a.keys() == b.keys()
    for key in a:
        if not key.startswith("runs/"):
            assert a[key] == b[key], key
    ra, rb = (results.load(tmp_path / w / "det").runs.drop(columns=["created_at", "wall_time_s"]) for w in "ab")
    for r in (ra, rb):  # the config as typed, where results_dir differs on purpose
        r["config_json"] = [json.dumps({**json.loads(c), "results_dir": None}) for c in r["config_json"]]
    pd.testing.assert_frame_equal(ra, rb)


# ---- 6. resource limits -----------------------------------------------------------------------
def test_memory_estimate_is_sane():
    """estimate_bytes against tracemalloc's peak for a moderate NumPy job: it should neither miss
    the real peak by much (a refusal that lets through what does not fit) nor overshoot wildly
    (refusing what fits). Measured: about 1.4-2x the peak for full-batch jobs."""
    from bench.config import _enum
    from bench.init import init_params
    from bench.train import train

    cfg = compose_cfg(["task=teacher", "model.width=128", "model.depth=3", "ensemble=4", "train.steps=2",
                       "log.every=1"], results_dir="/tmp")
    task, net, tspec = validate(cfg)
    est = estimate_bytes(net, tspec, task, cfg.ensemble)
    params = init_params(net, _enum(cfg.model.init), list(range(4)), None, None)
    tracemalloc.start()
    try:
        train(task, net, tspec, params, "numpy", list(range(4)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 0.7 <= est / peak <= 4, (est, peak)


@pytest.mark.slow
def test_memory_estimate_is_sane_for_torch(tmp_path):
    # torch's CPU allocator is invisible to tracemalloc: measure the growth of the peak RSS instead
    script = textwrap.dedent("""
        import resource, sys
        sys.path.insert(0, "tests")
        from conftest import compose_cfg
        from bench.config import _enum, estimate_bytes, validate
        from bench.init import init_params
        from bench.train import train
        cfg = compose_cfg(["task=digits", "model.width=256", "model.depth=6", "ensemble=16", "train.steps=2",
                           "log.every=1", "backend=torch"], results_dir="/tmp")
        task, net, tspec = validate(cfg)
        params = init_params(net, _enum(cfg.model.init), list(range(16)), None, None)
        rss0 = int(open("/proc/self/statm").read().split()[1]) * 4096
        train(task, net, tspec, params, "torch", list(range(16)))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(estimate_bytes(net, tspec, task, 16) / (peak - rss0))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 0.7 <= float(proc.stdout.split()[-1]) <= 4


def test_job_over_the_memory_limit_is_refused_up_front(exp, monkeypatch, capsys):
    """Refused before any initialisation (a 10^5-wide net would take seconds to init): the default
    limit is 70% of MemAvailable, the message gives the estimate, and nothing is written."""
    root, before = exp
    t0 = time.perf_counter()
    code, lines = cli(monkeypatch, capsys, *_args(["model.width=100000", "model.depth=8", "ensemble=64"], root))
    assert time.perf_counter() - t0 < 10
    assert_one_line(code, lines, 2, ["ensemble=64 x model widths [100000,", "needs about",
                                     "GiB, over the", "70% of available memory", "lower ensemble"])
    assert snapshot(root) == before
    # a fresh experiment name: not even its folder is created
    huge = ["model.width=100000", "model.depth=8", "ensemble=64"]
    code, lines = cli(monkeypatch, capsys, *_args(huge, root, name="new"))
    assert code == 2 and not (root / "new").exists()
    assert snapshot(root) == before
