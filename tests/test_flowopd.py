"""The Flow-OPD baseline (``core/flowopd.py``): SDE transition, hand-computed loss and gradient,
properties of the policy gradient, and a short run through the smoke config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from danceopd_jax import build
from danceopd_jax.config_validation import ConfigError, validate
from danceopd_jax.core import objectives
from danceopd_jax.core.flowopd import (
    FlowOPDOptions,
    flowopd_loss,
    rollout_sde,
    sde_std,
    sde_step_std,
    sde_transition_mean,
)
from danceopd_jax.core.rollout import rollout_trajectory
from danceopd_jax.core.schedule import sigma_grid
from danceopd_jax.core.step import make_loss_fn
from danceopd_jax.train import setup_run

SHAPE = (3, 4, 4, 2)


def _linear_student(params, x, t, cond):
    return params["a"] * x


def _linear_field(b):
    def field(x, t, cond):
        return b * x

    return field


def _reference(a, b, key, sigmas, shape, *, eta=0.7, kl_scale=-1.0, advantage_clip=5.0):
    """Numpy Flow-OPD for v_student = a x, v_teacher = b x: per-sample loss [B] and d loss / d a [B].

    Uses the same random draws as ``flowopd_loss`` (noise from ``split(key)[0]``, step noise from
    ``fold_in(split(key)[1], i)``); everything else is recomputed from the formulas.
    """
    noise_key, sde_key = jax.random.split(key)
    x = np.asarray(jax.random.normal(noise_key, shape), np.float64)
    sig = np.asarray(sigmas, np.float64)
    cap = sig[1]
    axes = tuple(range(1, len(shape)))
    losses, grads, clipped = [], [], []
    for i in range(len(sig) - 1):
        sigma, dt = sig[i], sig[i + 1] - sig[i]
        std = eta * np.sqrt(sigma / (1.0 - min(sigma, cap)))
        s = std * np.sqrt(-dt)
        c_x = 1.0 + std**2 / (2 * sigma) * dt
        c_v = (1.0 + std**2 * (1 - sigma) / (2 * sigma)) * dt
        mu_s, mu_t = x * c_x + a * x * c_v, x * c_x + b * x * c_v
        x_next = mu_s + s * np.asarray(jax.random.normal(jax.random.fold_in(sde_key, i), shape), np.float64)
        kl = np.mean((mu_s - mu_t) ** 2, axis=axes) / (2 * std**2)
        adv = np.clip(kl_scale * kl, -advantage_clip, advantage_clip)
        clipped.append(np.abs(kl_scale * kl) > advantage_clip)
        losses.append(-adv)  # ratio = 1
        dlogp_da = np.mean((x_next - mu_s) * x * c_v, axis=axes) / s**2
        grads.append(-adv * dlogp_da)
        x = x_next
    return np.mean(losses, axis=0), np.mean(grads, axis=0), np.array(clipped)


# ---------------------------------------------------------------------------- the transition


def test_sde_mean_with_zero_noise_is_the_euler_step():
    x = jax.random.normal(jax.random.key(0), SHAPE)
    v = jax.random.normal(jax.random.key(1), SHAPE)
    sigmas = sigma_grid(6, shift=3.0)
    for i in range(6):
        mean = sde_transition_mean(x, v, sigmas[i], sigmas[i + 1], 0.0, sigmas[1])
        np.testing.assert_allclose(mean, x + (sigmas[i + 1] - sigmas[i]) * v, rtol=1e-6, atol=1e-6)
    # and a whole SDE rollout at eta = 0 is the ODE rollout
    def field(x, t, c):
        return jnp.sin(x) - t[:, None, None, None] * x

    sde = rollout_sde(field, x, sigmas, {}, jax.random.key(2), 0.0)
    ode_states, final = rollout_trajectory(field, x, sigmas, {})
    np.testing.assert_allclose(sde.states, ode_states, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sde.next_states[-1], final, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sde.means, sde.next_states, atol=0)


def test_sde_mean_matches_the_formula_and_the_first_step_is_capped():
    sigma, sigma_next, eta, cap = 0.6, 0.45, 0.7, 0.9
    x, v = jnp.float32(1.3), jnp.float32(-0.4)
    std = eta * np.sqrt(sigma / (1 - sigma))
    dt = sigma_next - sigma
    expected = 1.3 * (1 + std**2 / (2 * sigma) * dt) - 0.4 * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
    assert float(sde_transition_mean(x, v, sigma, sigma_next, eta, cap)) == pytest.approx(expected, rel=1e-6)
    # sigma = 1: the denominator's sigma is capped at sigmas[1] (Flow-GRPO), the numerator is not
    assert float(sde_std(1.0, eta, cap)) == pytest.approx(eta * np.sqrt(1.0 / (1 - cap)), rel=1e-6)
    assert float(sde_std(sigma, eta, cap)) == pytest.approx(std, rel=1e-6)
    assert float(sde_step_std(sigma, sigma_next, eta, cap)) == pytest.approx(std * np.sqrt(-dt), rel=1e-6)


def test_sampled_transitions_have_the_stated_std():
    """x_{i+1} - mean_i over 16k draws per step: mean ~ 0, std = std_i sqrt(-dt_i) within 3%."""
    sigmas, eta = sigma_grid(5, shift=2.0), 0.7
    noise = jax.random.normal(jax.random.key(0), (2000, 8))
    rollout = rollout_sde(_linear_field(-0.5), noise, sigmas, {}, jax.random.key(1), eta)
    residual = np.asarray(rollout.next_states - rollout.means).reshape(5, -1)
    s = np.asarray(sigmas, np.float64)
    for i in range(5):
        std = eta * np.sqrt(s[i] / (1 - min(s[i], s[1])))
        expected = std * np.sqrt(s[i] - s[i + 1])
        assert residual[i].std() == pytest.approx(expected, rel=0.03), i
        assert abs(residual[i].mean()) < 4 * expected / np.sqrt(residual[i].size), i
    np.testing.assert_array_equal(rollout.states[0], noise)
    np.testing.assert_array_equal(rollout.states[1:], rollout.next_states[:-1])


# ---------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("advantage_clip", [5.0, 0.05])
def test_loss_and_gradient_equal_hand_computation(advantage_clip):
    """Linear student v = a x, teacher v = b x; the second case clips some advantages."""
    a, b = 0.3, -1.5
    sigmas = sigma_grid(6)
    batch = {"image": jnp.zeros(SHAPE), "cond": {}}
    key = jax.random.key(7)

    def loss(a):
        return flowopd_loss(
            _linear_student, {"a": a}, _linear_field(b), batch, key, sigmas=sigmas, advantage_clip=advantage_clip
        )

    value, grad = jax.jit(lambda a: (loss(a), jax.grad(lambda a: loss(a).mean())(a)))(jnp.float32(a))
    expected, expected_grad, clipped = _reference(a, b, key, sigmas, SHAPE, advantage_clip=advantage_clip)
    assert value.shape == (SHAPE[0],) and value.dtype == jnp.float32
    np.testing.assert_allclose(value, expected, rtol=1e-4)
    np.testing.assert_allclose(grad, expected_grad.mean(), rtol=1e-3)
    if advantage_clip < 1:
        assert clipped.any() and not clipped.all()


def test_student_equal_to_teacher_gives_zero_advantage_and_exactly_zero_gradient():
    params = {"w": jnp.float32(0.8), "u": jnp.float32(-0.3)}

    def student(p, x, t, c):
        return jnp.tanh(p["w"] * x + p["u"] * t[:, None, None, None])

    def target(x, t, c):
        return student(params, x, t, c)

    batch = {"image": jnp.zeros(SHAPE), "cond": {}}
    sigmas = sigma_grid(5, shift=3.0)

    def loss(p):
        return flowopd_loss(student, p, target, batch, jax.random.key(0), sigmas=sigmas)

    assert np.all(np.asarray(loss(params)) == 0.0)
    grads = jax.grad(lambda p: loss(p).mean())(params)
    assert all(float(g) == 0.0 for g in jax.tree.leaves(grads))


def test_policy_gradient_has_zero_mean_over_rollouts():
    """v = a x against v = b x: the per-step KL depends on x_i, not on the sampled x_{i+1}, so
    E[A_i grad logp_i] = 0. Over many rollouts the gradient does not systematically move a toward
    b (or away); it is non-zero per rollout (its variance is what moves the student)."""
    a, b = 0.5, -1.0
    sigmas = sigma_grid(8)
    batch = {"image": jnp.zeros((16, 4, 4, 2)), "cond": {}}

    def grad(key):
        def mean_loss(a):
            return flowopd_loss(_linear_student, {"a": a}, _linear_field(b), batch, key, sigmas=sigmas).mean()

        return jax.grad(mean_loss)(jnp.float32(a))

    grads = np.asarray(jax.jit(jax.vmap(grad))(jax.random.split(jax.random.key(0), 512)), np.float64)
    standard_error = grads.std() / np.sqrt(grads.size)
    assert grads.std() > 0 and np.all(grads != 0)
    assert abs(grads.mean()) < 4 * standard_error, (grads.mean(), standard_error)
    # no systematic sign: the mean is small next to the typical per-rollout magnitude
    assert abs(grads.mean()) < 0.1 * np.abs(grads).mean()


# ---------------------------------------------------------------------------- through the smoke run


@pytest.fixture(scope="module")
def run():
    return setup_run(load_config(method="flowopd", **{"optimizer.warmup_steps": 0}))


def test_flowopd_is_a_registered_method():
    assert "flowopd" in objectives.OBJECTIVES
    validate(load_config(method="flowopd"))


def test_no_gradient_reaches_the_experts(run):
    route, batch = run.global_batch(0)
    key = jax.random.key(0)

    @jax.jit
    def grads(params, experts):
        return jax.grad(lambda p, e: run.loss_fn(p, e, batch, jnp.int32(route), key).mean(), argnums=(0, 1))(
            params, experts
        )

    student_grads, expert_grads = grads(run.state.params, run.experts)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(expert_grads))
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(student_grads))


def test_short_training_run_has_finite_losses(run):
    params_before = jax.tree.map(np.array, run.state.params)
    state = run.state
    for step in range(3):
        route, batch = run.global_batch(step)
        state, metrics = run.train_step(state, run.experts, batch, jnp.int32(route))
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        assert np.isfinite(loss) and loss > 0 and np.isfinite(grad_norm), (step, loss, grad_norm)
    run.state = state
    assert int(state.step) == 3
    assert any(np.any(b != np.asarray(a)) for b, a in zip(jax.tree.leaves(params_before), jax.tree.leaves(state.params)))


def test_config_options_reach_the_loss():
    """config.flowopd -> build.flowopd_options -> make_loss_fn("flowopd") -> flowopd_loss."""
    config = load_config(method="flowopd", **{"flowopd.eta": 0.4, "flowopd.advantage_clip": 0.05, "flowopd.kl_scale": -2.0})
    options = build.flowopd_options(config)
    assert options == FlowOPDOptions(eta=0.4, kl_scale=-2.0, advantage_clip=0.05, ppo_clip=1e-4)
    sigmas = sigma_grid(6)
    teacher = _linear_field(-1.5)
    loss_fn = make_loss_fn(
        "flowopd", _linear_student, lambda experts: [teacher], routing_mode="per_step", route_weights=[1.0],
        group_sizes=[SHAPE[0]], sigmas=sigmas, flowopd_options=options,
    )
    params, batch, key = {"a": jnp.float32(0.3)}, {"image": jnp.zeros(SHAPE), "cond": {}}, jax.random.key(3)
    direct = flowopd_loss(
        _linear_student, params, teacher, batch, key, sigmas=sigmas, eta=0.4, kl_scale=-2.0, advantage_clip=0.05
    )
    np.testing.assert_array_equal(loss_fn(params, {}, batch, jnp.int32(0), key), direct)
    default = flowopd_loss(_linear_student, params, teacher, batch, key, sigmas=sigmas)
    assert np.all(np.asarray(direct) <= 0.05 * (1 + 1e-6)) and np.all(np.asarray(default) > 0.05)


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"flowopd.eta": 0.0}, "config.flowopd.eta:"),
        ({"flowopd.eta": -0.7}, "config.flowopd.eta:"),
        ({"flowopd.advantage_clip": 0.0}, "config.flowopd.advantage_clip:"),
        ({"flowopd.ppo_clip": 0.0}, "config.flowopd.ppo_clip:"),
        ({"flowopd.ppo_clip": 1.0}, "config.flowopd.ppo_clip:"),
    ],
)
def test_bad_flowopd_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as error:
        validate(load_config(method="flowopd", **overrides))
    message = str(error.value)
    assert message.startswith(key) and "\n" not in message, message
