"""Property-based tests (hypothesis): schedules, routing invariants and config overrides hold for
any sizes and values, not just the ones the example tests pick."""

import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from danceopd_jax.config_validation import ConfigError, validate
from danceopd_jax.core import routing, schedule

from conftest import load_config

FAST = settings(max_examples=40, deadline=None)
SLOW = settings(max_examples=15, deadline=None)  # JAX ops compile once per new shape: few examples, few shapes

weights_lists = st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=1, max_size=6).filter(lambda w: sum(w) > 0)


# ---------------------------------------------------------------- schedules


@SLOW
@given(num_steps=st.integers(1, 200), shift=st.floats(0.05, 20.0))
def test_sigma_grid_runs_from_one_to_zero_and_decreases(num_steps, shift):
    sigmas = np.asarray(schedule.sigma_grid(num_steps, shift))
    assert sigmas.shape == (num_steps + 1,)
    assert sigmas[0] == pytest.approx(1.0, abs=1e-6) and sigmas[-1] == 0.0
    assert np.all(np.diff(sigmas) < 0)


@FAST
@given(shift=st.floats(0.05, 20.0), points=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=20))
def test_shift_maps_the_unit_interval_onto_itself_monotonically(shift, points):
    sigma = np.sort(np.asarray(points, np.float64))
    shifted = np.asarray(schedule.shift_sigma(sigma, shift))
    assert np.all(shifted >= 0.0) and np.all(shifted <= 1.0 + 1e-12)
    assert np.all(np.diff(shifted) >= -1e-12)
    assert schedule.shift_sigma(0.0, shift) == 0.0 and schedule.shift_sigma(1.0, shift) == pytest.approx(1.0)


@settings(max_examples=10, deadline=None)  # the Beta samplers compile for ~1 s per new (B, K)
@given(
    sampler=st.sampled_from(schedule.QUERY_SAMPLERS),
    num_steps=st.integers(1, 64),
    num_states=st.integers(1, 3),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_query_indices_stay_within_the_rollout(sampler, num_steps, num_states, batch, seed):
    indices = np.asarray(schedule.sample_query_indices(jax.random.key(seed), batch, num_states, num_steps, sampler))
    assert indices.shape == (batch, num_states) and indices.dtype == np.int32
    assert indices.min() >= 0 and indices.max() <= num_steps - 1


# ---------------------------------------------------------------- routing


@FAST
@given(batch=st.integers(0, 512), weights=weights_lists)
def test_group_sizes_apportion_the_batch(batch, weights):
    sizes = routing.group_sizes(batch, weights)
    assert len(sizes) == len(weights) and sum(sizes) == batch and min(sizes) >= 0
    share = np.asarray(weights) / sum(weights) * batch
    assert np.all(np.abs(np.asarray(sizes) - share) < 1.0 + 1e-9)


@FAST
@given(weights=weights_lists)
def test_normalized_weights_are_a_distribution(weights):
    p = routing.normalized_weights(weights)
    assert math.isclose(p.sum(), 1.0, rel_tol=1e-12) and np.all(p >= 0)


@FAST
@given(seed=st.integers(0, 2**32 - 1), step=st.integers(0, 10**9), weights=weights_lists)
def test_route_for_step_depends_only_on_seed_and_step(seed, step, weights):
    route = routing.route_for_step(seed, step, weights)
    assert route == routing.route_for_step(seed, step, list(weights))
    assert 0 <= route < len(weights) and weights[route] > 0


@SLOW
@given(
    sizes=st.lists(st.integers(0, 4), min_size=1, max_size=4).filter(lambda s: sum(s) > 0),
    blocks=st.integers(1, 3),
    repeats=st.integers(1, 2),
)
def test_split_then_merge_is_the_identity(sizes, blocks, repeats):
    rows = blocks * sum(sizes) * repeats
    batch = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
    groups = routing.split_groups(batch, sizes, blocks)
    assert [g.shape[0] for g in groups] == [blocks * size * repeats for size in sizes]
    np.testing.assert_array_equal(np.asarray(routing.merge_groups(groups, blocks)), batch)


# ---------------------------------------------------------------- config overrides

# Numeric keys of the smoke config: (valid values, invalid values). Image sizes stay multiples of the
# patch size (2); the cross-key checks have example tests of their own.
NUMERIC_KEYS = {
    "rollout_steps": (st.integers(1, 10**6), st.integers(-10**6, 0)),
    "queries_per_rollout": (st.integers(1, 64), st.integers(-64, 0)),
    "batch_size": (st.integers(1, 10**6), st.integers(-10**6, 0)),
    "num_train_steps": (st.integers(0, 10**9), st.integers(-10**9, -1)),
    "image_size": (st.integers(1, 512).map(lambda n: 2 * n), st.integers(-512, 0)),
    "seed": (st.integers(0, 2**31 - 1), st.integers(-2**31, -1)),
    "log_every": (st.integers(1, 10**6), st.integers(-10**6, 0)),
    "checkpoint_every": (st.integers(1, 10**6), st.integers(-10**6, 0)),
    "keep_checkpoints": (st.integers(1, 100), st.integers(-100, 0)),
    "shift": (st.floats(1e-3, 1e3), st.floats(-1e3, 0.0) | st.just(math.nan)),
    "condition_dropout": (st.floats(0.0, 0.999), st.floats(1.0, 10.0) | st.floats(-10.0, -1e-6)),
    "optimizer.learning_rate": (st.floats(0.0, 10.0), st.floats(-10.0, -1e-9) | st.just(math.inf)),
    "optimizer.warmup_steps": (st.integers(0, 10**6), st.integers(-10**6, -1)),
    "optimizer.weight_decay": (st.floats(0.0, 1.0), st.floats(-1.0, -1e-9)),
    "optimizer.grad_clip": (st.floats(1e-6, 1e3), st.floats(-1e3, 0.0)),
    "optimizer.b1": (st.floats(0.0, 0.999), st.floats(1.0, 2.0)),
    "optimizer.b2": (st.floats(0.0, 0.999), st.floats(-1.0, -1e-9)),
    "optimizer.ema_decay": (st.floats(0.0, 0.999), st.floats(1.0, 2.0)),
    "flowopd.eta": (st.floats(1e-3, 10.0), st.floats(-10.0, 0.0)),
    "flowopd.ppo_clip": (st.floats(1e-6, 0.999), st.floats(1.0, 5.0)),
    "routes.t2i.weight": (st.floats(0.0, 100.0), st.floats(-100.0, -1e-9)),
    "data.buckets.edit.size": (st.integers(1, 10**4), st.integers(-100, 0)),
    "data.buckets.t2i.seed": (st.integers(0, 2**31 - 1), st.integers(-100, -1)),
}


@st.composite
def overrides(draw, valid: bool):
    keys = draw(st.lists(st.sampled_from(sorted(NUMERIC_KEYS)), min_size=1, max_size=3, unique=True))
    values = {key: draw(NUMERIC_KEYS[key][0]) for key in keys}
    bad = None if valid else draw(st.sampled_from(keys))
    if bad:
        values[bad] = draw(NUMERIC_KEYS[bad][1])
    return values, bad


@FAST
@given(overrides(valid=True))
def test_valid_numeric_overrides_validate(drawn):
    values, _ = drawn
    validate(load_config(**values))


@FAST
@given(overrides(valid=False))
def test_an_invalid_numeric_override_names_its_key(drawn):
    values, bad = drawn
    with pytest.raises(ConfigError) as error:
        validate(load_config(**values))
    assert str(error.value).startswith(f"config.{bad}:"), (values, str(error.value))
