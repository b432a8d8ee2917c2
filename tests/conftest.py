"""Shared fixtures: compose the real Hydra config (as `python -m bench.run` would), shrunk for tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")


def compose_cfg(overrides=(), results_dir=None):
    """The composed job config for `overrides`, as @hydra.main would build it (no sweep syntax)."""
    from bench.config import register

    register()  # the typed schema in Hydra's ConfigStore, as `python -m bench.run` does first

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        extra = [f"results_dir={results_dir}"] if results_dir is not None else []
        return compose(config_name="config", overrides=[*overrides, *extra, "progress=none"])


@pytest.fixture
def cfg_factory(tmp_path):
    def make(*overrides):
        return compose_cfg(overrides, results_dir=tmp_path / "results")

    return make


def run_cli(*args, cwd=None, env=None, timeout=300):
    """Run `python -m bench.run ARGS` in a subprocess, as a user would; returns CompletedProcess."""
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "bench.run", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
