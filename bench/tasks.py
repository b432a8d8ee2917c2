"""Datasets: the 1986 problems, scikit-learn's bundled digits, and a deep random teacher.

Every task is generated or bundled; nothing is downloaded. A task carries its data, the output
non-linearity and loss it was posed with, and (for the binary 1986 problems) the "solved" criterion
used to count sweeps to solution: every output of every pattern within `solve_tol` of its target.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Task:
    name: str
    x_train: np.ndarray  # (N, n_in) float64
    y_train: np.ndarray  # (N, n_out) float64: 0/1 targets, one-hot classes, or regression values
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    output: str  # output non-linearity: sigmoid | softmax | identity
    loss: str  # the loss the task was posed with: sse_half | mse | cross_entropy
    kind: str  # binary | classification | regression: decides what "accuracy" means
    solve_tol: float | None = None  # binary tasks: solved when every |y - d| < solve_tol
    input_blocks: tuple[int, ...] | None = None  # sizes of the one-hot input groups (family trees)

    @property
    def n_in(self) -> int:
        return self.x_train.shape[1]

    @property
    def n_out(self) -> int:
        return self.y_train.shape[1]

    @property
    def n_train(self) -> int:
        return self.x_train.shape[0]


def _bits(n: int) -> np.ndarray:
    """All 2**n patterns of n bits, first bit most significant."""  # (2**n, n)
    return np.array(list(itertools.product([0.0, 1.0], repeat=n)))


def xor() -> Task:
    x = _bits(2)
    y = (x.sum(1, keepdims=True) % 2 == 1).astype(float)
    return Task("xor", x, y, None, None, "sigmoid", "sse_half", "binary", solve_tol=0.4)


def parity(bits: int = 4) -> Task:
    """bits: input bits; all 2**bits patterns, target 1 for an odd number of 1s."""
    x = _bits(bits)
    y = (x.sum(1, keepdims=True) % 2 == 1).astype(float)
    return Task("parity", x, y, None, None, "sigmoid", "sse_half", "binary", solve_tol=0.4)


def encoder(n: int = 8) -> Task:
    """n one-hot patterns mapped to themselves through a narrow (log2 n) hidden layer (set model.width)."""
    x = np.eye(n)
    return Task("encoder", x, x.copy(), None, None, "sigmoid", "sse_half", "binary", solve_tol=0.4)


def symmetry(bits: int = 6) -> Task:
    """All 2**bits patterns; target 1 when one is a mirror image of itself (8 of 64 for 6 bits)."""
    x = _bits(bits)
    y = np.all(x == x[:, ::-1], axis=1, keepdims=True).astype(float)
    return Task("symmetry", x, y, None, None, "sigmoid", "sse_half", "binary", solve_tol=0.4)


# The two isomorphic families of the 1986 paper: (person, sex, spouse, father, mother).
_ENGLISH = [
    ("Christopher", "m", "Penelope", None, None), ("Penelope", "f", "Christopher", None, None),
    ("Andrew", "m", "Christine", None, None), ("Christine", "f", "Andrew", None, None),
    ("Margaret", "f", "Arthur", None, None), ("Arthur", "m", "Margaret", "Christopher", "Penelope"),
    ("Victoria", "f", "James", "Christopher", "Penelope"), ("James", "m", "Victoria", "Andrew", "Christine"),
    ("Jennifer", "f", "Charles", "Andrew", "Christine"), ("Charles", "m", "Jennifer", None, None),
    ("Colin", "m", None, "James", "Victoria"), ("Charlotte", "f", None, "James", "Victoria"),
]
# the Italian family is the same tree with other names, person for person
_ITALIAN_NAME = dict(zip([row[0] for row in _ENGLISH], (
    "Roberto", "Maria", "Pierro", "Francesca", "Gina", "Emilio", "Lucia", "Marco", "Angela", "Tomaso", "Alfonso",
    "Sophia")))
_ITALIAN = [tuple(_ITALIAN_NAME.get(v, v) for v in row) for row in _ENGLISH]
RELATIONS = ("father", "mother", "husband", "wife", "son", "daughter",
             "uncle", "aunt", "brother", "sister", "nephew", "niece")


def family_triples() -> list[tuple[str, str, frozenset[str]]]:
    """The 104 (person, relation) queries of the 1986 paper with the set of people that answer each."""
    triples = []
    for family in (_ENGLISH, _ITALIAN):
        sex = {p: s for p, s, *_ in family}
        spouse = {p: sp for p, _, sp, *_ in family}
        parents = {p: {f, m} - {None} for p, _, _, f, m in family}
        children = {p: {c for c in sex if p in parents[c]} for p in sex}
        siblings = {p: {c for c in sex if c != p and parents[c] and parents[c] == parents[p]} for p in sex}
        for p in sex:
            piblings = {s for par in parents[p] for s in siblings[par]}
            piblings |= {spouse[s] for s in piblings if spouse[s]}
            in_laws = siblings[p] | (siblings[spouse[p]] if spouse[p] else set())
            niblings = {c for s in in_laws for c in children[s]}
            answers = {
                "father": {q for q in parents[p] if sex[q] == "m"},
                "mother": {q for q in parents[p] if sex[q] == "f"},
                "husband": {spouse[p]} if spouse[p] and sex[spouse[p]] == "m" else set(),
                "wife": {spouse[p]} if spouse[p] and sex[spouse[p]] == "f" else set(),
                "son": {q for q in children[p] if sex[q] == "m"},
                "daughter": {q for q in children[p] if sex[q] == "f"},
                "uncle": {q for q in piblings if sex[q] == "m"},
                "aunt": {q for q in piblings if sex[q] == "f"},
                "brother": {q for q in siblings[p] if sex[q] == "m"},
                "sister": {q for q in siblings[p] if sex[q] == "f"},
                "nephew": {q for q in niblings if sex[q] == "m"},
                "niece": {q for q in niblings if sex[q] == "f"},
            }
            triples += [(p, r, frozenset(answers[r])) for r in RELATIONS if answers[r]]
    return triples


def family_trees(n_test: int = 4, split_seed: int = 0) -> Task:
    """Person (24 one-hot) and relation (12 one-hot) in, the 24 people who answer out.

    n_test: held-out triples (1986: 4 of 104); split_seed: which ones.
    """
    people = [p for p, *_ in _ENGLISH + _ITALIAN]
    triples = family_triples()
    x = np.zeros((len(triples), len(people) + len(RELATIONS)))
    y = np.zeros((len(triples), len(people)))
    for i, (p, r, answers) in enumerate(triples):
        x[i, people.index(p)] = 1.0
        x[i, len(people) + RELATIONS.index(r)] = 1.0
        y[i, [people.index(a) for a in answers]] = 1.0
    test = np.zeros(len(triples), bool)
    test[np.random.default_rng(split_seed).choice(len(triples), n_test, replace=False)] = True
    # 1986: an output is right when "on" > 0.8 and "off" < 0.2, i.e. within 0.2 of its target.
    return Task("family_trees", x[~test], y[~test], x[test], y[test], "sigmoid", "sse_half", "binary",
                solve_tol=0.2, input_blocks=(len(people), len(RELATIONS)))


def digits(test_fraction: float = 0.2, split_seed: int = 0) -> Task:
    """scikit-learn's bundled 8x8 digits (1,797 images), standardised with training statistics.

    test_fraction: held-out share of the images; split_seed: which ones.
    """
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    data = load_digits()
    x, labels = data.data.astype(float), data.target
    order = np.random.default_rng(split_seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(0), x[train].std(0)
    std[std == 0] = 1.0  # the always-blank corner pixels stay 0 instead of dividing by 0
    x = (x - mean) / std
    y = np.eye(10)[labels]
    return Task("digits", x[train], y[train], x[test], y[test], "softmax", "cross_entropy",
                "classification")


def teacher(n_in: int = 16, n_out: int = 1, n_train: int = 1024, n_test: int = 256,
            teacher_depth: int = 3, teacher_width: int = 32, data_seed: int = 0) -> Task:
    """Regression on the outputs of a random deep tanh network (N(0, 2/fan_in) weights).

    n_in / n_out: input and output size of student and teacher; n_train / n_test: cases;
    teacher_depth / teacher_width: hidden layers of the teacher; data_seed fixes the teacher and the
    inputs, independent of the student's seed.
    """
    rng = np.random.default_rng(data_seed)
    x = rng.standard_normal((n_train + n_test, n_in))
    a = x
    for fan_out in [teacher_width] * teacher_depth:
        a = np.tanh(a @ (rng.standard_normal((a.shape[1], fan_out)) * np.sqrt(2.0 / a.shape[1])))
    y = a @ rng.standard_normal((a.shape[1], n_out)) / np.sqrt(a.shape[1])
    y = (y - y[:n_train].mean(0)) / y[:n_train].std(0)  # unit-variance targets: loss 1 = predicting 0
    return Task("teacher", x[:n_train], y[:n_train], x[n_train:], y[n_train:], "identity", "mse",
                "regression")


# a task is a function here (its keyword defaults are the config's defaults) and an entry in MAKERS
MAKERS = {"xor": xor, "parity": parity, "encoder": encoder, "symmetry": symmetry,
           "family_trees": family_trees, "digits": digits, "teacher": teacher}


def make_task(name: str, **params) -> Task:
    """Build a task by name; `params` are the task's own options (e.g. parity's `bits`)."""
    if name not in MAKERS:
        raise ValueError(f"task={name!r} is not a task; valid choices: {', '.join(MAKERS)}")
    return MAKERS[name](**params)


def correct(task: Task, y: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Which patterns are right: (E, N) bool from outputs y and targets d of shape (E | 1, N, n_out)."""
    if task.kind == "binary":
        return np.all(np.abs(y - d) < task.solve_tol, axis=-1)
    if task.kind == "classification":
        return np.argmax(y, -1) == np.argmax(d, -1)
    raise ValueError(f"task {task.name!r} is a regression task: it has no notion of a correct pattern")
