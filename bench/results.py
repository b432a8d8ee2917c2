"""Result tables on disk: one schema, run ids, atomic writes, resume and load().

Layout: ``results_dir/<name>/{runs,steps,layers}/<job_id>.parquet``. A job trains E ensemble
members at once and writes one file per table; each member is a run with its own ``run_id``. The
runs file is written last and is the commit marker: a job whose runs file exists is complete. Temp
files start with "." so that ``pd.read_parquet(exp_dir / "layers")`` (pyarrow's dataset discovery
ignores names starting with "." or "_") never sees a partial file.

``results_dir/<name>/done/<run_id>`` is an index beside the tables: an empty-ish file per complete
run, written (atomically) after the job's runs file. Deciding whether a run needs training is then
one ``stat``, the same cost at the first job of a sweep as at the 10,000th, where reading every runs
file grew with the sweep. The index is derived: delete ``done/`` and the next writer rebuilds it
from the runs tables. ``compact`` merges many small files into few (see its docstring).

This module knows nothing about training; it only writes and reads the tables.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# pandas and pyarrow.compute are imported where they are used: `python -m bench.run` imports this
# module, and a refused config should cost the interpreter's start, not half a second of pandas.
if TYPE_CHECKING:
    import pandas as pd

# bump when a column changes meaning or type; readers skip versions before OLDEST_READABLE or after this one.
# 2: steps.loss became the whole training set's evaluation-mode loss (the batch's is steps.batch_loss)
# 3: runs.optimizer, runs.method, runs.residual_scale; layers.update_norm and layers.update_ratio;
#    layers statistics are float32 unless log.stats_dtype=float64 (a file says which in its schema).
#    Version 2 files (float64 statistics, without the new columns) still load (ADDED)
SCHEMA_VERSION = 3
_META_VERSION, _META_TABLE = b"vgbench.schema_version", b"vgbench.table"

# Keys that do not change what a run computes: where it is written, how it was launched, how many
# siblings trained beside it, and the preset's name (a preset's effect on values is in the values).
SEMANTIC_EXCLUDE = frozenset(
    {"results_dir", "name", "overwrite", "ensemble", "hydra", "progress", "experiment"}
)

_S, _I, _F, _B = pa.string(), pa.int64(), pa.float64(), pa.bool_()


def _schema(table: str, fields: list[tuple], nullable: set[str]) -> pa.Schema:
    return pa.schema(
        [pa.field(n, t, nullable=n in nullable) for n, t in fields],
        metadata={_META_VERSION: str(SCHEMA_VERSION).encode(), _META_TABLE: table.encode()},
    )


RUNS_SCHEMA = _schema("runs", [
    ("run_id", _S), ("job_id", _S), ("name", _S), ("experiment", _S),
    ("method", _S),  # the method preset (config key method_name; conf/method/), null without one
    ("backend", _S), ("task", _S), ("activation", _S), ("depth", _I), ("width", _I),
    ("widths", _S),  # JSON list of hidden widths, input side first
    ("residual", _B), ("residual_scale", _S),  # one | inv_sqrt_depth | rezero (only matters when residual)
    ("norm", _S), ("init", _S), ("init_scale", _F), ("init_bias", _F), ("lr", _F),
    ("optimizer", _S),  # sgd | adam (its betas and eps are in config_json)
    ("momentum", _F), ("weight_decay", _F), ("batch_size", _I),  # null = full batch
    ("loss", _S), ("steps", _I), ("log_every", _I), ("seed", _I),
    ("member", _I),  # index of this run in its job's ensemble
    ("ensemble", _I), ("dtype", _S), ("device", _S), ("status", _S),  # ok | diverged | failed
    ("diverged_step", _I), ("error", _S), ("final_loss", _F), ("final_accuracy", _F),
    ("final_test_loss", _F), ("final_test_accuracy", _F),
    ("solved_step", _I),  # first step at which the task's solve criterion held
    ("wall_time_s", _F), ("config_json", _S), ("created_at", pa.timestamp("us", tz="UTC")),
    ("schema_version", _I), ("git_commit", _S),
    ("params_json", _S),  # final parameters {name: nested lists} of small nets (Hinton diagrams), else null
], nullable={"method", "init_scale", "init_bias", "params_json", "batch_size", "diverged_step", "error",
             "final_accuracy", "final_test_loss", "final_test_accuracy", "solved_step", "git_commit"})

STEPS_SCHEMA = _schema("steps", [
    ("run_id", _S), ("job_id", _S), ("step", _I),
    ("loss", _F),  # the whole training set, evaluation mode (batch norm: running statistics)
    ("batch_loss", _F),  # this step's training batch, training mode: what the gradient is of
    ("accuracy", _F),  # the whole training set, evaluation mode
    ("test_loss", _F), ("test_accuracy", _F),
], nullable={"accuracy", "test_loss", "test_accuracy"})

_LAYERS_FLOAT64 = _schema("layers", [
    ("run_id", _S), ("job_id", _S), ("step", _I),
    ("layer", _I),  # 1 = the layer next to the input
    ("param", _S),  # weight | bias | gamma | beta | direct | alpha
    ("grad_norm", _F), ("grad_mean_abs", _F), ("weight_norm", _F), ("delta_norm", _F),
    ("act_mean", _F), ("act_std", _F), ("act_saturation", _F),
    ("update_norm", _F), ("update_ratio", _F),  # the update applied after this step (bench.record)
], nullable=set())

# Columns a schema_version added, with the value a file of an earlier version gets for them when read:
# such files still load (and `compact` rewrites them at this version). Files before OLDEST_READABLE
# (or after this code) changed what a column means, and are skipped.
# every run before version 3 trained with the 1986 SGD, had no method preset and an unscaled residual branch
ADDED = {3: {"runs": {"optimizer": "sgd", "method": None, "residual_scale": "one"},
             "layers": {"update_norm": float("nan"), "update_ratio": float("nan")}}}  # not recorded then
OLDEST_READABLE = 2

# Statistics (every float column of the layers table) are stored as log.stats_dtype: float32 by default,
# ~7 significant digits, far finer than any plot or ratio needs and half the bytes; float64 where runs
# of two backends are compared to 1e-9 from the stored tables. Whatever a file stores, load() returns
# float64 (float32 values widened exactly).
STATS_DTYPES = ("float32", "float64")


def layers_schema(stats_dtype: str = "float32") -> pa.Schema:
    """The layers schema with its statistics stored as `stats_dtype` (one of STATS_DTYPES)."""
    if stats_dtype not in STATS_DTYPES:
        raise ValueError(f"stats_dtype={stats_dtype!r}: choose one of {', '.join(STATS_DTYPES)}")
    t = pa.float32() if stats_dtype == "float32" else pa.float64()
    return pa.schema([f.with_type(t) if pa.types.is_floating(f.type) else f for f in _LAYERS_FLOAT64],
                     metadata=_LAYERS_FLOAT64.metadata)


LAYERS_SCHEMA = layers_schema()  # the default; a reader accepts either width in the statistics columns


def schema_of(table: str, stats_dtype: str = "float32") -> pa.Schema:
    """The schema a table is written with (only the layers table depends on stats_dtype)."""
    return layers_schema(stats_dtype) if table == "layers" else SCHEMAS[table]

RUNNING = "running"  # experiment subfolder: running jobs' checkpoints and streamed parts (bench.checkpoint)
SCHEMAS = {"runs": RUNS_SCHEMA, "steps": STEPS_SCHEMA, "layers": LAYERS_SCHEMA}  # as written by default
READ_SCHEMAS = {**SCHEMAS, "layers": layers_schema("float64")}  # as read: statistics widened to float64
# the row order of files and of load(); a file already in order saves load() a reordering copy
SORT_KEYS = {"runs": ["run_id"], "steps": ["run_id", "step"],
             "layers": ["run_id", "step", "layer", "param"]}
# runs columns that describe a run's configuration: what load(config_columns=True) joins on
CONFIG_COLUMNS = (
    "name", "experiment", "method", "backend", "task", "activation", "depth", "width", "widths", "residual",
    "residual_scale", "norm", "init", "init_scale", "init_bias", "optimizer", "lr", "momentum", "weight_decay",
    "batch_size", "loss", "steps", "log_every", "seed", "member", "ensemble", "dtype", "device",
)
_COMPLETE = ("ok", "diverged")


def _canonical(x, key="config"):
    """Plain JSON-able form: dicts with str keys, lists, str/int/float/bool/None."""
    if isinstance(x, dict):
        return {str(k): _canonical(v, f"{key}.{k}") for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_canonical(v, f"{key}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, enum.Enum):
        return x.name  # as OmegaConf writes an Enum in YAML
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and x.is_integer():
        return int(x)  # lr=1 and lr=1.0 are the same run; json renders other floats via repr
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    raise TypeError(f"{key}: cannot hash a {type(x).__name__} into a run id; pass plain "
                    "containers, e.g. OmegaConf.to_container(cfg, resolve=True)")


def _hash(config: dict, exclude: frozenset) -> str:
    semantic = {k: v for k, v in config.items() if k not in exclude}
    text = json.dumps(_canonical(semantic), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_id(config: dict) -> str:
    """Id of one member's resolved config (seed already member-specific); launcher keys ignored."""
    return _hash(config, SEMANTIC_EXCLUDE)


def job_id(config: dict) -> str:
    """Like run_id but keeps ``ensemble``: a job of 8 members and a solo run are different jobs."""
    return _hash(config, SEMANTIC_EXCLUDE - {"ensemble"})


def experiment_dir(results_dir: str | os.PathLike, name: str) -> Path:
    return Path(results_dir) / name


def _to_table(cols: dict, schema: pa.Schema, table: str) -> pa.Table:
    """Cast a dict of columns to ``schema``, naming any missing, extra or unconvertible column.

    Non-nullable float columns keep NaN as a value (a diverged loss); in nullable ones NaN means
    "not measured" and is stored as null.
    """
    for f in schema:  # an optional (nullable) column may be left out: it is written as nulls
        if f.nullable and f.name not in cols:
            cols[f.name] = [None] * (len(next(iter(cols.values()))) if cols else 0)
    missing = [n for n in schema.names if n not in cols]
    extra = [c for c in cols if c not in schema.names]
    if missing or extra:
        raise ValueError(f"{table}: missing columns {missing}, unexpected columns {extra}")
    arrays = []
    for field in schema:
        import pandas as pd

        values = pd.Series(cols[field.name])  # lists -> Series so 1.5 is not silently cut to int 1
        keep_nan = pa.types.is_floating(field.type) and not field.nullable
        try:
            arr = pa.array(values, type=field.type, from_pandas=not keep_nan)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as e:
            raise ValueError(f"{table}.{field.name}: cannot convert to {field.type}: {e}") from e
        if not field.nullable and arr.null_count:
            raise ValueError(f"{table}.{field.name}: {arr.null_count} nulls in a required column")
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, schema=schema)


@contextlib.contextmanager
def atomic_file(path: Path):
    """Write `path` through a hidden temporary beside it (hidden from dataset discovery): on success it
    is flushed to disk and renamed into place, so a reader never meets a partial file; on any error,
    a kill included, no file appears under the real name and the temporary is removed where possible."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_atomic(table: pa.Table, path: Path) -> None:
    with atomic_file(path) as f:
        pq.write_table(table, f, **_writer_options(table.schema))


def sorted_table(table: str, data, job_id: str, stats_dtype: str = "float32") -> pa.Table:
    """Columns (dict or DataFrame) -> the table's schema, sorted; job_id (all tables),
    schema_version and created_at (runs; now, UTC) are filled in when absent. Layers statistics are
    stored as `stats_dtype`, except that float32 becomes float64 for a table holding a value float32
    cannot (see `_fits_float32`)."""
    cols = {c: data[c] for c in data.columns} if hasattr(data, "columns") else dict(data)  # a DataFrame
    n = len(next(iter(cols.values()))) if cols else 0
    cols.setdefault("job_id", [job_id] * n)
    if table == "runs":
        cols.setdefault("schema_version", [SCHEMA_VERSION] * n)
        cols.setdefault("created_at", [datetime.now(UTC)] * n)
    if table == "layers" and stats_dtype == "float32" and not _fits_float32(cols):
        stats_dtype = "float64"
    t = _to_table(cols, schema_of(table, stats_dtype), table).sort_by([(k, "ascending") for k in SORT_KEYS[table]])
    if set(t.column("job_id").unique().to_pylist()) - {job_id}:
        raise ValueError(f"{table}.job_id: rows belong to another job than {job_id!r}")
    return t


_F32 = np.finfo(np.float32)


def _fits_float32(cols: dict) -> bool:
    """Whether every statistic keeps its order of magnitude in float32: none nonzero below float32's
    smallest normal number (1.2e-38: a deep net's vanished gradient would become a subnormal or 0)
    and none finite above its largest (3.4e38: an exploding one would become inf)."""
    for f in _LAYERS_FLOAT64:
        if pa.types.is_floating(f.type) and f.name in cols:
            a = np.abs(np.asarray(cols[f.name], dtype=np.float64))
            with np.errstate(invalid="ignore"):
                if ((a > 0) & (a < _F32.tiny)).any() or ((a > _F32.max) & (a < np.inf)).any():
                    return False
    return True


def _stats_type(schemas) -> str:
    """The stats_dtype a merge of layers files with these schemas needs: float64 if any stores float64."""
    return "float64" if any(f.type == pa.float64() for s in schemas for f in s) else "float32"


# Encodings and codecs, chosen per column on real statistics (bench.perf P6: digits 64-32x8-10,
# sigmoid/tanh/relu, every step, 13,176 rows after `compact`; bytes per row of each column read from the
# parquet metadata, float32 statistics; pyarrow 26):
# - ids (run_id, job_id, param): dictionary pages, ~0.01 B/row each.
# - step, layer: DELTA_BINARY_PACKED, 0.03 and 0.02 B/row (dictionary pages 0.02 and 0.01 here, but
#   0.27 B/row for a steps table of 1000 runs x 1001 logged steps and 2.1 for 20 runs x 100,001, where
#   the delta encoding stays at 0.01).
# - _REPEATED (per-layer statistics, repeated on each of the layer's parameter rows): PLAIN keeps a
#   value's 4 bytes together and zstd from level 4 on (4-byte matches) stores each repeat as a match:
#   delta_norm 1.80, act_mean 1.75, act_std 1.79 B/row, where level 1 finds none (3.62, 3.16, 3.60)
#   and byte-stream-split hides them (level 1: 3.09, 2.91, 3.08; level 6: 2.70, 2.51, 2.61).
#   act_saturation (a few distinct values, mostly 0) is byte-stream-split at level 4: 0.63 (level 1 0.72,
#   PLAIN 0.67, dictionary 0.81, lz4 1.09).
# - every other float (the per-parameter statistics; steps and runs floats): byte-stream-split, lz4
#   (LZ4_RAW): 3.13-3.46 B/row (grad_norm 3.36, grad_mean_abs 3.46, weight_norm 3.13, update_norm 3.26,
#   update_ratio 3.27). Exponent bytes alike, mantissas noise: zstd's entropy coding saves 0.06-0.24 B/row
#   a column on the mantissas (3.04-3.30 at level 1; PLAIN 3.6-3.7, dictionary 5.1-5.4) but decodes a
#   value in ~6 ns where lz4 takes ~2: load() of 10M rows (P6's synthetic folder, medians of 10
#   alternated) spends 1.13 s user + 0.85 s system with lz4 here, 1.35 + 1.06 with zstd.
# - min/max statistics for ids and ints only (row-group pruning on them, the run_id of a part's row
#   group in _merge_parts_atomic); float ones prune nothing and cost 0.02 B/row of footer here.
# Total 22.7 B/row, footer included (26.7 before: act_std byte-stream-split, every column zstd level 1;
# 22.1 with zstd for the per-parameter statistics too); with float64 statistics 46.4 (49.8). Writing a
# layers table: 188 -> 222 ns/row on 1M real-shaped rows (level 4 on four columns), 185 -> 172 on
# random statistics (best of 5 each).
_REPEATED = {"delta_norm": "PLAIN", "act_mean": "PLAIN", "act_std": "PLAIN", "act_saturation": "BYTE_STREAM_SPLIT"}
_REPEATED_LEVEL = 4
_DELTA_INTS = ("step", "layer")
_DICT_COLUMNS = ("run_id", "job_id", "param")


def _writer_options(schema: pa.Schema) -> dict:
    """pyarrow writer options for a table of `schema` (see the comment above)."""
    floats = [f.name for f in schema if pa.types.is_floating(f.type)]
    encoding = {n: _REPEATED.get(n, "BYTE_STREAM_SPLIT") for n in floats}
    encoding.update({n: "DELTA_BINARY_PACKED" for n in _DELTA_INTS if n in schema.names})
    return {"compression": {n: "lz4_raw" if n in floats and n not in _REPEATED else "zstd" for n in schema.names},
            "compression_level": {n: _REPEATED_LEVEL for n in _REPEATED if n in floats},
            "use_dictionary": [n for n in _DICT_COLUMNS if n in schema.names], "column_encoding": encoding,
            "write_statistics": [n for n in schema.names if n not in floats]}


def write_part(table: pa.Table, path: Path) -> None:
    """A streamed part of a running job (bench.checkpoint): sorted rows, one row group per run, so
    that the final merge can copy each run's rows in run order one row group at a time."""
    rid = table.column("run_id").to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.append(True, rid[1:] != rid[:-1])) if len(rid) else np.zeros(0, int)
    with atomic_file(path) as f, pq.ParquetWriter(f, table.schema, **_writer_options(table.schema)) as w:
        for a, b in zip(starts, np.append(starts[1:], len(rid))):
            w.write_table(table.slice(a, b - a))


def write_running_runs(path: Path, runs) -> None:
    """The runs rows (status `running`) of a job still training, beside its streamed parts."""
    t = sorted_table("runs", runs, runs["job_id"][0] if "job_id" in runs else path.parents[1].name)
    _write_atomic(t, path)


def _merge_parts_atomic(parts: list[Path], path: Path, table: str) -> None:
    """Write the parts' rows as one file sorted like write_job's: run by run (run_id order), each
    run's rows part by part (step order). One row group in memory at a time. Layers statistics stay
    float32 unless a part had to store float64 (see sorted_table)."""
    files = [pq.ParquetFile(p) for p in parts]
    schema = (layers_schema(_stats_type(f.schema_arrow for f in files)) if table == "layers"
              else SCHEMAS[table])
    where: dict[str, list[tuple[int, int]]] = {}
    for i, f in enumerate(files):
        col = f.schema_arrow.get_field_index("run_id")
        for g in range(f.metadata.num_row_groups):
            stats = f.metadata.row_group(g).column(col).statistics  # one run per row group: min = the run
            where.setdefault(stats.min, []).append((i, g))
    try:
        with atomic_file(path) as out, pq.ParquetWriter(out, schema, **_writer_options(schema)) as w:
            if not where:
                w.write_table(schema.empty_table())
            for rid in sorted(where):
                for i, g in where[rid]:
                    # one thread: the pool's per-thread arenas would each keep a row group's memory
                    group = files[i].read_row_group(g, use_threads=False)
                    w.write_table(group.cast(schema))
    finally:
        for f in files:
            f.close()


def write_job(exp_dir, job_id: str, runs, steps, layers, parts: dict[str, list[Path]] | None = None,
              stats_dtype: str = "float32") -> None:
    """Write one job's three tables atomically, runs last (the commit marker), then its runs' done
    markers (the index that `completed` reads).

    ``job_id`` (all tables), ``schema_version`` and ``created_at`` (runs; now, UTC) are filled in
    when absent. Rewriting a job first removes its done markers and its runs file, so a crash midway
    leaves the job incomplete (it is retried) rather than old runs rows beside new steps.
    ``parts``: {"steps": [...], "layers": [...]} part files a long job streamed out
    (bench.checkpoint); they are merged into the job's files and ``steps``/``layers`` are ignored.
    ``stats_dtype``: how layers statistics are stored (see STATS_DTYPES and sorted_table).
    """
    exp_dir, tables = Path(exp_dir), {}
    for table, data in (("steps", steps), ("layers", layers), ("runs", runs)):
        if parts is None or table == "runs":
            tables[table] = sorted_table(table, data, job_id, stats_dtype)
    for table in SCHEMAS:
        (exp_dir / table).mkdir(parents=True, exist_ok=True)
    _ensure_index(exp_dir)
    rids, status = tables["runs"].column("run_id").to_pylist(), tables["runs"].column("status").to_pylist()
    for r in rids:
        (exp_dir / DONE / r).unlink(missing_ok=True)
    (exp_dir / "runs" / f"{job_id}.parquet").unlink(missing_ok=True)
    for table in ("steps", "layers", "runs"):
        path = exp_dir / table / f"{job_id}.parquet"
        if parts is not None and table != "runs":
            _merge_parts_atomic(parts[table], path, table)
        else:
            _write_atomic(tables[table], path)
    for r, s in zip(rids, status):
        if s in _COMPLETE:
            _mark_done(exp_dir, r, job_id, s)


# ---- the done index: one file per complete run -------------------------------------------------
DONE = "done"  # beside the table folders, never inside one: pyarrow's discovery of a table is unaffected


def _mark_done(exp_dir: Path, rid: str, job: str, status: str) -> None:
    """done/<run_id> holds "<job_id> <status>"; written to a hidden temp name, then renamed, so two
    workers marking at once each leave a whole file (the last rename wins)."""
    path = exp_dir / DONE / rid
    tmp = path.with_name(f".{rid}.tmp-{os.getpid()}")
    try:
        tmp.write_text(f"{job} {status}\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_INDEX_VERSION = "_schema_version"  # in done/: the schema_version whose tables the index describes


def _index_ok(index: Path) -> bool:
    try:
        return (index / _INDEX_VERSION).read_text().strip() == str(SCHEMA_VERSION)
    except OSError:
        return False


def _ensure_index(exp_dir: Path) -> None:
    """Create done/, first filling it from the runs tables when results predate the index (or the
    index was written for another schema_version: done/_schema_version says which).

    The rebuild fills a hidden folder and renames it into place, so a reader never sees a half
    index; if another worker's rename won the race, ours is discarded (both hold the same facts).
    """
    import shutil

    index = exp_dir / DONE
    if _index_ok(index):
        return
    if index.is_dir():
        stale = exp_dir / f".{DONE}.stale-{os.getpid()}"  # another version's index: its facts may not hold
        try:
            os.rename(index, stale)
        except OSError:
            pass  # another worker moved it first
        shutil.rmtree(stale, ignore_errors=True)
    tmp = exp_dir / f".{DONE}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if (exp_dir / "runs").is_dir() and any((exp_dir / "runs").glob("*.parquet")):
            runs = _newest_runs(load_table(exp_dir, "runs", ["run_id", "job_id", "status", "created_at"]))
            for r, j, s in zip(*(runs.column(c).to_pylist() for c in ("run_id", "job_id", "status"))):
                if s in _COMPLETE:
                    (tmp / r).write_text(f"{j} {s}\n")
        (tmp / _INDEX_VERSION).write_text(f"{SCHEMA_VERSION}\n")
        try:
            os.rename(tmp, index)
        except OSError:  # another worker built it first (ENOTEMPTY/EEXIST)
            if not index.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def completed(exp_dir, run_ids) -> set[str]:
    """The run ids among ``run_ids`` that need no rerun: one ``stat`` per id in the done index,
    whatever the size of the experiment (no table is read once the index exists). Read-only: where
    the index is missing or stale (results of older code), the runs tables are read instead, and the
    next write_job builds the index."""
    exp_dir = Path(exp_dir)
    if not (exp_dir / "runs").is_dir():
        return set()
    index = exp_dir / DONE
    if not _index_ok(index):
        return set(completed_run_ids(exp_dir)) & set(run_ids)
    return {r for r in run_ids if (index / r).is_file()}


def count_completed(exp_dir) -> int:
    """How many runs the done index holds (a directory listing, no table read)."""
    index = Path(exp_dir) / DONE
    return sum(1 for e in os.scandir(index) if not e.name.startswith((".", "_"))) if index.is_dir() else 0


def other_version_files(exp_dir, job_id: str) -> list[tuple[Path, int]]:
    """This job's files that another schema_version wrote: rewriting the job would replace them.

    The loader skips such files (it cannot read them), so without this check a rerun would take
    the job for missing and overwrite results that the older code can still read.
    """
    found = []
    for table in SCHEMAS:
        path = Path(exp_dir) / table / f"{job_id}.parquet"
        try:
            meta = pq.read_schema(path).metadata or {}
            version = int(meta[_META_VERSION])
        except (OSError, ValueError, KeyError, pa.ArrowException):  # absent, unreadable or foreign
            continue
        if version != SCHEMA_VERSION:
            found.append((path, version))
    return found


def _read_file(path: Path, schema: pa.Schema, names: list[str], dictionary: list[str], widen: bool = True,
               threads: bool = False):
    """Return (table, None), or (None, why the file is skipped). Float columns are cast to `schema`'s
    (float64) if `widen`, else kept as stored (float32 statistics: load() widens them once, at the end)."""
    try:
        with pq.ParquetFile(path, read_dictionary=dictionary) as f:
            file_schema = f.schema_arrow  # a property that rebuilds the schema: read it once
            meta = file_schema.metadata or {}
            if _META_VERSION not in meta:
                return None, "not a vgbench file (no schema_version in its metadata)"
            if not OLDEST_READABLE <= (version := int(meta[_META_VERSION])) <= SCHEMA_VERSION:
                return None, (f"schema_version {version}, this code reads {SCHEMA_VERSION} "
                              f"(and from {OLDEST_READABLE} on)")
            table = schema.metadata[_META_TABLE].decode()
            fill = {n: v for added, tables in ADDED.items() if added > version
                    for n, v in tables.get(table, {}).items() if n in names}
            if missing := sorted(set(names) - set(fill) - set(file_schema.names)):
                return None, f"missing columns {missing}"
            t = f.read(columns=[n for n in names if n not in fill], use_threads=threads)
            for n, v in fill.items():
                t = t.append_column(n, pa.repeat(pa.scalar(v, schema.field(n).type), len(t)))
    except KeyError as e:  # read_dictionary names a column the file lacks
        name = e.args[0].decode() if isinstance(e.args[0], bytes) else e.args[0]
        return None, f"missing column {name!r}"
    except (OSError, ValueError, TypeError, pa.ArrowException) as e:  # truncated, garbage, ...
        return None, f"unreadable ({type(e).__name__}: {e})"
    for i, (n, got) in enumerate(zip(t.column_names, t.schema.types)):
        want = schema.field(n).type
        if got != want and pa.types.is_floating(got) and pa.types.is_floating(want):
            if widen:
                t = t.set_column(i, n, t.column(i).cast(want))  # float32 statistics: widened exactly
        elif got != want and not (pa.types.is_dictionary(got) and got.value_type == want):
            return None, f"column {n} is {got}, expected {want}"
    return t.select(names), None


def _read_folder(path, table: str, columns=None, dictionary=(), prepare=None, widen=True) -> list[pa.Table]:
    schema, names = READ_SCHEMAS[table], list(columns or READ_SCHEMAS[table].names)
    folder = Path(path) / table  # hidden names are temp files, as for pyarrow's own discovery
    files = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith((".", "_")))

    # a file per thread; pyarrow's threads (a column each) too where there are fewer files than cores
    threads = len(files) < (os.cpu_count() or 1)

    def work(p):
        t, why = _read_file(p, schema, names, [c for c in dictionary if c in names], widen, threads)
        return (t if t is None or prepare is None else prepare(t)), why

    if len(files) < 2:
        results = [work(p) for p in files]
    else:
        with ThreadPoolExecutor(min(16, (os.cpu_count() or 1) + 4)) as pool:  # decoding frees the GIL
            results = list(pool.map(work, files))
    for p, (_, why) in zip(files, results):
        if why is not None:
            warnings.warn(f"skipping {p}: {why}", stacklevel=3)
    return [t for t, why in results if why is None]


def load_table(path, table: str, columns: list[str] | None = None) -> pa.Table:
    """Read ``path/table/*.parquet`` file by file and concatenate (an Arrow table, no dedup).

    A file that is corrupt, truncated, foreign (no vgbench metadata, missing or mistyped columns)
    or of a schema_version outside OLDEST_READABLE..SCHEMA_VERSION is skipped with a warning naming it,
    and the rest is read: one killed or stray file should not hide a whole experiment (load() inherits this).
    """
    schema = pa.schema([READ_SCHEMAS[table].field(n) for n in columns or READ_SCHEMAS[table].names])
    parts = _read_folder(path, table, columns)
    return pa.concat_tables([pa.Table.from_arrays(t.columns, schema=schema) for t in parts]
                            or [schema.empty_table()])


def _newest_runs(runs: pa.Table) -> pa.Table:
    """One row per run_id: the newest by created_at (ties: larger job_id), sorted by run_id."""
    import pyarrow.compute as pc

    order = pc.sort_indices(runs, [("run_id", "ascending"), ("created_at", "descending"),
                                   ("job_id", "descending")])
    runs = runs.take(order).combine_chunks()
    rid = runs.column("run_id").to_numpy(zero_copy_only=False)
    return runs.filter(np.append(True, rid[1:] != rid[:-1])) if len(rid) else runs


def completed_run_ids(exp_dir) -> dict[str, str]:
    """run_id -> status for runs that need no rerun ("ok" or "diverged"; "failed" is retried)."""
    runs = _newest_runs(load_table(exp_dir, "runs", ["run_id", "job_id", "status", "created_at"]))
    return {r: s for r, s in zip(runs.column("run_id").to_pylist(),
                                 runs.column("status").to_pylist()) if s in _COMPLETE}


@dataclass(frozen=True)
class Results:
    runs: pd.DataFrame
    steps: pd.DataFrame
    layers: pd.DataFrame


def _to_pandas(t: pa.Table) -> pd.DataFrame:
    import pandas as pd

    # Nullable int columns (batch_size, diverged_step, solved_step) become pandas Int64 whether or
    # not this load happens to contain a null; required ints stay int64, strings load as str.
    # (split_blocks=True would be zero-copy, but its columns are read-only: df.loc[...] = x would fail)
    nullable_int = [f.name for f in t.schema if f.nullable and pa.types.is_integer(f.type)]
    if not nullable_int:  # steps and layers: no reordering, whose copy cost more than the conversion
        return t.to_pandas()
    df = t.drop_columns(nullable_int).to_pandas()
    for name in nullable_int:
        df[name] = t.select([name]).to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)[name]
    return df[t.column_names]


def _codes(col: pa.ChunkedArray, code: dict) -> np.ndarray:
    """``code[value]`` (int32) per row of dictionary-encoded ``col``, -1 if absent (no per-row hashing);
    the dictionary's own indices where they are the codes already (no copy)."""
    out = []
    for c in col.chunks:
        table = np.array([code.get(v, -1) for v in c.dictionary.to_pylist()], np.int32)
        indices = c.indices.to_numpy(zero_copy_only=False)
        out.append(indices if np.array_equal(table, np.arange(len(table))) and indices.dtype == np.int32
                   else table[indices])
    return (out[0] if len(out) == 1 else np.concatenate(out)) if out else np.zeros(0, np.int32)


def _keep_and_sort(t: pa.Table, run_rank: dict, job_code: dict, run_job: np.ndarray, keys):
    """One file, in the thread pool: keep the kept (run_id, job_id) rows, sort, ids -> __rank.
    `param` stays dictionary-encoded (decoded once, where the rows are put together)."""
    rank = _codes(t["run_id"], run_rank)  # position in the kept runs (sorted by run_id), -1: none
    keep = (rank >= 0) & (_codes(t["job_id"], job_code) == run_job[rank])  # orphans, stale dups
    t = t.drop_columns(["run_id", "job_id"])
    if not keep.all():
        t, rank = t.filter(keep), rank[keep]
    sort_by = [rank] + [t[k].to_numpy() for k in keys if k != "param"]
    if "param" in keys:  # within a file, rank param names against the file's own sorted names
        names = sorted({v for c in t["param"].chunks for v in c.dictionary.to_pylist()})
        sort_by.append(_codes(t["param"], {n: i for i, n in enumerate(names)}))
    if not _is_sorted(sort_by):  # write_job and compact write sorted files: no sort, no copy
        order = np.lexsort(sort_by[::-1])
        t, rank = t.take(order), rank[order]
    return t.append_column("__rank", pa.array(rank, pa.int32()))


def _is_sorted(keys: list[np.ndarray]) -> bool:
    """Whether rows are in lexicographic order of `keys` (first key first): O(n) comparisons, where
    a lexsort to check it costs O(n log n) and a sorting pass per key."""
    if not len(keys) or len(keys[0]) < 2:
        return True
    tied = np.ones(len(keys[0]) - 1, bool)  # rows whose earlier keys equal the previous row's
    for k in keys:
        a, b = k[:-1], k[1:]
        if (tied & (b < a)).any():
            return False
        tied &= b == a
    return True


def _gather(col: pa.ChunkedArray, rank: pa.Array) -> pa.Array:
    if pa.types.is_string(col.type):  # decoding a dictionary is ~10x faster than take on strings
        return pa.DictionaryArray.from_arrays(rank, col.combine_chunks()).cast(col.type)
    return col.combine_chunks().take(rank)


# load() of 10M compacted layers rows (bench.perf P6's synthetic folder: 3 files, float32 statistics; a
# 2-core VM shared with other work, medians of 5 alternated with the previous code and pd.read_parquet):
# wall 1.51 s, user CPU 1.03 s, system 0.52 s, where the previous load (statistics cast to float64 per
# file, then concat_tables + combine_chunks, then to_pandas: three new copies of every column; zstd for
# every column) took 4.08 / 1.64 / 2.63 s and pd.read_parquet 1.99 / 1.54 / 0.55 s. The system time is
# page faults on fresh memory, dearer than the copies themselves on this machine: hence statistics kept
# as stored until _frame copies each column once into the array the DataFrame keeps. User time: about
# half decoding, the rest _keep_and_sort's checks (~0.2 s), filling the float64 columns (~0.2 s) and
# the three string columns (~0.25 s).
def _slices(path, table: str, runs: pa.Table, keys: list[str]) -> tuple[list[pa.Table], list[list[int]]]:
    """The files' rows of the kept runs, each file's sorted with `__rank` (the run's row in `runs`)
    in place of run_id and job_id, and the [file, start, stop) slices that, in order, are the rows
    of `runs`, sorted. Statistics stay as stored (float32 or float64)."""
    ids, jobs = runs["run_id"].to_pylist(), runs["job_id"].to_pylist()
    run_rank = {r: i for i, r in enumerate(ids)}
    job_code = {j: i for i, j in enumerate(dict.fromkeys(jobs))}
    run_job = np.array([job_code[j] for j in jobs] + [-2], np.int32)  # [-1] = -2: orphans match no job
    parts = _read_folder(path, table, dictionary=("run_id", "job_id", "param"), widen=False,
                         prepare=lambda t: _keep_and_sort(t, run_rank, job_code, run_job, keys))
    # A run's rows come from one job, i.e. one file (a copied file repeats them: first one wins),
    # so the sorted result is the files' per-run slices put in run order: no global sort.
    # A running job's rows are in several part files, in step order: a run's later segments are
    # kept when they go on where the last one stopped (a copy of the same rows starts no later).
    segments: dict[int, list[tuple[int, int, int]]] = {}
    last_step: dict[int, int] = {}
    for i, t in enumerate(parts):
        r, steps = t["__rank"].to_numpy(), t["step"].to_numpy()
        starts = np.flatnonzero(np.diff(r, prepend=-1))
        for start, stop in zip(starts, np.append(starts[1:], len(r))):
            k = int(r[start])
            if k in segments and steps[start] <= last_step[k]:
                continue
            segments.setdefault(k, []).append((i, int(start), int(stop)))
            last_step[k] = int(steps[stop - 1])
    # runs in rank order; back-to-back slices of one file (all of a compacted file) become one slice
    merged: list[list[int]] = []
    for _, segs in sorted(segments.items()):
        for i, a, b in segs:
            if merged and merged[-1][0] == i and merged[-1][2] == a:
                merged[-1][2] = b
            else:
                merged.append([i, a, b])
    return parts, merged


def _rows(path, table: str, runs: pa.Table, schema: pa.Schema) -> pa.Table:
    """Steps or layers rows of the kept runs as an Arrow table of `schema` (what `compact` writes), sorted."""
    parts, slices = _slices(path, table, runs, SORT_KEYS[table][1:])
    ids = ("run_id", "job_id")
    body_schema = pa.schema([f for f in schema if f.name not in ids] + [pa.field("__rank", pa.int32())])
    parts = [t.select(body_schema.names).cast(body_schema) for t in parts]  # param decoded, floats as `schema`
    body = pa.concat_tables([parts[i].slice(a, b - a) for i, a, b in slices] or [body_schema.empty_table()])
    body = body.combine_chunks()  # one chunk per column, not one per run
    rank = body["__rank"].combine_chunks()
    cols = [_gather(runs[n], rank) if n in ids else body.column(n) for n in schema.names]
    return pa.Table.from_arrays(cols, schema=schema)


def _numeric(parts: list[pa.Table], slices: list[list[int]], name: str, dtype, n: int) -> np.ndarray:
    """Column `name` of the slices as one new array of `dtype` (nulls: NaN): each value copied (float32
    widened) once, straight into the array the DataFrame keeps (owned, so writable). Slices are numpy
    views, put together by one np.concatenate: a few hundred ns a slice, where an uncompacted
    experiment has one slice per run."""
    whole: dict[int, np.ndarray] = {}  # a file's column: no copy where it is one chunk without nulls
    views = [(whole[i] if i in whole else whole.setdefault(i, parts[i].column(name).to_numpy()))[a:b]
             for i, a, b in slices]
    out = np.empty(n, dtype)
    if views:
        np.concatenate(views, out=out, casting="safe")
    return out


def _frame(path, table: str, runs: pa.Table, config: list[str], pool: ThreadPoolExecutor) -> pd.DataFrame:
    """Steps or layers rows of the kept runs as load() returns them: READ_SCHEMAS[table]'s columns
    (statistics float64), then the `config` columns joined on (a name may come twice: steps.loss and
    the config's loss); sorted.

    Floats and required ints go from the files' decoded pages into their final numpy arrays in one
    copy each (float32 widened on the way; numpy copies without the GIL), a column per task in `pool`;
    strings (ids decoded from the runs' dictionary, param from the files') and the config columns go
    through Arrow to pandas in one more task.
    """
    import pandas as pd

    parts, slices = _slices(path, table, runs, SORT_KEYS[table][1:])
    schema, ids = READ_SCHEMAS[table], ("run_id", "job_id")
    n = sum(b - a for _, a, b in slices)
    fields = list(schema) + [runs.schema.field(c) for c in config]
    numeric = {k: np.float64 if pa.types.is_floating(f.type) else np.int64 for k, f in enumerate(schema)
               if pa.types.is_floating(f.type) or (pa.types.is_integer(f.type) and not f.nullable)}
    rank = pa.array(_numeric(parts, slices, "__rank", np.int32, n))

    def others() -> pd.DataFrame:  # the columns that are not numeric, in one conversion to pandas
        cols = []
        for k, f in enumerate(fields):
            if k in numeric:
                continue
            if f.name in ids or k >= len(schema):
                cols.append(_gather(runs[f.name], rank))
            else:  # param: each file's dictionary decoded
                chunks = [c for i, a, b in slices for c in parts[i][f.name].slice(a, b - a).chunks]
                cols.append(pa.chunked_array(chunks, pa.dictionary(pa.int32(), f.type)).cast(f.type) if chunks
                            else pa.array([], f.type))
        return _to_pandas(pa.Table.from_arrays(cols, schema=pa.schema([f for k, f in enumerate(fields)
                                                                       if k not in numeric])))

    # threads pay from ~100k rows on; the slower string columns first, so that the numeric ones fill
    # the other threads meanwhile
    submit = pool.submit if n >= 1 << 17 else _now
    strings = submit(others)
    arrays = {k: submit(_numeric, parts, slices, fields[k].name, dtype, n) for k, dtype in numeric.items()}
    strings = strings.result()
    j = iter(range(strings.shape[1]))
    columns = {k: arrays[k].result() if k in numeric else strings.iloc[:, next(j)] for k in range(len(fields))}
    df = pd.DataFrame(columns, copy=False)  # no copy: each column its own block
    df.columns = [f.name for f in fields]
    return df


def _now(fn, *args) -> Future:
    """fn(*args) run here, as a finished Future (where a thread would cost more than it saves)."""
    done = Future()
    done.set_result(fn(*args))
    return done


def load(path, config_columns: list[str] | bool | None = None, running: bool = False) -> Results:
    """Load an experiment dir into ``Results(runs, steps, layers)`` DataFrames.

    A run trained by several jobs keeps its newest runs row (by created_at) and only that job's
    steps/layers rows; steps/layers rows without a runs row (a killed job) are dropped. Unreadable,
    foreign or other-version files are skipped with a warning (see load_table). ``config_columns``:
    runs columns to join onto steps and layers by run_id, or True for CONFIG_COLUMNS. Dtypes: str
    for strings, int64 for required ints, Int64 for nullable ints, float64 (NaN for null; layers
    statistics stored as float32 are widened exactly), bool,
    datetime64[us, UTC]. Sorted by run_id (then step, layer, param).

    ``running=True`` adds the runs of jobs still training (status `running`, see bench.checkpoint)
    with the rows they have streamed out so far, for runs without a finished row of their own.
    """
    import pandas as pd

    config = list(CONFIG_COLUMNS) if config_columns is True else list(dict.fromkeys(config_columns or []))
    if bad := [c for c in config if c not in RUNS_SCHEMA.names or c in ("run_id", "job_id")]:
        raise ValueError(f"config_columns: {bad} are not runs columns; choose in {CONFIG_COLUMNS}")
    with ThreadPoolExecutor(max(2, min(16, os.cpu_count() or 1))) as pool:
        runs = _newest_runs(load_table(path, "runs"))
        out = [_to_pandas(runs), _frame(path, "steps", runs, config, pool), _frame(path, "layers", runs, config, pool)]
        if running:
            finished = set(runs.column("run_id").to_pylist())
            for job_dir in sorted(Path(path, RUNNING).glob("*/")):
                live = _newest_runs(load_table(job_dir, "runs"))
                live = live.filter(pa.array([r not in finished for r in live.column("run_id").to_pylist()], pa.bool_()))
                if not len(live):
                    continue
                more = [_to_pandas(live), _frame(job_dir, "steps", live, config, pool),
                        _frame(job_dir, "layers", live, config, pool)]
                out = [pd.concat([a, b], ignore_index=True) for a, b in zip(out, more)]
            keys = [SORT_KEYS["runs"], SORT_KEYS["steps"], SORT_KEYS["layers"]]
            out = [df.sort_values(k, ignore_index=True, kind="stable") for df, k in zip(out, keys)]
    return Results(*out)


# ---- compaction: many small files -> few large ones ----------------------------------------------
ROWS_PER_FILE = 4_000_000  # per compacted steps/layers file; a run never straddles two files


def _manifests(exp_dir: Path) -> list[Path]:
    return sorted(exp_dir.glob(".compact-*.json"))


def _finish(exp_dir: Path, manifest: Path) -> None:
    """Complete a committed compaction: move its new files into place, then delete the old ones.
    Idempotent, so an interrupted compaction is finished by the next `compact`."""
    plan = json.loads(manifest.read_text())
    for tmp, final in plan["new"]:
        if (exp_dir / tmp).exists():
            os.replace(exp_dir / tmp, exp_dir / final)
    for old in plan["old"]:
        (exp_dir / old).unlink(missing_ok=True)
    manifest.unlink(missing_ok=True)


def _file_schemas(paths):
    for p in paths:
        try:
            yield pq.read_schema(p)
        except (OSError, pa.ArrowException):  # unreadable: load() skips it, and so does compact
            continue


def compact(exp_dir, rows_per_file: int = ROWS_PER_FILE) -> dict[str, tuple[int, int]]:
    """Merge an experiment's per-job files into a few sorted files per table; returns
    {table: (files before, files after)}.

    What load() would return is unchanged: only the runs rows load() keeps (newest per run_id) and
    those runs' steps/layers rows are written, sorted as load() returns them, each run's rows in one
    file. Rows without a runs row (a killed or a still-running job) are dropped, so run it while
    nothing else writes to the experiment. Memory is bounded by about one output file: runs are cut
    into groups of about `rows_per_file` rows (by run_id order, using the row counts in the files'
    footers) and each group is one pass over the input files.

    Safe to interrupt: new files are written under hidden names, then a manifest naming old and new
    files is renamed into place (the commit); only after that are new files made visible and old
    ones deleted. Killed before the commit: the old files are untouched and hidden litter is all
    that is left (removed by the next compact). Killed after: the next compact finishes the job;
    until then old and new files hold the same rows, and load() keeps each once (a raw
    pd.read_parquet would see them twice).
    """
    import secrets

    exp_dir = Path(exp_dir)
    for m in _manifests(exp_dir):
        _finish(exp_dir, m)
    for table in SCHEMAS:  # litter of a compaction killed before its commit
        for p in (exp_dir / table).glob(".compact-*"):
            p.unlink(missing_ok=True)
    old = {t: sorted(p for p in (exp_dir / t).glob("*.parquet") if not p.name.startswith((".", "_")))
           for t in SCHEMAS}
    if not old["runs"]:
        return {t: (len(v), len(v)) for t, v in old.items()}
    runs = _newest_runs(load_table(exp_dir, "runs"))
    token = secrets.token_hex(4)
    new: list[tuple[str, str]] = []

    stats_dtype = _stats_type(_file_schemas(old["layers"]))  # float32 stays float32; float64 is kept

    def put(table: str, t: pa.Table, i: int) -> None:
        name = f"compact-{token}-{i:05d}.parquet"
        tmp = exp_dir / table / f".{name}"
        schema = schema_of(table, stats_dtype)
        t = t.cast(schema)  # the schema's version metadata (runs; steps and layers come as `schema`)
        with open(tmp, "wb") as f:
            pq.write_table(t, f, row_group_size=1 << 20, **_writer_options(schema))
            f.flush()
            os.fsync(f.fileno())
        new.append((f"{table}/.{name}", f"{table}/{name}"))

    put("runs", runs, 0)
    # rows per run, from the footers (no data read): a job's rows divide evenly among its members
    per_job, total = {}, 0
    for p in old["layers"] + old["steps"]:
        try:
            n = pq.ParquetFile(p).metadata.num_rows
        except (OSError, pa.ArrowException):
            continue
        per_job[p.stem] = per_job.get(p.stem, 0) + n
        total += n
    import pyarrow.compute as pc

    members = {d["values"]: d["counts"] for d in pc.value_counts(runs["job_id"]).to_pylist()}
    jobs = runs["job_id"].to_pylist()
    known = [j in per_job for j in jobs]
    # runs of earlier compacted files (not named by job): share what the named files do not hold
    rest = max(0, total - sum(per_job.get(j, 0) for j in members)) / max(1, known.count(False))
    cost = np.array([per_job[j] / members[j] if k else rest for j, k in zip(jobs, known)])
    group = (np.cumsum(cost) // max(1, rows_per_file)).astype(np.int64)
    for i, g in enumerate(np.unique(group)):
        part = runs.filter(pa.array(group == g))
        for table in ("steps", "layers"):
            put(table, _rows(exp_dir, table, part, schema_of(table, stats_dtype)), i)
    manifest = exp_dir / f".compact-{token}.json"
    tmp = exp_dir / f".compact-{token}.json.tmp"
    plan = {"old": [str(p.relative_to(exp_dir)) for v in old.values() for p in v], "new": new}
    tmp.write_text(json.dumps(plan))
    os.replace(tmp, manifest)  # the commit
    _finish(exp_dir, manifest)
    return {t: (len(old[t]), sum(1 for _, f in new if f.startswith(t + "/"))) for t in SCHEMAS}


def _main(argv=None) -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m bench.results", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compact", help="merge an experiment's many small files into few (atomic, resumable)")
    c.add_argument("exp_dir", help="results_dir/name")
    c.add_argument("--rows-per-file", type=int, default=ROWS_PER_FILE)
    args = parser.parse_args(argv)
    exp_dir = Path(args.exp_dir)
    if not (exp_dir / "runs").is_dir():
        print(f"error: {exp_dir} has no runs/ folder: give results_dir/name of an experiment", file=sys.stderr)
        sys.exit(2)
    counts = compact(exp_dir, args.rows_per_file)
    print(", ".join(f"{t}: {a} -> {b} files" for t, (a, b) in counts.items()))


if __name__ == "__main__":
    _main()
