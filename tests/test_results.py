"""bench.results: schema round trip, run ids, atomic writes, resume and the tolerant loader."""

import json
import os
import shutil
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench import results as R

BASE = {
    "backend": "numpy", "seed": 0, "ensemble": 1, "results_dir": "results", "name": "demo",
    "experiment": "none", "overwrite": False, "progress": True,
    "task": {"name": "xor"},
    "model": {"depth": 2, "width": 3, "activation": "sigmoid", "residual": False},
    "train": {"lr": 0.5, "momentum": 0.9, "steps": 20, "batch_size": None},
}
PARAMS = ["weight", "bias"]


def _job(seed=0, ensemble=2, created=datetime(2024, 1, 1, tzinfo=UTC), status=None, mark=0.0):
    """A job of ``ensemble`` members; every metric carries ``mark`` so tests see which job won."""
    cfg = {**BASE, "seed": seed, "ensemble": ensemble}
    jid = R.job_id(cfg)
    members = [{**cfg, "seed": seed + k} for k in range(ensemble)]
    rids = [R.run_id(m) for m in members]
    status = status or ["ok"] * ensemble
    runs = {
        "run_id": rids, "name": ["demo"] * ensemble, "experiment": ["none"] * ensemble,
        "backend": ["numpy"] * ensemble, "task": ["xor"] * ensemble,
        "activation": ["sigmoid"] * ensemble, "depth": [2] * ensemble, "width": [3] * ensemble,
        "widths": [json.dumps([3, 3])] * ensemble, "residual": [False] * ensemble,
        "residual_scale": ["one"] * ensemble,
        "norm": ["none"] * ensemble, "init": ["uniform"] * ensemble,
        "init_scale": [0.3] + [None] * (ensemble - 1), "optimizer": ["sgd"] * ensemble, "lr": [0.5] * ensemble,
        "momentum": [0.9] * ensemble, "weight_decay": [0.0] * ensemble,
        "batch_size": [None] * ensemble, "loss": ["sse_half"] * ensemble,
        "steps": [20] * ensemble, "log_every": [10] * ensemble,
        "seed": [seed + k for k in range(ensemble)], "member": list(range(ensemble)),
        "ensemble": [ensemble] * ensemble, "dtype": ["float64"] * ensemble,
        "device": ["cpu"] * ensemble, "status": status,
        "diverged_step": [7 if s == "diverged" else None for s in status],
        "error": ["boom" if s == "failed" else None for s in status],
        "final_loss": [float("nan") if s == "diverged" else mark + k for k, s in enumerate(status)],
        "final_accuracy": [1.0] * ensemble, "final_test_loss": [None] * ensemble,
        "final_test_accuracy": [None] * ensemble, "solved_step": [12] + [None] * (ensemble - 1),
        "wall_time_s": [1.5] * ensemble, "config_json": [json.dumps(m) for m in members],
        "created_at": [created] * ensemble, "git_commit": [None] * ensemble,
    }
    logged = [0, 10, 20]
    steps = pd.DataFrame([
        {"run_id": r, "step": s, "loss": mark + k + s / 100, "batch_loss": mark + k + s / 100 + 0.5, "accuracy": 0.5,
         "test_loss": None, "test_accuracy": None}
        for k, r in enumerate(rids) for s in reversed(logged)  # written unsorted on purpose
    ])
    rows = [(k, r, s, layer, p) for k, r in enumerate(rids) for s in logged
            for layer in (2, 1) for p in PARAMS]
    layers = {
        "run_id": np.array([r for _, r, *_ in rows]),
        "step": np.array([s for *_, s, _, _ in rows]),
        "layer": np.array([lay for *_, lay, _ in rows]),
        "param": [p for *_, p in rows],
        **{c: np.array([mark + k + s / 100 + lay / 10 for k, _, s, lay, _ in rows])
           for c in ("grad_norm", "grad_mean_abs", "weight_norm", "delta_norm", "act_mean",
                     "act_std", "act_saturation", "update_norm", "update_ratio")},
    }
    return jid, rids, runs, steps, layers


def _visible(exp):
    return sorted(str(p.relative_to(exp)) for p in exp.rglob("*") if p.is_file())


def test_round_trip_names_dtypes_values(tmp_path):
    exp = R.experiment_dir(tmp_path, "demo")
    jid, rids, runs, steps, layers = _job(mark=1.0)
    R.write_job(exp, jid, runs, steps, layers)
    res = R.load(exp)
    assert list(res.runs.columns) == R.RUNS_SCHEMA.names
    assert list(res.steps.columns) == R.STEPS_SCHEMA.names
    assert list(res.layers.columns) == R.LAYERS_SCHEMA.names
    dt = res.runs.dtypes.astype(str).to_dict()
    assert dt["run_id"] == dt["widths"] == dt["error"] == "str"
    assert dt["depth"] == dt["seed"] == "int64"
    assert dt["batch_size"] == dt["diverged_step"] == dt["solved_step"] == "Int64"
    assert dt["residual"] == "bool" and dt["lr"] == dt["init_scale"] == "float64"
    assert dt["created_at"] == "datetime64[us, UTC]"
    assert res.steps.dtypes.astype(str).tolist() == ["str", "str", "int64"] + ["float64"] * 5
    assert res.layers.dtypes.astype(str).tolist() == (
        ["str", "str", "int64", "int64", "str"] + ["float64"] * 9)

    order = np.argsort(rids)
    r = res.runs
    assert r.run_id.tolist() == sorted(rids) and (r.job_id == jid).all()
    assert r.final_loss.tolist() == [1.0 + k for k in order]
    assert r.seed.tolist() == [int(k) for k in order]
    assert r.solved_step.isna().tolist() == [k != 0 for k in order]
    assert r.init_scale.isna().tolist() == [k != 0 for k in order]
    assert r.batch_size.isna().all() and (r.schema_version == R.SCHEMA_VERSION).all()
    assert r.created_at.iloc[0] == pd.Timestamp("2024-01-01", tz="UTC")
    assert json.loads(r.widths.iloc[0]) == [3, 3]

    s = res.steps
    assert s.step.tolist() == [0, 10, 20] * 2  # sorted although written in reverse
    expected = [1.0 + k + st / 100 for k in order for st in (0, 10, 20)]
    assert s.loss.tolist() == pytest.approx(expected)
    assert s.test_loss.isna().all()

    lay = res.layers
    assert len(lay) == 2 * 3 * 2 * 2
    first = lay.iloc[:4]
    assert first.layer.tolist() == [1, 1, 2, 2] and first.param.tolist() == ["bias", "weight"] * 2
    assert lay.grad_norm.iloc[0] == pytest.approx(1.0 + order[0] + 0.1)


def test_read_parquet_directly_and_hidden_files_ignored(tmp_path):
    exp = tmp_path / "demo"
    jid, rids, runs, steps, layers = _job()
    R.write_job(exp, jid, runs, steps, layers)
    (exp / "layers" / ".x.parquet.tmp-1").write_bytes(b"half a parquet file")
    (exp / "runs" / ".y.parquet.tmp-2").write_bytes(b"PAR1 junk")
    df = pd.read_parquet(exp / "layers")
    assert len(df) == 24 and set(df.run_id) == set(rids) and set(df.param) == set(PARAMS)
    assert df.run_id.dtype == "str"
    assert pd.read_parquet(exp / "runs").status.tolist() == ["ok", "ok"]
    assert len(R.load(exp).layers) == 24  # the loader ignores hidden files too, without warning


def _encodings(path) -> dict[str, tuple[str, str, bool]]:
    """{column: (its data encoding, its codec, whether it has min/max statistics)} from a file's metadata."""
    md = pq.ParquetFile(path).metadata
    out = {}
    for g in range(md.num_row_groups):
        for i in range(md.num_columns):
            c = md.row_group(g).column(i)
            data = set(c.encodings) - {"RLE"} - ({"PLAIN"} if "RLE_DICTIONARY" in c.encodings else set())
            assert len(data) == 1, (c.path_in_schema, c.encodings)  # no fallback from a dictionary to PLAIN
            out.setdefault(c.path_in_schema, set()).add((data.pop(), c.compression, c.is_stats_set))
    assert all(len(v) == 1 for v in out.values()), out  # every row group alike
    return {k: v.pop() for k, v in out.items()}


def test_file_metadata_and_encoding(tmp_path):
    """The encodings and codecs chosen in bench.results (see the comment above _writer_options), read back
    from the files' metadata, in a job's files and in compacted ones; float32 and float64 statistics alike.
    (pyarrow reports the LZ4_RAW codec, 7 in the footer, as "LZ4".)"""
    jid, _, runs, steps, layers = _job()
    R.write_job(tmp_path, jid, runs, steps, layers)
    jid64, _, *tables = _job(seed=10)
    R.write_job(tmp_path / "f64", jid64, *tables, stats_dtype="float64")
    f = pq.ParquetFile(tmp_path / "layers" / f"{jid}.parquet")
    assert f.schema_arrow.metadata[b"vgbench.schema_version"] == str(R.SCHEMA_VERSION).encode()
    repeated = {"delta_norm": "PLAIN", "act_mean": "PLAIN", "act_std": "PLAIN", "act_saturation": "BYTE_STREAM_SPLIT"}
    dictionary, delta = ("RLE_DICTIONARY", "ZSTD", True), ("DELTA_BINARY_PACKED", "ZSTD", True)
    want = {"run_id": dictionary, "job_id": dictionary, "param": dictionary, "step": delta, "layer": delta,
            **{c: (repeated[c], "ZSTD", False) if c in repeated else ("BYTE_STREAM_SPLIT", "LZ4", False)
               for c in R.LAYERS_SCHEMA.names if pa.types.is_floating(R.LAYERS_SCHEMA.field(c).type)}}
    for exp in (tmp_path, tmp_path / "f64"):
        for _ in range(2):  # as write_job wrote it, then compacted
            (layers_file,) = (exp / "layers").glob("*.parquet")
            assert _encodings(layers_file) == want
            steps_enc = _encodings(next((exp / "steps").glob("*.parquet")))
            assert steps_enc["step"] == delta and steps_enc["loss"] == ("BYTE_STREAM_SPLIT", "LZ4", False)
            runs_enc = _encodings(next((exp / "runs").glob("*.parquet")))
            assert runs_enc["run_id"] == dictionary and runs_enc["lr"] == ("BYTE_STREAM_SPLIT", "LZ4", False)
            R.compact(exp)


def test_repeated_layer_statistics_are_stored_about_once(tmp_path):
    """A per-layer statistic is the same on each of the layer's parameter rows: stored PLAIN at zstd
    level 4, the repeat is a 4-byte match. Random float32 values, each on two rows: about 4 B per pair
    (plus a few bits of match), where a level that misses the repeats stores ~4 B per row. Bound: 2.6 B/row,
    a deterministic size (fixed seed), far from both."""
    rng = np.random.default_rng(0)
    n_steps, n_layers = 1000, 10
    rows = [(s, lay, p) for s in range(n_steps) for lay in range(1, n_layers + 1) for p in ("bias", "weight")]
    n = len(rows)
    per_layer = rng.random(n // 2)  # one value per (step, layer), on its bias and its weight row
    floats = [f.name for f in R.LAYERS_SCHEMA if pa.types.is_floating(f.type)]
    layers = {"run_id": ["r"] * n, "step": [r[0] for r in rows], "layer": [r[1] for r in rows],
              "param": [r[2] for r in rows], **{c: rng.random(n) for c in floats}}
    for c in ("delta_norm", "act_mean", "act_std"):
        layers[c] = np.repeat(per_layer, 2)
    table = R.sorted_table("layers", layers, "j")
    R._write_atomic(table, tmp_path / "l.parquet")
    md = pq.ParquetFile(tmp_path / "l.parquet").metadata
    size = {md.row_group(0).column(i).path_in_schema: md.row_group(0).column(i).total_compressed_size / n
            for i in range(md.num_columns)}
    assert size["act_mean"] < 2.6 and size["delta_norm"] < 2.6 and size["act_std"] < 2.6, size
    assert size["grad_norm"] > 3.0, size  # the check above is not met by every column: random values do not compress


def test_files_are_written_sorted(tmp_path):
    jid, _, runs, steps, layers = _job()
    R.write_job(tmp_path, jid, runs, steps, layers)
    for table, keys in R.SORT_KEYS.items():
        df = pd.read_parquet(tmp_path / table / f"{jid}.parquet")
        assert df.equals(df.sort_values(keys, ignore_index=True)), table


def test_loader_sorts_and_dedups_files_it_did_not_write(tmp_path):
    jid, rids, runs, steps, layers = _job()
    R.write_job(tmp_path, jid, runs, steps, layers)
    path = tmp_path / "layers" / f"{jid}.parquet"
    written = pq.read_table(path)
    shuffled = written.take(np.random.default_rng(0).permutation(len(written)))
    pq.write_table(shuffled, path, row_group_size=5)  # 5 row groups, each its own dictionary
    shutil.copy(path, tmp_path / "layers" / "copy.parquet")  # the same rows twice
    res = R.load(tmp_path, config_columns=["seed"])
    assert len(res.layers) == 24
    # float32 statistics load widened to float64
    pd.testing.assert_frame_equal(res.layers.drop(columns="seed"), written.cast(R.READ_SCHEMAS["layers"]).to_pandas())
    assert res.layers.seed.tolist() == [int(r == rids[1]) for r in res.layers.run_id]
    assert R.load_table(tmp_path, "layers").num_rows == 48  # the raw reader does not dedup


def test_run_id_semantics():
    a = R.run_id(BASE)
    reordered = {k: BASE[k] for k in reversed(list(BASE))}
    reordered["model"] = {k: BASE["model"][k] for k in reversed(list(BASE["model"]))}
    assert R.run_id(reordered) == a and len(a) == 16 and int(a, 16) >= 0
    launcher = {"results_dir": "/elsewhere", "name": "other", "overwrite": True, "ensemble": 8,
                "progress": False, "experiment": "fig1", "hydra": {"job": {"num": 3}}}
    assert R.run_id({**BASE, **launcher}) == a
    assert R.run_id({k: v for k, v in BASE.items() if k not in R.SEMANTIC_EXCLUDE}) == a
    assert R.run_id({**BASE, "seed": 1}) != a
    assert R.run_id({**BASE, "model": {**BASE["model"], "depth": 3}}) != a
    assert R.run_id({**BASE, "train": {**BASE["train"], "lr": 0.1}}) != R.run_id(
        {**BASE, "train": {**BASE["train"], "lr": 0.2}})
    # the same number written differently is the same run
    assert R.run_id({**BASE, "train": {**BASE["train"], "lr": 0.10}}) == R.run_id(
        {**BASE, "train": {**BASE["train"], "lr": 1e-1}})
    assert R.run_id({**BASE, "seed": np.int64(0)}) == a
    assert R.run_id({**BASE, "train": {**BASE["train"], "lr": 1}}) == R.run_id(
        {**BASE, "train": {**BASE["train"], "lr": 1.0}})
    assert R.run_id({**BASE, "train": {**BASE["train"], "lr": np.float64(0.5)}}) == a
    # a semantic key nested under an excluded name is still semantic
    assert R.run_id({**BASE, "task": {"name": "parity"}}) != a
    with pytest.raises(TypeError, match="config.train.lr"):
        R.run_id({**BASE, "train": {"lr": object()}})


def test_job_id_keeps_ensemble():
    assert R.job_id({**BASE, "ensemble": 8}) != R.job_id({**BASE, "ensemble": 1})
    assert R.job_id({**BASE, "name": "x", "results_dir": "y"}) == R.job_id(BASE)
    assert R.job_id(BASE) != R.run_id(BASE)
    # member k of an ensemble is the solo run with seed + k
    assert R.run_id({**BASE, "ensemble": 8, "seed": 3}) == R.run_id({**BASE, "seed": 3})


def test_experiment_dir(tmp_path):
    assert R.experiment_dir(tmp_path, "demo") == tmp_path / "demo"
    assert R.experiment_dir(str(tmp_path), "demo") == tmp_path / "demo"


def test_orphans_dropped(tmp_path):
    done, done_rids, *tables = _job(seed=0)
    R.write_job(tmp_path, done, *tables)
    killed, _, *tables = _job(seed=10)
    R.write_job(tmp_path, killed, *tables)
    (tmp_path / "runs" / f"{killed}.parquet").unlink()  # killed before its commit marker
    res = R.load(tmp_path)
    assert set(res.runs.run_id) == set(res.steps.run_id) == set(res.layers.run_id) == set(done_rids)
    assert len(res.steps) == 6 and len(res.layers) == 24
    assert R.completed_run_ids(tmp_path) == {r: "ok" for r in done_rids}


@pytest.mark.parametrize("newer", ["pair", "solo"])
def test_duplicate_run_keeps_newest_job(tmp_path, newer):
    t_old, t_new = datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 6, 1, tzinfo=UTC)
    # a pair (seeds 0, 1) and a solo run with seed 1 share one run
    pair, pair_rids, *pair_tables = _job(0, 2, t_new if newer == "pair" else t_old, mark=100.0)
    solo, solo_rids, *solo_tables = _job(1, 1, t_new if newer == "solo" else t_old, mark=200.0)
    shared = solo_rids[0]
    assert shared == pair_rids[1] and pair != solo
    R.write_job(tmp_path, pair, *pair_tables)
    R.write_job(tmp_path, solo, *solo_tables)
    res = R.load(tmp_path)
    assert res.runs.run_id.tolist() == sorted(pair_rids)
    row = res.runs.set_index("run_id").loc[shared]
    winner, loss = (pair, 101.0) if newer == "pair" else (solo, 200.0)
    assert row.job_id == winner and row.final_loss == loss
    st = res.steps[res.steps.run_id == shared]
    assert st.job_id.tolist() == [winner] * 3 and st.step.tolist() == [0, 10, 20]
    assert st.loss.tolist() == pytest.approx([loss, loss + 0.1, loss + 0.2])
    lay = res.layers[res.layers.run_id == shared]
    assert (lay.job_id == winner).all() and len(lay) == 12
    other = res.steps[res.steps.run_id == pair_rids[0]]
    assert other.job_id.tolist() == [pair] * 3 and other.loss.iloc[0] == 100.0


def test_bad_files_skipped_with_warning(tmp_path):
    jid, rids, runs, steps, layers = _job(seed=0)
    R.write_job(tmp_path, jid, runs, steps, layers)
    good = tmp_path / "layers" / f"{jid}.parquet"
    truncated = tmp_path / "layers" / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "layers" / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all" * 10)
    foreign = tmp_path / "layers" / "foreign.parquet"
    pq.write_table(pa.table({"a": [1, 2], "b": ["x", "y"]}), foreign)
    old = tmp_path / "layers" / "old.parquet"
    pq.write_table(pq.read_table(good).replace_schema_metadata(
        {b"vgbench.schema_version": b"0"}), old)
    with pytest.warns(UserWarning) as caught:
        res = R.load(tmp_path)
    messages = "\n".join(str(w.message) for w in caught)
    for bad in (truncated, garbage, foreign, old):
        assert str(bad) in messages
    assert f"schema_version 0, this code reads {R.SCHEMA_VERSION}" in messages
    assert str(good) not in messages
    assert len(res.layers) == 24 and set(res.layers.run_id) == set(rids)
    assert len(res.steps) == 6 and res.runs.run_id.tolist() == sorted(rids)


def test_files_of_an_older_readable_version_load_with_the_added_columns_filled(tmp_path):
    """A version-2 file (before runs.optimizer and layers.update_*) loads without a warning: its runs
    trained with the 1986 SGD, and its update statistics were not recorded (NaN)."""
    jid, rids, runs, steps, layers = _job()
    R.write_job(tmp_path, jid, runs, steps, layers)
    for table, added in R.ADDED[3].items():
        path = tmp_path / table / f"{jid}.parquet"
        t = pq.read_table(path).drop_columns(list(added))
        pq.write_table(t.replace_schema_metadata({**t.schema.metadata, b"vgbench.schema_version": b"2"}), path)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = R.load(tmp_path, config_columns=["optimizer"])
    assert res.runs["optimizer"].tolist() == ["sgd", "sgd"] and (res.layers["optimizer"] == "sgd").all()
    assert len(res.layers) == 24 and res.layers[["update_norm", "update_ratio"]].isna().all().all()
    assert (res.layers["grad_norm"] > 0).all()


def test_foreign_runs_file_does_not_break_resume(tmp_path):
    jid, rids, *tables = _job()
    R.write_job(tmp_path, jid, *tables)
    (tmp_path / "runs" / "zzz.parquet").write_bytes(b"\x00" * 64)
    with pytest.warns(UserWarning, match="zzz.parquet"):
        assert R.completed_run_ids(tmp_path) == {r: "ok" for r in rids}


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_failing_write_leaves_no_partial_file(tmp_path, monkeypatch):
    first, first_rids, *tables = _job(seed=0)
    R.write_job(tmp_path, first, *tables)
    before = _snapshot(tmp_path)
    real_write = pq.write_table

    def disk_full(table, where, **kw):
        where.write(b"PAR1 partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", disk_full)
    second, _, *tables = _job(seed=10)
    with pytest.raises(OSError, match="No space"):
        R.write_job(tmp_path, second, *tables)
    assert _snapshot(tmp_path) == before  # no temp file left, the first job byte-identical

    # a failure at the last rename (the runs file): steps/layers are whole files, but the job is
    # not committed, so it is neither complete nor loaded
    monkeypatch.setattr(pq, "write_table", real_write)
    real_replace, calls = os.replace, []

    def fail_third(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_third)
    with pytest.raises(OSError, match="rename failed"):
        R.write_job(tmp_path, second, *tables)
    assert str(calls[-1]).endswith(f"runs/{second}.parquet")
    files = _visible(tmp_path)
    assert not any(name.split("/")[-1].startswith(".") for name in files)
    assert f"runs/{second}.parquet" not in files and f"layers/{second}.parquet" in files
    # the first job's files and its runs' done markers (named by run id) are as they were
    assert {k: v for k, v in _snapshot(tmp_path).items() if first in k or k.startswith("done/")} == before
    assert R.completed_run_ids(tmp_path) == {r: "ok" for r in first_rids}
    assert set(R.load(tmp_path).layers.run_id) == set(first_rids)


def test_failed_overwrite_uncommits_the_job(tmp_path, monkeypatch):
    jid, _, *tables = _job()
    R.write_job(tmp_path, jid, *tables)

    def broken(*a, **kw):
        raise OSError("disk gone")

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OSError):
        R.write_job(tmp_path, jid, *tables)
    assert R.completed_run_ids(tmp_path) == {}  # a half-overwritten job is retried
    assert not [p for p in _visible(tmp_path) if "tmp" in p]


def test_completed_run_ids_excludes_failed(tmp_path):
    assert R.completed_run_ids(tmp_path / "missing") == {}
    jid, rids, *tables = _job(ensemble=3, status=["ok", "diverged", "failed"])
    R.write_job(tmp_path, jid, *tables)
    assert R.completed_run_ids(tmp_path) == {rids[0]: "ok", rids[1]: "diverged"}
    runs = R.load(tmp_path).runs.set_index("run_id")
    assert np.isnan(runs.loc[rids[1], "final_loss"]) and runs.loc[rids[1], "diverged_step"] == 7
    assert runs.loc[rids[2], "error"] == "boom" and pd.isna(runs.loc[rids[0], "error"])


def test_newer_failed_run_is_retried(tmp_path):
    old, _, *tables = _job(0, 1, datetime(2024, 1, 1, tzinfo=UTC))
    R.write_job(tmp_path, old, *tables)
    new, _, *tables = _job(0, 1, datetime(2024, 2, 1, tzinfo=UTC), status=["failed"])
    R.write_job(tmp_path, new + "x", *tables)  # a second job id for the same run
    assert R.completed_run_ids(tmp_path) == {}
    assert R.load(tmp_path).runs.status.tolist() == ["failed"]


def test_write_job_rejects_bad_columns(tmp_path):
    jid, _, runs, steps, layers = _job()
    with pytest.raises(ValueError, match=r"missing columns \['lr'\]"):
        R.write_job(tmp_path, jid, {k: v for k, v in runs.items() if k != "lr"}, steps, layers)
    with pytest.raises(ValueError, match=r"unexpected columns \['colour'\]"):
        R.write_job(tmp_path, jid, runs, steps.assign(colour=1), layers)
    with pytest.raises(ValueError, match=r"runs.depth: 1 nulls"):
        R.write_job(tmp_path, jid, {**runs, "depth": [2, None]}, steps, layers)
    with pytest.raises(ValueError, match="runs.depth: cannot convert"):
        R.write_job(tmp_path, jid, {**runs, "depth": [2, 2.5]}, steps, layers)
    with pytest.raises(ValueError, match="another job"):
        R.write_job(tmp_path, jid, runs, steps.assign(job_id="other"), layers)
    assert _visible(tmp_path) == []  # validation happens before anything is written


def test_config_columns_join(tmp_path):
    jid, _, runs, steps, layers = _job()
    R.write_job(tmp_path, jid, runs, steps, layers)
    res = R.load(tmp_path, config_columns=["activation", "seed", "batch_size"])
    assert list(res.steps.columns[-3:]) == ["activation", "seed", "batch_size"]
    seed_of = dict(zip(res.runs.run_id, res.runs.seed))
    assert res.layers.seed.tolist() == [seed_of[r] for r in res.layers.run_id]
    assert (res.steps.activation == "sigmoid").all() and res.steps.batch_size.dtype == "Int64"
    everything = R.load(tmp_path, config_columns=True)
    assert list(everything.layers.columns) == R.LAYERS_SCHEMA.names + list(R.CONFIG_COLUMNS)
    # steps.loss (the loss value) and the config's loss (its name) are both there, each with its own dtype
    assert list(everything.steps.columns) == R.STEPS_SCHEMA.names + list(R.CONFIG_COLUMNS)
    value, name = (everything.steps.iloc[:, i] for i, c in enumerate(everything.steps.columns) if c == "loss")
    assert value.tolist() == res.steps.loss.tolist() and (name == "sse_half").all()
    with pytest.raises(ValueError, match="not runs columns"):
        R.load(tmp_path, config_columns=["colour"])


def test_loaded_frames_are_writable(tmp_path):
    """load() hands out arrays it owns: assigning into a frame works (a zero-copy view of Arrow memory
    would be read-only) and changes nothing on disk."""
    jid, _, runs, steps, layers = _job()
    R.write_job(tmp_path, jid, runs, steps, layers)
    res = R.load(tmp_path)
    res.layers.loc[0, "grad_norm"] = -1.0
    res.layers.loc[1, "step"] = 99
    res.steps.loc[0, "loss"] = -1.0
    assert res.layers.grad_norm.iloc[0] == -1.0 and res.layers.step.iloc[1] == 99 and res.steps.loss.iloc[0] == -1.0
    assert R.load(tmp_path).layers.grad_norm.iloc[0] != -1.0


def test_empty_experiment_has_schema_dtypes(tmp_path):
    res = R.load(tmp_path / "nothing")
    assert len(res.runs) == len(res.steps) == len(res.layers) == 0
    assert list(res.layers.columns) == R.LAYERS_SCHEMA.names
    assert res.runs.batch_size.dtype == "Int64" and res.runs.depth.dtype == "int64"


# ---- float32 statistics (log.stats_dtype) -----------------------------------------------------------
def _stat_types(path):
    schema = pq.read_schema(path)
    return {schema.field(c).type for c in R.LAYERS_SCHEMA.names if pa.types.is_floating(R.LAYERS_SCHEMA.field(c).type)}


def test_schema_statistics_are_the_recorders():
    from bench.record import STATS

    floats = [f.name for f in R.LAYERS_SCHEMA if pa.types.is_floating(f.type)]
    assert floats == list(STATS)  # every statistic the recorder makes is stored, as log.stats_dtype says
    assert {R.LAYERS_SCHEMA.field(c).type for c in floats} == {pa.float32()}
    assert {R.layers_schema("float64").field(c).type for c in floats} == {pa.float64()}


@pytest.mark.parametrize("dtype", R.STATS_DTYPES)
def test_statistics_round_trip(tmp_path, dtype):
    """float32 statistics load as the float32 value widened exactly; float64 ones unchanged."""
    jid, rids, runs, steps, layers = _job(mark=0.1)
    layers["grad_norm"] = layers["grad_norm"] * np.pi * 1e-30  # a vanishing gradient, still float32's
    layers["update_ratio"][::3] = np.nan  # as for a bias at initialisation (0 weight norm)
    layers["update_norm"][1] = np.inf  # a diverging run's last update
    R.write_job(tmp_path, jid, runs, steps, layers, stats_dtype=dtype)
    assert _stat_types(tmp_path / "layers" / f"{jid}.parquet") == {pa.float32() if dtype == "float32" else pa.float64()}
    got = R.load(tmp_path).layers
    want = pd.DataFrame(layers).sort_values(["run_id", "step", "layer", "param"], ignore_index=True)
    for c in [f.name for f in R.LAYERS_SCHEMA if pa.types.is_floating(f.type)]:  # every encoding chosen for them
        expected = want[c].to_numpy()
        if dtype == "float32":
            expected = expected.astype(np.float32).astype(np.float64)
        assert got[c].dtype == "float64"
        np.testing.assert_array_equal(got[c].to_numpy(), expected)
    R.compact(tmp_path)  # compaction stores what the files stored
    stored = pa.float32() if dtype == "float32" else pa.float64()
    assert _stat_types(next((tmp_path / "layers").glob("*.parquet"))) == {stored}
    pd.testing.assert_frame_equal(R.load(tmp_path).layers, got)


@pytest.mark.parametrize("value", [1e-40, 1e39])
def test_a_value_float32_cannot_hold_keeps_float64(tmp_path, value):
    """A vanished gradient below float32's smallest normal number (or an exploded one above its
    largest) would lose its order of magnitude: that job's file stays float64, exact."""
    jid, _, runs, steps, layers = _job()
    layers["grad_norm"][3] = value
    R.write_job(tmp_path, jid, runs, steps, layers)
    assert _stat_types(tmp_path / "layers" / f"{jid}.parquet") == {pa.float64()}
    assert value in R.load(tmp_path).layers["grad_norm"].tolist()


def test_files_with_the_earlier_version_3_encodings_still_load(tmp_path):
    """Version 3 files written before the encodings were chosen per column (dictionary pages for step
    and layer, byte-stream-split for every float but act_mean and delta_norm, zstd at its default level,
    float min/max) load as the same frames; `compact` rewrites them with today's encodings."""
    for seed in (0, 10):
        R.write_job(tmp_path / "now", *(_job(seed=seed)[i] for i in (0, 2, 3, 4)))
    shutil.copytree(tmp_path / "now", tmp_path / "before")
    for path in (tmp_path / "before").glob("*/*.parquet"):
        t = pq.read_table(path)
        floats = [f.name for f in t.schema if pa.types.is_floating(f.type)]
        dictionary = [c for c in ("run_id", "job_id", "param", "step", "layer") if c in t.column_names]
        pq.write_table(t, path, compression="zstd", use_dictionary=dictionary,
                       use_byte_stream_split=[c for c in floats if c not in ("act_mean", "delta_norm")])
    before_enc = _encodings(next((tmp_path / "before" / "layers").glob("*.parquet")))
    assert before_enc["step"][0] == "RLE_DICTIONARY" and before_enc["act_std"][0] == "BYTE_STREAM_SPLIT"
    now = R.load(tmp_path / "now")
    for _ in range(2):  # as written, then compacted
        before = R.load(tmp_path / "before")
        for table in ("runs", "steps", "layers"):
            pd.testing.assert_frame_equal(getattr(before, table), getattr(now, table))
        R.compact(tmp_path / "before")
    assert _encodings(next((tmp_path / "before" / "layers").glob("*.parquet")))["act_std"][0] == "PLAIN"


def test_schema_version_2_float64_files_still_load(tmp_path):
    """Files of the code before float32 statistics (schema_version 2, float64) load beside new ones."""
    old_jid, old_rids, *old = _job(seed=0)
    R.write_job(tmp_path, old_jid, *old, stats_dtype="float64")
    for table in R.SCHEMAS:
        p = tmp_path / table / f"{old_jid}.parquet"
        t = pq.read_table(p)
        pq.write_table(t.replace_schema_metadata({**t.schema.metadata, b"vgbench.schema_version": b"2"}), p)
    new_jid, new_rids, *new = _job(seed=10)
    R.write_job(tmp_path, new_jid, *new)
    res = R.load(tmp_path)
    assert set(res.runs.run_id) == {*old_rids, *new_rids} and len(res.layers) == 48
    old_rows = res.layers[res.layers.run_id.isin(old_rids)].sort_values(["run_id", "step", "layer", "param"])
    want = pd.DataFrame(old[2]).sort_values(["run_id", "step", "layer", "param"])
    np.testing.assert_array_equal(old_rows.grad_norm.to_numpy(), want.grad_norm.to_numpy())  # float64, exact
    R.compact(tmp_path)  # a merge of float64 and float32 files keeps float64
    assert _stat_types(next((tmp_path / "layers").glob("*.parquet"))) == {pa.float64()}
    pd.testing.assert_frame_equal(R.load(tmp_path).layers, res.layers)
