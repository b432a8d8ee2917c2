"""Refuse a job before it starts when it cannot fit: memory and disk, from the config alone.

`preflight(cfg)` validates the config, then compares the job's estimated peak memory and the bytes
of rows it will write (bench.config's estimates: arithmetic, no loop over members or steps, so even
ensemble=10^8 or 10^12 steps is refused at once) with what the machine has, and raises ConfigError
naming the key that fixes it. It runs from the Hydra callback before Hydra makes a job's log folder
(bench.sweep), and again in run(cfg).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from omegaconf import DictConfig

from bench.config import ConfigError, estimate_bytes, estimate_disk_bytes, rows_per_logged_step, validate
from bench.spec import CHUNK_ROWS

MEMORY_FRACTION = 0.7  # without max_memory_gb, a job may use this share of the memory available now


def available_memory_bytes() -> float:
    """What the OS says is available now (MemAvailable), or inf where it does not say."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return math.inf


def memory_limit_bytes(cfg: DictConfig) -> float:
    if cfg.max_memory_gb is not None:
        return cfg.max_memory_gb * 2**30
    return MEMORY_FRACTION * available_memory_bytes()


def free_disk_bytes(path: Path) -> float:
    for p in (path, *path.parents):  # the first folder that exists holds the filesystem to ask
        if p.exists():
            return shutil.disk_usage(p).free
    return math.inf


def size(n: float) -> str:
    """Bytes for a person: '3.2 GiB', '512 KiB', '80 B'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.{1 if n >= 10 * scale else 2}f} {unit}"
    return f"{n:.0f} B"


def preflight(cfg: DictConfig):
    """validate(cfg), then refuse a job that cannot fit in memory or on disk; returns (task, net, tspec)."""
    task, net, tspec = validate(cfg)
    E = cfg.ensemble
    # rows stream out in parts of about CHUNK_ROWS (bench.checkpoint): memory holds one part at most
    in_memory = CHUNK_ROWS // (rows_per_logged_step(net) * E) + 1
    need = estimate_bytes(net, tspec, task, E, logged_in_memory=in_memory)
    limit = memory_limit_bytes(cfg)
    if need > limit:
        raise ConfigError(f"ensemble={E} x model widths {list(net.widths)} needs about {size(need)}, "
                          f"over the {size(limit)} limit "
                          f"({'max_memory_gb' if cfg.max_memory_gb is not None else '70% of available memory'}): "
                          f"lower ensemble, width or train.batch_size, or raise max_memory_gb")
    disk = estimate_disk_bytes(net, tspec, E)
    free = free_disk_bytes(Path(cfg.results_dir))
    if disk > free:
        raise ConfigError(f"train.steps={tspec.steps} with log.every={tspec.log_every} x ensemble={E} writes "
                          f"about {size(disk)} of rows, more than the {size(free)} free under {cfg.results_dir}: "
                          f"raise log.every, lower train.steps or ensemble, or choose another results_dir")
    return task, net, tspec
