"""Issue 11's scorecard: every method preset (conf/method/) on one fixed suite, five numbers each.

The suite (conf/experiment/scorecard.yaml): the digits (classification) and the deep random teacher
(regression), a ladder of hidden-layer depths, one width, batch size and step budget, 8 seeds per point.
Per (method, task), from the runs, steps and layers tables of `bench.results.load`:

  attenuation            at depth ATTENUATION_DEPTH, step 0: per run the geometric mean over hidden layers
                         l = 1..D-1 of ||delta^l|| / ||delta^(l+1)|| (delta = dLoss/dz, the layers table's
                         delta_norm), which telescopes to (||delta^1|| / ||delta^D||)^(1/(D-1)); then the
                         median over seeds. Below 1: the gradient vanishes toward the input; above 1: explodes.
  predicted_attenuation  the same geometric mean predicted by bench.theory at this init, width and task: plain
                         nets without a norm, the mean-field sqrt(chi_1(q^l)) along the q path from the task's
                         inputs (analysis.figures.theory_profile); plain batch-norm nets, the large-batch rate
                         bench.theory.bn_delta_ratio; NaN where no theory applies (residual nets, layer norm,
                         plug-in activations or inits the theory does not cover).
  grad_spread            at depth ATTENUATION_DEPTH, step 0: per run log10(||dL/dW^1|| / ||dL/dW^out||) (first
                         hidden layer's weights over the output layer's), then the median over seeds (the
                         median of the log is the log of the median: a geometric median).
  trainable_depth        the deepest depth of the ladder at which at least half the seeds (the median seed)
                         reach the task's target at some logged step within the budget; 0 when no depth does.
  steps_to_target        at depth SPEED_DEPTH, the Kaplan-Meier median over seeds of the first logged step that
                         meets the target, seeds that never do censored at the budget (analysis.tables.km_summary);
                         NaN ("not reached") when fewer than half get there.

Targets (TARGETS): digits, test accuracy >= 0.9 (chance is 0.1); teacher, test loss <= 0.5: the teacher's
targets have unit variance and the loss is their mean squared error, so predicting 0 scores 1.0 and 0.5 means
half the target variance explained (a 2-layer relu/He net gets ~0.2 in 300 steps). A diverged seed counts as
not reaching the target after it diverged, and its final metric as the worst value (accuracy 0, loss +inf).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from analysis.figures import DOUBLE, _require, plt, set_theme, sns, theory_profile
from analysis.tables import km_summary

KINDS = ("scorecard", "scorecard_smoke")  # the presets whose experiments the report scores
# the built-in methods (conf/method/<name>.yaml), in the order tables and figures list them
METHOD_ORDER = ("sigmoid_normal", "sigmoid_xavier", "tanh_xavier", "tanh_critical_orthogonal", "relu_he",
                "relu_bn", "relu_residual", "relu_residual_rezero", "relu_residual_bn", "relu_layernorm",
                "selu_lecun", "gelu_he",
                "silu_he", "relu_he_adam", "sigmoid_xavier_adam")
# task -> (steps column, direction, target): "max" = reached when the metric >= target, "min" = <= target
TARGETS = {"digits": ("test_accuracy", "max", 0.9), "teacher": ("test_loss", "min", 0.5)}
ATTENUATION_DEPTH = 32  # attenuation and grad_spread are measured at this depth
SPEED_DEPTH = 8  # steps_to_target is measured at this depth
COLUMNS = ("method", "task", "attenuation", "predicted_attenuation", "grad_spread", "trainable_depth",
           "steps_to_target")
NOTE = (
    "Per method and task. attenuation: at depth 32 and step 0, each run's geometric mean over hidden layers of "
    "||delta^l|| / ||delta^(l+1)|| (< 1 vanishing toward the input, > 1 exploding), median over seeds; "
    "predicted_attenuation: the same from bench.theory (plain nets: mean-field sqrt(chi_1) along the q path "
    "from the task's inputs; plain batch norm: the large-batch bn_delta_ratio), empty where no theory applies "
    "(residual, layer norm, plug-ins); grad_spread: log10 ||dL/dW^1|| / ||dL/dW^out|| at depth 32, step 0, "
    "median over seeds; trainable_depth: the deepest ladder depth at which at least half the seeds reach the "
    "target (digits: test accuracy >= 0.9; teacher: test loss <= 0.5, where predicting 0 scores 1) at a logged "
    "step within the budget, 0 if none; steps_to_target: at depth 8, the Kaplan-Meier median over seeds of the "
    "first logged step at the target, censored at the budget (empty: fewer than half reach it); "
    "steps_to_target_ci_low/high: its 95% interval; reached_d8: seeds at the target at depth 8; final_d<k>: "
    "the median over seeds of the final test metric at depth k (a diverged seed counts as accuracy 0 or loss "
    "inf); diverged: diverged runs over all depths; seeds: runs per depth; budget: training steps.")


def method_order(methods) -> list:
    """The built-ins in METHOD_ORDER, then any other method (a user's preset) alphabetically."""
    methods = set(methods)
    return [m for m in METHOD_ORDER if m in methods] + sorted(methods - set(METHOD_ORDER))


def scored_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs the scorecard scores: a method preset's (runs.method set) on one of the suite's tasks."""
    if "method" not in runs:
        return runs.iloc[:0]
    return runs[runs["method"].notna() & runs["task"].isin(list(TARGETS))]


def _layer_norms(runs: pd.DataFrame, layers: pd.DataFrame, depth: int) -> pd.DataFrame:
    """Step-0 weight rows of the runs at `depth`, pivoted to run_id x layer for delta_norm and grad_norm."""
    r = runs[runs["depth"] == depth]
    ly = layers[(layers["step"] == 0) & (layers["param"] == "weight") & layers["run_id"].isin(r["run_id"])]
    return ly.pivot_table(index="run_id", columns="layer", values=["delta_norm", "grad_norm"], aggfunc="first")


def attenuation_per_run(runs: pd.DataFrame, layers: pd.DataFrame, depth: int = ATTENUATION_DEPTH) -> pd.Series:
    """run_id -> geometric mean over l = 1..depth-1 of ||delta^l|| / ||delta^(l+1)|| at step 0. A delta^1
    of exactly 0 gives 0 (the gradient vanished); a top delta of exactly 0 gives NaN, not inf (rezero: alpha = 0
    switches every residual branch off at initialisation, so the branches' deltas are 0 and the ratio says
    nothing about vanishing)."""
    p = _layer_norms(runs, layers, depth)
    if p.empty or depth < 2:
        return pd.Series(dtype=float)
    d = p["delta_norm"]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (d[1] / d[depth]) ** (1.0 / (depth - 1))
    return ratio.where(np.isfinite(ratio))


def grad_spread_per_run(runs: pd.DataFrame, layers: pd.DataFrame, depth: int = ATTENUATION_DEPTH) -> pd.Series:
    """run_id -> log10(||dL/dW^1|| / ||dL/dW^out||) at step 0; the output layer is layer depth + 1."""
    p = _layer_norms(runs, layers, depth)
    if p.empty:
        return pd.Series(dtype=float)
    g = p["grad_norm"]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log10(g[1] / g[depth + 1])


def predicted_attenuation(row) -> float:
    """bench.theory's geometric-mean ||delta^l|| / ||delta^(l+1)|| for a run's config (a runs row with
    config_json), or NaN where no theory applies: residual nets, layer norm, or an activation or init the
    theory does not cover (a plug-in, a new scheme without variances)."""
    from bench import theory
    from bench.tasks import make_task

    depth = int(row["depth"])
    plug_in = ":" in str(row["activation"]) or ":" in str(row["init"])  # pkg.module:Name: not the theory's
    if bool(row["residual"]) or depth < 2 or plug_in:
        return math.nan
    try:
        if row["norm"] == "batchnorm":
            return float(theory.bn_delta_ratio(row["activation"]))
        if row["norm"] != "none":
            return math.nan
        task = json.loads(row["config_json"])["task"]
        x = make_task(task.pop("name"), **task).x_train
        profile = theory_profile(row["activation"], row["init"], int(row["width"]), depth, x.shape[1],
                                 float(np.mean(x * x)), row["init_scale"], row["init_bias"])
    except (ValueError, KeyError, TypeError, ImportError):  # not covered by the theory (it raises these)
        return math.nan
    return float(profile[0] ** (1.0 / (depth - 1)))  # profile is 1 at l = depth: profile[0] = prod of ratios


def first_step_at_target(runs: pd.DataFrame, steps: pd.DataFrame) -> pd.Series:
    """run_id -> the first logged step at which the run meets its task's target (NaN if never)."""
    hits = []
    for task, g in runs.groupby("task"):
        column, direction, target = TARGETS[task]
        st = steps[steps["run_id"].isin(g["run_id"])]
        ok = st[column] >= target if direction == "max" else st[column] <= target
        hits.append(st[ok].groupby("run_id")["step"].min())
    first = pd.concat(hits) if hits else pd.Series(dtype=float)
    return runs["run_id"].map(first).set_axis(runs["run_id"]).astype(float)


def final_metric(runs: pd.DataFrame) -> pd.Series:
    """Per run (runs' index): the final test metric of its task; a diverged or missing value counts as the
    worst (accuracy 0, loss +inf)."""
    out = pd.Series(np.nan, index=runs.index)
    for task, g in runs.groupby("task"):
        column, direction, _ = TARGETS[task]
        v = g[f"final_{column}"].astype(float).where(g["status"] == "ok")
        out.loc[g.index] = v.fillna(0.0 if direction == "max" else math.inf)
    return out


def depth_grid(runs: pd.DataFrame) -> pd.DataFrame:
    """method, task, depth, final (median final test metric over seeds), reached (seeds at the target within
    the budget), seeds, trainable (at least half reached it: the Kaplan-Meier median is finite), diverged."""
    r = runs.assign(final=final_metric(runs).to_numpy())
    rows = []
    for (method, task, depth), g in r.groupby(["method", "task", "depth"]):
        km = km_summary(g["to_target"], g["steps"])
        rows.append({"method": method, "task": task, "depth": int(depth), "final": float(g["final"].median()),
                     "reached": km["solved"], "seeds": km["seeds"], "trainable": not math.isnan(km["median"]),
                     "diverged": int((g["status"] == "diverged").sum())})
    return pd.DataFrame(rows)


def scorecard_table(runs: pd.DataFrame, steps: pd.DataFrame, layers: pd.DataFrame) -> pd.DataFrame:
    """The scorecard: a row per (method, task), COLUMNS first, then steps_to_target's interval, reached_d8,
    final_d<k> per ladder depth, diverged, seeds and budget (see NOTE)."""
    r = scored_runs(runs)
    _require(r, "the scorecard (no runs of a method preset on digits or teacher)")
    r = r.assign(to_target=first_step_at_target(r, steps).to_numpy())
    att, spread = attenuation_per_run(r, layers), grad_spread_per_run(r, layers)
    grid = depth_grid(r)
    ladder = sorted(grid["depth"].unique())
    rows = []
    for (method, task), g in r.groupby(["method", "task"]):
        gg = grid[(grid["method"] == method) & (grid["task"] == task)].set_index("depth")
        ids, deep, fast = g["run_id"], g[g["depth"] == ATTENUATION_DEPTH], g[g["depth"] == SPEED_DEPTH]
        speed = km_summary(fast["to_target"], fast["steps"])
        none = not len(fast)
        trainable = gg.index[gg["trainable"]]
        rows.append({
            "method": method, "task": task,
            "attenuation": float(att[att.index.isin(ids)].median()) if len(deep) else math.nan,
            "predicted_attenuation": predicted_attenuation(deep.iloc[0]) if len(deep) else math.nan,
            "grad_spread": float(spread[spread.index.isin(ids)].median()) if len(deep) else math.nan,
            "trainable_depth": int(trainable.max()) if len(trainable) else 0,
            **{k: math.nan if none else speed[v] for k, v in (
                ("steps_to_target", "median"), ("steps_to_target_ci_low", "median_ci_low"),
                ("steps_to_target_ci_high", "median_ci_high"), (f"reached_d{SPEED_DEPTH}", "solved"))},
            **{f"final_d{d}": gg["final"].get(d, math.nan) for d in ladder},
            "diverged": int((g["status"] == "diverged").sum()), "seeds": int(g.groupby("depth").size().min()),
            "budget": int(g["steps"].max())})
    out = pd.DataFrame(rows)
    order = {m: i for i, m in enumerate(method_order(out["method"]))}
    return out.sort_values(["task", "method"], key=lambda c: c.map(order) if c.name == "method" else c,
                           ignore_index=True)


def scorecard_figure(runs: pd.DataFrame, steps: pd.DataFrame) -> plt.Figure:
    """Methods x depth heat maps of the median final test metric, a panel per task, each cell annotated;
    the trainable depth's cell is outlined (black box) and named beside the method ('none': no depth)."""
    r = scored_runs(runs)
    _require(r, "the scorecard figure")
    r = r.assign(to_target=first_step_at_target(r, steps).to_numpy())
    grid = depth_grid(r)
    set_theme()
    tasks = [t for t in TARGETS if t in set(grid["task"])]
    methods = method_order(grid["method"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(DOUBLE, 0.9 + 0.24 * len(methods)), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        column, direction, target = TARGETS[task]
        g = grid[grid["task"] == task]
        depths = sorted(g["depth"].unique())
        def cells(col, g=g, depths=depths):
            return g.pivot(index="method", columns="depth", values=col).reindex(index=methods, columns=depths)
        values = cells("final")
        shown = values.clip(upper=1.5) if direction == "min" else values  # diverged (inf) drawn as the worst colour
        labels = values.map(lambda v: "" if pd.isna(v) else f"{v:.2f}").mask(cells("diverged") * 2 >= cells("seeds"),
                                                                           "div")
        sns.heatmap(shown, ax=ax, annot=labels.to_numpy(), fmt="", annot_kws={"fontsize": 5.5},
                    cmap="viridis" if direction == "max" else "viridis_r",
                    vmin=0.0, vmax=1.0 if direction == "max" else 1.5, linewidths=0.4, linecolor="w",
                    cbar_kws={"label": f"final {column.replace('_', ' ')} (median)", "shrink": 0.8})
        names = []
        for i, m in enumerate(methods):
            ok = g[(g["method"] == m) & g["trainable"]]["depth"]
            if len(ok):
                ax.add_patch(plt.Rectangle((depths.index(int(ok.max())), i), 1, 1, fill=False, ec="k", lw=1.4))
            names.append(f"{m} ({int(ok.max()) if len(ok) else 'none'})" if m in set(g["method"]) else m)
        sign = ">=" if direction == "max" else "<="
        ax.set(title=f"{task}: target {column.replace('_', ' ')} {sign} {target:g}", xlabel="hidden layers",
               ylabel="method (trainable depth)" if ax is axes[0][0] else "")
        ax.set_yticks(np.arange(len(methods)) + 0.5, names, rotation=0)
        ax.tick_params(labelsize=6.5)
    fig.tight_layout()
    return fig


def caption(table: pd.DataFrame, runs: pd.DataFrame) -> str:
    """The figure's caption with the trainable depths it shows."""
    r = scored_runs(runs)
    depths = "/".join(str(int(d)) for d in sorted(r["depth"].unique()))
    parts = [f"{t}: " + ", ".join(f"{x.method} {x.trainable_depth}" for x in table[table["task"] == t].itertuples())
             for t in table["task"].unique()]
    return (f"Scorecard: the median over seeds ({int(table['seeds'].min())} per point) of the final test metric "
            f"after {int(table['budget'].max()):,} steps, methods x depth ({depths} hidden layers of "
            f"{int(r['width'].max())}); a diverged seed counts as accuracy 0 / loss inf ('div': at least half "
            "the seeds diverged). Black box: the trainable depth, the deepest at which at least half the seeds "
            "reach the target (digits: test accuracy >= 0.9; teacher: test loss <= 0.5) at a logged step within the "
            "budget, also in brackets after each method's name ('none': no depth does). Trainable depth per method: "
            + "; ".join(parts) + ".")


def plan_items(exps) -> tuple[list[tuple], list[tuple[str, str]], dict]:
    """For analysis.report.plan: figures (name, draw, caption, key), skipped (name, reason) and tables
    {name: (DataFrame, note)} for every experiment holding method-preset runs on the suite's tasks."""
    figs, skipped, tables = [], [], {}
    for e in exps:
        r = scored_runs(e.runs)
        if r.empty:
            if e.kind in KINDS:
                skipped.append((f"{e.name}-scorecard", "no runs of a method preset on digits or teacher"))
            continue
        name = "scorecard" if "scorecard" not in tables else f"scorecard-{e.name}"
        t = scorecard_table(e.runs, e.steps, e.layers)
        tables[name] = (t, NOTE)
        figs.append((f"{e.name}-scorecard", lambda r=e.runs, s=e.steps: scorecard_figure(r, s),
                     lambda t=t, r=e.runs: caption(t, r), "scorecard"))
    return figs, skipped, tables
