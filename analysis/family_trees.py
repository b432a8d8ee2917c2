"""The 1986 family-trees net: how many held-out triples each setting gets right, and its person units.

Two things the report draws from family-trees runs (any experiment with task family_trees, above all
`experiment=family_trees_scan`):

- `scan_table`: per setting (loss, weight decay, initial range, learning rate) and per checkpoint
  (the paper's 1,500 sweeps and the run's last step), the fraction of seeds that get 4/4, 3/4, ...,
  0/4 of the held-out triples right. A triple is right when every one of its 24 outputs is within
  0.2 of its target (`bench.tasks.correct`): "on" above 0.8 and "off" below 0.2, the paper's
  criterion. The count is read off the steps table: test_accuracy x n_test.
- `person_weights_figure`: the paper's picture, a Hinton diagram of the weights from the 24 people
  into the 6 person-encoding units, English (first 12 people) beside Italian (last 12).
"""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis.figures import DOUBLE, hinton_squares, set_theme

PAPER_SWEEPS = 1500  # the paper trained for 1,500 sweeps and reports 4/4 held-out triples right
SETTING = ["loss", "weight_decay", "init_scale", "lr"]  # what the scan varies (the rest is the paper's)
PERSON_UNITS = 6  # layers.0.weight is (36, 12), block-diagonal: rows 0-23 (people) feed columns 0-5
N_PEOPLE = 24

SCAN_NOTE = (
    "Fraction of seeds with k of the held-out triples right (k = 4 .. 0), per setting, after the paper's "
    "1,500 sweeps and after the run's last sweep. Right = every output within 0.2 of its target (the paper's "
    "'on' > 0.8, 'off' < 0.2). Settings not listed are the paper's: 36 -> (6 + 6 block-diagonal) -> 12 -> 6 "
    "-> 24 sigmoid units, 100 training triples, the same 4 held out (split_seed 0) for every seed, eps 0.005 / "
    "alpha 0.5 for 20 sweeps, then eps = lr / alpha 0.9, full-batch sweeps. train_correct: median fraction of "
    "the 100 training triples right; train_loss: median training loss (of the loss the setting trains). A "
    "seed that diverged before a checkpoint counts in 'diverged', not in 0/4.")


def _n_test(runs: pd.DataFrame) -> pd.Series:
    """Held-out triples per run, from its config (4 in the paper)."""
    return runs["config_json"].map(lambda c: int(json.loads(c)["task"].get("n_test", 4)))


def scan_table(runs: pd.DataFrame, steps: pd.DataFrame, at: tuple[int, ...] = (PAPER_SWEEPS,)) -> pd.DataFrame:
    """One row per setting and checkpoint (the sweeps in `at` that the runs reach, and their last step):
    seeds, the fraction with 4/4 .. 0/4 held-out triples right, diverged, and medians of the training
    accuracy and loss. `runs`, `steps`: the results tables (any experiments; family_trees rows are used)."""
    r = runs[runs["task"] == "family_trees"].copy()
    if r.empty:
        raise ValueError("no family_trees runs")
    r["n_test"] = _n_test(r)
    if r["n_test"].nunique() != 1:
        raise ValueError(f"runs hold out different numbers of triples {sorted(r['n_test'].unique())}: one table "
                         "cannot count them together")
    n_test = int(r["n_test"].iloc[0])
    s = steps[steps["run_id"].isin(r["run_id"])]
    rows = []
    for key, g in r.groupby(SETTING, dropna=False):
        gs = s[s["run_id"].isin(g["run_id"])]
        cap = int(g["steps"].max())
        for sweeps in sorted({a for a in at if a <= cap} | {cap}):
            reach = g[g["steps"] >= sweeps]  # runs trained at least this long (a shorter one says nothing)
            at_step = gs[(gs["step"] == sweeps) & gs["run_id"].isin(reach["run_id"])].set_index("run_id")
            right = (at_step["test_accuracy"] * n_test).round()
            n = len(reach)
            row = dict(zip(SETTING, key), sweeps=sweeps, seeds=n)
            for k in range(n_test, -1, -1):
                row[f"{k}/{n_test}"] = float((right == k).sum() / n)
            row["diverged"] = float((n - right.notna().sum()) / n)  # stopped logging before this sweep
            row["train_correct"] = float(at_step["accuracy"].median())
            row["train_loss"] = float(at_step["loss"].median())
            rows.append(row)
    return pd.DataFrame(rows)


def person_weights(params: dict) -> np.ndarray:
    """(2, 6, 12): weights from the English (0) and Italian (1) people into the 6 person units.

    layers.0.weight is (36 inputs, 12 units) with a block-diagonal mask: inputs 0-23 are the people
    (English first, `bench.tasks` order) wired to units 0-5; inputs 24-35 (relations) to units 6-11.
    """
    w = np.asarray(params["layers.0.weight"], float)
    if w.shape != (N_PEOPLE + 12, 2 * PERSON_UNITS):
        raise ValueError(f"layers.0.weight has shape {w.shape}, not the family-trees net's (36, 12)")
    block = w[:N_PEOPLE, :PERSON_UNITS].T  # (units, people)
    return np.stack([block[:, :12], block[:, 12:]])


def pick_seed(runs: pd.DataFrame) -> tuple[pd.Series, str]:
    """A typical seed that got every held-out triple right (median final loss among them, in the
    setting with the most such seeds), or, if none did, the best seed; returns (run, why)."""
    r = runs[(runs["task"] == "family_trees") & runs["params_json"].notna() & (runs["status"] == "ok")].copy()
    if r.empty:
        raise ValueError("no family_trees run with final parameters (runs.params_json)")
    r["n_test"] = _n_test(r)
    r["right"] = (r["final_test_accuracy"] * r["n_test"]).round()
    full = r[r["right"] == r["n_test"]]
    if len(full):
        best = full.groupby(SETTING, dropna=False).size().idxmax()
        g = full.set_index(SETTING).loc[[best]].reset_index().sort_values(["final_loss", "seed"])
        why = f"the median-loss seed of the {len(g)} seeds of its setting with every held-out triple right"
        return g.iloc[len(g) // 2], why
    g = r.sort_values(["right", "final_accuracy", "final_loss", "seed"], ascending=[False, False, True, True])
    return g.iloc[0], "the best seed (no seed got every held-out triple right)"


def person_units_summary(w: np.ndarray) -> str:
    """What each person unit encodes, in a sentence: how alike its English and Italian weights are
    (correlation across the 12 isomorphic people) and how much the unit separates the two families."""
    parts = []
    for u in range(w.shape[1]):
        en, it = w[0, u], w[1, u]
        corr = float(np.corrcoef(en, it)[0, 1]) if en.std() > 0 and it.std() > 0 else float("nan")
        nationality = float(abs(en.mean() - it.mean()) / np.abs(w[:, u]).max())
        parts.append(f"unit {u + 1}: r(En, It) {corr:+.2f}, nationality {nationality:.2f}")
    return "; ".join(parts)


def person_weights_figure(params: dict, names: list[str], title: str | None = None) -> plt.Figure:
    """Hinton diagram: square area ~ |w|, white positive, black negative, on grey; a row per person unit,
    a column per person; English (left) and Italian (right) on one scale. `names`: the 24 people in
    input order."""
    set_theme()
    w = person_weights(params)
    wmax = np.abs(w).max()
    fig, axes = plt.subplots(1, 2, figsize=(DOUBLE, 2.1), sharey=True)
    for ax, m, who, label in zip(axes, w, (names[:12], names[12:]), ("English", "Italian")):
        hinton_squares(ax, m, wmax)
        ax.set_xticks(range(m.shape[1]), who, rotation=60, ha="right")
        ax.set_yticks(range(m.shape[0]), [f"unit {u + 1}" for u in range(m.shape[0])])
        ax.set_title(label)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def report_figure(runs: pd.DataFrame, figure_cls):
    """The report's entry (`analysis.report.Figure`): the picked seed's person weights and a caption."""
    from bench.tasks import _ENGLISH, _ITALIAN  # the 24 people in input order (data, not training code)

    run, why = pick_seed(runs)
    params = json.loads(run["params_json"])
    names = [p for p, *_ in _ENGLISH + _ITALIAN]
    right = int(run["right"])
    caption = (f"Weights from the 24 people into the 6 person units of the family-trees net (layers.0.weight rows "
               f"0-23, columns 0-5), seed {int(run['seed'])}, {why}: {run['loss']}, weight decay "
               f"{run['weight_decay']:g}, initial range {run['init_scale']:g}, {int(run['steps']):,} sweeps; "
               f"{right}/{int(run['n_test'])} held-out triples right, {run['final_accuracy']:.0%} of the training "
               f"triples. Area ~ |w|; white positive, black negative; English left, Italian right, isomorphic "
               f"people in the same column. {person_units_summary(person_weights(params))}.")
    return figure_cls("family_trees-person_weights", lambda: person_weights_figure(params, names), caption,
                      key="family_trees_weights")
