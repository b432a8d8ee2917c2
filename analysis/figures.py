"""One function per figure: result DataFrames in, a matplotlib Figure out.

What it is for: the figures of the report (`analysis.report`), drawn from the `runs`, `steps` and `layers`
tables of `bench.results.load` (column names as there). Every curve summarises all seeds, never one: the
median as a line and the interquartile range as a band; time to solve as the Kaplan-Meier fraction solved
(unsolved seeds censored at the cap); the twin checks as the worst case over seeds. Figures are sized for a paper:
single column 3.4 in, double column 7 in; log axes wherever magnitudes span decades.

What it is not for: choosing which data to plot (the report filters the tables) or saving (the caller
does `fig.savefig`). Functions raise ValueError when the data they are given cannot make the figure.
"""

from __future__ import annotations

import json
import warnings

import matplotlib

matplotlib.use("Agg")  # files only: the report runs headless
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402,F401  (FixedLocator, formatters)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402

from analysis.paper import (  # noqa: E402,F401  (figures.X is how the report reads them)
    ACT_ORDER,
    ARCH_ORDER,
    BLOG_GRAD,
    BLOG_LOSS,
    FAMILY_TREES_SWEEPS,
    NIELSEN,
    PAPER_SWEEPS,
    PROBLEMS,
    sigma_w_label,
)
from bench.twin import LIMIT as LOCKSTEP_LIMIT  # noqa: E402  (the twin check's own bound)

SINGLE, DOUBLE = 3.4, 7.0  # figure widths in inches: one and two columns of a paper
BAND_ALPHA = 0.2

_THEME_SET = False


def set_theme() -> None:
    """The one theme of every figure (seaborn "paper" context, sized for a 3.4 in column)."""
    global _THEME_SET
    if _THEME_SET:
        return
    sns.set_theme(context="paper", style="whitegrid", font_scale=0.9,
                  rc={"figure.dpi": 100, "savefig.dpi": 200, "savefig.bbox": "tight",
                      "axes.titlesize": 8.5, "axes.labelsize": 8, "legend.fontsize": 7,
                      "legend.title_fontsize": 7, "xtick.labelsize": 7, "ytick.labelsize": 7,
                      "lines.linewidth": 1.3, "grid.linewidth": 0.5, "pdf.fonttype": 42})
    _THEME_SET = True


def arch_label(residual, norm) -> str:
    """plain | residual | batchnorm | residual+bn | layernorm | residual+ln."""
    short = {"batchnorm": "bn", "layernorm": "ln"}.get(str(norm))
    if bool(residual):
        return f"residual+{short}" if short else "residual"
    return str(norm) if short else "plain"


def with_arch(runs: pd.DataFrame) -> pd.DataFrame:
    """runs plus an `arch` column."""
    out = runs.copy()
    out["arch"] = [arch_label(r, n) for r, n in zip(out["residual"], out["norm"])]
    return out


def join_runs(df: pd.DataFrame, runs: pd.DataFrame, cols) -> pd.DataFrame:
    """steps/layers rows with the runs columns `cols` joined on run_id (columns already there are kept)."""
    cols = [c for c in cols if c not in df.columns]
    return df.merge(runs[["run_id", *cols]], on="run_id", how="inner") if cols else df


def quartiles(df: pd.DataFrame, by, value: str) -> pd.DataFrame:
    """Median and IQR of `value` over seeds: columns by..., q25, q50, q75, n."""
    g = df.groupby(list(by), sort=True, observed=True)[value]
    out = pd.DataFrame({"q25": g.quantile(0.25), "q50": g.median(), "q75": g.quantile(0.75), "n": g.count()})
    return out.reset_index()


def _band(ax, x, q, color, label=None, ls="-", alpha=BAND_ALPHA, marker=None, lw=None):
    ax.fill_between(x, q["q25"], q["q75"], color=color, alpha=alpha, lw=0)
    ax.plot(x, q["q50"], color=color, ls=ls, label=label, marker=marker, ms=3, lw=lw)


def _order(values, preferred) -> list:
    values = list(dict.fromkeys(values))
    return [v for v in preferred if v in values] + sorted(v for v in values if v not in preferred)


def _require(df: pd.DataFrame, what: str) -> None:
    if df is None or len(df) == 0:
        raise ValueError(f"no data for {what}")


def _tidy_log_y(ax) -> None:
    """Log y without crowded minor labels; under 2 decades, majors at 1, 2, 5 x 10^k instead."""
    lo, hi = ax.get_ylim()
    if lo > 0 and np.log10(hi / lo) < 2.0:
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _grid(n_rows, n_cols, width, row_height, sharex=False, sharey=False):
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width, row_height * n_rows), squeeze=False,
                             sharex=sharex, sharey=sharey)
    return fig, axes


# ----------------------------------------------------------------------------------------------- seed
def seed_xor_charts(runs: pd.DataFrame, steps: pd.DataFrame, layers: pd.DataFrame,
                    backend: str | None = None) -> plt.Figure:
    """The blog post's two charts over seeds: loss vs step; mean |grad W2| (solid) vs |grad W1| (dashed)."""
    set_theme()
    _require(runs, "the seed's charts")
    backend = backend or ("numpy" if "numpy" in set(runs["backend"]) else runs["backend"].iloc[0])
    ids = runs.loc[runs["backend"] == backend, "run_id"]
    st = steps[steps["run_id"].isin(ids)]
    ly = layers[layers["run_id"].isin(ids) & (layers["param"] == "weight")]
    _require(st, "the seed's loss chart")
    fig, axes = _grid(1, 2, DOUBLE, 2.5)
    ax = axes[0, 0]
    q = quartiles(st, ["step"], "loss")
    n = len(ids)
    _band(ax, q["step"], q, "C0", label=f"median, IQR ({n} seeds)")
    ax.plot(list(BLOG_LOSS), list(BLOG_LOSS.values()), "kD", ms=4, label="blog post (1 run)")
    ax.set(yscale="log", xlabel="step", ylabel="loss (MSE)", title="(a) loss")
    ax.legend(loc="lower left")
    ax = axes[0, 1]
    colors = {2: "C4", 1: "C1"}
    for layer, ls in ((2, "-"), (1, "--")):
        q = quartiles(ly[ly["layer"] == layer], ["step"], "grad_mean_abs")
        _band(ax, q["step"], q, colors[layer], ls=ls, label=f"|grad W{layer}|")
    last = int(st["step"].max())
    for layer, v in BLOG_GRAD.items():
        ax.plot([last], [v], marker="D" if layer == 2 else "o", color="k", ms=4, ls="none",
                label=f"blog W{layer}")
    ax.set(yscale="log", xlabel="step", ylabel="mean |dLoss/dW|", title="(b) gradient size per layer")
    ax.legend(loc="lower left", ncols=2)
    fig.tight_layout()
    return fig


# -------------------------------------------------------------------------------- theory for overlays
def theory_profile(activation: str, init: str, width: int, depth: int, n_in: int, mean_x2: float,
                   init_scale=None, init_bias=None) -> np.ndarray:
    """Mean-field ||delta^l|| for hidden layers 1..depth of a plain net, normalised to 1 at l = depth.

    Layer 1 reads raw inputs, so q^1 = sw2_1 mean(x^2) + sb2 (bench.theory's docstring); the ratios
    ||delta^l|| / ||delta^(l+1)|| = sqrt(chi1(q^l)) use the hidden-to-hidden sw2 of W^(l+1).
    """
    from bench import theory

    scale = None if init_scale is None or pd.isna(init_scale) else float(init_scale)
    bias = None if init_bias is None or pd.isna(init_bias) else float(init_bias)
    sw2_1, sb2_1 = theory.init_variances(init, n_in, scale, bias, fan_out=width)
    sw2, sb2 = theory.init_variances(init, width, scale, bias, fan_out=width)
    q1 = theory.input_q(sw2_1, sb2_1, mean_x2)
    if depth == 1:
        return np.ones(1)
    tail = theory.predicted_delta_profile(activation, sw2, sb2, depth - 1, q1)  # layers 2..depth
    first = tail[0] * theory.delta_ratio(activation, sw2, sb2, q1)
    return np.concatenate([[first], tail])


# ---------------------------------------------------------------------------- profile at initialisation
def gradient_profile(runs: pd.DataFrame, layers: pd.DataFrame, stat: str = "delta_norm",
                     param: str = "weight", inputs: dict | None = None, reference: dict | None = None,
                     theory: bool = True) -> plt.Figure:
    """`stat` of `param` rows vs layer index at step 0: a panel per activation x arch, a line per depth.

    inputs: {task: (n_in, mean x^2)} for the mean-field overlay (dashed, plain nets only, normalised to
    the measured median at the last hidden layer). The theory predicts delta norms, so the overlay is
    drawn only when stat == "delta_norm": a weight gradient also carries the activation norms;
    reference: {depth: values per hidden layer} drawn as
    markers (Nielsen's numbers). Needs a single init in `runs`.
    """
    set_theme()
    r = with_arch(runs)
    inits = r["init"].unique()
    if len(inits) != 1:
        raise ValueError(f"gradient_profile needs one init, got {sorted(inits)}")
    ly = layers[(layers["step"] == 0) & (layers["param"] == param)]
    ly = join_runs(ly, r, ["activation", "arch", "depth", "width", "task", "init", "init_scale", "init_bias"])
    _require(ly, f"{stat} of {param} at step 0")
    acts = _order(ly["activation"], ACT_ORDER)
    archs = _order(ly["arch"], ARCH_ORDER)
    depths = sorted(ly["depth"].unique())
    palette = dict(zip(depths, sns.color_palette("viridis_r" if len(depths) > 1 else "dark", len(depths))))
    fig, axes = _grid(len(archs), len(acts), SINGLE if len(acts) == 1 else DOUBLE,
                      2.3 if len(acts) == 1 else 1.9)  # own y range per panel: they span 1e-16 to 1e4
    drew_theory = False
    for i, arch in enumerate(archs):
        for j, act in enumerate(acts):
            ax = axes[i, j]
            sub = ly[(ly["arch"] == arch) & (ly["activation"] == act)]
            if sub.empty:
                ax.set_axis_off()
                continue
            for depth in depths:
                d = sub[(sub["depth"] == depth) & (sub["layer"] <= depth + (0 if param == "bias" else 1))]
                if d.empty:
                    continue
                q = quartiles(d, ["layer"], stat)
                _band(ax, q["layer"], q, palette[depth], label=f"{depth}", marker="." if depth <= 5 else None)
                row = d.iloc[0]
                if (theory and stat == "delta_norm" and arch == "plain" and inputs is not None
                        and row["task"] in inputs and depth > 1):
                    n_in, mean_x2 = inputs[row["task"]]
                    pred = theory_profile(act, row["init"], int(row["width"]), depth, n_in, mean_x2,
                                          row["init_scale"], row["init_bias"])
                    anchor = q.loc[q["layer"] == depth, "q50"]
                    if len(anchor) and np.isfinite(anchor.iloc[0]) and anchor.iloc[0] > 0:
                        ax.plot(np.arange(1, depth + 1), pred * anchor.iloc[0], color="k", alpha=0.8,
                                ls=(0, (3, 2)), lw=0.8, zorder=5)
                        drew_theory = True
                if reference and depth in reference:
                    ref = reference[depth]
                    ax.plot(np.arange(1, len(ref) + 1), ref, ls=":", marker="s", mfc="none", ms=4,
                            color=palette[depth])
            ax.set_yscale("log")
            _tidy_log_y(ax)
            ax.set_title(f"{act}, {arch}" if len(archs) * len(acts) > 1 else f"{act}, {arch}, init {inits[0]}")
            if i == len(archs) - 1:
                ax.set_xlabel("layer (1 = input side)")
            if j == 0:
                label = {"delta_norm": r"$\|\delta^l\|$",
                         "grad_norm": rf"$\|\partial L/\partial {'b' if param == 'bias' else 'W'}^l\|$",
                         "grad_mean_abs": "mean |grad|"}.get(stat, stat)
                ax.set_ylabel(label)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    handles = [plt.Line2D([], [], color=palette[d], label=str(d)) for d in depths]
    if drew_theory:
        handles.append(plt.Line2D([], [], color="k", ls=(0, (3, 2)), lw=0.8, label="mean field"))
    if reference:
        handles.append(plt.Line2D([], [], color="0.3", ls=":", marker="s", mfc="none", label="Nielsen"))
    fig.tight_layout()
    fig.legend(handles=handles, title="hidden layers", loc="upper center", ncols=min(len(handles), 8),
               bbox_to_anchor=(0.5, 0.0), frameon=False)
    return fig


# ------------------------------------------------------------------------------ first/last ratio
def gradient_ratio(runs: pd.DataFrame, layers: pd.DataFrame, stat: str = "grad_norm") -> plt.Figure:
    """||grad W^1|| / ||grad W^out|| at step 0 vs depth: hue = activation, line style = arch, a panel per
    (task, init): tasks are never pooled into one median (their inputs and losses differ)."""
    set_theme()
    r = with_arch(runs)
    ly = layers[(layers["step"] == 0) & (layers["param"] == "weight")]
    ly = join_runs(ly, r, ["activation", "arch", "depth", "init", "task"])
    first = ly[ly["layer"] == 1].set_index("run_id")[stat]
    last = ly[ly["layer"] == ly["depth"] + 1].set_index("run_id")[stat]
    ratio = (first / last).rename("ratio").reset_index()
    ratio = ratio.merge(r[["run_id", "activation", "arch", "depth", "init", "task"]], on="run_id")
    ratio = ratio[np.isfinite(ratio["ratio"]) & (ratio["ratio"] > 0)]
    _require(ratio, "the first/last gradient ratio")
    if ratio["depth"].nunique() < 2:
        raise ValueError("the first/last gradient ratio needs at least two depths")
    panels = sorted(set(zip(ratio["task"], ratio["init"])))
    acts = _order(ratio["activation"], ACT_ORDER)
    archs = _order(ratio["arch"], ARCH_ORDER)
    styles = dict(zip(ARCH_ORDER, ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))))
    colors = dict(zip(acts, sns.color_palette("colorblind", len(acts))))
    n_cols = min(len(panels), 3)
    fig, axes = _grid(int(np.ceil(len(panels) / n_cols)), n_cols, SINGLE if len(panels) == 1 else DOUBLE, 2.6,
                      sharey=True)
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    for j, (task, init) in enumerate(panels):
        ax = axes.flat[j]
        for act in acts:
            for arch in archs:
                d = ratio[(ratio["task"] == task) & (ratio["init"] == init) & (ratio["activation"] == act)
                          & (ratio["arch"] == arch)]
                if d.empty:
                    continue
                q = quartiles(d, ["depth"], "ratio")
                _band(ax, q["depth"], q, colors[act], ls=styles.get(arch, "-"), alpha=0.12, marker=".")
        ax.axhline(1.0, color="0.4", lw=0.6)
        # linear x: exponential decay is a straight line
        ax.set(yscale="log", xlabel="hidden layers", title=f"{task}, init {init}")
        if j % n_cols == 0:
            ax.set_ylabel(r"$\|\partial L/\partial W^1\| \,/\, \|\partial L/\partial W^{out}\|$ at step 0")
    handles = [plt.Line2D([], [], color=colors[a], label=a) for a in acts]
    handles += [plt.Line2D([], [], color="0.3", ls=styles.get(a, "-"), label=a) for a in archs]
    fig.tight_layout()
    fig.legend(handles=handles, loc="upper center", ncols=min(len(handles), 7), bbox_to_anchor=(0.5, 0.0),
               frameon=False)
    return fig


# ------------------------------------------------------------------------------ over training
def training_dynamics(runs: pd.DataFrame, layers: pd.DataFrame, depth: int | None = None) -> plt.Figure:
    """Per-layer ||grad W^l|| over training at one depth: sigmoid plain vs relu, sigmoid residual and
    sigmoid batchnorm (the panels present). Lines per layer (colour = layer); IQR bands for the first
    and the output layer only (bands for every layer would hide the lines)."""
    set_theme()
    r = with_arch(runs)
    panels = [("sigmoid", "plain"), ("relu", "plain"), ("sigmoid", "residual"), ("sigmoid", "batchnorm")]
    sig = r[(r["activation"] == "sigmoid") & (r["arch"] == "plain")]
    if depth is None:
        _require(sig, "training dynamics (no plain sigmoid runs)")
        depth = int(sig["depth"].max())
    r = r[r["depth"] == depth]
    present = [p for p in panels if ((r["activation"] == p[0]) & (r["arch"] == p[1])).any()]
    if len(present) < 2:
        raise ValueError(f"training dynamics needs plain sigmoid and one other net at depth {depth}")
    ly = join_runs(layers[layers["param"] == "weight"], r, ["activation", "arch", "depth"])
    if ly["step"].nunique() < 2:
        raise ValueError("training dynamics needs more than one logged step")
    n_cols = 2 if len(present) > 2 else len(present)
    n_rows = int(np.ceil(len(present) / n_cols))
    fig, axes = _grid(n_rows, n_cols, DOUBLE, 2.2, sharey=True, sharex=True)
    cmap, norm = plt.get_cmap("viridis"), Normalize(1, depth + 1)
    for k, (act, arch) in enumerate(present):
        ax = axes.flat[k]
        d = ly[(ly["activation"] == act) & (ly["arch"] == arch)]
        n = d["run_id"].nunique()
        for layer in range(1, depth + 2):
            q = quartiles(d[d["layer"] == layer], ["step"], "grad_norm")
            banded = layer in (1, depth + 1)
            _band(ax, q["step"], q, cmap(norm(layer)), alpha=BAND_ALPHA if banded else 0.0,
                  lw=1.4 if banded else 0.8)
        ax.set(yscale="log", title=f"{act}, {arch}, depth {depth} ({n} seeds)")
        if k % n_cols == 0:
            ax.set_ylabel(r"$\|\partial L/\partial W^l\|$")
        if k >= len(present) - n_cols:
            ax.set_xlabel("step")
    for ax in list(axes.flat)[len(present):]:
        ax.set_axis_off()
    fig.tight_layout()
    cb = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes.ravel().tolist(), pad=0.01,
                      fraction=0.03)
    cb.set_label("layer (1 = input side)")
    return fig


# ------------------------------------------------------------------------------ trainability
def trainability(runs: pd.DataFrame) -> plt.Figure:
    """Final loss on the whole training set (log) and final test accuracy (or test loss) vs depth: two
    rows per task (tasks are never pooled), a column per arch, hue = activation, line style = init.
    runs.final_loss is the whole training set's loss in evaluation mode (batch norm with running
    statistics). Diverged runs (NaN loss) are left out of the quartiles; an x marks a depth where every
    seed diverged."""
    set_theme()
    r = with_arch(runs)
    _require(r, "trainability")
    if r["depth"].nunique() < 2:
        raise ValueError("trainability needs at least two depths")
    tasks = _order(r["task"], ())
    archs = _order(r["arch"], ARCH_ORDER)
    acts = _order(r["activation"], ACT_ORDER)
    inits = _order(r["init"], ())
    colors = dict(zip(acts, sns.color_palette("colorblind", len(acts))))
    styles = dict(zip(inits, ("-", "--", ":", "-.")))
    rows = []  # (task, stat): the second metric is the task's own (accuracy where it means something)
    for task in tasks:
        t = r[r["task"] == task]
        rows += [(task, "final_loss"),
                 (task, "final_test_accuracy" if t["final_test_accuracy"].notna().any() else "final_test_loss")]
    fig, axes = _grid(len(rows), len(archs), DOUBLE if len(archs) > 1 else SINGLE, 2.0, sharex=True)
    names = {"final_loss": "train-set loss", "final_test_accuracy": "test accuracy",
             "final_test_loss": "test loss"}
    diverged = False
    for j, arch in enumerate(archs):
        for i, (task, stat) in enumerate(rows):
            ax = axes[i, j]
            for act in acts:
                for init in inits:
                    d = r[(r["task"] == task) & (r["arch"] == arch) & (r["activation"] == act) & (r["init"] == init)]
                    lost = d.groupby("depth")[stat].apply(lambda v: not np.isfinite(v).any())
                    if stat == "final_loss" and lost.any():  # every seed diverged: an x at the top
                        ax.plot(lost.index[lost], [0.95] * int(lost.sum()), ls="none", marker="x", ms=4,
                                color=colors[act], transform=ax.get_xaxis_transform())
                        diverged = True
                    d = d[np.isfinite(d[stat])]
                    if d.empty:
                        continue
                    q = quartiles(d, ["depth"], stat)
                    _band(ax, q["depth"], q, colors[act], ls=styles[init], alpha=0.12, marker=".")
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(sorted(r["depth"].unique())))
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%d"))
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            if stat != "final_test_accuracy":
                ax.set_yscale("log")
            if i == 0:
                ax.set_title(arch)
            if i == len(rows) - 1:
                ax.set_xlabel("hidden layers")
            if j == 0:
                ax.set_ylabel(f"{task}: final\n{names[stat]}")
    for i in range(len(rows)):  # a shared y range per row: the same task and metric across architectures
        lims = [axes[i, j].get_ylim() for j in range(len(archs)) if axes[i, j].has_data()]
        if lims:
            for j in range(len(archs)):
                ax = axes[i, j]
                ax.set_ylim(min(lo for lo, _ in lims), max(hi for _, hi in lims))
                if ax.get_yscale() == "log":
                    lo, hi = ax.get_ylim()
                    if np.log10(hi / lo) < 1:  # under a decade: plain numbers, not 2.3 x 10^0
                        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
                        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
                    else:
                        _tidy_log_y(ax)
    handles = [plt.Line2D([], [], color=colors[a], label=a) for a in acts]
    handles += [plt.Line2D([], [], color="0.3", ls=styles[i], label=f"init {i}") for i in inits]
    if diverged:
        handles.append(plt.Line2D([], [], color="0.3", ls="none", marker="x", label="all seeds diverged"))
    fig.tight_layout()
    fig.legend(handles=handles, loc="upper center", ncols=len(handles), bbox_to_anchor=(0.5, 0.0), frameon=False)
    return fig


# ------------------------------------------------------------------------------ twin agreement
def _twin_key(config_json: str) -> str:
    """The config without its backend (and launch-time paths): the same key for the two twins of a run."""
    c = json.loads(config_json)
    for k in ("backend", "results_dir", "progress", "overwrite"):
        c.pop(k, None)
    return json.dumps(c, sort_keys=True)


def twin_pairs(runs: pd.DataFrame, layers: pd.DataFrame, stat: str = "grad_norm") -> pd.DataFrame:
    """NumPy and torch values of `stat` for the same (config without backend, step, layer, param).

    Columns: key, step, layer, param, numpy, torch, rel_err = |torch - numpy| / |numpy| (0 when both 0).
    """
    both = runs[runs["backend"].isin(["numpy", "torch"])]
    ids = pd.DataFrame({"run_id": both["run_id"], "backend": both["backend"],
                        "key": [_twin_key(c) for c in both["config_json"]]})
    ly = layers[layers["run_id"].isin(ids["run_id"])][["run_id", "step", "layer", "param", stat]]
    ly = ly.merge(ids, on="run_id")
    cols = ["key", "step", "layer", "param"]
    a = ly[ly["backend"] == "numpy"][cols + [stat]].rename(columns={stat: "numpy"})
    b = ly[ly["backend"] == "torch"][cols + [stat]].rename(columns={stat: "torch"})
    pairs = a.merge(b, on=cols)
    diff = (pairs["torch"] - pairs["numpy"]).abs()
    denom = pairs["numpy"].abs()
    pairs["rel_err"] = np.where(diff == 0, 0.0, diff / denom.where(denom > 0, np.nan))
    return pairs


ARCH_COLS = ["activation", "residual", "norm", "depth"]  # what tells the twins' architectures apart
TINY = 1e-18  # exact zeros drawn here on the log axes (and said in the legend)


def arch_name(row) -> str:
    return f"{row['activation']} {arch_label(row['residual'], row['norm'])} depth {int(row['depth'])}"


def twin_free_running(runs: pd.DataFrame, layers: pd.DataFrame, stat: str = "grad_norm") -> pd.DataFrame:
    """Free-running divergence: per architecture and logged step, the largest relative difference of
    per-layer `stat` between a NumPy run and the torch run of the same config and seed (over seeds,
    layers and parameters). Columns: activation, residual, norm, depth, step, max_rel_diff."""
    pairs = twin_pairs(runs, layers, stat)
    if pairs.empty:
        return pd.DataFrame(columns=[*ARCH_COLS, "step", "max_rel_diff"])
    arch = runs[runs["backend"] == "numpy"].copy()
    arch["key"] = [_twin_key(c) for c in arch["config_json"]]
    arch = arch.drop_duplicates("key")[["key", *ARCH_COLS]]
    pairs = pairs.merge(arch, on="key")
    pairs["rel_err"] = pairs["rel_err"].fillna(np.inf)  # a value against a zero: as far apart as can be
    out = pairs.groupby([*ARCH_COLS, "step"], sort=True)["rel_err"].max().rename("max_rel_diff")
    return out.reset_index()


def twin_summary(free: pd.DataFrame) -> pd.DataFrame:
    """Per architecture: the free-running divergence at step 0, at the middle logged step, at the last."""
    rows = []
    for keys, g in free.groupby(ARCH_COLS, sort=True):
        g = g.sort_values("step")
        steps = g["step"].to_numpy()
        mid = steps[len(steps) // 2]
        at = g.set_index("step")["max_rel_diff"]
        rows.append({**dict(zip(ARCH_COLS, keys)), "step_0": float(at.iloc[0]), "middle_step": int(mid),
                     "at_middle": float(at[mid]), "last_step": int(steps[-1]), "at_last": float(at.iloc[-1])})
    return pd.DataFrame(rows)


def _per_arch_lines(ax, table: pd.DataFrame, value: str) -> None:
    archs = table.drop_duplicates(ARCH_COLS)[ARCH_COLS].sort_values(ARCH_COLS)
    colors = sns.color_palette("colorblind", max(len(archs), 1))
    for k, (_, a) in enumerate(archs.iterrows()):
        d = table[(table[ARCH_COLS] == a[ARCH_COLS].values).all(axis=1)].sort_values("step")
        y = np.clip(d[value].astype(float).to_numpy(), TINY, None)
        ax.plot(d["step"], y, color=colors[k % len(colors)], marker="." if len(d) < 30 else None, ms=3,
                label=arch_name(a))


def twin_lockstep(table: pd.DataFrame) -> plt.Figure:
    """LOCKSTEP twin error per logged step (bench.twin): the NumPy net trains, and at each logged step the
    torch twin recomputes loss, gradients and every per-layer statistic on the NumPy parameters; the
    worst relative difference, a line per architecture, log y, with the 1e-9 bound.
    `table`: activation, residual, norm, depth, step, max_rel_diff."""
    set_theme()
    _require(table, "the lockstep twin check")
    fig, ax = plt.subplots(figsize=(SINGLE * 1.35, SINGLE * 0.8))
    _per_arch_lines(ax, table, "max_rel_diff")
    ax.axhline(LOCKSTEP_LIMIT, color="C3", lw=0.9, ls="--", label="bound 1e-9")
    ax.set(yscale="log", xlabel="step", ylabel="lockstep max relative difference",
           ylim=(TINY / 3, max(1e-6, float(table["max_rel_diff"].max()) * 10)))
    worst = float(table["max_rel_diff"].max())
    ax.set_title(f"lockstep, float64: max {worst:.1e} ({'within' if worst <= LOCKSTEP_LIMIT else 'ABOVE'} 1e-9)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title=f"exact 0 drawn at {TINY:g}")
    fig.tight_layout()
    return fig


def twin_divergence(free: pd.DataFrame) -> plt.Figure:
    """FREE-RUNNING divergence per logged step: NumPy and torch runs of one config and seed, each on its
    own trajectory; the largest relative difference of per-layer gradient norms, a line per architecture,
    log y. Growth here measures how chaotic training is (rounding differences amplified), not an error."""
    set_theme()
    _require(free, "free-running twin divergence (no config run in both backends)")
    fig, ax = plt.subplots(figsize=(SINGLE * 1.35, SINGLE * 0.8))
    _per_arch_lines(ax, free, "max_rel_diff")
    ax.set(yscale="log", xlabel="step", ylabel="free-running max relative difference")
    ax.set_title("free-running NumPy vs torch: divergence of trajectories")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title=f"exact 0 drawn at {TINY:g}")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ 1986
def time_to_solve(runs: pd.DataFrame) -> plt.Figure:
    """Fraction of seeds solved vs sweeps per 1986 problem (and initial range where there are several):
    the Kaplan-Meier estimate over ALL seeds, unsolved seeds censored at the cap (analysis.tables), with
    its 95% pointwise band (log-log). The paper's number: a dotted vertical line and a diamond where it
    meets our curve (family trees: the fixed 1,500 sweeps it trained for, open diamond)."""
    from analysis.tables import init_range, km_curve, rumelhart_groups

    set_theme()
    r = runs[runs["task"].isin(PROBLEMS)]
    _require(r, "time to solve (no 1986 problems)")
    groups = list(rumelhart_groups(r))
    palette = sns.color_palette("colorblind", 5)
    colors = [palette[i] for i in (0, 1, 2, 4, 3)]  # symmetry purple: not a second orange beside parity
    fig, ax = plt.subplots(figsize=(DOUBLE * 0.8, 2.9))
    styles = ("-", "--", ":", "-.")
    seen: dict[str, int] = {}
    for task, g in groups:
        color = colors[PROBLEMS.index(task)]
        ls = styles[seen.get(task, 0) % len(styles)]
        seen[task] = seen.get(task, 0) + 1
        res = km_curve(g["solved_step"], g["steps"])
        cap = float(g["steps"].max())
        n, k = len(g), int(g["solved_step"].notna().sum())
        label = f"{task.replace('_', ' ')}, {init_range(g['init'].iloc[0], g['init_scale'].iloc[0])} ({k}/{n})"
        if res is None or k == 0:
            ax.plot([1, cap], [0, 0], color=color, ls=ls, label=label, drawstyle="steps-post")
            continue
        t = np.concatenate([[1.0], res.cdf.quantiles, [cap]])
        f = np.concatenate([[0.0], res.cdf.probabilities, [res.cdf.probabilities[-1]]])
        with warnings.catch_warnings():  # log-log is undefined where S = 0 or 1: NaN there
            warnings.simplefilter("ignore", RuntimeWarning)
            band = res.sf.confidence_interval(method="log-log")
        sf = res.sf.probabilities  # where the band is undefined (S = 0 after the last event) it is S itself
        lo = 1 - np.where(np.isnan(band.high.probabilities), sf, band.high.probabilities)
        hi = 1 - np.where(np.isnan(band.low.probabilities), sf, band.low.probabilities)
        ax.fill_between(np.concatenate([res.cdf.quantiles, [cap]]), np.append(lo, lo[-1]), np.append(hi, hi[-1]),
                        step="post", color=color, alpha=0.12, lw=0)
        ax.plot(t, f, drawstyle="steps-post", color=color, ls=ls, label=label)
        if task in PAPER_SWEEPS or task == "family_trees":
            paper = PAPER_SWEEPS.get(task, FAMILY_TREES_SWEEPS)
            ax.axvline(paper, color=color, ls=":", lw=0.9)
            ax.plot(paper, float(res.cdf.evaluate(paper)), marker="D", ms=5, color=color, mec="k", mew=0.5,
                    mfc=color if task in PAPER_SWEEPS else "none", ls="none", zorder=6)
    ax.axhline(0.5, color="0.4", lw=0.6)
    ax.set(xscale="log", ylim=(-0.02, 1.02), xlabel="sweeps", ylabel="fraction of seeds solved (Kaplan-Meier)")
    ax.set_xlim(left=max(1.0, 0.7 * float(np.nanmin(pd.to_numeric(r["solved_step"], errors="coerce").astype(float)
                                                      .fillna(r["steps"].max())))))
    ax.plot([], [], marker="D", color="0.5", mec="k", mew=0.5, ls=":", label="paper's sweeps (dotted)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def hinton_squares(ax, m: np.ndarray, wmax: float) -> None:
    """Matrix m as a Hinton diagram on ax: square area ~ |w| / wmax, white positive, black negative, on grey."""
    ax.set_facecolor("0.55")
    for (i, j), w in np.ndenumerate(m):
        side = np.sqrt(abs(w) / wmax) * 0.92
        ax.add_patch(plt.Rectangle((j - side / 2, i - side / 2), side, side,
                                   facecolor="white" if w > 0 else "black", edgecolor="none"))
    ax.set(xlim=(-0.5, m.shape[1] - 0.5), ylim=(m.shape[0] - 0.5, -0.5), aspect="equal")
    ax.grid(False)
    ax.tick_params(length=0)


def hinton_weights(params: dict, title: str | None = None) -> plt.Figure:
    """Hinton diagram of a 1-hidden-layer net (the 6-2-1 symmetry net): squares of area ~ |w|, white
    positive, black negative, on grey. Left: hidden units' input weights and bias; right: the output's."""
    set_theme()
    w1 = np.asarray(params["layers.0.weight"], float)  # (n_in, hidden)
    b1 = np.asarray(params["layers.0.bias"], float).reshape(-1)  # (hidden,)
    w2 = np.asarray(params["layers.1.weight"], float)  # (hidden, n_out)
    b2 = np.asarray(params["layers.1.bias"], float).reshape(-1)
    left = np.column_stack([w1.T, b1])  # (hidden, n_in + 1)
    right = np.column_stack([w2.T, b2])  # (n_out, hidden + 1)
    wmax = max(np.abs(left).max(), np.abs(right).max())
    fig, axes = plt.subplots(1, 2, figsize=(SINGLE, 1.5), width_ratios=[left.shape[1], right.shape[1] + 0.6])
    for ax, m, rows, cols in ((axes[0], left, [f"h{i + 1}" for i in range(left.shape[0])],
                               [f"x{i + 1}" for i in range(w1.shape[0])] + ["bias"]),
                              (axes[1], right, ["out"] if right.shape[0] == 1 else
                               [f"y{i + 1}" for i in range(right.shape[0])],
                               [f"h{i + 1}" for i in range(w2.shape[0])] + ["bias"])):
        hinton_squares(ax, m, wmax)
        ax.set_xticks(range(m.shape[1]), cols)
        ax.set_yticks(range(m.shape[0]), rows)
    axes[0].set_title("input -> hidden")
    axes[1].set_title("hidden -> output")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ mean field
def meanfield_ratios(table: pd.DataFrame) -> plt.Figure:
    """Measured median ||delta^l|| / ||delta^(l+1)|| (IQR as error bars) vs the mean-field sqrt(chi1),
    log-log with the identity; each point labelled with its sigma_w ('sqrt2=He' for He init's sqrt 2).
    `table`: activation, sigma_w, sigma_b, predicted, measured, q25, q75."""
    set_theme()
    _require(table, "the mean-field comparison")
    fig, ax = plt.subplots(figsize=(SINGLE, SINGLE * 0.9))
    acts = _order(table["activation"], ACT_ORDER)
    markers = dict(zip(sorted(table["sigma_b"].unique()), "osD^v"))
    for k, act in enumerate(acts):
        d = table[table["activation"] == act]
        for sb, m in markers.items():
            e = d[d["sigma_b"] == sb]
            if e.empty:
                continue
            err = np.vstack([e["measured"] - e["q25"], e["q75"] - e["measured"]])
            ax.errorbar(e["predicted"], e["measured"], yerr=err, fmt=m, color=f"C{k}", ms=4, lw=0.8, mfc="none"
                        if sb else None)
            if "sigma_w" in e:  # which sigma_w each point is: the grid has several per activation
                for x, y, sw in zip(e["predicted"], e["measured"], e["sigma_w"]):
                    ax.annotate(sigma_w_label(sw).replace(" (He)", "=He"), (x, y), xytext=(3, -6 if sb else 3),
                                textcoords="offset points", fontsize=4.5, color=f"C{k}")
    lo = min(table["predicted"].min(), table["q25"].min()) * 0.8
    hi = max(table["predicted"].max(), table["q75"].max()) * 1.25
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.7)
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel=r"mean field $\sqrt{\chi_1}$",
           ylabel=r"measured $\|\delta^l\| / \|\delta^{l+1}\|$")
    ticks = [t for t in (0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5) if lo <= t <= hi]
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
        axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    handles = [plt.Line2D([], [], color=f"C{k}", marker="o", ls="none", label=a) for k, a in enumerate(acts)]
    handles += [plt.Line2D([], [], color="0.3", marker=m, ls="none", mfc="none" if sb else None,
                           label=f"sigma_b {sb:g}") for sb, m in markers.items()]
    ax.legend(handles=handles, loc="upper left", fontsize=6.5)
    fig.tight_layout()
    return fig
