"""Route weight schedules (core/route_weights.py): fixed, curriculum and loss-adaptive weights, the
one-step observation lag, and the state round trip that makes resume bit-exact."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from danceopd_jax.core.route_weights import SCHEDULES, RouteWeights

FAST = settings(max_examples=60, deadline=None)

BASE = [3.0, 1.0]
B = np.array([0.75, 0.25])


def feed(schedule: RouteWeights, pairs) -> list[np.ndarray]:
    """Observe each (route, loss) pair; the weights after each observation."""
    out = []
    for step, (route, loss) in enumerate(pairs):
        schedule.observe(route, loss)
        out.append(schedule.weights(step + 1))
    return out


# ---------------------------------------------------------------- fixed and curriculum


def test_fixed_returns_the_normalised_base_at_every_step():
    schedule = RouteWeights(BASE)
    assert not schedule.adaptive
    for step in (0, 1, 10**9):
        np.testing.assert_array_equal(schedule.weights(step), B)
    schedule.observe(1, 100.0)
    schedule.observe(1, 100.0)
    np.testing.assert_array_equal(schedule.weights(2), B)
    assert schedule.get_state() == {"ema": [None, None], "pending": None}


def test_curriculum_interpolates_from_base_to_end():
    schedule = RouteWeights(BASE, schedule="curriculum", end=[0.0, 2.0], curriculum_steps=10)
    e = np.array([0.0, 1.0])
    np.testing.assert_array_equal(schedule.weights(0), B)
    np.testing.assert_allclose(schedule.weights(5), (B + e) / 2, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(schedule.weights(10), e)
    np.testing.assert_array_equal(schedule.weights(1000), e)
    assert schedule.weights(3)[1] < schedule.weights(4)[1]
    schedule.observe(0, 1.0)
    schedule.observe(0, 1.0)
    np.testing.assert_allclose(schedule.weights(5), (B + e) / 2, rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(end=[1.0, 2.0, 3.0], curriculum_steps=5), "end weights must have 2"),
        (dict(end=None, curriculum_steps=5), "end weights must have 2"),
        (dict(end=[1.0, 1.0], curriculum_steps=0), "curriculum_steps"),
        (dict(end=[0.0, 0.0], curriculum_steps=5), "all zero"),
        (dict(end=[-1.0, 2.0], curriculum_steps=5), ">= 0"),
    ],
)
def test_curriculum_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RouteWeights(BASE, schedule="curriculum", **kwargs)


# ---------------------------------------------------------------- adaptive


def test_adaptive_moves_weight_to_the_route_with_the_higher_loss():
    schedule = RouteWeights(BASE, schedule="adaptive", floor=0.2)
    assert schedule.adaptive
    # both routes start at loss 1, then route 1's loss rises to 4 and its running loss follows
    history = feed(schedule, [(0, 1.0), (1, 1.0)] + [(0, 1.0), (1, 4.0)] * 8 + [(0, 1.0)])
    np.testing.assert_array_equal(history[1], B)  # only route 0's loss folded in: unseen route 1 gets the mean
    np.testing.assert_allclose(history[2], B, rtol=0, atol=1e-15)  # equal running losses
    after_route_1 = [w[1] for w in history[4::2]]  # each time route 1's loss 4 was just folded in
    assert after_route_1[0] > B[1]
    assert all(later > earlier for earlier, later in zip(after_route_1, after_route_1[1:]))
    ema = schedule.get_state()["ema"]
    assert ema[0] == 1.0 and ema[1] == pytest.approx(4.0 - 3.0 * 0.9**8, rel=1e-12)  # ema <- 0.9 ema + 0.1 loss
    expected = np.array([0.75 * ema[0], 0.25 * ema[1]])
    np.testing.assert_allclose(schedule.weights(99), 0.2 * B + 0.8 * expected / expected.sum(), rtol=1e-14)


def test_adaptive_temperature_sharpens_the_tilt():
    sharp, flat = (RouteWeights(BASE, schedule="adaptive", temperature=t) for t in (0.25, 4.0))
    pairs = [(0, 1.0), (1, 4.0), (0, 1.0)]
    assert feed(sharp, pairs)[-1][1] > feed(flat, pairs)[-1][1] > B[1]


@pytest.mark.parametrize("low, high", [(0.0, 1.0), (1.0, 1e300), (1e-300, 1e12)])
def test_adaptive_never_drops_a_route_below_its_floor(low, high):
    schedule = RouteWeights(BASE, schedule="adaptive", floor=0.1, temperature=0.05)
    for w in feed(schedule, [(0, low), (1, high)] * 3 + [(0, low)]):
        assert np.all(np.isfinite(w)) and math.isclose(w.sum(), 1.0, rel_tol=1e-12)
        assert np.all(w >= 0.1 * B - 1e-15)
    assert w[0] == pytest.approx(0.1 * B[0], rel=1e-9)  # route 0 is pinned at its floor
    assert w[0] > 0.0


def test_all_zero_losses_fall_back_to_the_base():
    schedule = RouteWeights(BASE, schedule="adaptive")
    np.testing.assert_array_equal(feed(schedule, [(0, 0.0), (1, 0.0), (0, 0.0)])[-1], B)


def test_a_zero_base_weight_stays_zero():
    schedule = RouteWeights([1.0, 0.0, 1.0], schedule="adaptive")
    w = feed(schedule, [(0, 1.0), (2, 5.0), (0, 1.0)])[-1]
    assert w[1] == 0.0 and w[2] > w[0]


def test_observe_lags_one_step():
    schedule = RouteWeights(BASE, schedule="adaptive")
    schedule.observe(1, 5.0)
    np.testing.assert_array_equal(schedule.weights(1), B)  # step 0's loss is still pending
    schedule.observe(0, 1.0)  # folds step 0 in: only route 1 seen, route 0 gets the mean -> still b
    np.testing.assert_array_equal(schedule.weights(2), B)
    schedule.observe(1, 5.0)  # folds step 1 in: route 0 at 1, route 1 at 5
    assert schedule.weights(3)[1] > B[1]
    assert schedule.get_state() == {"ema": [1.0, 5.0], "pending": [1, 5.0]}


def test_observe_accepts_jax_scalars():
    schedule = RouteWeights(BASE, schedule="adaptive")
    feed(schedule, [(0, jnp.float32(2.0)), (1, jnp.asarray(3.0)), (0, jnp.float32(1.0))])
    assert schedule.get_state() == {"ema": [2.0, 3.0], "pending": [0, 1.0]}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_losses_are_ignored(bad):
    clean, noisy = (RouteWeights(BASE, schedule="adaptive") for _ in range(2))
    pairs = [(0, 1.0), (1, 3.0), (0, 2.0), (1, 1.0), (0, 1.0)]
    noisy_pairs = pairs[:2] + [(1, bad), (0, bad)] + pairs[2:]
    clean_w, noisy_w = feed(clean, pairs), feed(noisy, noisy_pairs)
    np.testing.assert_array_equal(noisy_w[-1], clean_w[-1])
    assert clean.get_state()["ema"] == noisy.get_state()["ema"]
    assert all(np.all(np.isfinite(w)) for w in noisy_w)


def test_route_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="route must be in"):
        RouteWeights(BASE, schedule="adaptive").observe(2, 1.0)


# ---------------------------------------------------------------- state


@pytest.mark.parametrize("cut", [0, 1, 2, 7])
def test_state_json_round_trip_reproduces_the_weights_exactly(cut):
    rng = np.random.default_rng(cut)
    pairs = [(int(rng.integers(3)), float(rng.gamma(2.0))) for _ in range(20)]
    kwargs = dict(schedule="adaptive", ema_decay=0.7, temperature=0.6, floor=0.15)
    original = RouteWeights([1.0, 2.0, 1.5], **kwargs)
    feed(original, pairs[:cut])
    restored = RouteWeights([1.0, 2.0, 1.5], **kwargs)
    restored.set_state(json.loads(json.dumps(original.get_state())))
    for step, (route, loss) in enumerate(pairs[cut:], start=cut):
        np.testing.assert_array_equal(restored.weights(step), original.weights(step))
        original.observe(route, loss)
        restored.observe(route, loss)
    assert restored.get_state() == original.get_state()
    np.testing.assert_array_equal(restored.weights(len(pairs)), original.weights(len(pairs)))


def test_set_state_validates_its_input():
    schedule = RouteWeights(BASE, schedule="adaptive")
    with pytest.raises(ValueError, match="has 3 routes, expected 2"):
        schedule.set_state({"ema": [1.0, None, 2.0], "pending": None})
    with pytest.raises(ValueError, match="pending"):
        schedule.set_state({"ema": [1.0, None], "pending": [5, 1.0]})
    with pytest.raises(ValueError, match="pending"):
        schedule.set_state({"ema": [1.0, None], "pending": [0]})


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "base, kwargs, match",
    [
        (BASE, dict(schedule="greedy"), "valid: " + ", ".join(SCHEDULES)),
        (BASE, dict(schedule="adaptive", floor=0.0), "floor"),
        (BASE, dict(schedule="adaptive", floor=1.5), "floor"),
        (BASE, dict(schedule="adaptive", floor=math.nan), "floor"),
        (BASE, dict(schedule="adaptive", temperature=0.0), "temperature"),
        (BASE, dict(schedule="adaptive", temperature=-1.0), "temperature"),
        (BASE, dict(schedule="adaptive", temperature=math.inf), "temperature"),
        (BASE, dict(schedule="adaptive", ema_decay=1.0), "ema_decay"),
        (BASE, dict(schedule="adaptive", ema_decay=-0.1), "ema_decay"),
        ([0.0, 0.0], dict(), "all zero"),
        ([1.0, -1.0], dict(schedule="adaptive"), ">= 0"),
        ([], dict(), "at least one"),
    ],
)
def test_bad_arguments_raise(base, kwargs, match):
    with pytest.raises(ValueError, match=match) as error:
        RouteWeights(base, **kwargs)
    assert "\n" not in str(error.value)


def test_negative_step_is_rejected():
    with pytest.raises(ValueError, match="step must be >= 0"):
        RouteWeights(BASE).weights(-1)


# ---------------------------------------------------------------- properties

bases = st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=1, max_size=5).filter(lambda w: sum(w) > 0)
losses = st.floats(0.0, 1e12) | st.sampled_from([0.0, 1e-300, 1e300, math.nan, math.inf])


@FAST
@given(
    base=bases,
    data=st.data(),
    floor=st.floats(1e-6, 1.0),
    temperature=st.floats(1e-3, 100.0),
    ema_decay=st.floats(0.0, 0.999),
)
def test_adaptive_weights_are_a_distribution_above_the_floor(base, data, floor, temperature, ema_decay):
    b = np.asarray(base) / sum(base)
    schedule = RouteWeights(base, schedule="adaptive", floor=floor, temperature=temperature, ema_decay=ema_decay)
    pairs = data.draw(st.lists(st.tuples(st.integers(0, len(base) - 1), losses), max_size=12))
    for w in [schedule.weights(0)] + feed(schedule, pairs):
        assert w.dtype == np.float64 and w.shape == b.shape
        assert np.all(np.isfinite(w)) and np.all(w >= 0)
        assert abs(w.sum() - 1.0) <= 1e-12
        assert np.all(w >= floor * b - 1e-12)


@FAST
@given(base=bases, data=st.data(), steps=st.integers(1, 10**6), step=st.integers(0, 2 * 10**6))
def test_curriculum_weights_are_a_distribution_between_the_endpoints(base, data, steps, step):
    end = data.draw(st.lists(st.floats(0.0, 10.0), min_size=len(base), max_size=len(base)).filter(lambda e: sum(e) > 0))
    b, e = np.asarray(base) / sum(base), np.asarray(end) / sum(end)
    w = RouteWeights(base, schedule="curriculum", end=end, curriculum_steps=steps).weights(step)
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    assert abs(w.sum() - 1.0) <= 1e-12
    assert np.all(w >= np.minimum(b, e) - 1e-12) and np.all(w <= np.maximum(b, e) + 1e-12)
