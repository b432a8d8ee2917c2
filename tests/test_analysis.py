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
    # the mean-field theory predicts delta norms: its line (one per depth > 1) on plain delta panels only;
    # a weight gradient also carries the activation norms, so grad_norm panels get none
    theory_lines = 3 if stat == "delta_norm" else 0
    for ax in plain:
        assert len(ax.lines) == 3 + theory_lines, ax.get_title()
        dashed = [ln for ln in ax.lines if ln.get_color() == "k"]
        assert len(dashed) == theory_lines, ax.get_title()
    for ax in other:
        assert len(ax.lines) == 3, ax.get_title()  # no prediction for residual / batch norm
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert ("mean field" in legend) == (stat == "delta_norm")
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


def two_tasks(**kw):
    """synthetic() for digits and teacher, teacher's first-layer gradients 10x larger (run ids distinct)."""
    out = []
    for task, boost in (("digits", 1.0), ("teacher", 10.0)):
        runs, steps, layers = synthetic(task=task, **kw)
        for df in (runs, steps, layers):
            df["run_id"] = task + "-" + df["run_id"]
        layers.loc[layers["layer"] == 1, ["grad_norm", "delta_norm"]] *= boost
        runs["final_loss"] = runs["final_loss"] * boost
        if task == "teacher":  # regression: no accuracy, a test loss
            runs["final_test_accuracy"] = np.nan
        out.append((runs, steps, layers))
    return [pd.concat(parts, ignore_index=True) for parts in zip(*out)]


def test_gradient_ratio_splits_tasks(tmp_path):
    runs, _, layers = two_tasks(inits=("he",), depths=(1, 2, 5), acts=("sigmoid",), archs=((False, "none"),))
    fig = F.gradient_ratio(runs, layers)
    axes = _axes(fig)
    assert [ax.get_title() for ax in axes] == ["digits, init he", "teacher, init he"]
    for ax, boost in zip(axes, (1.0, 10.0)):  # each panel's median is its own task's, not a pooled one
        assert np.allclose(ax.lines[0].get_ydata(), boost * 0.5 ** np.array([1, 2, 5])), ax.get_title()
    _saves(fig, tmp_path)


def test_trainability_splits_tasks(tmp_path):
    runs, _, _ = two_tasks(inits=("he",), depths=(1, 2, 5), acts=("sigmoid",))
    fig = F.trainability(runs)
    axes = fig.axes
    assert len(axes) == 4 * 3  # (loss, metric) per task x architectures
    labels = [axes[3 * i].get_ylabel() for i in range(4)]
    assert labels == ["digits: final\ntrain-set loss", "digits: final\ntest accuracy",
                      "teacher: final\ntrain-set loss", "teacher: final\ntest loss"]
    r = F.with_arch(runs)
    for i, task in ((0, "digits"), (2, "teacher")):
        for j, arch in enumerate(("plain", "residual", "batchnorm")):
            d = r[(r["task"] == task) & (r["arch"] == arch)]
            expected = d.groupby("depth")["final_loss"].median().to_numpy()
            assert np.allclose(axes[3 * i + j].lines[0].get_ydata(), expected), (task, arch)
    _saves(fig, tmp_path)


def test_gradient_ratio(tmp_path):
    runs, _, layers = synthetic(inits=("he", "xavier"), depths=(1, 2, 5))
    fig = F.gradient_ratio(runs, layers)
    axes = _axes(fig)
    assert len(axes) == 2  # a panel per init (one task)
    assert all(ax.get_yscale() == "log" and ax.get_xscale() == "linear" for ax in axes)  # the caption says so
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


def _twins(depths=(2,), drift=1e-9):
    """numpy and torch twins of synthetic runs; torch's gradient norms drift by drift * step (relative)."""
    runs, _, layers = synthetic(acts=("sigmoid", "relu"), archs=((False, "none"),), depths=depths,
                                backends=("numpy", "torch"), steps=(0, 10, 20, 30))
    torch_rows = layers["run_id"].str.endswith("torch")
    layers.loc[torch_rows, "grad_norm"] *= 1 + drift * layers.loc[torch_rows, "step"]
    return runs, layers


def test_twin_free_running(tmp_path):
    runs, layers = _twins()
    pairs = F.twin_pairs(runs, layers)
    assert len(pairs) == layers["run_id"].str.endswith("torch").sum()
    free = F.twin_free_running(runs, layers)
    assert sorted(free["activation"].unique()) == ["relu", "sigmoid"]
    for row in free.itertuples():  # the largest relative drift at each step: drift * step
        assert row.max_rel_diff == pytest.approx(1e-9 * row.step, rel=1e-6, abs=1e-15), row  # rel: float rounding
    summary = F.twin_summary(free)
    assert list(summary.columns) == ["activation", "residual", "norm", "depth", "step_0", "middle_step",
                                     "at_middle", "last_step", "at_last"]
    for row in summary.itertuples():
        assert row.step_0 == 0 and row.middle_step == 20 and row.last_step == 30
        assert row.at_last == pytest.approx(3e-8, rel=1e-6)  # float rounding of 1 + 3e-8 only
    fig = F.twin_divergence(free)
    (ax,) = _axes(fig)
    assert ax.get_yscale() == "log" and "free-running" in ax.get_ylabel()
    assert len(ax.lines) == 2  # a line per architecture
    assert ax.lines[0].get_ydata()[0] == F.TINY  # the exact 0 at step 0, drawn at the floor
    _saves(fig, tmp_path)


def test_lockstep_table_runs_each_numpy_job_once(tmp_path):
    from analysis.report import lockstep_summary, lockstep_table

    runs, _ = _twins(depths=(2, 3))
    calls = []

    def fake(config, ensemble):  # stands in for bench.twin.lockstep_from_run_config
        calls.append((config["depth"], config["activation"], config["seed"], config["backend"], ensemble))
        err = 1e-15 if config["activation"] == "sigmoid" else 2e-9
        return pd.DataFrame({"step": [0, 10, 20], "max_rel_diff": [0.0, err / 2, err],
                             "quantity": ["loss", "grad_norm", "delta_norm"]})

    lock = lockstep_table(runs, lockstep=fake)
    # synthetic(): 3 seeds per (activation, depth), numpy and torch: one call per numpy job, lowest seed
    assert sorted(calls) == sorted((d, a, 0, "numpy", 3) for a in ("sigmoid", "relu") for d in (2, 3))
    assert len(lock) == 4 * 3 and set(lock["seeds"]) == {3}
    summary = lockstep_summary(lock)
    assert len(summary) == 4  # per architecture
    for row in summary.itertuples():
        assert row.seeds == 3 and row.step == 20 and row.quantity == "delta_norm"
        assert row.max_rel_diff == (1e-15 if row.activation == "sigmoid" else 2e-9)
        assert row.within_bound == (row.activation == "sigmoid")  # max_rel_diff <= 1e-9
    fig = F.twin_lockstep(lock)
    (ax,) = _axes(fig)
    assert ax.get_yscale() == "log"
    bound = [ln for ln in ax.lines if list(ln.get_ydata()) == [1e-9, 1e-9]]
    assert len(bound) == 1  # the 1e-9 line
    assert len(ax.lines) == 4 + 1 and "ABOVE" in ax.get_title()
    _saves(fig, tmp_path)


# ------------------------------------------------------------------------------ time to solve (Kaplan-Meier)
def test_km_without_censoring_is_the_empirical_distribution():
    rng = np.random.default_rng(3)
    for n in (7, 40, 101):  # odd and even: KM's median is the lower median, numpy's inverted_cdf
        t = rng.integers(10, 5000, n).astype(float)
        km = T.km_summary(t, cap=10_000)
        assert km["seeds"] == km["solved"] == n and km["solved_fraction"] == pytest.approx(1.0)
        for key, p in (("median", 0.5), ("q25", 0.25), ("q75", 0.75)):
            assert km[key] == np.quantile(t, p, method="inverted_cdf"), (n, key)
        assert km["median_ci_low"] <= km["median"] <= km["median_ci_high"]


def test_km_hand_computed_with_censoring_in_the_middle():
    # events at 1, 2, 3, 5; one run censored at 4 (its own cap), two at 10. At risk 7, 6, 5, then 3 after
    # the censoring at 4: S = 6/7, 5/7, 4/7, then 4/7 * 2/3 = 8/21 at 5, so F(5) = 13/21 = 0.619.
    km = T.km_summary([1, 2, 3, None, 5, np.nan, np.nan], cap=[10, 10, 10, 4, 10, 10, 10])
    assert km["solved"] == 4 and km["seeds"] == 7 and km["cap"] == 10
    assert km["solved_fraction"] == pytest.approx(13 / 21, abs=1e-12)  # exact arithmetic, float rounding only
    assert km["median"] == 5 and km["q25"] == 2  # F(2) = 2/7 >= 0.25, F(3) = 3/7 < 0.5 <= F(5)
    assert np.isnan(km["q75"])  # F never reaches 0.75 within the cap
    # the raw median over solved seeds only would be 2.5: the bias this estimate exists to remove
    assert km["median"] != np.median([1, 2, 3, 5])


def test_km_heavy_censoring_is_not_reached():
    t = [100, 200, 300] + [np.nan] * 7
    km = T.km_summary(t, cap=1000)
    assert km["solved"] == 3 and km["solved_fraction"] == pytest.approx(0.3, abs=1e-12)
    assert np.isnan(km["median"]) and np.isnan(km["q75"]) and np.isnan(km["median_ci_high"])
    assert km["q25"] == 300  # 3/10 >= 0.25 at the third event
    none = T.km_summary([np.nan] * 4, cap=50)
    assert none["solved"] == 0 and none["solved_fraction"] == 0 and np.isnan(none["median"])


def test_km_median_interval_narrows_with_more_seeds():
    rng = np.random.default_rng(4)
    widths = []
    for n in (20, 200, 2000):
        t = rng.exponential(1000, n).round() + 1
        t[t > 3000] = np.nan  # censored at the cap: ~5% of an exponential with mean 1,000
        km = T.km_summary(t, cap=3000)
        assert km["median_ci_low"] <= km["median"] <= km["median_ci_high"], n
        widths.append(km["median_ci_high"] - km["median_ci_low"])
    assert widths[0] > widths[1] > widths[2]
    # true median of the exponential: 1000 ln 2 = 693; with 2000 seeds the 95% interval holds it (this seed)
    assert km["median_ci_low"] <= 694 <= km["median_ci_high"]


def _old_runs(n=20, scales=(0.3,), cap=5000):
    rows = []
    rng = np.random.default_rng(1)
    for task in ("xor", "parity", "symmetry", "family_trees"):
        for scale in (scales if task == "parity" else (0.3,)):
            for seed in range(n):
                rows.append({"run_id": f"{task}{scale}{seed}", "task": task, "seed": seed, "loss": "sse_half",
                             "lr": 0.5, "momentum": 0.9, "steps": cap, "widths": "[2]", "params_json": None,
                             "init": "uniform", "init_scale": scale, "status": "ok",
                             "solved_step": int(rng.integers(100, 4000)) if seed % 4 else None,
                             "final_accuracy": 1.0, "final_test_accuracy": 0.75})
    runs = pd.DataFrame(rows)
    runs["solved_step"] = runs["solved_step"].astype("Int64")
    return runs


def test_time_to_solve_figure(tmp_path):
    runs = _old_runs(scales=(1.0, 0.3))
    fig = F.time_to_solve(runs)
    (ax,) = _axes(fig)
    assert ax.get_xscale() == "log"
    curves = [ln for ln in ax.lines if ln.get_drawstyle() == "steps-post"]
    labels = [ln.get_label() for ln in curves]
    assert labels == ["xor, U[-0.3, 0.3] (15/20)", "parity, U[-1, 1] (15/20)", "parity, U[-0.3, 0.3] (15/20)",
                      "symmetry, U[-0.3, 0.3] (15/20)", "family trees, U[-0.3, 0.3] (15/20)"]
    for line in curves:  # each curve is the KM fraction solved: ends at 15/20 (all censoring at the cap)
        assert line.get_ydata()[-1] == pytest.approx(0.75, abs=1e-12), line.get_label()
        assert line.get_xdata()[-1] == 5000
    assert curves[1].get_linestyle() != curves[2].get_linestyle()  # two init ranges of one problem
    papers = sorted(ln.get_xdata()[0] for ln in ax.lines if ln.get_marker() == "D" and len(ln.get_xdata()))
    assert papers == [558, 1425, 1500, 2825, 2825]  # the papers' numbers (family trees: its fixed 1,500)
    _saves(fig, tmp_path)


def test_rumelhart_table_km_columns():
    runs = _old_runs(scales=(1.0, 0.3))
    table, note = T.rumelhart_table(runs)
    assert list(zip(table["problem"], table["init_range"])) == [
        ("xor", "U[-0.3, 0.3]"), ("parity", "U[-1, 1]"), ("parity", "U[-0.3, 0.3]"), ("symmetry", "U[-0.3, 0.3]"),
        ("family trees", "U[-0.3, 0.3]")]
    for col in ("problem", "seeds", "solved", "cap", "median_sweeps", "q25_sweeps", "q75_sweeps", "paper_sweeps",
                "init_range", "solved_fraction", "median_ci_low", "median_ci_high"):
        assert col in table.columns, col
    for row, (_, g) in zip(table.itertuples(), T.rumelhart_groups(runs)):
        km = T.km_summary(g["solved_step"], g["steps"])
        assert row.seeds == 20 and row.solved == 15 and row.cap == 5000
        assert row.median_sweeps == km["median"]  # the one helper, over all seeds
        assert row.median_sweeps != np.median(g["solved_step"].dropna())  # not the solved-only median
    assert np.isnan(table.loc[4, "paper_sweeps"]) and table.loc[0, "paper_sweeps"] == 558
    assert "3/4" in table.loc[4, "where they differ"] and "Kaplan-Meier" in note
    heavy = runs.assign(solved_step=runs["solved_step"].where(runs["seed"] < 5))
    table, _ = T.rumelhart_table(heavy)
    assert table["median_sweeps"].isna().all()  # 4 of 20 solved: the median is not reached
    assert "not reached" in table.loc[0, "where they differ"]


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
                          "sigma_w": [1.0, 1.5, 1.4142] * 2, "predicted": [0.25, 0.9, 1.0, 0.24, 0.85, 1.0]})
    table["measured"] = table["predicted"] * 1.01
    table["q25"], table["q75"] = table["measured"] * 0.98, table["measured"] * 1.02
    fig = F.meanfield_ratios(table)
    (ax,) = _axes(fig)
    assert ax.get_xscale() == ax.get_yscale() == "log"
    assert len(ax.containers) == 6  # one error bar per (activation, sigma_b)
    labels = sorted(t.get_text() for t in ax.texts)  # every point says its sigma_w; He's sqrt 2 by name
    assert labels == sorted(["1", "1.5", "sqrt2=He"] * 2)
    assert F.sigma_w_label(2 ** 0.5) == F.sigma_w_label(1.4142) == "sqrt2 (He)" and F.sigma_w_label(2.0) == "2"
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
       "train.batch_size=64", f"model.init_scale={s}"] for a in ("sigmoid", "tanh") for s in (1.0, 1.4142)],
    *[["experiment=depth_sweep", "task=digits", f"model.activation={a}", f"model.norm={n}", f"model.depth={d}",
       "model.init=he", "model.width=8", "ensemble=2", "train.steps=4", "log.every=2"]
      for a in ("sigmoid", "relu") for n in ("none", "batchnorm") for d in (1, 3)],
]
EXPECTED_FIGURES = ["seed_xor-charts", "seed_xor-twin_lockstep", "seed_xor-twin_free_running", "rumelhart-sweeps",
                    "rumelhart-symmetry_weights",
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
    for table in ("rumelhart", "nielsen_ch5", "meanfield", "twin_lockstep", "twin_free_running"):
        assert (tmp_path / "report" / "tables" / f"{table}.csv").exists()
        assert (tmp_path / "report" / "tables" / f"{table}.md").exists()
        assert f"(tables/{table}.md)" in text
    assert "## Provenance" in text and "git " in text and "| seed_xor | 6 |" in text
    lock = pd.read_csv(tmp_path / "report" / "tables" / "twin_lockstep.csv")
    assert len(lock) == 1 and lock.loc[0, "seeds"] == 3  # the seed's one net, its 3 members in one job
    assert lock["max_rel_diff"].max() <= 1e-9  # float64 lockstep: one step's rounding is ~1e-15
    free = pd.read_csv(tmp_path / "report" / "tables" / "twin_free_running.csv")
    assert list(free[["step_0", "middle_step", "last_step"]].iloc[0]) == [free.loc[0, "step_0"], 10, 20]
    assert "a finding, not a failure" in text
    mf = pd.read_csv(tmp_path / "report" / "tables" / "meanfield.csv")
    assert set(mf["activation"]) == {"sigmoid", "tanh"}
    assert sorted(set(mf["init"])) == ["1", "sqrt2 (He)"]  # He's sigma_w gets its own row and a sensible label
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
