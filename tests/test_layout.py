"""The codebase's shape: imports flow one way, each default is set once, each activation is one entry."""

from __future__ import annotations

import ast
import graphlib
import re

import numpy as np
import pytest
import yaml
from conftest import ROOT, compose_cfg
from omegaconf import OmegaConf

# Every module of bench/ and analysis/, lowest layer first. A module may import only modules of lower
# layers (at module level or inside a function): data flows conf -> config -> task/spec -> network ->
# trainer -> recorder -> results -> analysis, and the harness on top drives it. A new module gets a
# layer here, which is the point: where it sits is a decision, not an accident.
LAYERS = [
    {"bench", "analysis"},  # package docstrings
    {"bench.activations", "bench.losses"},  # the registries: one entry per activation / loss
    {"bench.spec", "bench.tasks", "bench.results"},  # engine descriptions, data, the results schema
    {"bench.init", "bench.record", "bench.checkpoint"},  # initial arrays; statistics; a run's saved state
    {"bench.theory", "bench.numpy_mlp", "bench.torch_mlp"},  # mean-field predictions; the two networks
    {"bench.train"},  # the loop shared by both networks
    {"bench.plugins"},  # plug-in activations and inits: load, check against both networks, register
    {"bench.config"},  # the typed schema with every default, and its checks -> task and engine specs
    {"bench.cli", "bench.guard"},  # errors as one line, progress; memory and disk refusals
    {"bench.twin"},  # the lockstep check: composes a config and trains both networks
    {"analysis.paper"},  # the sources' numbers, shared orders and labels
    {"analysis.tables"},  # results -> tables
    {"analysis.figures"},  # results -> figures (some read tables' summaries)
    {"analysis.family_trees", "analysis.extensions", "analysis.scorecard"},  # family trees; later papers; scorecard
    {"analysis.report"},  # figures + tables -> report.md (runs the lockstep check on stored runs)
    {"bench.sweep"},  # the Hydra callback: refusals before a job, sweep summaries, the report
    {"bench.run", "bench.perf"},  # run(cfg) and @hydra.main; the speed suite
]
RANK = {module: rank for rank, layer in enumerate(LAYERS) for module in layer}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for package in ("bench", "analysis"):
        for path in sorted((ROOT / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = ast.parse(path.read_text(), str(path))
    return out


def _imports(tree: ast.Module, known: set[str]) -> set[str]:
    """Every bench/analysis module imported anywhere in the tree, function bodies included."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from bench import results` imports the module bench.results
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def test_imports_are_acyclic_and_flow_down_the_layers():
    modules = _modules()
    assert set(modules) == set(RANK), f"give each module a layer in LAYERS: {set(modules) ^ set(RANK)}"
    graph = {m: _imports(tree, set(modules)) - {m} for m, tree in modules.items()}
    graphlib.TopologicalSorter(graph).static_order()  # raises CycleError naming the cycle
    upward = [(m, dep) for m, deps in graph.items() for dep in deps if RANK[dep] >= RANK[m]]
    assert not upward, f"imports of a module in the same or a higher layer: {upward}"


# --- defaults -------------------------------------------------------------------------------------
def _readme_defaults() -> dict[str, object]:
    """The README's defaults table: | `key` | `value` | why |, under the heading '## Defaults'."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Defaults", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([\w.]+)` \| `([^`]*)` \|", section, re.MULTILINE)
    return {key: yaml.safe_load(value) for key, value in rows}


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_default_config_is_the_documented_one():
    documented = _readme_defaults()
    cfg = OmegaConf.to_container(compose_cfg(), resolve=True, enum_to_str=True)
    cfg.pop("progress")  # compose_cfg sets progress=none for tests; the schema's default is checked below
    composed = dict(_leaves({k: v for k, v in cfg.items() if k != "task"}))
    composed["task"] = cfg["task"]["name"]  # the task group; each task's options are its maker's defaults
    assert documented.pop("progress") == "auto"
    assert composed == documented


def test_yaml_group_files_hold_no_values():
    """Values live in the schema (bench/config.py); a value here would be a second, competing home."""
    for path in [*(ROOT / "conf").glob("model/*.yaml"), *(ROOT / "conf").glob("train/*.yaml"),
                 *(ROOT / "conf").glob("task/*.yaml")]:
        assert set(yaml.safe_load(path.read_text())) == {"defaults"}, path
    assert set(yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())) == {"defaults", "hydra"}


def test_task_options_are_the_task_functions_defaults():
    import inspect

    from bench.config import TASK_SCHEMAS
    from bench.tasks import MAKERS

    for name, maker in MAKERS.items():
        cfg = compose_cfg([f"task={name}"])
        options = {k: v for k, v in OmegaConf.to_container(cfg.task).items() if k != "name"}
        assert options == {p.name: p.default for p in inspect.signature(maker).parameters.values()}, name
        assert cfg.task.name == name and TASK_SCHEMAS[name]().name == name


# --- the activation registry: one entry serves NumPy, torch and theory ----------------------------
def _activation_names():
    from bench.activations import ACTIVATIONS

    return list(ACTIVATIONS)


@pytest.mark.parametrize("name", _activation_names())
def test_activation_entry_serves_both_array_modules(name):
    torch = pytest.importorskip("torch")
    from bench.activations import ACTIVATIONS

    act = ACTIVATIONS[name]
    z = np.concatenate([np.linspace(-30.0, 30.0, 601), [-1e-300, 1e-300]])  # 0 included: relu's kink
    zt = torch.tensor(z, requires_grad=True)
    h, ht = act.phi(z, np), act.phi(zt, torch)
    # the same float64 formula in both modules: equal but for each library's tanh, exp or erf (<= 1 ulp,
    # ~1e-16 absolute; sigmoid's 1 + tanh(z/2) turns that into a large relative error far out, hence atol)
    np.testing.assert_allclose(ht.detach().numpy(), h, rtol=1e-15, atol=1e-15, err_msg=name)
    ht.sum().backward()  # what the torch twin uses: autograd through phi
    # the NumPy backward's phi' (from z and h) against autograd's: rounding only (1 - h^2 vs
    # autograd's own tanh' formula), and both give phi'(0) = 0 for relu as torch.relu does
    np.testing.assert_allclose(act.dphi(z, h, np), zt.grad.numpy(), rtol=1e-12, atol=1e-15, err_msg=name)
    # its largest slope: never exceeded on the grid, and reached to 1e-3 (most built-ins peak at 0, on the
    # grid; a smooth peak between grid points is missed by O(spacing^2) ~ 1e-3 at most) ...
    assert act.dphi_max * (1 - 1e-3) <= act.dphi(z, h, np).max() <= act.dphi_max * (1 + 1e-12), name
    # ... and to 1e-12 by a bounded optimiser near the top of the grid (gelu and silu peak off 0)
    from scipy.optimize import minimize_scalar

    top = z[np.argmax(act.dphi(z, h, np))]
    best = minimize_scalar(lambda v: -float(act.dphi(np.array(v), act.phi(np.array(v), np), np)),
                           bounds=(top - 0.1, top + 0.1), method="bounded", options={"xatol": 1e-10})
    assert -best.fun <= act.dphi_max * (1 + 1e-12), name
    assert -best.fun >= act.dphi_max * (1 - 1e-12) or top == 0.0, name  # a peak at a kink: the grid has it
    for dtype in (np.float32, np.float64):  # phi and phi' keep the network's dtype
        z32 = z.astype(dtype)
        assert act.phi(z32, np).dtype == dtype and act.dphi(z32, act.phi(z32, np), np).dtype == dtype, name


def test_config_choices_are_the_registries():
    from bench import config
    from bench.activations import ACTIVATIONS
    from bench.init import INITS
    from bench.losses import LOSSES
    from bench.spec import NORMS, OPTIMIZERS, RESIDUAL_SCALES

    # activation and init are strings (a plug-in is pkg.module:Name), checked against the registries
    for key, registry in (("activation", ACTIVATIONS), ("init", INITS)):
        with pytest.raises(config.ConfigError) as err:
            config.validate(compose_cfg([f"model.{key}=nope"]))
        assert str(err.value).endswith(f"valid choices: {', '.join(registry)}, or a plug-in pkg.module:Name")
    assert [e.value for e in config.Norm] == list(NORMS)
    assert [e.value for e in config.ResidualScale] == list(RESIDUAL_SCALES)
    assert [e.value for e in config.Optimizer] == list(OPTIMIZERS)
    assert [e.value for e in config.LossName] == ["auto", *LOSSES]
