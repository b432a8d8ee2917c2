"""Refuse a job before it starts when it cannot fit in memory, from the config alone.

`preflight(cfg)` validates the config, then compares the job's estimated peak memory
(bench.config.estimate_bytes) with what the machine has, and raises ConfigError naming the key that
fixes it, before anything is initialised or written.
"""

from __future__ import annotations

import math

from omegaconf import DictConfig

from bench.config import ConfigError, estimate_bytes, validate

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


def size(n: float) -> str:
    """Bytes for a person: '3.2 GiB', '512 KiB', '80 B'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.{1 if n >= 10 * scale else 2}f} {unit}"
    return f"{n:.0f} B"


def preflight(cfg: DictConfig):
    """validate(cfg), then refuse a job that cannot fit in memory; returns (task, net, tspec)."""
    task, net, tspec = validate(cfg)
    E = cfg.ensemble
    need = estimate_bytes(net, tspec, task, E)
    limit = memory_limit_bytes(cfg)
    if need > limit:
        raise ConfigError(f"ensemble={E} x model widths {list(net.widths)} needs about {size(need)}, "
                          f"over the {size(limit)} limit "
                          f"({'max_memory_gb' if cfg.max_memory_gb is not None else '70% of available memory'}): "
                          f"lower ensemble, width or train.batch_size, or raise max_memory_gb")
    return task, net, tspec
