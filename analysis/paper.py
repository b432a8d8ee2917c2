"""What the reproduced sources report, and the orders and labels every figure and table shares.

The numbers are quoted from REFERENCES.md; figures and tables overlay or tabulate them beside the
measured values. Kept apart from figures.py so a table can use them without importing matplotlib.
"""

from __future__ import annotations

from bench.activations import ACTIVATIONS

ACT_ORDER = tuple(ACTIVATIONS)  # the registry's order: every activation a network can use
ARCH_ORDER = ("plain", "residual", "batchnorm", "residual+bn", "layernorm", "residual+ln")
PROBLEMS = ("xor", "parity", "encoder", "symmetry", "family_trees")  # the 1986 problems, paper order

# The blog post's numbers (REFERENCES.md, "The seed"): loss at steps 0, 5,000, 10,000; final |grad|.
BLOG_LOSS = {0: 0.318, 5000: 0.010, 10000: 0.0023}
BLOG_GRAD = {2: 0.001217, 1: 0.000590}  # layer -> mean |grad W| at step 10,000
# Papers' sweeps to solution (REFERENCES.md); parity's 2,825 are "presentations" in PDP ch. 8.
PAPER_SWEEPS = {"xor": 558, "parity": 2825, "symmetry": 1425}
FAMILY_TREES_SWEEPS = 1500  # trained for a fixed 1,500 sweeps: not a sweeps-to-criterion number
# Nielsen ch. 5: ||dC/db^l|| per hidden layer at initialisation, MNIST, keyed by number of hidden layers.
NIELSEN = {2: (0.07, 0.31), 3: (0.012, 0.060, 0.283), 4: (0.003, 0.017, 0.070, 0.285)}


def sigma_w_label(sigma_w: float) -> str:
    """'1.5', or 'sqrt2 (He)' for sigma_w = sqrt(2) (He init's variance 2/fan_in), however it was typed."""
    return "sqrt2 (He)" if abs(float(sigma_w) - 2**0.5) < 1e-3 else f"{float(sigma_w):g}"
