"""The method's pure pieces checked against independent derivations (closed forms, hand sums)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from danceopd_jax.core import objectives, routing
from danceopd_jax.core.conditioning import NULL_LABEL, drop_condition, unconditional
from danceopd_jax.core.fields import cfg_field, is_guided, linear_combination
from danceopd_jax.core.rollout import rollout_query_states, rollout_trajectory, sample
from danceopd_jax.core.schedule import sample_query_indices, shift_sigma, sigma_grid

SHAPE = (3, 4, 4, 2)


def _cond(batch=SHAPE[0]):
    return {
        "text": jnp.ones((batch, 2, 3)),
        "text_mask": jnp.ones((batch, 2), bool),
        "label": jnp.arange(batch, dtype=jnp.int32),
        "source": jnp.ones((batch,) + SHAPE[1:]),
        "source_mask": jnp.ones((batch,), bool),
    }


# ---------------------------------------------------------------------------- schedules


def test_sigma_grid_linear_and_shifted():
    np.testing.assert_allclose(sigma_grid(4), [1.0, 0.75, 0.5, 0.25, 0.0])
    s = 3.0
    expected = [s * x / (1 + (s - 1) * x) for x in (1.0, 0.75, 0.5, 0.25, 0.0)]
    np.testing.assert_allclose(sigma_grid(4, shift=s), expected, rtol=1e-6)
    assert float(shift_sigma(jnp.float32(0.5), 1.0)) == 0.5
    with pytest.raises(ValueError, match="num_steps"):
        sigma_grid(0)
    with pytest.raises(ValueError, match="unknown sigma schedule 'karras'"):
        sigma_grid(4, schedule="karras")


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 16, 28])
def test_flow_match_euler_grid_is_diffusers_scheduler_grid(shift, steps):
    """``flow_match_euler`` is the grid SD3 pipelines (and the authors' SD3.5 rollout) step on:
    diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps(N).sigmas``, final 0 included."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps)
    ours = sigma_grid(steps, shift, "flow_match_euler")
    np.testing.assert_allclose(ours, scheduler.sigmas.numpy(), atol=3e-7)
    np.testing.assert_allclose(1000 * ours[:-1], scheduler.timesteps.numpy(), rtol=1e-6)  # the model's timestep 1000 t
    if steps > 1:  # not the uniform grid: the last step starts near 0, not at shift(1 / N)
        assert float(ours[-2]) < float(sigma_grid(steps, shift)[-2])


def test_low_t_indices_follow_beta_5_2():
    """Index histogram vs the exact bin masses of Beta(5,2): i = floor(u N), a chi-square test."""
    n, num_steps = 20000, 16
    idx = np.asarray(sample_query_indices(jax.random.key(0), n, 1, num_steps, "low_t")).ravel()
    edges = np.arange(num_steps + 1) / num_steps
    expected = np.diff(scipy.stats.beta.cdf(edges, 5, 2)) * n
    observed = np.bincount(idx, minlength=num_steps)
    keep = expected > 5  # chi-square needs non-tiny expected counts; pool the rest
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    stat, p = scipy.stats.chisquare(obs, exp)
    assert p > 1e-3, (stat, p, observed)
    assert idx.min() >= 0 and idx.max() <= num_steps - 1


@pytest.mark.parametrize("kind,a,b", [("mid_t", 5, 5), ("high_t", 2, 5)])
def test_mid_and_high_t_ks(kind, a, b):
    from danceopd_jax.core.schedule import sample_query_fractions

    u = np.asarray(sample_query_fractions(jax.random.key(1), (5000, 1), kind)).ravel()
    assert scipy.stats.kstest(u, scipy.stats.beta(a, b).cdf).pvalue > 1e-3


def test_stratified_puts_one_state_in_each_stratum():
    idx = np.asarray(sample_query_indices(jax.random.key(2), 500, 4, 16, "stratified"))
    assert np.all(idx // 4 == np.arange(4))


def test_unknown_sampler():
    with pytest.raises(ValueError, match="unknown query sampler"):
        sample_query_indices(jax.random.key(0), 1, 1, 4, "late")


# ---------------------------------------------------------------------------- rollout


def test_rollout_of_straight_field_is_exact():
    """v = (x - x0) / sigma is the exact flow to x0: Euler states equal (1-s) x0 + s eps."""
    x0 = jax.random.normal(jax.random.key(0), SHAPE)
    eps = jax.random.normal(jax.random.key(1), SHAPE)
    sigmas = sigma_grid(8, shift=3.0)
    field = lambda x, t, c: (x - x0) / t[:, None, None, None]  # noqa: E731
    states, final = rollout_trajectory(field, eps, sigmas, {})
    expected = (1 - sigmas[:-1, None, None, None, None]) * x0 + sigmas[:-1, None, None, None, None] * eps
    np.testing.assert_allclose(states, expected, atol=2e-5)
    np.testing.assert_allclose(final, x0, atol=2e-5)


def test_rollout_of_linear_field_matches_product_formula():
    """v = a x: each Euler step multiplies by (1 + a dt); the kept states are the partial products."""
    a = 0.7
    eps = jax.random.normal(jax.random.key(0), SHAPE)
    sigmas = sigma_grid(6)
    indices = jnp.array([[0, 5], [3, 1], [2, 2]], jnp.int32)
    states, times = rollout_query_states(lambda x, t, c: a * x, eps, sigmas, {}, indices)
    factors = np.cumprod(np.concatenate([[1.0], 1 + a * np.diff(np.asarray(sigmas))]))
    for b in range(3):
        for k in range(2):
            i = int(indices[b, k])
            np.testing.assert_allclose(states[b, k], factors[i] * eps[b], rtol=1e-5)
            assert float(times[b, k]) == pytest.approx(float(sigmas[i]))
    np.testing.assert_allclose(sample(lambda x, t, c: a * x, eps, sigmas, {}), factors[-1] * eps, rtol=1e-5)


# ---------------------------------------------------------------------------- fields


def _label_field(x, t, cond):
    """A field that reveals its condition: label + 10 * (number of real text tokens)."""
    value = cond["label"].astype(jnp.float32) + 10.0 * cond["text_mask"].sum(axis=1)
    return jnp.broadcast_to(value[:, None, None, None], x.shape) + x


def test_cfg_identities():
    x = jax.random.normal(jax.random.key(0), SHAPE)
    t = jnp.full((SHAPE[0],), 0.5)
    cond = _cond()
    v_c = _label_field(x, t, cond)
    v_u = _label_field(x, t, unconditional(cond))
    np.testing.assert_allclose(cfg_field(_label_field, 0.0)(x, t, cond), v_u, atol=1e-6)
    np.testing.assert_allclose(cfg_field(_label_field, 1.0)(x, t, cond), v_c, atol=1e-6)
    np.testing.assert_allclose(cfg_field(_label_field, 3.0)(x, t, cond), v_u + 3.0 * (v_c - v_u), atol=1e-5)
    assert np.all(np.asarray(v_u - x)[:, 0, 0, 0] == NULL_LABEL)  # empty prompt, null label


def test_only_a_scale_of_one_is_the_plain_field():
    assert cfg_field(_label_field, 1.0) is _label_field and cfg_field(_label_field, np.float32(1.0)) is _label_field
    assert cfg_field(_label_field, jnp.float32(1.0)) is not _label_field  # a traced scale always guides
    assert [is_guided(s) for s in (1, 1.0, np.float32(1.0), 0.0, 1.5, np.float32(4.5))] == [False] * 3 + [True] * 3


def test_unconditional_keeps_source_and_drop_is_per_sample():
    cond = _cond()
    null = unconditional(cond)
    np.testing.assert_array_equal(null["source"], cond["source"])
    assert not np.any(null["text_mask"])
    dropped = drop_condition(cond, jnp.array([True, False, True]))
    np.testing.assert_array_equal(dropped["label"], [NULL_LABEL, 1, NULL_LABEL])
    np.testing.assert_array_equal(dropped["text_mask"].sum(1), [0, 2, 0])


def test_linear_combination():
    x = jnp.ones(SHAPE)
    f = linear_combination([lambda x, t, c: x, lambda x, t, c: 2 * x], [0.25, 0.5])
    np.testing.assert_allclose(f(x, None, {}), 1.25 * x)


# ---------------------------------------------------------------------------- routing


def test_route_for_step_is_reproducible_and_follows_weights():
    draws = [routing.route_for_step(7, s, [1.0, 3.0]) for s in range(4000)]
    assert draws == [routing.route_for_step(7, s, [1.0, 3.0]) for s in range(4000)]
    assert abs(np.mean(draws) - 0.75) < 0.03
    assert all(routing.route_for_step(0, s, [0.0, 1.0]) == 1 for s in range(50))


@pytest.mark.parametrize("weights", [[-1.0, 1.0], [0.0, 0.0], []])
def test_bad_route_weights(weights):
    with pytest.raises(ValueError):
        routing.normalized_weights(weights)


def test_group_sizes_apportion_the_batch():
    assert routing.group_sizes(8, [1, 1]) == [4, 4]
    assert routing.group_sizes(7, [1, 1, 1]) == [3, 2, 2]
    assert routing.group_sizes(10, [3, 1]) == [8, 2]
    assert sum(routing.group_sizes(13, [0.2, 0.5, 0.3])) == 13


def _constant_field(value):
    return lambda x, t, c: jnp.full(x.shape, value, jnp.float32)


def test_per_step_field_switches_on_route():
    fields = [_constant_field(1.0), _constant_field(2.0), _constant_field(3.0)]
    x = jnp.zeros(SHAPE)
    for route in range(3):
        out = jax.jit(lambda r: routing.per_step_field(fields, r)(x, jnp.zeros(3), {}))(jnp.int32(route))
        assert np.all(np.asarray(out) == route + 1)


def test_per_sample_field_sends_each_group_to_its_field():
    """2 hosts (blocks) x groups [2, 1] x K=2 repeats: rows follow the block/group/sample/k layout."""
    fields = [lambda x, t, c: x + 100.0, lambda x, t, c: x + 200.0]
    rows = 2 * 3 * 2
    x = jnp.arange(rows, dtype=jnp.float32).reshape(rows, 1, 1, 1)
    cond = {"label": jnp.arange(rows)}
    out = np.asarray(routing.per_sample_field(fields, [2, 1], blocks=2)(x, jnp.zeros(rows), cond)).ravel()
    expected_offset = np.array([100] * 4 + [200] * 2 + [100] * 4 + [200] * 2)
    np.testing.assert_array_equal(out, np.arange(rows) + expected_offset)


def test_soft_mixing_is_the_weighted_sum():
    f = routing.soft_mixing_field([_constant_field(1.0), _constant_field(5.0)], [1.0, 3.0])
    assert np.allclose(f(jnp.zeros(SHAPE), None, {}), 4.0)


# ---------------------------------------------------------------------------- objectives


def _linear_student(params, x, t, cond):
    return params["w"] * x


def test_danceopd_loss_equals_hand_computation():
    """Student v = w x rolls out z_i = eps * prod(1 + w dt); target b x; loss = mean(((w-b) z_i)^2)."""
    w, b = 0.3, -0.4
    sigmas = sigma_grid(8)
    batch = {"image": jnp.zeros(SHAPE), "cond": {}}
    key = jax.random.key(5)
    loss = objectives.danceopd_loss(
        _linear_student, {"w": jnp.float32(w)}, lambda x, t, c: b * x, batch, key, sigmas=sigmas
    )
    noise_key, index_key = jax.random.split(key)
    eps = np.asarray(jax.random.normal(noise_key, SHAPE))
    idx = np.asarray(sample_query_indices(index_key, SHAPE[0], 1, 8, "low_t"))[:, 0]
    factors = np.cumprod(np.concatenate([[1.0], 1 + w * np.diff(np.asarray(sigmas))]))
    expected = [np.mean(((w - b) * factors[i] * eps[n]) ** 2) for n, i in enumerate(idx)]
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert loss.dtype == jnp.float32


def test_rollout_is_not_differentiated():
    """d loss / d w with the rollout states held constant equals the full gradient (stop-gradient)."""
    sigmas = sigma_grid(6)
    batch = {"image": jnp.zeros(SHAPE), "cond": {}}
    key = jax.random.key(3)
    target = lambda x, t, c: -x  # noqa: E731

    def full(w):
        return objectives.danceopd_loss(_linear_student, {"w": w}, target, batch, key, sigmas=sigmas).mean()

    noise_key, index_key = jax.random.split(key)
    eps = jax.random.normal(noise_key, SHAPE)
    idx = sample_query_indices(index_key, SHAPE[0], 1, 6, "low_t")
    states, _ = rollout_query_states(lambda x, t, c: 0.5 * x, eps, sigmas, {}, idx)
    states = states[:, 0]

    def frozen_states(w):
        return jnp.mean(jnp.square(w * states - (-states)))

    g_full = jax.grad(full)(jnp.float32(0.5))
    g_frozen = jax.grad(frozen_states)(jnp.float32(0.5))
    np.testing.assert_allclose(g_full, g_frozen, rtol=1e-5)

    def differentiated_rollout(w):  # what the loss would be if gradients flowed through the rollout
        x, kept = eps, jnp.zeros_like(eps)
        for i in range(6):
            kept = jnp.where((idx[:, 0] == i)[:, None, None, None], x, kept)
            x = x + (sigmas[i + 1] - sigmas[i]) * w * x
        return jnp.mean(jnp.square(w * kept + kept))

    assert abs(float(jax.grad(differentiated_rollout)(jnp.float32(0.5)) - g_full)) > 1e-3 * abs(float(g_full))


def test_diffusionopd_weights_each_state_by_half_dt_squared():
    w, b, n = 0.2, 0.6, 4
    sigmas = sigma_grid(n)
    batch = {"image": jnp.zeros(SHAPE), "cond": {}}
    key = jax.random.key(9)
    loss = objectives.diffusionopd_loss(_linear_student, {"w": jnp.float32(w)}, lambda x, t, c: b * x, batch, key, sigmas=sigmas)
    eps = np.asarray(jax.random.normal(key, SHAPE))
    factors = np.cumprod(np.concatenate([[1.0], 1 + w * np.diff(np.asarray(sigmas))]))
    per_state = [(w - b) ** 2 * factors[i] ** 2 * np.mean(eps**2, axis=(1, 2, 3)) for i in range(n)]
    expected = sum(0.5 / n**2 * s for s in per_state)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_offpolicy_queries_forward_noised_data():
    x0 = jax.random.normal(jax.random.key(1), SHAPE)
    sigmas = sigma_grid(8)
    seen = {}

    def target(x, t, c):
        seen["x"], seen["t"] = x, t
        return jnp.zeros_like(x)

    key = jax.random.key(4)
    objectives.offpolicy_loss(_linear_student, {"w": jnp.float32(1.0)}, target, {"image": x0, "cond": {}}, key, sigmas=sigmas)
    noise_key, index_key = jax.random.split(key)
    idx = sample_query_indices(index_key, SHAPE[0], 1, 8, "low_t")
    eps = jax.random.normal(noise_key, (SHAPE[0], 1) + SHAPE[1:])[:, 0]
    s = sigmas[idx[:, 0]][:, None, None, None]
    np.testing.assert_allclose(seen["x"], (1 - s) * x0 + s * eps, atol=1e-6)
    np.testing.assert_allclose(seen["t"], sigmas[idx[:, 0]])


def test_flow_matching_target_is_noise_minus_data_and_drops_conditions():
    x0 = jax.random.normal(jax.random.key(1), SHAPE)
    seen = {}

    def student(params, x, t, cond):
        seen["cond"] = cond
        return jnp.zeros_like(x)

    key = jax.random.key(2)
    loss = objectives.flow_matching_loss(
        student, {}, {"image": x0, "cond": _cond()}, key, condition_dropout=1.0 - 1e-7, time_sampler="uniform"
    )
    noise = jax.random.normal(jax.random.split(key, 3)[0], SHAPE)
    np.testing.assert_allclose(loss, np.mean(np.square(noise - x0), axis=(1, 2, 3)), rtol=1e-5)
    assert np.all(np.asarray(seen["cond"]["label"]) == NULL_LABEL)


def test_logit_normal_training_times():
    u = np.asarray(objectives.sample_training_times(jax.random.key(0), 20000, "logit_normal"))
    z = np.log(u / (1 - u))
    assert scipy.stats.kstest(z, "norm").pvalue > 1e-3
    with pytest.raises(ValueError, match="unknown flow-matching time sampler"):
        objectives.sample_training_times(jax.random.key(0), 4, "beta")


@pytest.mark.parametrize("sampler", ["low_t", "high_t", "uniform"])
def test_truncated_rollout_keeps_the_same_states(sampler):
    """Stopping at the batch's last query index gives exactly the states of the full-length rollout."""
    eps = jax.random.normal(jax.random.key(1), SHAPE)
    sigmas = sigma_grid(12, 3.0)
    indices = sample_query_indices(jax.random.key(2), SHAPE[0], 2, 12, sampler)
    field = lambda x, t, c: jnp.tanh(x) * t[:, None, None, None] - 0.3 * x  # noqa: E731
    full, full_times = rollout_query_states(field, eps, sigmas, {}, indices, truncate=False)
    cut, cut_times = jax.jit(lambda e, i: rollout_query_states(field, e, sigmas, {}, i))(eps, indices)
    np.testing.assert_array_equal(np.asarray(cut), np.asarray(full))
    np.testing.assert_array_equal(np.asarray(cut_times), np.asarray(full_times))


def test_truncated_rollout_runs_only_up_to_the_last_query():
    """The field is called max(index) times (counted on the host through a callback)."""
    calls = []

    def field(x, t, c):
        jax.debug.callback(lambda: calls.append(1))
        return -x

    eps = jnp.ones(SHAPE)
    indices = jnp.array([[1], [4], [2]], jnp.int32)
    jax.block_until_ready(rollout_query_states(field, eps, sigma_grid(10), {}, indices))
    assert len(calls) == 4
