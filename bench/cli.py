"""What a user sees of `python -m bench.run` besides results: one line per error, and progress.

Every bad input ends in one line on stderr and a non-zero exit: 2 for a bad config (nothing is
written, and Hydra's log folder for the refused job is removed), 1 when results cannot be written
(disk full, read-only, not a directory), 130 on Ctrl-C (finished jobs are kept; rerun to resume).
Hydra's and OmegaConf's own errors are several lines; `one_line` keeps the one that matters.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from bench.config import SCHEMAS, ConfigError, NotADirectoryConfigError, check_name, unknown_key_message

log = logging.getLogger("bench")
_SCHEMAS_BY_NAME = {schema.__name__: schema for schema in SCHEMAS}


class ResultsWriteError(OSError):
    """Results could not be written (disk full, read-only, not a directory): one line for the user."""


class Progress:
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


def one_line(e: BaseException) -> str:
    """The user-facing line for a config or input error: Hydra's and OmegaConf's are multi-line."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    cause = e
    while cause.__cause__ is not None and not isinstance(cause, ConfigError):
        cause = cause.__cause__
    schema = _SCHEMAS_BY_NAME.get(getattr(cause, "object_type_str", None) or "")
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and schema is not None:
        return "error: " + unknown_key_message(cause.full_key or "", [f.name for f in dataclasses.fields(schema)])
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


def refuse_on(check, *args) -> None:
    """Run a check; a ConfigError becomes its line and an exit (1 where results_dir is a file, else 2).
    SystemExit, not an exception: Hydra turns a callback's exception into a warning and goes on."""
    try:
        check(*args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1 if isinstance(e, NotADirectoryConfigError) else 2)


def job_or_exit(run, cfg: DictConfig):
    """run(cfg) inside a Hydra job; a refused config or a failed write becomes one line and an exit.
    SystemExit passes through Hydra untouched: one line, no "Error executing job" block."""
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


def main(hydra_main) -> None:
    """Run `hydra_main()` as the command line: every bad input ends in one line and an exit code."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us, to print one line instead of Hydra's block
    sys.argv = _multirun_flag_first(sys.argv)
    try:
        _check_names(sys.argv)
        hydra_main()
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
