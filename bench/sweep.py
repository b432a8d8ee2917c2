"""The Hydra callback (conf/config.yaml, hydra.callbacks): refusals before a job starts, a summary
line after each job and at the end of a sweep, and the report when `report=true`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict

from bench.cli import refuse_on
from bench.config import check_name
from bench.guard import preflight

log = logging.getLogger("bench")


class SweepSummary(Callback):
    """A sweep-level line after each job and at the end (runs done / skipped / failed)."""

    def __init__(self) -> None:
        self.totals = {"trained": 0, "skipped": 0, "failed": 0}
        self.jobs = 0

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # before Hydra makes the run's log folder: a refused config leaves no folder at all
        task_cfg = config.copy()
        with open_dict(task_cfg):
            del task_cfg["hydra"]
        refuse_on(preflight, task_cfg)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # the sweep's folder is under results_dir/name: refuse name=../x before it exists
        refuse_on(check_name, config.name)

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
        from bench import results  # here, not at the top: a refused config never loads pyarrow

        exp_dir = results.experiment_dir(config.results_dir, config.name)
        log.info("[sweep] done: %d complete runs in %s", results.count_completed(exp_dir), exp_dir)
        if config.get("report"):
            _report(exp_dir)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        from bench import results

        if config.get("report"):
            _report(results.experiment_dir(config.results_dir, config.name))


def _report(exp_dir: Path) -> None:
    from analysis.report import make_report

    out = make_report(exp_dir)
    log.info("[report] %s", out)
