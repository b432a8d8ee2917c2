"""`python -m bench.run`: train one config (or a `-m` sweep of them) and write its parquet results.

`run(cfg)` is a plain function (tests call it with a composed config); `main()` wraps it in Hydra
and turns any bad input into one line on stderr and a non-zero exit: 2 for a bad config (nothing is
written, and Hydra's log folder for the refused job is removed), 1 when results cannot be written
(disk full, read-only, not a directory), 130 on Ctrl-C (finished jobs are kept; rerun to resume).
One job trains the config's `ensemble` members at once; each member is a run with its own run_id
(see `bench.results`). Members whose run already has complete results are skipped unless
`overwrite=true`, so rerunning a sweep finishes only what is missing.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from bench import results
from bench.checkpoint import CHUNK_ROWS, Session
from bench.config import (
    ConfigError,
    NotADirectoryConfigError,
    _enum,
    check_name,
    estimate_bytes,
    estimate_disk_bytes,
    register,
    rows_per_logged_step,
    validate,
)
from bench.init import init_params
from bench.train import train

log = logging.getLogger("bench")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # the repository's conf/ (install with pip -e)
NON_SEMANTIC = ("report", "max_memory_gb", "checkpoint")  # beyond results.SEMANTIC_EXCLUDE: launch-time settings


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _hydra_choice(key: str) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get(key) or ""
    except (ValueError, ImportError):  # not running under Hydra (a test calling run directly)
        return ""


def _threads_for_launcher() -> int | None:
    """Under the joblib launcher, give each worker its share of the cores so workers do not fight."""
    try:
        from hydra.core.hydra_config import HydraConfig

        launcher = HydraConfig.get().launcher
    except (ValueError, ImportError):
        return None
    if "joblib" not in str(launcher.get("_target_", "")):
        return None
    n_jobs = launcher.get("n_jobs", -1)
    cores = os.cpu_count() or 1
    return 1 if n_jobs is None or n_jobs <= 0 else max(1, cores // n_jobs)


def semantic_config(cfg: DictConfig, net, tspec) -> dict[str, Any]:
    """The resolved config with equivalent spellings made equal (depth x width vs widths, loss auto)."""
    c = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for key in NON_SEMANTIC:
        c.pop(key, None)
    c["model"]["widths"] = list(net.widths)
    c["model"]["depth"], c["model"]["width"] = net.depth, net.widths[0]
    c["train"]["loss"] = tspec.loss
    return c


def _memory_limit_bytes(cfg: DictConfig) -> float:
    if cfg.max_memory_gb is not None:
        return cfg.max_memory_gb * 2**30
    try:  # 70% of what the OS says is available now
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
        return 0.7 * avail
    except (OSError, StopIteration):
        return math.inf


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.{1 if n >= 10 * scale else 2}f} {unit}"
    return f"{n:.0f} B"


class ResultsWriteError(OSError):
    """Results could not be written (disk full, read-only, not a directory): one line for the user."""


class _Progress:
    """A tqdm bar on a terminal, or a log line every ~10% of the steps when output is not a TTY."""

    def __init__(self, mode: str, total: int, desc: str):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.total, self.desc, self.done, self.next_log = mode, total, desc, 0, 0
        self.bar = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, unit="step", dynamic_ncols=True)

    def __call__(self, step: int, losses: np.ndarray) -> None:
        loss = float(np.nanmedian(losses)) if np.isfinite(losses).any() else float("nan")
        if self.bar is not None:
            self.bar.update(step - self.done)
            self.bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        elif self.mode == "log" and (step >= self.next_log or step == self.total):
            log.info("%s step %d/%d loss %.4g", self.desc, step, self.total, loss)
            self.next_log = step + max(1, self.total // 10)
        self.done = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _describe(cfg: DictConfig, net) -> str:
    arch = "+".join(x for x in (_enum(cfg.model.activation), "res" if net.residual else "",
                                "bn" if net.norm == "batchnorm" else "") if x)
    return f"{cfg.task.name} {arch} depth {net.depth} {_enum(cfg.backend)} seed {cfg.seed}"


def _free_disk(path: Path) -> float:
    for p in (path, *path.parents):  # the first folder that exists holds the filesystem to ask
        if p.exists():
            return shutil.disk_usage(p).free
    return math.inf


def preflight(cfg: DictConfig):
    """Every check that needs no training and no file: validate, then refuse a job that cannot fit
    in memory or on disk, with the estimate and the key that fixes it. Arithmetic on the config only
    (nothing loops over members or steps), so even ensemble=10^8 or 10^12 steps is refused at once.
    Runs from Hydra's on_run_start, before Hydra makes its log folder, and again in run()."""
    task, net, tspec = validate(cfg)
    E = cfg.ensemble
    # rows stream out in parts of about CHUNK_ROWS (bench.checkpoint): memory holds one part at most
    in_memory = CHUNK_ROWS // (rows_per_logged_step(net) * E) + 1
    need = estimate_bytes(net, tspec, task, E, logged_in_memory=in_memory)
    limit = _memory_limit_bytes(cfg)
    if need > limit:
        raise ConfigError(f"ensemble={E} x model widths {list(net.widths)} needs about {_size(need)}, "
                          f"over the {_size(limit)} limit "
                          f"({'max_memory_gb' if cfg.max_memory_gb is not None else '70% of available memory'}): "
                          f"lower ensemble, width or train.batch_size, or raise max_memory_gb")
    disk = estimate_disk_bytes(net, tspec, E)
    free = _free_disk(Path(cfg.results_dir))
    if disk > free:
        raise ConfigError(f"train.steps={tspec.steps} with log.every={tspec.log_every} x ensemble={E} writes "
                          f"about {_size(disk)} of rows, more than the {_size(free)} free under {cfg.results_dir}: "
                          f"raise log.every, lower train.steps or ensemble, or choose another results_dir")
    return task, net, tspec


def run(cfg: DictConfig) -> dict[str, int]:
    """Train the config's ensemble and write its results; returns counts of trained/skipped/failed runs."""
    task, net, tspec = preflight(cfg)
    semantic = semantic_config(cfg, net, tspec)
    members = [dict(semantic, seed=cfg.seed + k) for k in range(cfg.ensemble)]
    ids = [results.run_id(m) for m in members]
    exp_dir = results.experiment_dir(cfg.results_dir, cfg.name)
    done = set() if cfg.overwrite else results.completed(exp_dir, ids)
    todo = [k for k in range(cfg.ensemble) if ids[k] not in done]
    desc = _describe(cfg, net)
    if not todo:
        log.info("%s: all %d runs already complete, skipped", desc, cfg.ensemble)
        return {"trained": 0, "skipped": cfg.ensemble, "failed": 0}
    seeds = [cfg.seed + k for k in todo]
    # the job is what is trained now: the same config with another set of missing members is another job
    job = results.job_id(dict(semantic, ensemble=cfg.ensemble, members=[ids[k] for k in todo]))
    if old := results.other_version_files(exp_dir, job):
        path, version = old[0]
        raise ConfigError(f"{path} holds this job's results in schema_version {version} (this code writes "
                          f"{results.SCHEMA_VERSION}); rerunning would replace them: move {exp_dir} away "
                          f"or choose another name")
    threads = _threads_for_launcher()
    progress = _Progress(_enum(cfg.progress), tspec.steps, desc)
    rid = np.array([ids[k] for k in todo], dtype=object)
    running_runs, _, _ = _tables(cfg, net, tspec, members, ids, todo, job, None, None, 0.0)
    running_runs["status"] = ["running"] * len(todo)
    session = Session(exp_dir, job, lambda st, la: (results.sorted_table("steps", _rows_of(st, rid, "steps"), job),
                                                   results.sorted_table("layers", _rows_of(la, rid, "layers"), job)),
                      running_runs, cfg.checkpoint.every_steps, cfg.checkpoint.every_minutes)
    if cfg.overwrite:
        session.remove()  # retrain from scratch, not from an old checkpoint
    session.arm()  # under submitit: checkpoint at SLURM's warning signal, then let it requeue
    t0 = time.perf_counter()
    try:
        params = init_params(net, _enum(cfg.model.init), seeds, cfg.model.init_scale, cfg.model.init_bias)
        if threads is not None:
            from threadpoolctl import threadpool_limits

            with threadpool_limits(threads):
                if _enum(cfg.backend) == "torch":
                    import torch

                    torch.set_num_threads(threads)
                out = train(task, net, tspec, params, _enum(cfg.backend), seeds, on_log=progress, session=session)
        else:
            out = train(task, net, tspec, params, _enum(cfg.backend), seeds, on_log=progress, session=session)
        error = None
        if session.resumed_from is not None:
            log.info("%s: resumed from the checkpoint at step %d", desc, session.resumed_from)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # a failed run is recorded with its error and the sweep goes on
        out, error = None, f"{type(e).__name__}: {e}"
        log.error("%s failed: %s\n%s", desc, error, traceback.format_exc())
    finally:
        progress.close()
        session.disarm()
    runs, steps, layers = _tables(cfg, net, tspec, members, ids, todo, job, out, error,
                                  time.perf_counter() - t0 + session.elapsed)
    parts = None
    try:
        if out is not None and session.parts:  # rows streamed out: the rest becomes the last part
            session.write_rows(out.steps, out.layers)
            parts = {t: session.part_files(t) for t in ("steps", "layers")}
        results.write_job(exp_dir, job, runs, steps, layers, parts=parts)
    except OSError as e:  # write_job leaves no partial file and the job uncommitted: a rerun redoes it
        raise ResultsWriteError(e.errno, f"could not write results to {exp_dir}: "
                                f"{e.strerror or e}") from e
    session.remove()  # committed (or failed, to be retried from scratch): the checkpoint is spent
    status = runs["status"]
    counts = {"trained": sum(s != "failed" for s in status), "skipped": cfg.ensemble - len(todo),
              "failed": sum(s == "failed" for s in status)}
    log.info("%s: %d runs trained (%d diverged), %d skipped, %d failed in %.1fs -> %s", desc,
             counts["trained"], sum(s == "diverged" for s in status), counts["skipped"], counts["failed"],
             time.perf_counter() - t0, exp_dir)
    return counts


def _tables(cfg, net, tspec, members, ids, todo, job, out, error, wall):
    """The three tables' columns for the members trained in this job."""
    import json

    E = len(todo)
    m, t = cfg.model, cfg.train
    final = out.final if out is not None else {}

    def per_member(key):
        v = final.get(key)
        return [None] * E if v is None else [None if not np.isfinite(x) else float(x) for x in v]

    runs = {
        "run_id": [ids[k] for k in todo], "name": [cfg.name] * E, "experiment": [_hydra_choice("experiment")] * E,
        "backend": [_enum(cfg.backend)] * E, "task": [cfg.task.name] * E,
        "activation": [net.activation] * E, "depth": [net.depth] * E, "width": [net.widths[0]] * E,
        "widths": [json.dumps(list(net.widths))] * E, "residual": [net.residual] * E, "norm": [net.norm] * E,
        "init": [_enum(m.init)] * E, "init_scale": [m.init_scale] * E, "init_bias": [m.init_bias] * E,
        "lr": [t.lr] * E, "momentum": [t.momentum] * E, "weight_decay": [t.weight_decay] * E,
        "batch_size": [t.batch_size] * E, "loss": [tspec.loss] * E, "steps": [t.steps] * E,
        "log_every": [cfg.log.every] * E, "seed": [cfg.seed + k for k in todo], "member": todo,
        "ensemble": [cfg.ensemble] * E, "dtype": [tspec.dtype] * E, "device": [tspec.device] * E,
        "status": out.status if out is not None else ["failed"] * E,
        "diverged_step": [None] * E if out is None else [int(s) if s >= 0 else None for s in out.diverged_step],
        "error": [error] * E,
        "final_loss": [float("nan") if v is None else v for v in per_member("loss")],
        "final_accuracy": per_member("accuracy"), "final_test_loss": per_member("test_loss"),
        "final_test_accuracy": per_member("test_accuracy"),
        "solved_step": [None] * E if out is None else [int(s) if s >= 0 else None for s in out.solved_step],
        "wall_time_s": [wall / E] * E,
        "config_json": [json.dumps(members[k], sort_keys=True) for k in todo],
        "params_json": _params_json(out, E), "git_commit": [git_commit()] * E,
    }
    if out is None:
        return runs, _empty("steps"), _empty("layers")
    rid = np.array([ids[k] for k in todo], dtype=object)
    steps = {"run_id": rid[out.steps["member"]], **{k: v for k, v in out.steps.items() if k != "member"}}
    for k in ("accuracy", "test_loss", "test_accuracy"):
        steps.setdefault(k, np.full(len(steps["run_id"]), np.nan))
    layers = {"run_id": rid[out.layers["member"]], **{k: v for k, v in out.layers.items() if k != "member"}}
    return runs, steps, layers


def _rows_of(cols: dict, rid: np.ndarray, table: str) -> dict:
    """Recorder columns (member index) -> table columns (run_id)."""
    if not cols or not len(cols.get("member", ())):
        return _empty(table)
    return {"run_id": rid[cols["member"].astype(np.intp)], **{k: v for k, v in cols.items() if k != "member"}}


SMALL_NET = 1000  # final parameters of nets up to this size are kept in runs.params_json (Hinton diagrams)


def _params_json(out, E: int) -> list[str | None]:
    import json

    if out is None or sum(v[0].size for v in out.params.values()) > SMALL_NET:
        return [None] * E
    return [json.dumps({k: v[i].tolist() for k, v in out.params.items()}) for i in range(E)]


def _empty(table: str) -> dict[str, list]:
    return {n: [] for n in results.SCHEMAS[table].names if n != "job_id"}


class SweepSummary(Callback):
    """Hydra callback: a sweep-level line after each job and at the end (runs done / skipped / failed)."""

    def __init__(self) -> None:
        self.totals = {"trained": 0, "skipped": 0, "failed": 0}
        self.jobs = 0

    # Hydra turns an Exception raised by a callback into a warning and goes on, so a refusal here
    # prints its line and raises SystemExit, which Hydra lets through.
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # before Hydra makes the run's log folder: a refused config leaves no folder at all
        task_cfg = config.copy()
        with open_dict(task_cfg):
            del task_cfg["hydra"]
        _refuse_on(preflight, task_cfg)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # the sweep's folder is under results_dir/name: refuse name=../x before it exists
        _refuse_on(check_name, config.name)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        self.jobs += 1
        ret = getattr(job_return, "_return_value", None)
        if isinstance(ret, dict):
            for k in self.totals:
                self.totals[k] += ret.get(k, 0)
        elif getattr(job_return, "status", None) is not None and job_return.status.name == "FAILED":
            self.totals["failed"] += config.get("ensemble", 1)
        log.info("[sweep] %d jobs finished: %d runs trained, %d skipped, %d failed",
                 self.jobs, self.totals["trained"], self.totals["skipped"], self.totals["failed"])

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        exp_dir = results.experiment_dir(config.results_dir, config.name)
        log.info("[sweep] done: %d complete runs in %s", results.count_completed(exp_dir), exp_dir)
        if config.get("report"):
            _report(exp_dir)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("report"):
            _report(results.experiment_dir(config.results_dir, config.name))


def _refuse_on(check, *args) -> None:
    try:
        check(*args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1 if isinstance(e, NotADirectoryConfigError) else 2)


def _report(exp_dir: Path) -> None:
    from analysis.report import make_report

    out = make_report(exp_dir)
    log.info("[report] %s", out)


register()


def task_function(cfg: DictConfig) -> dict[str, int]:
    """What Hydra runs for each job. Module-level, so launchers that pickle it (joblib, submitit)
    pickle a reference to `bench.run.task_function`."""
    # SystemExit passes through Hydra untouched: one line, no "Error executing job" block
    try:
        return run(cfg)
    except ConfigError as e:
        _discard_job_dir(cfg)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ResultsWriteError as e:
        print(f"error: {e.strerror}", file=sys.stderr)
        sys.exit(1)


def _discard_job_dir(cfg: DictConfig) -> None:
    """Remove the folder Hydra made for a refused job (its config and log, no results), and the
    then-empty folders above it up to results_dir, so bad input leaves the tree as it found it."""
    try:
        from hydra.core.hydra_config import HydraConfig

        out = Path(HydraConfig.get().runtime.output_dir).resolve()
    except (ValueError, ImportError):  # not under Hydra: nothing was made
        return
    root = Path(cfg.results_dir).resolve()
    if root not in out.parents or ".hydra" not in out.relative_to(root).parts:
        return  # hydra.run.dir pointed elsewhere: not ours to remove
    shutil.rmtree(out, ignore_errors=True)  # the open log file goes with it (POSIX unlinks open files)
    for p in out.parents:
        if p == root:
            break
        try:
            if [c.name for c in p.iterdir()] == ["multirun.yaml"]:  # a sweep folder of refused jobs only
                (p / "multirun.yaml").unlink()
            p.rmdir()  # only if empty
        except OSError:
            break


def _hydra_main() -> None:
    import hydra

    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(task_function)()


def _schemas_by_name() -> dict[str, type]:
    from bench import config as c

    return {k.__name__: k for k in (c.Config, c.ModelConfig, c.TrainConfig, c.LogConfig, c.CheckpointConfig,
                                        *c.TASK_SCHEMAS.values())}


_SCHEMAS_BY_NAME = _schemas_by_name()


def one_line(e: BaseException) -> str:
    """The user-facing line for a config or input error: Hydra's and OmegaConf's are multi-line."""
    import dataclasses
    import difflib

    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    cause = e
    while cause.__cause__ is not None and not isinstance(cause, ConfigError):
        cause = cause.__cause__
    schema = _SCHEMAS_BY_NAME.get(getattr(cause, "object_type_str", None) or "")
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and schema is not None:
        names = [f.name for f in dataclasses.fields(schema)]
        key = cause.full_key or ""
        prefix, _, leaf = key.rpartition(".")
        close = difflib.get_close_matches(leaf, names, n=1)
        hint = f"did you mean {prefix + '.' if prefix else ''}{close[0]}? " if close else ""
        return f"error: unknown key {key}; {hint}valid keys there: {', '.join(names)}"
    if isinstance(cause, OmegaConfBaseException):
        msg = str(cause).splitlines()[0].strip()
        key = getattr(cause, "full_key", None)
        return f"error: {key + ': ' if key and key not in msg else ''}{msg}"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if lines and "Available options" in str(e):  # an unknown group option: list the valid ones
        head = lines[0].replace("In 'config': ", "")
        options = []
        for line in lines[2:]:
            if line.startswith("Config search path"):
                break
            if not line.endswith("_schema"):  # the typed schemas behind the YAML files
                options.append(line)
        return f"error: {head}; valid choices: {', '.join(options)}"
    if isinstance(e, ConfigError) or not lines:
        return f"error: {str(e).strip() or type(e).__name__}"
    return "error: " + "; ".join(lines[:3])


def os_error_line(e: OSError) -> str:
    """One line for an OSError met while writing (Hydra's job folder or our results)."""
    if isinstance(e, ResultsWriteError):
        return f"error: {e.strerror}"
    path = Path(e.filename) if e.filename else None
    if path is not None and e.errno in (errno.ENOTDIR, errno.EEXIST):
        for p in path.parents:  # the first existing ancestor is a file where a folder is needed
            if p.exists():
                if not p.is_dir():
                    return f"error: could not write results to {path}: {p} is a file, not a directory; " \
                           f"choose another results_dir or name"
                break
    where = f" to {path}" if path is not None else ""
    return f"error: could not write{where}: {e.strerror or e}; free space or choose a writable results_dir"


def _multirun_flag_first(argv: list[str]) -> list[str]:
    """`python -m bench.run a=1 -m b=2,3` fails in argparse (overrides after a flag): move -m first."""
    flags = [a for a in argv[1:] if a in ("-m", "--multirun")]
    return argv[:1] + flags + [a for a in argv[1:] if a not in ("-m", "--multirun")] if flags else argv


def _check_names(argv: list[str]) -> None:
    """Refuse `name=../x` (or a sweep over names with one such) before Hydra composes anything: its
    log folder is results_dir/name/.hydra/..., which Hydra would make outside results_dir first."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in argv[1:] if not a.startswith("-") and "=" in a and a.lstrip("+~").startswith("name=")]
    if not args:
        return
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except Exception:  # noqa: BLE001 - a malformed override: Hydra itself reports it in one line later
        return
    for o in overrides:
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        for v in values:
            check_name(v)


def main() -> None:
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us, to print one line instead of Hydra's block
    sys.argv = _multirun_flag_first(sys.argv)
    try:
        _check_names(sys.argv)
        _hydra_main()
    except KeyboardInterrupt:
        print("interrupted: finished runs are saved; run the same command again to resume "
              "(complete runs are skipped)", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # bad input: one line, non-zero exit; results on disk are untouched
        from hydra.errors import HydraException

        if isinstance(e, OSError) and not isinstance(e, HydraException):  # Hydra's missing config is an IOError
            print(os_error_line(e), file=sys.stderr)  # a failing write (disk full, a file in the way)
            sys.exit(1)
        print(one_line(e), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    # run the imported module's main, not this __main__ copy: job functions must pickle as bench.run.*
    from bench.run import main as _main

    _main()
