"""`python -m analysis.report RESULTS_DIR`: every figure the results support (PNG + PDF), tables (CSV + MD)
and report.md with captions, tables and provenance.

RESULTS_DIR is a path or a name under results/; it is one experiment dir (it has runs/) or a root of
several (every experiment found is used). Figures the data cannot support are skipped with a logged
reason. `--figures-dir docs/figures` also writes the few key figures as small PNGs for the README;
`--only NAME` redraws one figure. Bad input (no such path, no results) is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import extensions as X
from analysis import figures as F
from analysis import scorecard as SC
from analysis import tables as T

log = logging.getLogger("analysis.report")
ROOT = Path(__file__).resolve().parents[1]
PNG_DPI = 200
README_DPI = (150, 110, 80)  # docs/figures: the first of these that keeps the PNG under README_MAX_BYTES
README_MAX_BYTES = 290_000  # committed PNGs stay small (< 300 KB)
PACKAGES = ("numpy", "pandas", "pyarrow", "matplotlib", "seaborn", "scipy", "torch", "hydra-core")


class ReportError(Exception):
    """Bad input for the report: shown as one line, exit code 2."""


@dataclass
class Experiment:
    name: str
    path: Path
    runs: pd.DataFrame
    steps: pd.DataFrame
    layers: pd.DataFrame

    @property
    def kind(self) -> str:
        """The preset that produced it (runs.experiment), else the results name."""
        values = [v for v in self.runs["experiment"].unique() if v]
        return values[0] if len(values) == 1 else self.name


@dataclass
class Figure:
    name: str  # file stem, unique in the report
    draw: Callable[[], object]  # -> matplotlib Figure
    caption: str | Callable[[], str]
    key: str | None = None  # file stem under --figures-dir (the README's few key figures), or None


# ------------------------------------------------------------------------------ discovery and loading
def resolve(path) -> Path:
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (ROOT / "results" / p).exists():
        p = ROOT / "results" / p
    if not p.exists():
        raise ReportError(f"no such results directory: {path}")
    if not p.is_dir():
        raise ReportError(f"not a directory: {path}")
    return p


def find_experiments(path: Path) -> list[Path]:
    if (path / "runs").is_dir():
        return [path]
    found = sorted(d for d in path.iterdir() if d.is_dir() and (d / "runs").is_dir())
    if not found:
        raise ReportError(f"no results in {path}: expected runs/ there or in its subdirectories")
    return found


def load_experiments(path: Path) -> list[Experiment]:
    from bench.results import load

    out = []
    for d in find_experiments(path):
        res = load(d)
        if len(res.runs):
            out.append(Experiment(d.name, d, res.runs, res.steps, res.layers))
    if not out:
        raise ReportError(f"no results in {path}: the runs tables are empty")
    return out


# ------------------------------------------------------------------------------ which figures
def _task_inputs(tasks) -> dict:
    """{task: (n_in, mean x^2)} of the training inputs, for the mean-field overlays."""
    from bench.tasks import make_task

    out = {}
    for t in tasks:
        try:
            x = make_task(t).x_train
        except Exception as e:  # an unknown or non-default task: no overlay, said in the log
            log.info("no mean-field overlay for task %s: %s", t, e)
            continue
        out[t] = (x.shape[1], float(np.mean(x * x)))
    return out


def _nets(exp: Experiment) -> pd.DataFrame:
    """Runs of networks-at-scale experiments (not the 1986 problems or the seed)."""
    return exp.runs[~exp.runs["task"].isin(F.PROBLEMS)]


# ------------------------------------------------------------------------------ twin checks
LOCKSTEP_NOTE = (
    "Lockstep twin check (bench.twin.lockstep_from_run_config): every distinct NumPy job of the experiment "
    "(config without seed and backend) retrained from its lowest seed with all its members, the PyTorch twin "
    "recomputing each logged step on the NumPy parameters. max_rel_diff: the worst relative difference over "
    "the loss and every per-layer statistic, all members and logged steps; float64 bound 1e-9 (one step's "
    "rounding is ~1e-15); within_bound: max_rel_diff <= 1e-9. quantity/step: where the worst one was.")
FREE_NOTE = (
    "Free-running twins: NumPy and PyTorch runs of the same config and seed, each training on its own. "
    "Largest relative difference of per-layer gradient norms (over seeds, layers, parameters) at step 0, at "
    "the middle logged step and at the last one. Growth measures how chaotic training is, not an error: "
    "correctness is the lockstep table.")


def _unique(tables: dict, base: str, exp_name: str) -> str:
    """`base` for the first experiment that has it, then `base-<experiment>`."""
    return base if base not in tables else f"{base}-{exp_name}"


def lockstep_table(runs: pd.DataFrame, lockstep=None) -> pd.DataFrame:
    """The lockstep check of every distinct NumPy job in `runs`: columns job, seeds, activation, residual,
    norm, depth, step, max_rel_diff, quantity. `lockstep(config, ensemble)` defaults to
    bench.twin.lockstep_from_run_config (tests pass a stand-in)."""
    if lockstep is None:
        from bench.twin import lockstep_from_run_config as lockstep
    numpy_runs = runs[runs["backend"] == "numpy"]
    keys = []
    for c in numpy_runs["config_json"]:
        c = json.loads(c)
        c.pop("seed", None)
        c.pop("backend", None)
        keys.append(json.dumps(c, sort_keys=True))
    numpy_runs = numpy_runs.assign(_job=keys)
    out = []
    for k, (_, g) in enumerate(sorted(numpy_runs.groupby("_job"), key=lambda kv: kv[1]["seed"].min())):
        first = g.loc[g["seed"].idxmin()]
        config = json.loads(first["config_json"])
        config["seed"] = int(first["seed"])
        t = lockstep(config, len(g)).copy()
        t["job"], t["seeds"] = k, len(g)
        for col in F.ARCH_COLS:
            t[col] = first[col]
        out.append(t)
    if not out:
        return pd.DataFrame()
    return pd.concat(out, ignore_index=True)[["job", "seeds", *F.ARCH_COLS, "step", "max_rel_diff", "quantity"]]


def lockstep_summary(lock: pd.DataFrame) -> pd.DataFrame:
    """Per architecture: the worst lockstep difference, where it was, and whether it is within 1e-9."""
    worst = lock.loc[lock.groupby(F.ARCH_COLS, sort=True)["max_rel_diff"].idxmax()]
    seeds = lock.drop_duplicates("job").groupby(F.ARCH_COLS, sort=True)["seeds"].sum().rename("seeds")
    out = worst.merge(seeds.reset_index(), on=F.ARCH_COLS, suffixes=("_job", ""))
    out["within_bound"] = out["max_rel_diff"] <= F.LOCKSTEP_LIMIT
    return out[[*F.ARCH_COLS, "seeds", "max_rel_diff", "quantity", "step", "within_bound"]].reset_index(drop=True)



def plan(exps: list[Experiment]) -> tuple[list[Figure], list[tuple[str, str]], dict]:
    """Figures to draw, (figure, reason) for those skipped, and tables {name: (DataFrame, note)}."""
    figs: list[Figure] = []
    skipped: list[tuple[str, str]] = []
    tables: dict[str, tuple[pd.DataFrame, str]] = {}

    def sub(exp, runs):
        ids = set(runs["run_id"])
        return (exp.steps[exp.steps["run_id"].isin(ids)], exp.layers[exp.layers["run_id"].isin(ids)])

    # the seed's two charts and twin agreement
    for exp in exps:
        r = exp.runs
        seed = r[(r["task"] == "xor") & (r["loss"] == "mse")]  # the blog's net (the 1986 XOR uses sse_half)
        if exp.kind == "seed_xor" or len(seed):
            if len(seed):
                st, ly = sub(exp, seed)
                n = int((seed["backend"] == ("numpy" if "numpy" in set(seed["backend"]) else
                                             seed["backend"].iloc[0])).sum())
                figs.append(Figure(f"{exp.name}-charts", lambda s=seed, a=st, b=ly: F.seed_xor_charts(s, a, b),
                                   f"The seed's 2-4-1 sigmoid XOR net over {n} seeds (median line, interquartile "
                                   "band). (a) MSE loss vs step; (b) mean |dLoss/dW| (grad_mean_abs, the blog's "
                                   "measure) of W2 (output, solid) and W1 (dashed). Black markers: the blog "
                                   "post's single run.", key="seed_xor"))
            else:
                skipped.append((f"{exp.name}-charts", "no 2-4-1 XOR runs"))
        if set(r["backend"]) >= {"numpy", "torch"}:
            try:
                lock = lockstep_table(r)
            except Exception as e:  # noqa: BLE001  (bench.twin missing or failing: said in "Not drawn")
                skipped.append((f"{exp.name}-twin_lockstep", f"lockstep check not run: {type(e).__name__}: {e}"))
                lock = None
            if lock is not None and len(lock):
                per_arch = lockstep_summary(lock)
                tables[_unique(tables, "twin_lockstep", exp.name)] = (per_arch, LOCKSTEP_NOTE)

                def lock_cap(t=lock, name=exp.name):
                    w = t.loc[t["max_rel_diff"].idxmax()]
                    return (f"Lockstep twin check on {name} (bench.twin, float64): each distinct NumPy job is "
                            f"retrained from its lowest seed with all its members ({t['job'].nunique()} jobs, "
                            f"{int(t.drop_duplicates('job')['seeds'].sum())} seeds); at every logged step the "
                            "PyTorch twin is loaded with the NumPy network's current parameters, takes the same "
                            "batch and recomputes the loss, the gradients and every per-layer statistic. Line: the "
                            "worst relative difference at that step over all of them, a line per architecture; "
                            f"dashed: the 1e-9 bound. Worst: {w['max_rel_diff']:.1e} ({w['quantity']}, step "
                            f"{int(w['step'])}), {'within' if t['max_rel_diff'].max() <= F.LOCKSTEP_LIMIT else 'ABOVE'}"
                            " the bound. Exact zeros are drawn at 1e-18.")
                figs.append(Figure(f"{exp.name}-twin_lockstep", lambda t=lock: F.twin_lockstep(t), lock_cap,
                                   key="twin_lockstep"))
            free = F.twin_free_running(r, exp.layers)
            if len(free):
                tables[_unique(tables, "twin_free_running", exp.name)] = (F.twin_summary(free), FREE_NOTE)

                def free_cap(f=free, name=exp.name):
                    last = f[f["step"] == f["step"].max()]["max_rel_diff"].max()
                    return (f"Free-running twins on {name}: a NumPy run and the PyTorch run of the same config and "
                            "seed each train on their own, and the line is the largest relative difference of "
                            "their per-layer gradient norms at each logged step (over seeds, layers and "
                            f"parameters), a line per architecture; at the last step {last:.1e}. This measures how "
                            "chaotic training is: rounding differences of ~1e-16 in the first step are amplified "
                            "along the trajectory. It is a finding, not a failure: correctness is the lockstep "
                            "check, which compares the two on the same parameters. Exact zeros are drawn at 1e-18.")
                figs.append(Figure(f"{exp.name}-twin_free_running", lambda f=free: F.twin_divergence(f), free_cap,
                                   key="twin_free_running"))
        elif exp.kind in ("seed_xor", "quickstart"):
            skipped.append((f"{exp.name}-twin_lockstep/free_running", "only one backend in the data"))

    # depth studies: profiles at init, first/last ratio, training dynamics, trainability
    for exp in exps:
        nets = _nets(exp)
        if (nets.empty or exp.kind == "meanfield" or (nets["init"] == "meanfield").all() or exp.kind in X.KINDS
                or exp.kind in SC.KINDS):
            continue
        inputs = _task_inputs(nets["task"].unique())
        is_nielsen = exp.kind == "nielsen_ch5" or (nets["init"] == "nielsen").all()
        for (task, init), g in nets.groupby(["task", "init"]):
            g = g[g["backend"] == g["backend"].iloc[0]] if g["backend"].nunique() > 1 else g
            st, ly = sub(exp, g)
            stem = f"{exp.name}-{task}-{init}"
            if g["depth"].max() < 2:
                skipped.append((f"{stem}-profiles", "no net with 2 or more hidden layers"))
                continue
            if is_nielsen:
                figs.append(Figure(f"{stem}-bias_grad_profile",
                                   lambda g=g, ly=ly, inputs=inputs: F.gradient_profile(
                                       g, ly, "grad_norm", "bias", inputs, reference=F.NIELSEN),
                                   f"Nielsen ch. 5 on the digits stand-in: ||dC/db^l|| per hidden layer at "
                                   f"initialisation, a line per depth, median and IQR over "
                                   f"{g.groupby('depth').size().min()} seeds, each over its own random "
                                   "mini-batch of the digits training images (scikit-learn's 8x8 digits, not "
                                   "MNIST); open squares, dotted: Nielsen's MNIST numbers (one unseeded run).",
                                   key=None))
            backend = g["backend"].iloc[0]
            key = "profile_delta" if init in ("he", "torch_default") and exp.kind != "nielsen_ch5" else None
            for stat, what in (("delta_norm", "||delta^l|| (norm of dLoss/dz over the batch and units)"),
                               ("grad_norm", "||dLoss/dW^l||")):
                theory_text = (
                    "Dashed: the mean-field prediction for plain nets (bench.theory, this init's (sigma_w^2, "
                    "sigma_b^2) via init_variances, layer 1 fed the task's mean x^2), anchored at the measured "
                    "last hidden layer; no prediction for residual or batch-norm nets."
                    if stat == "delta_norm" else
                    "No mean-field line here: the theory predicts delta norms (see the profile_delta_norm "
                    "figure), and a weight gradient also carries the activation norms.")
                figs.append(Figure(
                    f"{stem}-profile_{stat}",
                    lambda g=g, ly=ly, stat=stat, inputs=inputs: F.gradient_profile(g, ly, stat, "weight", inputs),
                    f"{exp.name}, task {task}, init {init} ({backend}): {what} vs layer at step 0, a panel per "
                    "activation and architecture, a line per depth (median and IQR over seeds; the last point of "
                    "each line is the output layer; each panel has its own log y range). " + theory_text,
                    key=key if stat == "delta_norm" else None))
        if is_nielsen:
            continue
        steps_total = int(nets["steps"].max())
        one = nets[nets["backend"] == nets["backend"].iloc[0]]
        st, ly = sub(exp, one)
        if one["depth"].nunique() >= 2:
            figs.append(Figure(f"{exp.name}-grad_ratio", lambda r=one, ly=ly: F.gradient_ratio(r, ly),
                               f"{exp.name}: ||grad W^1|| / ||grad W^out|| at step 0 vs depth (log y, linear "
                               "depth: exponential decay is a straight line), median and IQR over seeds; colour = "
                               "activation, line style = architecture, a panel per task and init (tasks are not "
                               "pooled). Below 1: the first layer learns slower than the output layer.",
                               key=None))
            if steps_total > 1:
                figs.append(Figure(f"{exp.name}-trainability", lambda r=one: F.trainability(r),
                                   f"{exp.name}: after {steps_total} steps, the loss on the whole training set "
                                   "(evaluated in evaluation mode: batch norm uses its running statistics) and "
                                   "the test metric (accuracy where the task has classes, else test loss) vs "
                                   "depth (log depth axis), median and IQR over seeds; two rows per task (tasks "
                                   "are not pooled), a column per architecture, colour = activation, line style "
                                   f"= init. {int((one['status'] == 'diverged').sum())} diverged runs are left "
                                   "out (x: every seed diverged).", key=None))
        else:
            skipped.append((f"{exp.name}-grad_ratio/trainability", "a single depth"))
        if steps_total > 1:
            for (task, init), g in one.groupby(["task", "init"]):
                plain_sig = g[(g["activation"] == "sigmoid") & ~g["residual"] & (g["norm"] == "none")]
                name = f"{exp.name}-{task}-{init}-training_dynamics"
                if plain_sig.empty:
                    skipped.append((name, "no plain sigmoid net"))
                    continue
                depth = int(plain_sig["depth"].max())
                _, gl = sub(exp, g)
                figs.append(Figure(name, lambda g=g, gl=gl, d=depth: F.training_dynamics(g, gl, d),
                                   f"{exp.name}, task {task}, init {init}: ||dLoss/dW^l|| per layer over training "
                                   f"at {depth} hidden layers (colour = layer, median over seeds; IQR band for the "
                                   "first and the output layer): plain sigmoid vs relu, residual and batch norm.",
                                   key="training_dynamics" if init in ("he", "torch_default") else None))

    # mean field
    mf = [e for e in exps if (e.runs["init"] == "meanfield").any() and e.kind not in X.KINDS]
    if mf:
        table = pd.concat([T.meanfield_table(e.runs, e.layers) for e in mf], ignore_index=True)
        tables["meanfield"] = (table, T.MEANFIELD_NOTE)
        figs.append(Figure("meanfield-ratios", lambda t=table: F.meanfield_ratios(t),
                           "Mean field vs measurement: the median per-layer ratio ||delta^l|| / ||delta^(l+1)|| "
                           "over hidden layers inside the net (step 0; error bars: IQR over seeds) against "
                           "the mean-field sqrt(chi_1(q^l)) along the finite-depth q path over the same layers "
                           "(equal to sqrt(chi_1(q*)) except for tanh at sigma_b = 0, whose q* = 0 is approached "
                           "slowly). Colour: activation; marker: sigma_b; each point is labelled with its sigma_w "
                           "(sqrt2=He: He init's sigma_w = sqrt 2). Dashed: identity.", key="meanfield"))
    else:
        skipped.append(("meanfield-ratios", "no runs with init=meanfield"))

    # 1986
    olds = [T.rumelhart_runs(e.runs) for e in exps if e.kind not in X.KINDS]
    old = pd.concat(olds, ignore_index=True) if olds else exps[0].runs.iloc[:0]
    if len(old):
        table, note = T.rumelhart_table(old)
        tables["rumelhart"] = (table, note)

        def sweeps_caption(t=table):
            parts = []
            for row in t.itertuples(index=False):
                med = ("median not reached" if pd.isna(row.median_sweeps) else
                       f"median {row.median_sweeps:,.0f} [95% CI {row.median_ci_low:,.0f}, "
                       + ("not reached" if pd.isna(row.median_ci_high) else f"{row.median_ci_high:,.0f}") + "]")
                parts.append(f"{row.problem} {row.init_range}: {row.solved}/{row.seeds} solved within "
                             f"{row.cap:,} sweeps, {med}")
            return ("1986 problems: fraction of seeds solved (every output of every pattern within 0.4 of its "
                    "target; family trees 0.2) vs sweeps, the Kaplan-Meier estimate over ALL seeds with unsolved "
                    "seeds censored at the cap; band: 95% pointwise confidence (log-log); horizontal line: half "
                    "the seeds. Dotted verticals: the papers' numbers; diamonds: our fraction solved by then "
                    "(parity's are 'presentations'; open diamond: the fixed 1,500 sweeps the family-trees net was "
                    "trained for). " + "; ".join(parts) + ".")
        figs.append(Figure("rumelhart-sweeps", lambda o=old: F.time_to_solve(o), sweeps_caption,
                           key="rumelhart_sweeps"))
        sym = old[(old["task"] == "symmetry") & old["solved_step"].notna() & old["params_json"].notna()]
        if len(sym):
            pick = T.typical_solved(sym)
            params = json.loads(pick["params_json"])
            figs.append(Figure("rumelhart-symmetry_weights",
                               lambda p=params: F.hinton_weights(p),
                               f"Learned weights of the 6-2-1 symmetry net, seed {int(pick['seed'])} (a typical "
                               "solved seed: the median sweeps to solution among the solved seeds, "
                               f"{int(pick['solved_step']):,}). Area ~ |w|; "
                               "white positive, black negative. " + T.symmetry_sentence(params),
                               key="symmetry_weights"))
        else:
            skipped.append(("rumelhart-symmetry_weights", "no solved symmetry seed with params_json"))
    else:
        skipped.append(("rumelhart-sweeps", "no runs of the 1986 problems"))

    # Nielsen
    nl = [e for e in exps if (e.runs["init"] == "nielsen").any()]
    if nl:
        tables["nielsen_ch5"] = (pd.concat([T.nielsen_table(e.runs, e.layers) for e in nl], ignore_index=True),
                                 T.NIELSEN_NOTE)
    # family trees (issue 9 part 3): held-out score per setting and the person units' weights;
    # the code lives in analysis/family_trees.py, this block only adds its table and figure
    ft_runs = pd.concat([e.runs[e.runs["task"] == "family_trees"] for e in exps], ignore_index=True)
    if len(ft_runs):
        from analysis import family_trees as FT

        ft_steps = pd.concat([e.steps for e in exps], ignore_index=True)
        tables["family_trees_scan"] = (FT.scan_table(ft_runs, ft_steps), FT.SCAN_NOTE)
        try:
            figs.append(FT.report_figure(ft_runs, Figure))
        except ValueError as e:  # no run with final parameters to draw
            skipped.append(("family_trees-person_weights", str(e)))
    # ---- issue 12 (analysis.extensions): rumelhart_depth, glorot_bengio, trainability_phase, bn_explosion,
    # dynamical_isometry; their experiments are left out of the generic blocks above
    x_figs, x_skipped, x_tables = X.plan_items(exps)
    figs += [Figure(name, draw, caption, key) for name, draw, caption, key in x_figs]
    skipped += x_skipped
    tables.update(x_tables)
    # ---- end issue 12
    # ---- issue 11 (analysis.scorecard): the method presets on the fixed suite; scorecard experiments are
    # left out of the generic depth blocks above
    s_figs, s_skipped, s_tables = SC.plan_items(exps)
    figs += [Figure(name, draw, caption, key) for name, draw, caption, key in s_figs]
    skipped += s_skipped
    tables.update(s_tables)
    seen, unique = set(), []
    for f in figs:
        if f.name not in seen:
            seen.add(f.name)
            unique.append(f)
    return unique, skipped, tables


# ------------------------------------------------------------------------------ writing
def md_table(df: pd.DataFrame) -> str:
    def cell(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4g}"
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *rows])


def shown_table(name: str, df: pd.DataFrame) -> pd.DataFrame:
    """The markdown view of a table: in the 1986 table an empty time to solve reads 'not reached' (the
    Kaplan-Meier estimate never gets to that fraction within the cap; NaN in the CSV), an absent paper
    number '-'; sweeps as whole numbers."""
    if not name.startswith("rumelhart") or "median_sweeps" not in df:
        return df
    out = df.astype(object).copy()
    for col in ("median_sweeps", "median_ci_low", "median_ci_high", "q25_sweeps", "q75_sweeps", "paper_sweeps"):
        out[col] = [("-" if col == "paper_sweeps" else "not reached") if pd.isna(v) else f"{v:,.0f}"
                    for v in df[col]]
    out["solved_fraction"] = [f"{v:.1%}" for v in df["solved_fraction"]]
    return out


def git_describe() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                               timeout=5).stdout.strip()
        return (head or "unknown") + (" (working tree has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> str:
    out = [f"python {sys.version.split()[0]}"]
    for p in PACKAGES:
        try:
            out.append(f"{p} {metadata.version(p)}")
        except metadata.PackageNotFoundError:
            out.append(f"{p} (not installed)")
    return ", ".join(out)


def make_report(path, out_dir=None, figures_dir=None, only: str | None = None) -> Path:
    """Draw every supported figure (PNG + PDF), write tables (CSV + MD) and report.md; return its path."""
    import matplotlib.pyplot as plt

    path = resolve(path)
    exps = load_experiments(path)
    out = Path(out_dir) if out_dir is not None else path / "report"
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    if figures_dir is not None:
        Path(figures_dir).mkdir(parents=True, exist_ok=True)
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    cmd = f"python -m analysis.report {shown}"
    figs, skipped, tables = plan(exps)
    if only is not None:
        figs = [f for f in figs if f.name == only]
        if not figs:
            raise ReportError(f"--only {only}: no such figure for this data")
    for name, why in skipped:
        log.info("skip %s: %s", name, why)
    drawn, readme = [], {}
    for f in figs:
        try:
            fig = f.draw()
        except ValueError as e:
            log.info("skip %s: %s", f.name, e)
            skipped.append((f.name, str(e)))
            continue
        fig.savefig(out / "figures" / f"{f.name}.png", dpi=PNG_DPI)
        fig.savefig(out / "figures" / f"{f.name}.pdf")
        also = ""
        if figures_dir is not None and f.key is not None and f.key not in readme:
            readme[f.key] = Path(figures_dir) / f"{f.key}.png"  # the first figure with a key wins
            for dpi in README_DPI:  # the sharpest that stays under the size limit
                fig.savefig(readme[f.key], dpi=dpi)
                if readme[f.key].stat().st_size < README_MAX_BYTES:
                    break
            also = f" and {readme[f.key]}"
        plt.close(fig)
        caption = f.caption() if callable(f.caption) else f.caption
        drawn.append((f, caption))
        log.info("figure %s -> %s (.png, .pdf)%s", f.name, out / "figures" / f.name, also)
    for name, (df, _) in tables.items():
        df.to_csv(out / "tables" / f"{name}.csv", index=False)
        (out / "tables" / f"{name}.md").write_text(md_table(shown_table(name, df)) + "\n")
        log.info("table %s -> %s", name, out / "tables" / f"{name}.md")
    report = out / "report.md"
    if only is None:
        report.write_text(_markdown(path, exps, drawn, skipped, tables, cmd))
        log.info("report -> %s", report)
    return report


def _markdown(path, exps, drawn, skipped, tables, cmd) -> str:
    lines = [f"# vgbench report: {path.name}", "",
             f"Regenerate everything: `{cmd}`. Each figure alone: the command under it.", ""]
    titles = {"rumelhart": "1986 reproduction (Rumelhart, Hinton & Williams)",
              "nielsen_ch5": "Nielsen, chapter 5: speed of learning per hidden layer at initialisation",
              "meanfield": "Mean field: per-layer ratio of delta norms, predicted vs measured",
              "twin_lockstep": "Twin check in lockstep: NumPy vs PyTorch on the same parameters (correctness)",
              "twin_free_running": "Free-running twins: how far two trajectories drift apart (chaos, not error)",
              "scorecard": "Scorecard: the method presets on the fixed suite (issue 11)"}
    if tables:
        lines += ["## Tables", ""]
        for name, (df, note) in tables.items():
            lines += [f"### {titles.get(name, name)}", "", md_table(shown_table(name, df)), "", note, "",
                      f"Files: [tables/{name}.csv](tables/{name}.csv), [tables/{name}.md](tables/{name}.md)", ""]
    lines += ["## Figures", ""]
    for f, caption in drawn:
        lines += [f"### {f.name}", "", f"![{f.name}](figures/{f.name}.png)", "",
                  f"{caption} ([PDF](figures/{f.name}.pdf))", "", f"`{cmd} --only {f.name}`", ""]
    if skipped:
        lines += ["### Not drawn", ""] + [f"- {n}: {why}" for n, why in skipped] + [""]
    lines += ["## Provenance", "", f"- results: `{path}`", f"- code: git {git_describe()}",
              f"- packages: {versions()}", "", "| experiment | runs | ok | diverged | failed | backends | "
              "result commits |", "|---|---|---|---|---|---|---|"]
    for e in exps:
        s = e.runs["status"]
        commits = ", ".join(sorted({c[:10] for c in e.runs["git_commit"].dropna()})) or "unknown"
        lines.append(f"| {e.name} | {len(e.runs)} | {(s == 'ok').sum()} | {(s == 'diverged').sum()} | "
                     f"{(s == 'failed').sum()} | {', '.join(sorted(e.runs['backend'].unique()))} | {commits} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.splitlines()[0])
    p.add_argument("results", help="an experiment dir (with runs/), a results root, or a name under results/")
    p.add_argument("--out", default=None, help="output dir (default RESULTS/report)")
    p.add_argument("--figures-dir", default=None, help="also write the key figures as small PNGs here "
                   "(e.g. docs/figures)")
    p.add_argument("--only", default=None, help="draw only this figure (its name in report.md)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # INFO from fontTools etc. is noise
    log.setLevel(logging.INFO)
    try:
        report = make_report(args.results, args.out, args.figures_dir, args.only)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
