"""The Hydra harness: presets compose, bad input is one line, sweeps resume, launchers agree."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import compose_cfg, run_cli

from bench import results
from bench.config import ConfigError, validate
from bench.run import run

PRESETS = sorted(Path(p).stem for p in glob.glob(str(Path(__file__).parents[1] / "conf/experiment/*.yaml")))
CONTRACT_RUNS = ["run_id", "name", "backend", "task", "activation", "depth", "width", "residual", "norm", "init",
                 "lr", "momentum", "batch_size", "loss", "steps", "seed", "dtype", "device", "status",
                 "final_loss", "wall_time_s"]
CONTRACT_LAYERS = ["run_id", "step", "layer", "param", "grad_norm", "delta_norm", "act_mean", "act_std",
                   "act_saturation"]
TINY = ["train.steps=20", "log.every=5"]


def test_presets_are_all_there():
    assert set(PRESETS) >= {"quickstart", "seed_xor", "rumelhart_xor", "rumelhart_parity", "rumelhart_encoder",
                            "rumelhart_symmetry", "rumelhart_family_trees", "depth_sweep", "nielsen_ch5",
                            "meanfield"}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_validates(preset, tmp_path):
    cfg = compose_cfg([f"experiment={preset}"], results_dir=tmp_path)
    assert cfg.name == preset  # each preset writes under its own name
    task, net, tspec = validate(cfg)
    assert tspec.steps >= 1 and net.depth >= 1


def test_preset_sweep_grid_every_point_validates(tmp_path):
    # every combination a preset's sweep produces must be a valid config (checked on one per axis value)
    from omegaconf import OmegaConf

    for preset in PRESETS:
        base = compose_cfg([f"experiment={preset}"], results_dir=tmp_path)
        cfg = OmegaConf.load(Path(__file__).parents[1] / f"conf/experiment/{preset}.yaml")
        params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
        for key, values in params.items():
            for value in str(values).split(","):
                c = compose_cfg([f"experiment={preset}", f"{key}={value}"], results_dir=tmp_path)
                validate(c)
        assert base is not None


def _layers(path):
    return pd.read_parquet(Path(path) / "layers")


def test_run_writes_contract_tables(cfg_factory, tmp_path):
    cfg = cfg_factory("ensemble=3", *TINY, "name=t")
    counts = run(cfg)
    assert counts == {"trained": 3, "skipped": 0, "failed": 0}
    exp = tmp_path / "results" / "t"
    res = results.load(exp)
    # the runs table has the schema's columns in the schema's order, and the contract columns appear in
    # the contract's order (other columns may sit between them, e.g. job_id after run_id)
    assert list(res.runs.columns) == list(results.RUNS_SCHEMA.names)
    assert [c for c in res.runs.columns if c in CONTRACT_RUNS] == CONTRACT_RUNS
    for col in CONTRACT_RUNS:
        assert col in res.runs.columns, col
    for col in CONTRACT_LAYERS:
        assert col in res.layers.columns, col
    # load() sorts runs by run_id (a hash, so not by seed: when written, seeds 0, 1, 2 loaded as 1, 2, 0); each
    # run appears once, and member k of the ensemble is the run with seed cfg.seed + k
    run_ids = res.runs["run_id"].tolist()
    assert run_ids == sorted(run_ids) and len(set(run_ids)) == len(run_ids)
    assert (res.runs["seed"] == cfg.seed + res.runs["member"]).all()
    assert res.steps[["run_id", "step"]].equals(res.steps[["run_id", "step"]].sort_values(["run_id", "step"]))
    assert sorted(res.runs["seed"]) == [0, 1, 2]
    assert set(res.runs["status"]) == {"ok"}
    assert res.runs["depth"].dtype == np.int64 and res.runs["residual"].dtype == bool
    assert res.runs["backend"].dtype == "str" and res.layers["param"].dtype == "str"
    # steps 0, 5, 10, 15, 20 for each of 3 runs; 2 layers x (weight, bias) rows per logged step
    assert len(res.steps) == 3 * 5 and len(res.layers) == 3 * 5 * 4
    direct = _layers(exp)
    assert len(direct) == len(res.layers)  # pd.read_parquet on the folder works as is
    assert set(direct["layer"]) == {1, 2}
    for rid, grp in res.steps.groupby("run_id"):
        assert grp["step"].tolist() == [0, 5, 10, 15, 20], rid


def test_rerun_trains_nothing_and_overwrite_redoes(cfg_factory, tmp_path):
    cfg = cfg_factory("ensemble=2", *TINY, "name=r")
    assert run(cfg)["trained"] == 2
    before = {p: p.read_bytes() for p in (tmp_path / "results/r").rglob("*.parquet")}
    assert run(cfg) == {"trained": 0, "skipped": 2, "failed": 0}
    after = {p: p.read_bytes() for p in (tmp_path / "results/r").rglob("*.parquet")}
    assert before == after
    assert run(cfg_factory("ensemble=2", *TINY, "name=r", "overwrite=true"))["trained"] == 2
    # a bigger ensemble trains only the new members
    assert run(cfg_factory("ensemble=3", *TINY, "name=r")) == {"trained": 1, "skipped": 2, "failed": 0}
    assert len(results.load(tmp_path / "results/r").runs) == 3


def test_run_id_ignores_where_and_how_it_was_launched(cfg_factory, tmp_path):
    run(cfg_factory(*TINY, "name=a"))
    run(compose_cfg([*TINY, "name=b", "progress=log"], results_dir=tmp_path / "elsewhere"))
    a = results.load(tmp_path / "results/a").runs["run_id"]
    b = results.load(tmp_path / "elsewhere/b").runs["run_id"]
    assert a.tolist() == b.tolist()
    run(cfg_factory(*TINY, "name=a", "train.lr=0.2"))
    assert len(results.load(tmp_path / "results/a").runs) == 2  # a semantic change is a new run


def test_failed_run_is_recorded_and_retried(cfg_factory, tmp_path, monkeypatch):
    import bench.run as br

    def boom(*a, **k):
        raise RuntimeError("simulated failure inside training")

    monkeypatch.setattr(br, "train", boom)
    counts = run(cfg_factory(*TINY, "name=f", "ensemble=2"))
    assert counts == {"trained": 0, "skipped": 0, "failed": 2}
    runs = results.load(tmp_path / "results/f").runs
    assert set(runs["status"]) == {"failed"}
    assert runs["error"].str.contains("simulated failure").all()
    monkeypatch.undo()
    assert run(cfg_factory(*TINY, "name=f", "ensemble=2"))["trained"] == 2  # failed runs are retried
    assert set(results.load(tmp_path / "results/f").runs["status"]) == {"ok"}


BAD = [
    (["model.depth=0"], "model.depth=0"),
    (["model.width=0"], "model.width=0"),
    (["train.lr=0"], "train.lr=0"),
    (["train.lr=-1"], "train.lr=-1"),
    (["train.lr=nan"], "train.lr=nan"),
    (["train.lr=inf"], "train.lr=inf"),
    (["train.momentum=1.0"], "train.momentum=1.0"),
    (["train.momentum=-0.1"], "train.momentum=-0.1"),
    (["train.batch_size=0"], "train.batch_size=0"),
    (["train.batch_size=5"], "train.batch_size=5"),  # xor has 4 cases
    (["train.steps=0"], "train.steps=0"),
    (["ensemble=0"], "ensemble=0"),
    (["log.every=0"], "log.every=0"),
    (["model.first_layer_blocks=[2,2]"], "model.first_layer_blocks"),
    (["task=family_trees", "model.width=12", "model.first_layer_blocks=[6,5]"], "must sum to"),
    (["train.loss=cross_entropy"], "train.loss=cross_entropy"),
    (["train.device=cuda"], "train.device=cuda"),
    (["model.norm=batchnorm", "train.batch_size=1"], "batchnorm"),
]


@pytest.mark.parametrize("overrides,needle", BAD)
def test_validation_messages(overrides, needle, tmp_path):
    cfg = compose_cfg(overrides, results_dir=tmp_path)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


CLI_BAD = [
    (["model.activaton=relu"], "model.activaton"),  # typo in a key
    (["model.activation=swish"], "sigmoid, tanh, relu"),  # unknown choice names the valid ones
    (["model.depth=two"], "model.depth"),  # wrong type
    (["task=mnist"], "mnist"),  # unknown task group option
    (["experiment=nope"], "nope"),
    (["model.init=glorot"], "xavier"),
    (["model.depth=0"], "model.depth=0: must be >= 1"),
]


@pytest.mark.parametrize("args,needle", CLI_BAD)
def test_cli_bad_input_is_one_line(args, needle, tmp_path):
    proc = run_cli(*args, f"results_dir={tmp_path}")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_multirun_basic_and_joblib_write_the_same_rows(tmp_path):
    sweep = ["-m", "train.steps=10", "log.every=5", "model.activation=sigmoid,relu", "backend=numpy,torch",
             "progress=none"]
    a = run_cli(*sweep, f"results_dir={tmp_path}/basic", "name=s")
    assert a.returncode == 0, a.stderr
    b = run_cli(*sweep, f"results_dir={tmp_path}/joblib", "name=s", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert b.returncode == 0, b.stderr
    ra, rb = results.load(tmp_path / "basic/s"), results.load(tmp_path / "joblib/s")
    assert len(ra.runs) == 4 and ra.runs["run_id"].tolist() == rb.runs["run_id"].tolist()
    for table in ("steps", "layers"):
        x, y = getattr(ra, table), getattr(rb, table)
        cols = [c for c in x.columns if c != "job_id"]
        pd.testing.assert_frame_equal(x[cols], y[cols])
    assert "[sweep]" in a.stderr + a.stdout


def test_submitit_local_launcher_runs(tmp_path):
    proc = run_cli("-m", "train.steps=10", "log.every=5", "seed=0,1", f"results_dir={tmp_path}", "name=sub",
                   "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "progress=none")
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = results.load(tmp_path / "sub").runs
    assert sorted(runs["seed"]) == [0, 1] and set(runs["status"]) == {"ok"}


def test_interrupted_sweep_finishes_only_the_rest(tmp_path, monkeypatch):
    import bench.run as br

    overrides = [*TINY, "name=i"]
    # the first two jobs of a four-job sweep finished before the interruption
    for seed in (0, 1):
        run(compose_cfg([*overrides, f"seed={seed}"], results_dir=tmp_path))
    trained = []
    real_train = br.train

    def spy(task, net, tspec, params, backend, seeds, **kw):
        trained.extend(seeds)
        return real_train(task, net, tspec, params, backend, seeds, **kw)

    monkeypatch.setattr(br, "train", spy)
    for seed in (0, 1, 2, 3):  # the rerun of the whole sweep
        run(compose_cfg([*overrides, f"seed={seed}"], results_dir=tmp_path))
    assert trained == [2, 3]
    assert sorted(results.load(tmp_path / "i").runs["seed"]) == [0, 1, 2, 3]


# --- presets' grids and packaging --------------------------------------------------------------

def test_meanfield_grid_includes_he_init(tmp_path):
    # the grid is in sigma_w, so He (sigma_w^2 = 2, the relu critical point) is only there if someone
    # writes sqrt(2) out; read the sweep as Hydra would, compose each value and ask theory for sw2
    from omegaconf import OmegaConf

    from bench import theory

    preset = OmegaConf.load(Path(__file__).parents[1] / "conf/experiment/meanfield.yaml")
    values = str(OmegaConf.select(preset, "hydra.sweeper.params")["model.init_scale"]).split(",")
    sw2s = []
    for value in values:
        cfg = compose_cfg(["experiment=meanfield", f"model.init_scale={value}"], results_dir=tmp_path)
        _, net, _ = validate(cfg)
        assert cfg.model.init == "meanfield"  # a str in the typed schema (a plug-in may be pkg.module:fn)
        sw2, _ = theory.init_variances("meanfield", net.widths[0], scale=cfg.model.init_scale)
        sw2s.append(sw2)
    # 1e-12: sqrt(2) written to 17 significant digits squares to 2 within one rounding (~4e-16)
    assert any(abs(sw2 - 2.0) < 1e-12 for sw2 in sw2s), sw2s
    assert any(abs(sw2 - 1.0) < 1e-12 for sw2 in sw2s), sw2s  # and the LeCun/meanfield default sigma_w = 1
    assert len(values) <= 5  # x 3 activations x 2 biases: a grid that still runs in minutes


ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("bench/**/*.py"), *ROOT.glob("analysis/**/*.py")])  # what pip installs
# (regular expression, what it needs): features whose use raises the lower bounds in pyproject.toml
NEEDS_PYTHON = [(r"\bdatetime\.UTC\b|from datetime import [^\n]*\bUTC\b", (3, 11), "datetime.UTC"),
                (r"^\s*(import|from) tomllib\b", (3, 11), "tomllib"),
                (r"\bexcept\*", (3, 11), "except*")]
NEEDS_NUMPY = [(r"\bnp\.vecdot\b|\bnumpy\.vecdot\b", (2, 0), "np.vecdot"),
               (r"\bnp\.(matrix_transpose|unique_values|unique_counts)\b", (2, 0), "numpy 2 array-API names")]


def _lower_bound(requirement: str) -> tuple[int, ...]:
    import re

    m = re.search(r">=\s*([0-9][0-9.]*)", requirement)
    assert m, f"{requirement!r} has no >= lower bound"
    return tuple(int(x) for x in m.group(1).split("."))


def _used(table) -> list[tuple[tuple[int, ...], str, str]]:
    import re

    found = []
    for path in SOURCES:
        text = path.read_text()
        for pattern, version, what in table:
            if re.search(pattern, text, re.MULTILINE):
                found.append((version, what, str(path.relative_to(ROOT))))
    return found


def test_pyproject_lower_bounds_cover_what_the_code_uses():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    python_min = _lower_bound(project["project"]["requires-python"])
    numpy_req = [r for r in project["project"]["dependencies"] if r.split(">")[0].split("=")[0].strip() == "numpy"]
    assert len(numpy_req) == 1, project["project"]["dependencies"]
    numpy_min = _lower_bound(numpy_req[0])
    assert SOURCES, "no package sources found"
    for version, what, where in _used(NEEDS_PYTHON):
        assert python_min >= version, f"{where} uses {what} (Python {version}); requires-python says {python_min}"
    for version, what, where in _used(NEEDS_NUMPY):
        assert numpy_min >= version, f"{where} uses {what} (NumPy {version}); dependencies say numpy {numpy_min}"
    # ruff must not suggest (or accept) code for an older Python than the package supports
    target = project["tool"]["ruff"]["target-version"]
    assert target == "py" + "".join(map(str, python_min[:2])), (target, python_min)


def test_citation_cff_matches_pyproject():
    import tomllib

    import yaml

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert cff["title"] == project["name"]
    assert cff["version"] == project["version"]  # a release bumps both or neither
    assert cff["license"] == project["license"]["text"] == "MIT"
    assert str(cff["date-released"]) == "2026-11-28"
    assert cff["authors"] and all("name" in a or "family-names" in a for a in cff["authors"])
    # every reference is citable: a type, a title, authors and a year (CFF's required reference keys)
    assert len(cff["references"]) >= 9
    for ref in cff["references"]:
        assert {"type", "title", "authors", "year"} <= set(ref), ref.get("title")
        assert all("family-names" in a or "name" in a for a in ref["authors"]), ref["title"]
    first_authors = {ref["authors"][0]["family-names"] for ref in cff["references"]}
    reproduced = {"Rumelhart", "Nielsen", "Glorot", "Poole", "Schoenholz", "He", "Ioffe", "Yang", "Pennington"}
    assert reproduced <= first_authors, reproduced - first_authors
    # the license pyproject.toml promises is the one shipped
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "Copyright (c) 2026 the vgbench authors" in license_text
