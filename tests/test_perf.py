"""The speed suite: it runs, writes its table, and compares like with like. No timing assertions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench import perf
from bench.init import init_params
from bench.spec import NetSpec, TrainSpec
from bench.tasks import make_task
from bench.train import train


def test_quick_suite_writes_its_table(tmp_path):
    df = perf.run_suite(["P1", "P2", "P3", "P4", "P6"], quick=True, repeats=1, out_dir=tmp_path)
    files = list(tmp_path.glob("perf-*.parquet"))
    assert len(files) == 1
    back = pd.read_parquet(files[0])
    assert list(back.columns) == perf.COLUMNS
    assert set(back["case"]) == {"P1", "P2", "P3", "P4", "P6"}
    assert len(back) == len(df)
    # every row with a target says whether it was met; measured rows have a finite value
    targeted = back[back["target"] != ""]
    assert targeted["met"].notna().all()
    assert np.isfinite(back.loc[back["metric"] != "skipped", "value"]).all()


def test_interleaved_pairs_rounds_and_alternates_the_order():
    """Each round runs every variant once, first-to-last and then last-to-first; with clock=None the
    callables' own returned seconds are the times (P3's step spans)."""
    calls = []

    def variant(name, seconds):
        return lambda: (calls.append(name), seconds)[1]

    times = perf.interleaved({"a": variant("a", 1.0), "b": variant("b", 2.0)}, 4, warmup=False, clock=None)
    assert times == {"a": [1.0] * 4, "b": [2.0] * 4}
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]


def test_steps_timer_times_the_steps_after_the_first_log():
    """P3's timer: the CPU seconds from the log at step 0 to the log at the last step, positive and within
    the whole call's (the set-up and step 0 are left out)."""
    import time

    task = make_task("xor")
    spec = NetSpec(2, 1, (4,), "sigmoid", "sigmoid")
    tspec = TrainSpec(steps=30, lr=0.5, log_every=1)
    run = perf._steps_timer(task, spec, tspec, init_params(spec, "normal", [0]), "numpy", record=True)
    for _ in range(3):
        t0 = time.process_time()
        span = run()
        whole = time.process_time() - t0
        assert 0 < span <= whole


def test_unknown_case_is_named():
    with pytest.raises(ValueError, match="P9"):
        perf.run_suite(["P9"], quick=True)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_ensemble_members_equal_solo_runs(backend):
    """P4's claim, asserted per member in float64: 1e-12 relative leaves room for last-bit BLAS blocking."""
    task = make_task("symmetry")
    spec = NetSpec(6, 1, (2,), "sigmoid", "sigmoid")
    tspec = TrainSpec(steps=150, lr=0.1, momentum=0.9, log_every=15)
    seeds = list(range(5))
    ens = train(task, spec, tspec, init_params(spec, "uniform", seeds), backend, seeds)
    for k, seed in enumerate(seeds):
        solo = train(task, spec, tspec, init_params(spec, "uniform", [seed]), backend, [seed])
        np.testing.assert_allclose(ens.steps["loss"][ens.steps["member"] == k], solo.steps["loss"],
                                   rtol=1e-12, atol=0, err_msg=f"member {k} loss")
        m = ens.layers["member"] == k
        for col in ("grad_norm", "delta_norm", "weight_norm", "act_mean"):
            np.testing.assert_allclose(ens.layers[col][m], solo.layers[col], rtol=1e-12, atol=1e-15,
                                       err_msg=f"member {k} {col}")
        for name in solo.params:
            np.testing.assert_allclose(ens.params[name][k], solo.params[name][0], rtol=1e-12, atol=1e-15,
                                       err_msg=f"member {k} {name}")
        assert ens.solved_step[k] == solo.solved_step[0], k


@pytest.mark.parametrize("net", list(perf.TINY))
def test_floor_computes_the_same_loss_as_bench(net):
    """The floor is a fair comparison only if it does the same arithmetic: same loss after k updates."""
    task_name, spec = perf.TINY[net]
    task = make_task(task_name)
    params = init_params(spec, "uniform", [3], scale=0.3)
    for steps in (0, 1, 50):
        tspec = TrainSpec(steps=steps, lr=0.5, momentum=0.9, log_every=max(steps, 1))
        out = train(task, spec, tspec, params, "numpy", [3])
        want = out.steps["loss"][out.steps["step"] == steps][0]
        got = perf.floor_step_loop(task.x_train, task.y_train, params, steps, 0.5, 0.9)
        # 2-D vs batched matmul and a different summation order: a few ulps per step
        assert got == pytest.approx(want, rel=1e-12), steps
