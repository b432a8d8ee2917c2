"""`python -m bench.run`: train one config (or a `-m` sweep of them) and write its parquet results.

`run(cfg)` is a plain function (tests call it with a composed config) that does one job: refuse what
cannot fit (bench.guard), skip members whose run already has complete results (unless
`overwrite=true`), train the rest as one ensemble, and write one row per run to the tables of
bench.results. `main()` only wraps it in Hydra; what a user sees when something is wrong is
bench.cli's, and the sweep-level callback is bench.sweep's. Each ensemble member is a run with its
own run_id (see `bench.results`), so rerunning a sweep finishes only what is missing.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
import traceback
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from bench import cli
from bench.config import CONF_DIR, ConfigError, _enum, register
from bench.guard import preflight
from bench.init import init_params
from bench.spec import NORMS

# bench.results (pyarrow), bench.checkpoint and bench.train are imported where a job runs: a config
# refused up front (bench.guard, from the Hydra callback) then costs the interpreter, Hydra and numpy only

log = logging.getLogger("bench")
NON_SEMANTIC = ("report", "max_memory_gb", "checkpoint")  # beyond results.SEMANTIC_EXCLUDE: launch-time settings
FILLED_ON_WRITE = ("job_id", "schema_version", "created_at")  # runs columns bench.results fills in
SMALL_NET = 1000  # final parameters of nets up to this size are kept in runs.params_json (Hinton diagrams)


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


def _describe(cfg: DictConfig, net) -> str:
    res = ("res" if net.residual_scale == "one" else f"res({net.residual_scale})") if net.residual else ""
    arch = "+".join(x for x in (_enum(cfg.model.activation), res, NORMS[net.norm].label) if x)
    return f"{cfg.task.name} {arch} depth {net.depth} {_enum(cfg.backend)} seed {cfg.seed}"


def train(*args, **kwargs):
    """bench.train.train, imported on first use (see the imports above)."""
    from bench.train import train as _train

    return _train(*args, **kwargs)


def run(cfg: DictConfig) -> dict[str, int]:
    """Train the config's ensemble and write its results; returns counts of trained/skipped/failed runs."""
    from bench import results
    from bench.checkpoint import Session

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
    progress = cli.Progress(_enum(cfg.progress), tspec.steps, desc)
    rid = np.array([ids[k] for k in todo], dtype=object)
    running_runs, _, _ = _tables(cfg, net, tspec, members, ids, todo, None, None, 0.0)
    running_runs["status"] = ["running"] * len(todo)
    stats_dtype = _enum(cfg.log.stats_dtype)
    session = Session(exp_dir, job, lambda st, la: (results.sorted_table("steps", _rows_of(st, rid, "steps"), job),
                                                   results.sorted_table("layers", _rows_of(la, rid, "layers"), job,
                                                                        stats_dtype)),
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
        if session.handed_over:  # submitit would not requeue it: the job fails, its checkpoint stays
            raise
        out, error = None, f"{type(e).__name__}: {e}"
        log.error("%s failed: %s\n%s", desc, error, traceback.format_exc())
    finally:
        progress.close()
        session.disarm()
    runs, steps, layers = _tables(cfg, net, tspec, members, ids, todo, out, error,
                                  time.perf_counter() - t0 + session.elapsed)
    parts = None
    try:
        if out is not None and session.parts:  # rows streamed out: the rest becomes the last part
            session.write_rows(out.steps, out.layers)
            parts = {t: session.part_files(t) for t in ("steps", "layers")}
        results.write_job(exp_dir, job, runs, steps, layers, parts=parts, stats_dtype=stats_dtype)
    except OSError as e:  # write_job leaves no partial file and the job uncommitted: a rerun redoes it
        raise cli.ResultsWriteError(e.errno, f"could not write results to {exp_dir}: "
                                    f"{e.strerror or e}") from e
    session.remove()  # committed (or failed, to be retried from scratch): the checkpoint is spent
    status = runs["status"]
    counts = {"trained": sum(s != "failed" for s in status), "skipped": cfg.ensemble - len(todo),
              "failed": sum(s == "failed" for s in status)}
    log.info("%s: %d runs trained (%d diverged), %d skipped, %d failed in %.1fs -> %s", desc,
             counts["trained"], sum(s == "diverged" for s in status), counts["skipped"], counts["failed"],
             time.perf_counter() - t0, exp_dir)
    return counts


def _tables(cfg, net, tspec, members, ids, todo, out, error, wall):
    """The three tables' columns for the members trained in this job. The runs columns are the
    results schema's, in its order: a column added there and not given a value here fails loudly."""
    from bench import results

    E = len(todo)
    m, t = cfg.model, cfg.train
    final = out.final if out is not None else {}

    def per_member(key):
        v = final.get(key)
        return [None] * E if v is None else [None if not np.isfinite(x) else float(x) for x in v]

    def steps_or_none(a):  # -1 marks "never" in TrainOutput
        return [None] * E if out is None else [int(s) if s >= 0 else None for s in a]

    shared = {  # the same for every member of the job
        "name": cfg.name, "experiment": _hydra_choice("experiment"), "method": cfg.method_name,
        "backend": _enum(cfg.backend),
        "task": cfg.task.name, "activation": net.activation, "depth": net.depth, "width": net.widths[0],
        "widths": json.dumps(list(net.widths)), "residual": net.residual,
        "residual_scale": net.residual_scale, "norm": net.norm,
        "init": _enum(m.init), "init_scale": m.init_scale, "init_bias": m.init_bias, "lr": t.lr,
        "optimizer": tspec.optimizer, "momentum": t.momentum, "weight_decay": t.weight_decay,
        "batch_size": t.batch_size, "loss": tspec.loss,
        "steps": t.steps, "log_every": cfg.log.every, "ensemble": cfg.ensemble, "dtype": tspec.dtype,
        "device": tspec.device, "error": error, "wall_time_s": wall / E, "git_commit": git_commit(),
    }
    per_run = {  # one value per member
        "run_id": [ids[k] for k in todo], "seed": [cfg.seed + k for k in todo], "member": todo,
        "status": out.status if out is not None else ["failed"] * E,
        "diverged_step": steps_or_none(out.diverged_step if out is not None else None),
        "final_loss": [float("nan") if v is None else v for v in per_member("loss")],
        "final_accuracy": per_member("accuracy"), "final_test_loss": per_member("test_loss"),
        "final_test_accuracy": per_member("test_accuracy"),
        "solved_step": steps_or_none(out.solved_step if out is not None else None),
        "config_json": [json.dumps(members[k], sort_keys=True) for k in todo], "params_json": _params_json(out, E),
    }
    runs = {n: per_run[n] if n in per_run else [shared[n]] * E
            for n in results.SCHEMAS["runs"].names if n not in FILLED_ON_WRITE}
    if out is None:
        return runs, _empty("steps"), _empty("layers")
    rid = np.array([ids[k] for k in todo], dtype=object)
    steps = _rows_of(out.steps, rid, "steps")
    for k in ("accuracy", "test_loss", "test_accuracy"):
        steps.setdefault(k, np.full(len(steps["run_id"]), np.nan))
    return runs, steps, _rows_of(out.layers, rid, "layers")


def _rows_of(cols: dict, rid: np.ndarray, table: str) -> dict:
    """Recorder columns (member index) -> table columns (run_id)."""
    if not cols or not len(cols.get("member", ())):
        return _empty(table)
    return {"run_id": rid[cols["member"].astype(np.intp)], **{k: v for k, v in cols.items() if k != "member"}}


def _params_json(out, E: int) -> list[str | None]:
    if out is None or sum(v[0].size for v in out.params.values()) > SMALL_NET:
        return [None] * E
    return [json.dumps({k: v[i].tolist() for k, v in out.params.items()}) for i in range(E)]


def _empty(table: str) -> dict[str, list]:
    from bench import results

    return {n: [] for n in results.SCHEMAS[table].names if n != "job_id"}


def task_function(cfg: DictConfig) -> dict[str, int]:
    """What Hydra runs for each job. Module-level, so launchers that pickle it (joblib, submitit)
    pickle a reference to `bench.run.task_function`."""
    return cli.job_or_exit(run, cfg)


def _hydra_main() -> None:
    import hydra

    register()  # the typed schema, before Hydra composes anything
    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(task_function)()


def main() -> None:
    cli.main(_hydra_main)


if __name__ == "__main__":
    # run the imported module's main, not this __main__ copy: job functions must pickle as bench.run.*
    from bench.run import main as _main

    _main()
