"""Issue 11's scorecard: the metrics on a synthetic results table with known answers, the method presets
(each composes and validates), and a smoke run of the preset through the report."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, compose_cfg, run_cli

from analysis import scorecard as SC
from bench import results

DEPTHS = (2, 8, 32)
BUDGET = 100
SEEDS = 4
TEACHER = json.dumps({"task": {"name": "teacher"}})


def _run(method, task, depth, seed, **cols):
    base = {"run_id": f"{method}-{task}-{depth}-{seed}", "method": method, "task": task, "depth": depth,
            "seed": seed, "status": "ok", "steps": BUDGET, "width": 32, "residual": False, "norm": "none",
            "activation": "relu", "init": "he", "init_scale": np.nan, "init_bias": np.nan,
            "config_json": TEACHER, "final_test_accuracy": np.nan, "final_test_loss": np.nan,
            "experiment": "scorecard"}
    return {**base, **cols}


def synthetic():
    """Two methods on digits at depths 2, 8, 32, 4 seeds each, built so that every metric is known:

    method 'a': ||delta^l|| = r^(D - l) times a wiggle that is 1 at l = 1 and l = D (the geometric mean of the
    ratios telescopes to r whatever happens in between), r = 0.5, 0.5, 0.5, 0.8 over the seeds (median 0.5);
    the output layer's delta is huge (it is not a hidden layer: it must not count). ||dL/dW^1|| = 1e-3 and
    ||dL/dW^out|| = 1 in every seed: grad_spread -3. Targets (test accuracy 0.9) first met at: depth 2 by
    every seed at step 10; depth 8 at steps 20 and 40, two seeds never (Kaplan-Meier median 40, where the
    solved seeds alone would say 30); depth 32 by one seed only. trainable_depth 8, steps_to_target 40.
    method 'b': no seed reaches the target at depth 2 or 32; at depth 8 seed 0 at step 10 and seed 1 at step 30
    (then it diverges: reached before diverging counts), so 2 of 4, median 30 and trainable depth 8 (the deepest
    trainable depth, though depth 2 fails). Seed 0 has ||delta^1|| = 0: attenuation 0, the median is still 0.5.
    """
    runs, steps, layers = [], [], []
    hits = {("a", 2): [10, 10, 10, 10], ("a", 8): [20, 40, None, None], ("a", 32): [50, None, None, None],
            ("b", 2): [None] * 4, ("b", 8): [10, 30, None, None], ("b", 32): [None] * 4}
    for (method, depth), seed_hits in hits.items():
        for seed, hit in enumerate(seed_hits):
            diverged = method == "b" and depth == 8 and seed == 1
            final = 0.95 if hit is not None else 0.5
            runs.append(_run(method, "digits", depth, seed, status="diverged" if diverged else "ok",
                             final_test_accuracy=np.nan if diverged else final))
            rid = runs[-1]["run_id"]
            for step in range(0, BUDGET + 1, 10):
                acc = 0.95 if hit is not None and step >= hit else 0.3
                if diverged and step > 30:
                    acc = np.nan
                steps.append({"run_id": rid, "step": step, "test_accuracy": acc, "test_loss": 1.0})
            r = 0.8 if seed == 3 else 0.5
            for layer in range(1, depth + 2):
                wiggle = 1.0 if layer in (1, depth) else 3.0 ** ((-1) ** layer)
                delta = 1e6 if layer == depth + 1 else r ** (depth - layer) * wiggle
                if method == "b" and seed == 0:
                    delta = 0.0 if layer == 1 else delta
                grad = 1e-3 if layer == 1 else 1.0 if layer == depth + 1 else 0.1
                for param in ("weight", "bias"):
                    layers.append({"run_id": rid, "step": 0, "layer": layer, "param": param,
                                   "delta_norm": delta, "grad_norm": grad if param == "weight" else 7.0})
    return pd.DataFrame(runs), pd.DataFrame(steps), pd.DataFrame(layers)


@pytest.fixture(scope="module")
def table():
    return SC.scorecard_table(*synthetic()).set_index(["method", "task"])


def test_attenuation_is_the_geometric_mean_over_hidden_layers(table):
    # 'a': seeds r = 0.5, 0.5, 0.5, 0.8 -> median 0.5, exact up to rounding of r^31 (a few ulps)
    assert table.loc[("a", "digits"), "attenuation"] == pytest.approx(0.5, rel=1e-12)
    # 'b': seed 0 has ||delta^1|| = 0 (attenuation 0); the others 0.5, 0.5, 0.8 -> median (0.5 + 0.5) / 2
    assert table.loc[("b", "digits"), "attenuation"] == pytest.approx(0.5, rel=1e-12)
    runs, _, layers = synthetic()
    per_run = SC.attenuation_per_run(runs[runs["method"] == "a"], layers)
    assert sorted(per_run.round(12)) == [0.5, 0.5, 0.5, 0.8]


def test_grad_spread_compares_the_first_and_the_output_layer(table):
    assert table.loc[("a", "digits"), "grad_spread"] == pytest.approx(-3.0, abs=1e-12)


def test_trainable_depth_is_the_deepest_depth_the_median_seed_reaches(table):
    assert table.loc[("a", "digits"), "trainable_depth"] == 8  # 4/4 at 2, 2/4 at 8, 1/4 at 32
    assert table.loc[("b", "digits"), "trainable_depth"] == 8  # 0/4 at 2 does not stop 2/4 at 8 counting


def test_steps_to_target_is_kaplan_meier_with_censoring(table):
    a = table.loc[("a", "digits")]
    # hits at 20 and 40, two seeds censored at the budget: the KM median is 40 (the solved seeds alone: 30)
    assert a["steps_to_target"] == 40 and a[f"reached_d{SC.SPEED_DEPTH}"] == 2
    # 'b': one hit at 10 and one at 30 in a seed that diverged later: reached before diverging counts
    assert table.loc[("b", "digits"), "steps_to_target"] == 30
    runs, steps, layers = synthetic()
    fewer = steps[~((steps["run_id"] == "a-digits-8-1") & (steps["step"] >= 40))]  # seed 1 never gets there
    only_one = SC.scorecard_table(runs, fewer, layers).set_index(["method", "task"]).loc[("a", "digits")]
    assert math.isnan(only_one["steps_to_target"]) and only_one["trainable_depth"] == 2


def test_final_metric_counts_a_diverged_seed_as_the_worst(table):
    # 'b' depth 8: finals 0.95 (hit), diverged (-> 0), 0.5, 0.5: median 0.5; 'a' depth 2: all 0.95
    assert table.loc[("b", "digits"), "final_d8"] == 0.5
    assert table.loc[("a", "digits"), "final_d2"] == 0.95
    assert table.loc[("b", "digits"), "diverged"] == 1


def test_columns_and_order():
    t = SC.scorecard_table(*synthetic())
    assert list(t.columns[:len(SC.COLUMNS)]) == list(SC.COLUMNS)
    assert {"final_d2", "final_d8", "final_d32", "seeds", "budget"} <= set(t.columns)
    assert t["seeds"].tolist() == [SEEDS, SEEDS] and t["budget"].tolist() == [BUDGET, BUDGET]


def test_teacher_target_is_a_loss_at_most_half():
    runs = pd.DataFrame([_run("a", "teacher", 8, s) for s in range(2)])
    steps = pd.DataFrame([{"run_id": runs["run_id"][s], "step": step, "test_accuracy": np.nan,
                           "test_loss": loss} for s, losses in enumerate(((1.0, 0.6, 0.5), (1.0, 0.9, 0.7)))
                          for step, loss in zip((0, 10, 20), losses)])
    first = SC.first_step_at_target(runs, steps)
    assert first.iloc[0] == 20 and math.isnan(first.iloc[1])


def test_predicted_attenuation_where_theory_applies():
    from bench import theory

    row = _run("x", "teacher", 32, 0)
    # relu with He's sigma_w^2 = 2, zero biases: chi_1 = 1 at every q, a ratio of exactly 1
    assert SC.predicted_attenuation(row) == pytest.approx(1.0, rel=1e-12)
    assert SC.predicted_attenuation({**row, "norm": "batchnorm"}) == theory.bn_delta_ratio("relu")
    for no_theory in ({"residual": True}, {"norm": "layernorm"}, {"activation": "pkg.mod:Swish"},
                      {"init": "pkg.mod:my_init"}):
        assert math.isnan(SC.predicted_attenuation({**row, **no_theory}))
    sig = SC.predicted_attenuation({**row, "activation": "sigmoid", "init": "xavier"})
    assert 0.1 < sig < 0.5  # sigmoid's slope is at most 1/4: it vanishes even at a variance-keeping init


def test_the_figure_draws_and_marks_trainable_depths():
    runs, steps, _ = synthetic()
    fig = SC.scorecard_figure(runs, steps)
    boxes = [p for p in fig.axes[0].patches if not p.get_fill()]
    assert len(boxes) == 2  # one outlined cell per method with a trainable depth


# ---------------------------------------------------------------------------------------- method presets
METHODS = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))


ISSUE_METHODS = {"sigmoid_normal", "sigmoid_xavier", "tanh_xavier", "tanh_critical_orthogonal", "relu_he", "relu_bn",
                 "relu_residual", "relu_residual_bn", "relu_layernorm", "selu_lecun", "gelu_he", "silu_he",
                 "relu_he_adam", "sigmoid_xavier_adam"}


def test_the_built_in_methods_include_the_issues_fourteen():
    assert set(METHODS) == set(SC.METHOD_ORDER) and ISSUE_METHODS <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_composes_and_validates(method, tmp_path):
    from bench.config import validate

    cfg = compose_cfg([f"method={method}", "experiment=scorecard_smoke", "model.depth=2"], results_dir=tmp_path)
    assert cfg.method_name == method
    validate(cfg)
    text = (ROOT / "conf" / "method" / f"{method}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    if "adam" in method:  # the method's own step wins over the experiment's SGD lr and momentum
        assert cfg.train.lr == 0.001 and cfg.train.momentum == 0.0
    else:
        assert cfg.train.lr == 0.02 and cfg.train.momentum == 0.9


def test_no_method_leaves_method_name_null():
    assert compose_cfg([]).method_name is None


@pytest.mark.slow  # ~40-60 s on a shared 2-core machine: Hydra in a subprocess, two depth-32 jobs, the report
def test_smoke_run_writes_the_scorecard(tmp_path):
    proc = run_cli("-m", "experiment=scorecard_smoke", "method=sigmoid_normal,relu_bn", "task=digits",
                   "model.depth=2,32", "ensemble=2", "train.steps=20", "log.every=10", "hydra/launcher=basic",
                   f"results_dir={tmp_path}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = results.load(tmp_path / "scorecard_smoke").runs
    assert set(runs["method"]) == {"sigmoid_normal", "relu_bn"} and set(runs["experiment"]) == {"scorecard_smoke"}
    csv = tmp_path / "scorecard_smoke" / "report" / "tables" / "scorecard.csv"
    t = pd.read_csv(csv)
    assert list(t.columns[:len(SC.COLUMNS)]) == list(SC.COLUMNS) and len(t) == 2
    assert (tmp_path / "scorecard_smoke" / "report" / "figures" / "scorecard_smoke-scorecard.png").exists()
    assert t.set_index("method").loc["relu_bn", "predicted_attenuation"] == pytest.approx(1.2112, abs=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_backward_by_finite_differences_and_twin(method, tmp_path):
    """Every built-in method as the scorecard builds it (its activation, init, norm, residual branch and
    optimizer), shrunk to 3 hidden layers of 5 units: the hand-written backward against central
    differences, then the torch twin in lockstep over 12 Adam or SGD steps."""
    from test_engine import _fd_check

    from bench.config import validate
    from bench.init import init_params
    from bench.twin import lockstep_cfg

    cfg = compose_cfg([f"method={method}", "task=digits", "model.depth=3", "model.width=5", "train.batch_size=16",
                       "train.steps=12", "log.every=4", "ensemble=2"], results_dir=tmp_path)
    task, spec, tspec = validate(cfg)
    params = init_params(spec, cfg.model.init, [1, 2], cfg.model.init_scale, cfg.model.init_bias)
    rng = np.random.default_rng(0)
    for name in params:
        if name.endswith(".alpha"):  # rezero's alpha starts at 0, where the branch's own gradients vanish
            params[name] = params[name] + 0.5
        if name.endswith(".bias"):  # zero biases below a layer of dead relus give z = 0 exactly: on the kink,
            params[name] = params[name] + 0.1 * rng.standard_normal(params[name].shape)  # where no FD holds
    x, d = task.x_train[None, :16], task.y_train[None, :16]
    # eps 1e-5 in float64: truncation and rounding both ~1e-10 relative, far below _fd_check's 1e-6
    _fd_check(spec, tspec.loss, x, d, params)
    table = lockstep_cfg(cfg)
    # lockstep: both engines redo each logged step from the same parameters and optimizer state, so
    # only float64 rounding separates them (the twin's own bound, 1e-9)
    assert len(table) and table["max_rel_diff"].max() < 1e-9, table.sort_values("max_rel_diff").tail(3)


def test_attenuation_is_empty_where_the_top_delta_is_exactly_zero():
    """rezero at initialisation: every branch's delta is exactly 0 (alpha = 0), the first layer's is not: the
    ratio is not a vanishing or exploding rate, so the run gives NaN (not inf) and the others' median stands."""
    runs, _, layers = synthetic()
    runs, layers = runs[runs["method"] == "a"], layers.copy()
    off = layers["run_id"].eq("a-digits-32-0") & layers["layer"].between(2, SC.ATTENUATION_DEPTH)
    layers.loc[off, "delta_norm"] = 0.0
    per_run = SC.attenuation_per_run(runs, layers)
    assert math.isnan(per_run["a-digits-32-0"])
    assert per_run.drop("a-digits-32-0").tolist() == pytest.approx([0.5, 0.5, 0.8], rel=1e-12)
