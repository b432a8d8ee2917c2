"""vgbench: a benchmark for the vanishing-gradient problem.

Every network exists twice -- in NumPy with a hand-written backward pass (`bench.numpy_mlp`) and in
PyTorch with autograd (`bench.torch_mlp`) -- built from the same initial arrays (`bench.init`), trained
by the same loop (`bench.train`) and measured by the same per-layer statistics (`bench.record`).
Nothing runs on import.
"""

__version__ = "0.1.0"
