"""Gradient accumulation (``config.grad_accum_steps``, ``core/microbatches.py``): the step over A
microbatches is the step over the whole batch, whatever it draws at random; the strided split
and its inverse; one-line errors for an A that does not fit the batch; a run resumed with another A."""

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from danceopd_jax import train
from danceopd_jax.config_validation import ConfigError, validate
from danceopd_jax.core import microbatches
from danceopd_jax.train import setup_run

from conftest import load_config

# Tolerances: float32 sums in another order (microbatch means, then their mean). The losses agree to
# rtol 1e-5; one Adam step (lr 1e-3) moves a parameter by up to 1e-3 and amplifies float noise in
# near-zero gradients (lr * g / (|g| + eps)), so parameters agree to 10% of one step (as in
# test_sharding.py).
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-4

# name: (A, config overrides); batch 8. Together they make every random draw of the objectives and
# the router through a microbatch: rollout noise and query indices (with per-sample route groups and
# K = 2), sampled routes, off-policy noise per query, Flow-OPD's SDE noise, flow-matching times and
# condition dropout.
CASES = {
    "danceopd_per_sample_two_queries": (2, {"routing": "per_sample", "queries_per_rollout": 2}),
    # an untrained router's probabilities are near uniform, so its sampled routes are random draws
    "danceopd_learned_sampled_routes": (4, {"routing": "learned", "router.assign": "sample", "router.train_steps": 1,
                                            "router.label_fraction": 1.0, "router.heldout": 32}),
    "offpolicy_two_queries": (2, {"method": "offpolicy", "queries_per_rollout": 2}),
    "flowopd": (2, {"method": "flowopd"}),
    "flow_matching_with_dropout": (4, {"method": "flow_matching", "condition_dropout": 0.5}),
}  # fmt: skip


def _config(accum: int, **overrides):
    return load_config(batch_size=8, grad_accum_steps=accum, **{"optimizer.warmup_steps": 0, "student.zero_init": False, **overrides})


def _one_step(config):
    run = setup_run(config)
    route, batch = run.global_batch(0)
    before = jax.tree.map(np.array, run.state.params)
    state, metrics = run.train_step(run.state, run.experts, batch, jnp.int32(route))
    return before, state, jax.tree.map(np.asarray, metrics)


@pytest.mark.parametrize("case", CASES)
def test_accumulated_microbatches_give_the_whole_batch_step(case):
    accum, overrides = CASES[case]
    before, whole_state, whole = _one_step(_config(1, **overrides))
    _, accum_state, accumulated = _one_step(_config(accum, **overrides))
    assert float(accumulated["loss"]) == pytest.approx(float(whole["loss"]), rel=LOSS_RTOL)
    np.testing.assert_allclose(accumulated["group_loss"], whole["group_loss"], rtol=LOSS_RTOL)
    assert float(accumulated["grad_norm"]) == pytest.approx(float(whole["grad_norm"]), rel=1e-4)
    moved = 0.0
    for b, w, a in zip(jax.tree.leaves(before), jax.tree.leaves(whole_state.params), jax.tree.leaves(accum_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(w), atol=PARAM_ATOL)
        moved = max(moved, float(np.max(np.abs(np.asarray(w) - b))))
    assert moved > 5 * PARAM_ATOL  # the step moved parameters by about lr = 1e-3, far more than the tolerance


def test_split_is_strided_and_merge_inverts_it():
    batch = {"image": jnp.arange(24.0).reshape(12, 2), "cond": {"label": jnp.arange(12)}}
    parts = microbatches.split(batch, 3)
    np.testing.assert_array_equal(parts["cond"]["label"], [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])
    np.testing.assert_array_equal(microbatches.merge(parts["image"]), batch["image"])
    for m in range(3):
        rows = microbatches.BatchRows(index=jnp.int32(m), count=3)
        np.testing.assert_array_equal(microbatches.take(batch["image"], rows), parts["image"][m])


def test_a_microbatch_draws_its_rows_of_the_whole_batch_draw():
    key = jax.random.key(7)
    whole = microbatches.normal(key, (8, 3))
    for m in range(4):
        part = microbatches.normal(key, (2, 3), microbatches.BatchRows(index=jnp.int32(m), count=4))
        np.testing.assert_array_equal(part, whole[m::4])


def test_route_groups_of_a_microbatch():
    assert microbatches.group_sizes([4, 8], 4) == [1, 2]
    with pytest.raises(ValueError, match=r"route groups \[4, 6\] do not each split into 4 microbatches"):
        microbatches.group_sizes([4, 6], 4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"grad_accum_steps": 0}, "config.grad_accum_steps: must be an integer >= 1, got 0"),
        ({"grad_accum_steps": 3}, "config.grad_accum_steps: 3 microbatches do not divide batch_size 8"),
    ],
)
def test_an_accumulation_that_does_not_divide_the_batch_is_one_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(batch_size=8, **overrides))


def test_microbatches_must_split_over_the_devices_and_the_route_groups():
    with pytest.raises(ConfigError, match=r"config.grad_accum_steps: 8 microbatches of the batch of 8 do not each split over "
                                          r"data x fsdp = 2 devices; use a divisor of 4"):  # fmt: skip
        train._check_layout(load_config(batch_size=8, grad_accum_steps=8), _mesh(data=2))
    grouped = load_config(batch_size=8, grad_accum_steps=4, routing="per_sample", **{"routes.t2i.weight": 3.0})
    with pytest.raises(ConfigError, match=r"config.grad_accum_steps: routing 'per_sample' splits the batch of 8 into route "
                                          r"groups \[2, 6\].*each must divide by 4"):  # fmt: skip
        train._check_layout(grouped, _mesh(data=1))


def _mesh(data: int):
    """What ``_check_layout`` reads of a mesh of ``data`` devices of one process."""
    devices = np.empty((data, 1, 1), object)
    devices[...] = SimpleNamespace(process_index=0)
    return SimpleNamespace(shape={"data": data, "fsdp": 1, "tensor": 1}, devices=devices)


def test_a_run_resumes_with_another_accumulation(tmp_path):
    """``grad_accum_steps`` is a memory setting: a run stopped at step 2 and resumed with A = 2 gives
    the losses of the run that never stopped (float summation order aside)."""
    common = {"num_train_steps": 4, "checkpoint_every": 2, "log_every": 1, "loss_log": True, "optimizer.decay": "constant"}
    train.train_and_evaluate(_config(1, **common), str(tmp_path / "whole"))
    train.train_and_evaluate(_config(1, **dict(common, num_train_steps=2)), str(tmp_path / "resumed"))
    train.train_and_evaluate(_config(2, **common), str(tmp_path / "resumed"))
    whole, resumed = (_losses(tmp_path / name) for name in ("whole", "resumed"))
    assert [r["step"] for r in resumed] == [r["step"] for r in whole] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in whole], rtol=1e-4)


def _losses(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / train.LOSS_LOG).read_text().splitlines()]
