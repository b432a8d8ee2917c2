"""Scale: constant-cost bookkeeping (the done index), compaction, refusals up front.

The index test proves the lookup reads no table (the reader is patched to fail); the timing claims
(a 2,000-job sweep, load of 10M compacted rows) are measured by hand and reported, not asserted
here: test machines are too noisy for timing assertions.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
from datetime import UTC, datetime

import pandas as pd
import pyarrow.parquet as pq
import pytest
from test_results import _job

from bench import results as R


def _write(exp, seed, ensemble=2):
    jid, rids, *tables = _job(seed=seed, ensemble=ensemble)
    R.write_job(exp, jid, *tables)
    return rids


def test_lookup_reads_no_table(tmp_path, monkeypatch):
    exp = tmp_path / "e"
    done = [r for s in (0, 10, 20) for r in _write(exp, s)]
    _, missing, *_ = _job(seed=30)

    def no_reading(*a, **k):
        raise AssertionError("completed() read a table")

    monkeypatch.setattr(R, "_read_file", no_reading)
    monkeypatch.setattr(pq, "ParquetFile", no_reading)
    monkeypatch.setattr(pq, "read_table", no_reading)
    assert R.completed(exp, done + missing) == set(done)
    assert R.count_completed(exp) == 6


def test_index_is_rebuilt_for_results_written_before_it(tmp_path):
    exp = tmp_path / "e"
    done = _write(exp, 0)
    jid, rids, *tables = _job(seed=5, ensemble=3, status=["ok", "diverged", "failed"])
    R.write_job(exp, jid, *tables)
    shutil.rmtree(exp / R.DONE)  # as an experiment written by the code before the index
    assert R.completed(exp, [*done, *rids]) == {*done, rids[0], rids[1]}  # failed runs are retried
    assert not (exp / R.DONE).exists()  # a lookup writes nothing; the next writer builds the index
    more = _write(exp, 40)
    assert R.completed(exp, [*done, *rids, *more]) == set(R.completed_run_ids(exp)) == {*done, *rids[:2], *more}
    assert not [p for p in exp.iterdir() if p.name.startswith(".")]  # the rebuild's temp folder is gone


def test_overwrite_with_a_failed_run_removes_its_marker(tmp_path):
    exp = tmp_path / "e"
    jid, rids, *tables = _job(seed=0, ensemble=1)
    R.write_job(exp, jid, *tables)
    assert R.completed(exp, rids) == set(rids)
    _, _, *failed = _job(seed=0, ensemble=1, created=datetime(2025, 1, 1, tzinfo=UTC), status=["failed"])
    R.write_job(exp, jid, *failed)
    assert R.completed(exp, rids) == set() == set(R.completed_run_ids(exp))


def _writer(exp, seed, barrier):
    barrier.wait()  # both processes start writing at the same moment
    _write(exp, seed, ensemble=4)


@pytest.mark.parametrize("legacy", [False, True], ids=["new", "index-rebuilt-by-both"])
def test_concurrent_writers_are_both_recorded(tmp_path, legacy):
    exp = tmp_path / "e"
    first = _write(exp, 100)
    if legacy:
        shutil.rmtree(exp / R.DONE)  # both writers race to rebuild the index too
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(exp, s, barrier)) for s in (0, 50)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    ids = [*first, *(r for s in (0, 50) for r in _job(seed=s, ensemble=4)[1])]
    assert R.completed(exp, ids) == set(ids) == set(R.completed_run_ids(exp))
    assert not [p for p in (exp / R.DONE).iterdir() if p.name.startswith(".")]


def _loaded(exp):
    res = R.load(exp, config_columns=["seed"])
    return res.runs, res.steps, res.layers


def test_compact_keeps_what_load_returns(tmp_path):
    exp = tmp_path / "e"
    for s in range(0, 60, 3):
        _write(exp, s, ensemble=3)
    _write(exp, 1, ensemble=1)  # a run that an ensemble also trained: load keeps one copy
    before = _loaded(exp)
    counts = R.compact(exp, rows_per_file=100)
    assert counts["layers"][0] == 21 and 1 < counts["layers"][1] < 21  # 60 runs x 12 rows in ~100-row files
    assert counts["runs"] == (21, 1)
    for a, b in zip(before, _loaded(exp)):
        pd.testing.assert_frame_equal(a, b)
    layers = pd.read_parquet(exp / "layers")  # the plain reader sees each kept row once
    assert len(layers) == len(before[2])
    # each run's rows sit in one file, sorted: load() needs no reordering
    for p in (exp / "layers").glob("*.parquet"):
        df = pd.read_parquet(p)
        assert df.equals(df.sort_values(R.SORT_KEYS["layers"], ignore_index=True))
    again = R.compact(exp, rows_per_file=100)  # compacting compacted files works too
    assert again["layers"][0] == counts["layers"][1]
    for a, b in zip(before, _loaded(exp)):
        pd.testing.assert_frame_equal(a, b)


@pytest.mark.parametrize("fail_at", ["before-commit", "after-commit"])
def test_compact_interrupted_then_finished(tmp_path, monkeypatch, fail_at):
    exp = tmp_path / "e"
    for s in range(0, 30, 3):
        _write(exp, s, ensemble=3)
    before = _loaded(exp)
    real_replace, calls = os.replace, []

    def interrupted(src, dst):  # a kill at the commit rename, or at the first file moved after it
        calls.append(str(dst))
        if (fail_at == "before-commit" and str(dst).endswith(".json")) or (
                fail_at == "after-commit" and str(dst).endswith(".parquet")):
            raise KeyboardInterrupt
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            R.compact(exp, rows_per_file=50)
    for a, b in zip(before, _loaded(exp)):  # either state reads as the uncompacted experiment
        pd.testing.assert_frame_equal(a, b)
    assert bool(R._manifests(exp)) == (fail_at == "after-commit")
    R.compact(exp, rows_per_file=50)  # finishes (or redoes) the compaction
    assert not R._manifests(exp)
    assert not [p for t in R.SCHEMAS for p in (exp / t).iterdir() if p.name.startswith(".")]
    for a, b in zip(before, _loaded(exp)):
        pd.testing.assert_frame_equal(a, b)
    assert len(pd.read_parquet(exp / "layers")) == len(before[2])


def test_compact_cli(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    exp = tmp_path / "e"
    for s in (0, 5):
        _write(exp, s)
    proc = subprocess.run([sys.executable, "-m", "bench.results", "compact", str(exp)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "runs: 2 -> 1 files, steps: 2 -> 1 files, layers: 2 -> 1 files"
    bad = subprocess.run([sys.executable, "-m", "bench.results", "compact", str(tmp_path / "nope")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope'} has no runs/ folder: give results_dir/name of an experiment"]


# ---- refusals up front ------------------------------------------------------------------------------
def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


REFUSED = [  # (args, words the one line must hold): the estimate and the knob that fixes it
    (["ensemble=100000000"], ["ensemble=100000000", "needs about", "GiB, over the", "lower ensemble",
                              "raise max_memory_gb"]),
    # rows stream to disk, so memory holds; the disk would not (about 3 TB at 64 B a row)
    (["train.steps=1000000000000"], ["train.steps=1000000000000 with log.every=100", "GiB",
                                     "free under", "raise log.every"]),
    (["name=../escape"], ["name='../escape'", "plain folder name"]),
    (["-m", "name=ok,../escape"], ["name='../escape'", "plain folder name"]),
    (["-m", "seed=0,1", "name=../escape"], ["name='../escape'", "plain folder name"]),
]


@pytest.mark.parametrize("args,needles", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_refused_up_front_leaves_nothing(args, needles, tmp_path):
    """One line, exit 2, and not a folder anywhere under tmp_path (results_dir's parent, where
    name=../escape would land). Refused by arithmetic before any allocation: timed by hand (see the
    report), not here."""
    from conftest import run_cli

    root = tmp_path / "results"
    (root / "keep").mkdir(parents=True)
    before = _tree(tmp_path)
    proc = run_cli(*args, f"results_dir={root}", "progress=none", timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert _tree(tmp_path) == before


def test_memory_estimate_is_bounded_by_the_part_size(monkeypatch):
    """Rows stream out in parts, so the estimate (and the job) does not grow with train.steps; the
    disk estimate does. A refusal names the limit that was crossed."""
    from conftest import compose_cfg

    import bench.guard as br
    from bench.config import ConfigError

    seen = {}
    real = br.estimate_bytes

    def spy(net, tspec, task, members, logged_in_memory=None):
        seen[tspec.steps] = real(net, tspec, task, members, logged_in_memory)
        return seen[tspec.steps]

    monkeypatch.setattr(br, "estimate_bytes", spy)
    disk = {}
    monkeypatch.setattr(br, "free_disk_bytes", lambda path: disk.setdefault("free", float("inf")))
    for steps in (20_000, 2_000_000, 10**12):
        br.preflight(compose_cfg([f"train.steps={steps}", "log.every=1"], results_dir="/tmp"))
    assert seen[20_000] <= seen[2_000_000] == seen[10**12]  # 20,000 logged steps: under one part
    disk["free"] = 2**30
    with pytest.raises(ConfigError, match=r"train.steps=20000000 with log.every=1 x ensemble=1 writes about .* GiB "
                                          r"of rows, more than the 1.00 GiB free"):
        br.preflight(compose_cfg(["train.steps=20000000", "log.every=1"], results_dir="/tmp"))


def test_index_of_another_schema_version_is_rebuilt(tmp_path, monkeypatch):
    exp = tmp_path / "e"
    done = _write(exp, 0)
    (exp / R.DONE / "_schema_version").write_text("1\n")  # as written by code of another schema
    (exp / R.DONE / "ffffffffffffffff").write_text("x ok\n")  # a claim the tables do not back
    assert R.completed(exp, [*done, "ffffffffffffffff"]) == set(done)  # read from the tables
    more = _write(exp, 40)  # the next writer rebuilds the index
    assert (exp / R.DONE / "_schema_version").read_text() == f"{R.SCHEMA_VERSION}\n"
    assert not (exp / R.DONE / "ffffffffffffffff").exists()
    assert R.completed(exp, [*done, *more, "ffffffffffffffff"]) == {*done, *more}
