"""The typed config schema (Hydra ConfigStore) and the checks Hydra's types cannot express.

Values live in `conf/*.yaml`; this file says what each key is and which values are valid. Hydra
rejects an unknown key, a wrong type or an unknown choice (the Enums) while composing; `validate`
then checks ranges and combinations and raises `ConfigError` with one line that names the key and
what would be valid. `bench.run.main` prints any of these as that one line and exits non-zero.
`model.activation` and `model.init` are strings, not Enums: a registry key or a plug-in
`pkg.module:Name`, which `validate` resolves (loads, checks and registers: bench.plugins) in whichever
process validates, so a launcher's worker and `python -m bench.twin` find it too.
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import typing
from dataclasses import dataclass, field, fields, make_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, List

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from bench.losses import LOSSES
from bench.plugins import PluginError, resolve_activation, resolve_init
from bench.spec import NORMS, OPTIMIZERS, RESIDUAL_SCALES, NetSpec, TrainSpec
from bench.tasks import MAKERS, Task, make_task

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # the repository's conf/ (install with pip -e)


class ConfigError(ValueError):
    """A config that composes but cannot run: the message is the one line a user sees."""


class NotADirectoryConfigError(ConfigError):
    """results_dir (or a folder on the way) is a file: results cannot be written there (exit 1, as
    for any failing write), as distinct from a bad value (exit 2)."""


# Enums, not Literal: Hydra 1.3's OmegaConf checks Enum choices and names them in its error
Backend = Enum("Backend", {"numpy": "numpy", "torch": "torch"})
Norm = Enum("Norm", {n: n for n in NORMS})
ResidualScale = Enum("ResidualScale", {s: s for s in RESIDUAL_SCALES})
LossName = Enum("LossName", {n: n for n in ("auto", *LOSSES)})
DType = Enum("DType", {"float64": "float64", "float32": "float32"})
Device = Enum("Device", {"cpu": "cpu", "cuda": "cuda"})
Optimizer = Enum("Optimizer", {o: o for o in OPTIMIZERS})
Progress = Enum("Progress", {"auto": "auto", "bar": "bar", "log": "log", "none": "none"})


# ---- task group: one schema per task, so a misspelt task option is rejected -------------------
def _task_schema(name: str, maker) -> type:
    """The schema of a task's options, read off its maker's signature in bench.tasks (the one place
    their defaults and meaning are written), plus the `name` the task group selects it by."""
    hints = typing.get_type_hints(maker)
    fields = [("name", str, field(default=name))]
    fields += [(p.name, hints[p.name], field(default=p.default))
               for p in inspect.signature(maker).parameters.values()]
    return make_dataclass("".join(w.title() for w in name.split("_")) + "Task", fields)


TASK_SCHEMAS = {name: _task_schema(name, maker) for name, maker in MAKERS.items()}


# ---- the defaults: each value is set here, once; conf/*.yaml only select these schemas ----------
# The default run is a 2-4-1 sigmoid net on XOR (README, "Defaults"; tests/test_harness.py checks it).
@dataclass
class ModelConfig:
    depth: int = 1  # hidden layers (>= 1)
    width: int = 4  # units per hidden layer (>= 1): 4 solves XOR from most seeds, 2 often sticks
    widths: List[int] | None = None  # explicit hidden widths, input side first; overrides depth/width
    # hidden non-linearity: a key of bench/activations.py, or a plug-in pkg.module:Name (bench/plugins.py)
    activation: str = "sigmoid"
    residual: bool = False  # a' = a + act(norm(W a + b)) around hidden layers of equal width
    residual_scale: ResidualScale = ResidualScale.one  # a' = a + s act(...): s = 1, 1/sqrt(depth), or rezero's alpha
    norm: Norm = Norm.none  # batchnorm: batch statistics (running ones in evaluation); layernorm: per case
    init: str = "normal"  # weight scheme of bench/init.py (N(0, 1) is Nielsen's text), or pkg.module:fn
    init_scale: float | None = None  # the scheme's scale (range, std or gain); null: its default
    init_bias: float | None = None  # bias scale where the scheme has one (meanfield: sigma_b)
    direct: bool = False  # direct input->output weights (the PDP XOR 2-1-1 net)
    first_layer_blocks: List[int] | None = None  # block-diagonal first layer: units per input block


@dataclass
class TrainConfig:
    steps: int = 1000  # parameter updates (a full-batch step is a 1986 "sweep")
    lr: float = 0.15  # epsilon: dw(t) = -lr dE/dw + momentum dw(t-1)
    momentum: float = 0.0  # alpha, in [0, 1); plain gradient descent by default
    momentum_initial: float | None = None  # momentum for the first initial_steps (1986 family trees: 0.5)
    lr_initial: float | None = None  # lr for the first initial_steps (1986 family trees: 0.005)
    initial_steps: int = 0  # how many steps use the *_initial values
    weight_decay: float = 0.0  # every parameter shrinks by this fraction after each update (1986: 0.002)
    batch_size: int | None = None  # null: full batch
    loss: LossName = LossName.auto  # auto: the loss the task was posed with; see bench/losses.py
    dtype: DType = DType.float64
    device: Device = Device.cpu  # cuda: torch backend only
    optimizer: Optimizer = Optimizer.sgd  # sgd: the 1986 rule above; adam: torch.optim.Adam's (momentum must be 0)
    adam_beta1: float = 0.9  # Adam's first-moment decay: Kingma & Ba's (and torch's) default
    adam_beta2: float = 0.999  # second-moment decay: their default
    adam_eps: float = 1e-8  # added to sqrt(v): their default, keeps the step finite where v ~ 0


@dataclass
class LogConfig:
    every: int = 100  # record statistics every k steps (always step 0 and the last step)
    # layers statistics on disk: float32 (half the bytes; a job holding a value outside float32's range,
    # a vanished gradient below 1e-38, keeps float64) or float64 (twin runs compared from the tables)
    stats_dtype: DType = DType.float32


@dataclass
class CheckpointConfig:
    # a long run saves its state (and streams its rows out) so that a killed or preempted job resumes
    # where it was; launch-time settings: they do not change a run's id or its numbers
    every_steps: int | None = None  # checkpoint after every k-th update; null: by time only
    every_minutes: float | None = 10.0  # checkpoint when this long has passed since the last; null: never


@dataclass
class Config:
    task: Any = MISSING  # one of TASK_SCHEMAS, chosen by the task group
    # the method preset's name (conf/method/<name>.yaml sets it with the model/train keys it stands for);
    # a label, stored as the runs table's `method` column and part of the run id, so two presets with
    # the same values keep their own runs. null: no preset, the keys were set one by one
    method_name: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    backend: Backend = Backend.numpy
    seed: int = 0  # member k of the ensemble uses seed + k (init and mini-batch order)
    ensemble: int = 1  # members trained at once in one batched pass
    results_dir: str = "results"  # output root
    name: str = "default"  # experiment name: results go to results_dir/name/
    overwrite: bool = False  # retrain runs that already have complete results
    progress: Progress = Progress.auto  # auto: a bar on a terminal, log lines otherwise
    report: bool = False  # write the report (analysis.report) when a sweep ends
    max_memory_gb: float | None = None  # refuse jobs estimated above this; null: 70% of free memory
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


SCHEMAS = (Config, ModelConfig, TrainConfig, LogConfig, CheckpointConfig, *TASK_SCHEMAS.values())


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="train", name="train_schema", node=TrainConfig)
    for name, schema in TASK_SCHEMAS.items():
        cs.store(group="task", name=f"{name}_schema", node=schema)


# ---- checks that need values ------------------------------------------------------------------
def _enum(v) -> str:
    return v.value if isinstance(v, Enum) else str(v)


def task_from(cfg: DictConfig) -> Task:
    params = {k: v for k, v in OmegaConf.to_container(cfg.task, resolve=True).items() if k != "name"}
    try:
        return make_task(cfg.task.name, **params)
    except TypeError as e:
        raise ConfigError(f"task.{cfg.task.name}: {e}") from None


def specs_from(cfg: DictConfig, task: Task) -> tuple[NetSpec, TrainSpec]:
    m, t = cfg.model, cfg.train
    # a plug-in (pkg.module:Name) is loaded, checked and registered once per process, so that a network
    # rebuilt from a stored config (analysis, the twin) finds it by name as the run did
    resolve_activation(m.activation)
    resolve_init(m.init)
    loss = task.loss if _enum(t.loss) == "auto" else _enum(t.loss)
    if loss == "cross_entropy":
        output = "softmax"
    else:  # a classification task asked for a squared error gets independent sigmoid outputs
        output = task.output if task.output != "softmax" else "sigmoid"
    widths = tuple(m.widths) if m.widths is not None else (m.width,) * m.depth
    blocks = tuple(m.first_layer_blocks) if m.first_layer_blocks is not None else None
    net = NetSpec(task.n_in, task.n_out, widths, _enum(m.activation), output, m.residual, _enum(m.norm),
                  m.direct, task.input_blocks if blocks is not None else None, blocks, _enum(m.residual_scale))
    train = TrainSpec(steps=t.steps, lr=t.lr, momentum=t.momentum, momentum_initial=t.momentum_initial,
                      initial_steps=t.initial_steps, lr_initial=t.lr_initial, weight_decay=t.weight_decay,
                      batch_size=t.batch_size, loss=loss, log_every=cfg.log.every, dtype=_enum(t.dtype),
                      device=_enum(t.device), optimizer=_enum(t.optimizer), adam_beta1=t.adam_beta1,
                      adam_beta2=t.adam_beta2, adam_eps=t.adam_eps)
    return net, train


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _finite_positive(x) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def unknown_key_message(key: str, names: list[str]) -> str:
    """`unknown key model.widht; did you mean model.width? valid keys there: ...` (the one hint)."""
    prefix, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, names, n=1)
    hint = f"did you mean {prefix + '.' if prefix else ''}{close[0]}? " if close else ""
    return f"unknown key {key}; {hint}valid keys there: {', '.join(names)}"


def _check_keys(cfg: DictConfig) -> None:
    """Keys added with `+key=value` pass Hydra's schema check (it opens the struct for them), but
    the engine would never read them and they would still change the run id: refuse them."""
    nodes = [("", cfg, Config), ("model.", cfg.model, ModelConfig), ("train.", cfg.train, TrainConfig),
             ("log.", cfg.log, LogConfig), ("task.", cfg.task, TASK_SCHEMAS.get(cfg.task.name)),
             ("checkpoint.", cfg.checkpoint, CheckpointConfig)]
    for prefix, node, schema in nodes:
        if schema is None:
            continue
        names = [f.name for f in fields(schema)]
        for key in node:
            if key not in names:
                raise ConfigError(unknown_key_message(f"{prefix}{key}", names))


def validate(cfg: DictConfig) -> tuple[Task, NetSpec, TrainSpec]:
    """Check ranges and combinations; return the task and the engine specs. Raises ConfigError."""
    _need(cfg.task.name in TASK_SCHEMAS, f"task.name={cfg.task.name}: valid choices: {', '.join(TASK_SCHEMAS)}")
    _check_keys(cfg)
    m, t = cfg.model, cfg.train
    try:  # a built-in name, or a plug-in loaded and checked here, in every process that validates
        resolve_activation(m.activation)
        resolve_init(m.init)
    except PluginError as e:
        raise ConfigError(str(e)) from None
    if m.widths is None:
        _need(m.depth >= 1, f"model.depth={m.depth}: must be >= 1 (hidden layers)")
        _need(m.width >= 1, f"model.width={m.width}: must be >= 1 (units per hidden layer)")
    else:
        _need(len(m.widths) >= 1 and min(m.widths) >= 1,
              f"model.widths={list(m.widths)}: need >= 1 layers, each >= 1 wide")
    _need(_finite_positive(t.lr), f"train.lr={t.lr}: must be a finite number > 0")
    _need(t.lr_initial is None or _finite_positive(t.lr_initial),
          f"train.lr_initial={t.lr_initial}: must be a finite number > 0 or null")
    for key in ("momentum", "momentum_initial"):
        v = t[key]
        _need(v is None or (math.isfinite(v) and 0 <= v < 1), f"train.{key}={v}: must be in [0, 1)")
    if _enum(t.optimizer) == "adam":
        for key, off in (("momentum", 0), ("momentum_initial", "null")):  # Adam's momentum is its beta1
            _need(not t[key], f"train.{key}={t[key]}: must be {off} with train.optimizer=adam (its momentum "
                  f"is train.adam_beta1); set train.{key}={off} or train.optimizer=sgd")
    for key in ("adam_beta1", "adam_beta2"):
        _need(math.isfinite(t[key]) and 0 <= t[key] < 1, f"train.{key}={t[key]}: must be in [0, 1)")
    _need(_finite_positive(t.adam_eps), f"train.adam_eps={t.adam_eps}: must be a finite number > 0")
    _need(math.isfinite(t.weight_decay) and 0 <= t.weight_decay < 1,
          f"train.weight_decay={t.weight_decay}: must be in [0, 1) (a fraction shrunk per update)")
    _need(t.steps >= 1, f"train.steps={t.steps}: must be >= 1")
    _need(t.initial_steps >= 0, f"train.initial_steps={t.initial_steps}: must be >= 0")
    for key in ("lr_initial", "momentum_initial"):  # a setting that would silently do nothing
        _need(t[key] is None or t.initial_steps > 0,
              f"train.{key}={t[key]} has no effect with train.initial_steps=0: set train.initial_steps "
              f"> 0 or train.{key}=null")
    _need(cfg.log.every >= 1, f"log.every={cfg.log.every}: must be >= 1 (record every k steps)")
    _need(cfg.ensemble >= 1, f"ensemble={cfg.ensemble}: must be >= 1 (members trained at once)")
    _need(cfg.seed >= 0, f"seed={cfg.seed}: must be >= 0")
    _need(cfg.max_memory_gb is None or _finite_positive(cfg.max_memory_gb),
          f"max_memory_gb={cfg.max_memory_gb}: must be a number > 0, or null for 70% of available memory")
    check_name(cfg.name)
    ck = cfg.checkpoint
    _need(ck.every_steps is None or ck.every_steps >= 1,
          f"checkpoint.every_steps={ck.every_steps}: must be >= 1, or null (by time only)")
    _need(ck.every_minutes is None or _finite_positive(ck.every_minutes),
          f"checkpoint.every_minutes={ck.every_minutes}: must be a number > 0, or null (never by time)")
    for key in ("init_scale", "init_bias"):
        v = m[key]
        _need(v is None or (math.isfinite(v) and v >= 0), f"model.{key}={v}: must be a finite number >= 0 or null")
    _need(not (_enum(cfg.backend) == "numpy" and _enum(t.device) == "cuda"),
          "train.device=cuda needs backend=torch (the numpy backend runs on cpu)")
    if _enum(t.device) == "cuda":
        import torch

        _need(torch.cuda.is_available(), "train.device=cuda but torch finds no CUDA device; use train.device=cpu")
    task = task_from(cfg)
    bs = t.batch_size
    _need(bs is None or 1 <= bs <= task.n_train,
          f"train.batch_size={bs}: must be null (full batch) or 1..{task.n_train} "
          f"(task {task.name} has {task.n_train} training cases)")
    norm = NORMS[_enum(m.norm)]
    _need(bs is None or bs >= norm.min_batch,
          f"train.batch_size={bs}: model.norm={norm.name} needs batches of >= {norm.min_batch} cases")
    _need(m.residual or _enum(m.residual_scale) == "one",
          f"model.residual_scale={_enum(m.residual_scale)} has no effect with model.residual=false: set "
          f"model.residual=true or model.residual_scale=one")
    net, train = specs_from(cfg, task)
    _need(min(net.widths) >= norm.min_width,
          f"model.norm={norm.name} needs hidden layers >= {norm.min_width} units wide (widths "
          f"{list(net.widths)}): a single unit normalised over itself is the constant beta")
    if train.loss == "cross_entropy":
        _need(task.n_out >= 2, f"train.loss=cross_entropy needs >= 2 output classes; task {task.name} has "
              f"{task.n_out} output: use sse_half or mse")
    if m.first_layer_blocks is not None:
        _need(task.input_blocks is not None,
              f"model.first_layer_blocks needs a task with input blocks (family_trees); task {task.name} has none")
    try:
        net.check()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_results_dir(cfg.results_dir, cfg.name)
    return task, net, train


def check_name(name) -> None:
    """The experiment name is one folder under results_dir: `../x` would write outside it."""
    name = str(name)
    _need(bool(name) and name not in (".", "..") and "/" not in name and os.sep not in name,
          f"name={name!r}: must be a plain folder name (no '/', not '.' or '..'); put the parent folder in results_dir")


def _check_results_dir(results_dir: str, name: str) -> None:
    """Before training, not after: the first existing folder on the way must be writable, and the
    experiment's table folders, where they exist, must be folders (a stray file named `runs`)."""
    path = Path(results_dir) / name
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise NotADirectoryConfigError(f"could not write results to {path}: {p} is a file, not a "
                                               f"directory; choose another results_dir or name")
            _need(os.access(p, os.W_OK | os.X_OK), f"results_dir={results_dir}: {p} is not writable; "
                  f"choose a writable results_dir")
            break
    for table in ("runs", "steps", "layers"):
        p = path / table
        _need(not p.exists() or p.is_dir(), f"{p} is a file, not a directory: move it away or choose "
              f"another name")


# Bytes a logged row costs at the peak while the tables are built: the recorder's per-step arrays,
# the columns made from them, the Arrow table and its sorted copy (a layers row is 13 values of 8 B).
ROW_BYTES_MEMORY = 4 * 104
# Bytes a row takes on disk (bench.perf P6, layers rows): ~23 B with float32 statistics (log.stats_dtype's
# default) and ~46 B with float64 on real statistics, ~34 B for random float32 ones; rounded up to cover
# any, so that a run refused for disk space would really not have fit.
ROW_BYTES_DISK = 64


def logged_steps(train: TrainSpec) -> int:
    """Logged steps of one run: every log_every-th step from 0, and the last step."""
    return train.steps // train.log_every + 1 + (train.steps % train.log_every != 0)


def rows_per_logged_step(net: NetSpec) -> int:
    """Rows one member adds per logged step: one steps row and one layers row per parameter."""
    return 1 + len(net.params())


def estimate_bytes(net: NetSpec, train: TrainSpec, task: Task, members: int,
                   logged_in_memory: int | None = None) -> int:
    """Rough peak memory of one job: parameters, grads, optimizer state, cached activations, and the
    logged rows held in memory (all of them, or `logged_in_memory` logged steps where rows stream to
    disk in chunks). Arithmetic only: no loop over members or steps, so any size is estimated at once."""
    itemsize = 8 if train.dtype == "float64" else 4
    n_params = sum(math.prod(shape) for *_, shape in net.params())
    batch = train.batch_size or task.n_train
    units = sum(net.widths) + net.n_out
    # per layer the forward caches z, n, h (+ batch-norm xhat) and backward makes delta and temporaries
    activations = 8 * batch * units
    logged = logged_steps(train) if logged_in_memory is None else min(logged_in_memory, logged_steps(train))
    rows = logged * rows_per_logged_step(net) * ROW_BYTES_MEMORY
    # per parameter entry: itself, its gradient, a temporary, its copy before a logged update, and the
    # optimizer's state (SGD: a velocity; Adam: two moments)
    per_param = 4 + (2 if train.optimizer == "adam" else 1)
    return members * (itemsize * (per_param * n_params + activations) + rows)


def estimate_disk_bytes(net: NetSpec, train: TrainSpec, members: int) -> int:
    """Bytes of the steps and layers rows one job writes."""
    return members * logged_steps(train) * rows_per_logged_step(net) * ROW_BYTES_DISK
