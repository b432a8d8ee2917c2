"""analysis: every figure on small synthetic tables, and the report on a tiny real sweep."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, compose_cfg

from analysis import figures as F
from analysis import tables as T
from analysis.report import make_report, md_table
from bench.run import run


# ------------------------------------------------------------------------------ synthetic tables
def synthetic(acts=("sigmoid", "relu"), archs=((False, "none"), (True, "none"), (False, "batchnorm")),
              depths=(2, 4), inits=("he",), backends=("numpy",), seeds=3, steps=(0, 10, 20), task="digits"):
    """runs, steps, layers with the real column names: gradients shrink 0.5x per layer toward the input."""
    rng = np.random.default_rng(0)
    runs, st, ly = [], [], []
    for act in acts:
        for residual, norm in archs:
            for depth in depths:
                for init in inits:
                    for seed in range(seeds):
                        config = {"task": task, "activation": act, "depth": depth, "residual": residual,
                                  "norm": norm, "init": init, "seed": seed}
                        for backend in backends:
                            rid = f"{act}-{residual}-{norm}-{depth}-{init}-{seed}-{backend}"
                            runs.append({
                                "run_id": rid, "name": "synthetic", "experiment": "", "backend": backend,
                                "task": task, "activation": act, "depth": depth, "width": 8,
                                "widths": json.dumps([8] * depth), "residual": residual, "norm": norm,
                                "init": init, "init_scale": np.nan, "init_bias": np.nan, "lr": 0.1,
                                "momentum": 0.9, "loss": "cross_entropy", "steps": max(steps), "seed": seed,
                                "status": "ok", "final_loss": rng.uniform(0.1, 2), "final_accuracy": 0.5,
                                "final_test_loss": 1.0, "final_test_accuracy": rng.uniform(0.1, 1),
                                "solved_step": pd.NA, "params_json": None, "git_commit": "abc",
                                "config_json": json.dumps({**config, "backend": backend})})
                            for s in steps:
                                st.append({"run_id": rid, "step": s, "loss": 1.0 / (1 + s) + rng.uniform(0, .01),
                                           "accuracy": 0.5})
                                for layer in range(1, depth + 2):
                                    g = 0.5 ** (depth + 1 - layer) * (1 + 0.1 * seed) / (1 + s)
                                    for param in ("weight", "bias"):
                                        ly.append({"run_id": rid, "step": s, "layer": layer, "param": param,
                                                   "grad_norm": g, "grad_mean_abs": g / 10, "weight_norm": 1.0,
                                                   "delta_norm": g, "act_mean": 0.0, "act_std": 1.0,
                                                   "act_saturation": 0.0})
    runs = pd.DataFrame(runs)
    runs["solved_step"] = runs["solved_step"].astype("Int64")
    return runs, pd.DataFrame(st), pd.DataFrame(ly)


def _saves(fig, tmp_path, name="fig"):
    path = tmp_path / f"{name}.png"
    fig.savefig(path)
    plt.close(fig)
    assert path.stat().st_size > 1000


def _axes(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.axison and ax.get_label() != "<colorbar>"]


def test_seed_xor_charts(tmp_path):
    runs, steps, layers = synthetic(acts=("sigmoid",), archs=((False, "none"),), depths=(1,), seeds=5,
                                    steps=tuple(range(0, 10001, 500)), task="xor", backends=("numpy", "torch"))
    fig = F.seed_xor_charts(runs, steps, layers)
    a, b = _axes(fig)
    assert a.get_yscale() == b.get_yscale() == "log"
    assert len(a.lines) == 2  # median + the blog's markers
    assert len(b.lines) == 4  # W2 solid, W1 dashed, two blog markers
    assert b.lines[0].get_linestyle() == "-" and b.lines[1].get_linestyle() == "--"
    assert len(a.collections) == 1 and len(b.collections) == 2  # IQR bands
    _saves(fig, tmp_path)


@pytest.mark.parametrize("stat", ["delta_norm", "grad_norm"])
def test_gradient_profile(stat, tmp_path):
    runs, _, layers = synthetic(depths=(2, 3, 5))
    inputs = {"digits": (64, 0.95)}
    fig = F.gradient_profile(runs, layers, stat, inputs=inputs)
    axes = _axes(fig)
    assert len(axes) == 2 * 3  # activations x architectures
    assert all(ax.get_yscale() == "log" for ax in axes)
    plain = [ax for ax in axes if ax.get_title().endswith("plain")]
    other = [ax for ax in axes if not ax.get_title().endswith("plain")]
    assert all(len(ax.lines) == 3 + 3 for ax in plain)  # a line per depth + the mean-field prediction
    assert all(len(ax.lines) == 3 for ax in other)  # no prediction for residual / batch norm
    _saves(fig, tmp_path)


def test_gradient_profile_needs_one_init():
    runs, _, layers = synthetic(inits=("he", "xavier"), archs=((False, "none"),))
    with pytest.raises(ValueError, match="one init"):
        F.gradient_profile(runs, layers)


def test_gradient_profile_reference_markers(tmp_path):
    runs, _, layers = synthetic(acts=("sigmoid",), archs=((False, "none"),), depths=(2, 3, 4))
    fig = F.gradient_profile(runs, layers, "grad_norm", "bias", reference=F.NIELSEN, theory=False)
    (ax,) = _axes(fig)
    assert len(ax.lines) == 3 + 3  # ours per depth + Nielsen's per depth
    _saves(fig, tmp_path)


def test_theory_profile_matches_theory_module():
    from bench import theory

    prof = F.theory_profile("relu", "he", 32, 5, 64, 1.0)
    assert np.allclose(prof, 1.0)  # He init: chi1 = 1 for relu at every layer
    prof = F.theory_profile("sigmoid", "nielsen", 30, 4, 64, 1.0)
    assert prof[-1] == 1.0 and np.all(np.diff(prof) > 0)
    assert prof[-2] == pytest.approx(theory.delta_ratio("sigmoid", 1.0, 1.0, theory.q_sequence(
        "sigmoid", 1.0, 1.0, 2.0, 3)[2]))


def test_gradient_ratio(tmp_path):
    runs, _, layers = synthetic(inits=("he", "xavier"), depths=(1, 2, 5))
    fig = F.gradient_ratio(runs, layers)
    axes = _axes(fig)
    assert len(axes) == 2  # a panel per init
    assert all(ax.get_yscale() == "log" and ax.get_xscale() == "linear" for ax in axes)
    assert len(axes[0].lines) == 2 * 3 + 1  # activation x arch medians + the line at 1
    y = axes[0].lines[0].get_ydata()
    assert np.allclose(y, 0.5 ** np.array([1, 2, 5]))  # first/last ratio of the synthetic 0.5x per layer
    _saves(fig, tmp_path)


def test_training_dynamics(tmp_path):
    runs, _, layers = synthetic(depths=(2, 4))
    fig = F.training_dynamics(runs, layers)
    axes = _axes(fig)
    assert len(axes) == 4  # sigmoid plain, relu plain, sigmoid residual, sigmoid batchnorm
    assert all(ax.get_yscale() == "log" and len(ax.lines) == 4 + 1 for ax in axes)  # a line per layer
    _saves(fig, tmp_path)


def test_training_dynamics_needs_two_nets():
    runs, _, layers = synthetic(acts=("sigmoid",), archs=((False, "none"),))
    with pytest.raises(ValueError, match="plain sigmoid and one other"):
        F.training_dynamics(runs, layers)


def test_trainability(tmp_path):
    runs, _, _ = synthetic(inits=("he", "xavier"), depths=(1, 2, 5))
    fig = F.trainability(runs)
    axes = _axes(fig)
    assert len(axes) == 2 * 3  # (loss, accuracy) x architectures
    assert all(ax.get_xscale() == "log" for ax in axes)
    assert axes[0].get_yscale() == "log" and axes[3].get_yscale() == "linear"  # loss log, accuracy linear
    assert len(axes[0].lines) == 2 * 2  # activation x init
    _saves(fig, tmp_path)


def test_twin_agreement(tmp_path):
    runs, _, layers = synthetic(acts=("sigmoid",), archs=((False, "none"),), depths=(2,),
                                backends=("numpy", "torch"))
    torch_rows = layers["run_id"].str.endswith("torch")
    layers.loc[torch_rows, "grad_norm"] *= 1 + 1e-9
    pairs = F.twin_pairs(runs, layers)
    assert len(pairs) == torch_rows.sum() and pairs["rel_err"].max() == pytest.approx(1e-9, rel=1e-3)
    fig = F.twin_agreement(runs, layers)
    (ax,) = _axes(fig)
    assert ax.get_xscale() == ax.get_yscale() == "log"
    assert "1.0e-09" in ax.get_title()
    assert len(ax.lines) == 1  # identity
    _saves(fig, tmp_path)


def test_sweeps_to_solution_and_table(tmp_path):
    rows = []
    rng = np.random.default_rng(1)
    for task in ("xor", "parity", "symmetry", "family_trees"):
        for seed in range(20):
            rows.append({"run_id": f"{task}{seed}", "task": task, "seed": seed, "loss": "sse_half", "lr": 0.5,
                         "momentum": 0.9, "steps": 5000, "widths": "[2]", "params_json": None,
                         "solved_step": int(rng.integers(100, 4000)) if seed % 4 else None,
                         "final_accuracy": 1.0, "final_test_accuracy": 0.75})
    runs = pd.DataFrame(rows)
    runs["solved_step"] = runs["solved_step"].astype("Int64")
    fig = F.sweeps_to_solution(runs)
    (ax,) = _axes(fig)
    assert ax.get_xscale() == "log"
    assert len(ax.get_yticklabels()) == 4
    _saves(fig, tmp_path)
    table, _ = T.rumelhart_table(runs)
    assert list(table["problem"]) == ["xor", "parity", "symmetry", "family trees"]
    assert set(table["solved"]) == {"75%"}
    assert "3/4" in table.loc[3, "where they differ"]


def test_hinton_weights(tmp_path):
    w = np.array([[-4, 4], [2, -2], [-1, 1], [1, -1], [-2, 2], [4, -4.0]])
    params = {"layers.0.weight": w.tolist(), "layers.0.bias": [[-1, -1]], "layers.1.weight": [[-6], [-6]],
              "layers.1.bias": [[3]]}
    fig = F.hinton_weights(params)
    left, right = _axes(fig)
    assert len(left.patches) == 2 * 7 and len(right.patches) == 3
    colors = {tuple(p.get_facecolor()[:3]) for p in left.patches}
    assert colors == {(1.0, 1.0, 1.0), (0.0, 0.0, 0.0)}
    stats = T.symmetry_weights_stats(params)
    assert stats["mirror_error"] == 0 and np.allclose(stats["ratios"], [1, 2, 4]) and stats["cos_h1_h2"] == -1
    _saves(fig, tmp_path)


def test_meanfield_ratios(tmp_path):
    table = pd.DataFrame({"activation": ["sigmoid", "tanh", "relu"] * 2, "sigma_b": [0.0] * 3 + [0.3] * 3,
                          "predicted": [0.25, 0.9, 1.0, 0.24, 0.85, 1.0]})
    table["measured"] = table["predicted"] * 1.01
    table["q25"], table["q75"] = table["measured"] * 0.98, table["measured"] * 1.02
    fig = F.meanfield_ratios(table)
    (ax,) = _axes(fig)
    assert ax.get_xscale() == ax.get_yscale() == "log"
    assert len(ax.containers) == 6  # one error bar per (activation, sigma_b)
    _saves(fig, tmp_path)


def test_md_table_escapes_pipes():
    text = md_table(pd.DataFrame({"a": ["x|y"], "b": [float("nan")]}))
    assert text.splitlines()[2] == "| x\\|y |  |"


# ------------------------------------------------------------------------------ the report on real runs
TINY_SWEEP = [
    ["experiment=seed_xor", "backend=numpy", "ensemble=3", "train.steps=20", "log.every=5"],
    ["experiment=seed_xor", "backend=torch", "ensemble=3", "train.steps=20", "log.every=5"],
    ["experiment=rumelhart_symmetry", "ensemble=12", "train.steps=3000", "log.every=1000"],
    ["experiment=nielsen_ch5", "ensemble=3", "model.depth=2"],
    ["experiment=nielsen_ch5", "ensemble=3", "model.depth=3"],
    *[["experiment=meanfield", f"model.activation={a}", "ensemble=2", "model.depth=8", "model.width=32",
       "train.batch_size=64"] for a in ("sigmoid", "tanh")],
    *[["experiment=depth_sweep", "task=digits", f"model.activation={a}", f"model.norm={n}", f"model.depth={d}",
       "model.init=he", "model.width=8", "ensemble=2", "train.steps=4", "log.every=2"]
      for a in ("sigmoid", "relu") for n in ("none", "batchnorm") for d in (1, 3)],
]
EXPECTED_FIGURES = ["seed_xor-charts", "seed_xor-twin_agreement", "rumelhart-sweeps", "rumelhart-symmetry_weights",
                    "nielsen_ch5-digits-nielsen-bias_grad_profile", "meanfield-ratios",
                    "depth_sweep-digits-he-profile_delta_norm", "depth_sweep-digits-he-profile_grad_norm",
                    "depth_sweep-grad_ratio", "depth_sweep-trainability", "depth_sweep-digits-he-training_dynamics"]


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    for overrides in TINY_SWEEP:
        run(compose_cfg(overrides, results_dir=root))
    return root


def test_report_on_a_tiny_sweep(tiny_results, tmp_path):
    report = make_report(tiny_results, tmp_path / "report", figures_dir=tmp_path / "docs")
    assert report == tmp_path / "report" / "report.md"
    text = report.read_text()
    for name in EXPECTED_FIGURES:
        for ext in ("png", "pdf"):
            assert (tmp_path / "report" / "figures" / f"{name}.{ext}").stat().st_size > 1000, name
        assert f"(figures/{name}.png)" in text and f"--only {name}`" in text
    for link in re.findall(r"\]\(((?:figures|tables)/[^)]+)\)", text):  # every link resolves
        assert (tmp_path / "report" / link).exists(), link
    for table in ("rumelhart_1986", "nielsen_ch5", "meanfield"):
        assert (tmp_path / "report" / "tables" / f"{table}.csv").exists()
        assert (tmp_path / "report" / "tables" / f"{table}.md").exists()
        assert f"(tables/{table}.md)" in text
    assert "## Provenance" in text and "git " in text and "| seed_xor | 6 |" in text
    mf = pd.read_csv(tmp_path / "report" / "tables" / "meanfield.csv")
    assert set(mf["activation"]) == {"sigmoid", "tanh"}
    docs = sorted(p.name for p in (tmp_path / "docs").iterdir())
    assert "seed_xor.png" in docs and "rumelhart_sweeps.png" in docs
    assert all((tmp_path / "docs" / p).stat().st_size < 300_000 for p in docs)


def test_report_on_one_experiment_dir(tiny_results):
    report = make_report(tiny_results / "seed_xor")  # default out_dir: <path>/report
    assert report == tiny_results / "seed_xor" / "report" / "report.md"
    assert (report.parent / "figures" / "seed_xor-charts.png").exists()
    assert "figures/meanfield-ratios.png" not in report.read_text()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "analysis.report", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_bad_path_is_one_line_and_exit_2(make, tmp_path):
    path = tmp_path / "nope"
    if make == "empty":
        path.mkdir()
    out = _cli(str(path))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope" in lines[0]
