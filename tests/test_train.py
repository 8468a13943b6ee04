"""The composed train step on the smoke config: what is trained, routing through real data and experts."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from danceopd_jax import build, train
from danceopd_jax.config_validation import ConfigError
from danceopd_jax.train import setup_run

from conftest import load_config


def _host_copy(tree):
    return jax.tree.map(lambda a: np.array(a, copy=True), tree)


def _zeroed(tree):
    return jax.tree.map(jnp.zeros_like, tree)


@pytest.fixture(scope="module")
def run():
    return setup_run(load_config(**{"optimizer.warmup_steps": 0}))


def test_step_trains_only_the_student(run):
    experts_before = _host_copy(run.experts)
    params_before = _host_copy(run.state.params)
    route, batch = run.global_batch(0)
    state, metrics = run.train_step(run.state, run.experts, batch, jnp.int32(route))
    run.state = state
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
    # Experts are bit-identical after the step; the student moved.
    for before, after in zip(jax.tree.leaves(experts_before), jax.tree.leaves(run.experts)):
        np.testing.assert_array_equal(before, np.asarray(after))
    moved = [np.any(b != np.asarray(a)) for b, a in zip(jax.tree.leaves(params_before), jax.tree.leaves(state.params))]
    assert any(moved)
    assert int(state.step) == 1


def test_no_gradient_reaches_the_experts(run):
    """The teacher target is stop-gradient: d loss / d expert params is exactly zero."""
    route, batch = run.global_batch(1)
    key = jax.random.key(0)
    grads = jax.grad(lambda e: run.loss_fn(run.state.params, e, batch, jnp.int32(route), key).mean())(run.experts)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))
    student_grads = jax.grad(lambda p: run.loss_fn(p, run.experts, batch, jnp.int32(route), key).mean())(
        run.state.params
    )
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(student_grads))


def test_per_step_routing_picks_the_routes_bucket_and_expert():
    """A zero-init student against a zeroed edit expert has loss exactly 0 on edit steps only."""
    config = load_config()
    run = setup_run(config)
    experts = dict(run.experts, edit_expert=_zeroed(run.experts["edit_expert"]))
    key = jax.random.key(0)
    seen = set()
    for step in range(8):
        route, groups = build.step_route_and_groups(config, step)
        name = list(config.routes)[route]
        assert groups == [(config.routes[name].bucket, config.batch_size)]
        _, batch = run.global_batch(step)
        assert bool(np.all(np.asarray(batch["cond"]["source_mask"]))) == (name == "edit")
        loss = float(run.loss_fn(run.state.params, experts, batch, jnp.int32(route), key).mean())
        assert (loss == 0.0) == (name == "edit"), (step, name, loss)
        seen.add(name)
    assert seen == {"t2i", "edit"}


def test_per_sample_routing_sends_each_group_to_its_field():
    config = load_config(routing="per_sample")
    run = setup_run(config)
    experts = dict(run.experts, edit_expert=_zeroed(run.experts["edit_expert"]))
    is_edit = np.repeat([name == "edit" for name in config.routes], 2)  # groups of 2 in route order
    _, batch = run.global_batch(0)
    np.testing.assert_array_equal(np.asarray(batch["cond"]["source_mask"]), is_edit)
    per_sample = np.asarray(run.loss_fn(run.state.params, experts, batch, jnp.int32(0), jax.random.key(0)))
    assert np.all(per_sample[is_edit] == 0) and np.all(per_sample[~is_edit] > 0)
    _, metrics = run.train_step(run.state, experts, batch, jnp.int32(0))
    group_loss = np.asarray(metrics["group_loss"])
    np.testing.assert_array_equal(group_loss == 0, is_edit[::2])


def test_soft_mixing_targets_the_weighted_sum():
    """With the edit expert zeroed, soft mixing (1:1) targets half the t2i field: loss = |v_t2i / 2|^2."""
    config = load_config(routing="soft")
    run = setup_run(config)
    experts = dict(run.experts, edit_expert=_zeroed(run.experts["edit_expert"]))
    _, batch = run.global_batch(0)
    key = jax.random.key(0)
    soft = run.loss_fn(run.state.params, experts, batch, jnp.int32(0), key)
    hard_config = load_config(routing="per_sample", **{"routes.edit.field": "t2i", "routes.edit.bucket": "edit"})
    hard = setup_run(hard_config).loss_fn(run.state.params, experts, batch, jnp.int32(0), key)
    np.testing.assert_allclose(soft, hard / 4.0, rtol=1e-5)  # zero-init student: loss = |target|^2


def test_route_groups_are_the_global_batchs_on_any_number_of_processes(monkeypatch):
    """Per-sample groups come from the global batch, split evenly over the processes; a split that
    would change the global groups (or starve a route) is one line before anything is built."""
    config = load_config(routing="per_sample", batch_size=16, **{"routes.t2i.weight": 3.0})
    assert list(config.routes) == ["edit", "t2i"] and build.step_group_sizes(config) == [4, 12]
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    assert build.step_group_sizes(config) == [1, 3]
    assert build.step_route_and_groups(config, 0)[1] == [("edit", 1), ("t2i", 3)]
    mesh = SimpleNamespace(shape={"data": 4, "fsdp": 1})
    config.batch_size = 8  # groups [2, 6]: each process's 2 rows cannot hold its share of both
    with pytest.raises(ConfigError, match=r"^config.batch_size: routing 'per_sample' splits the batch of 8 into route groups \[2, 6\], "):
        train._check_layout(config, mesh)


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"method": "distill"}, "config.method:"),
        ({"routing": "random"}, "config.routing:"),
        ({"routes.t2i.field": "nope"}, "config.routes.t2i.field:"),
        ({"routes.t2i.bucket": "nope"}, "config.routes.t2i.bucket:"),
        ({"fields.t2i.expert": "nope"}, "config.fields.t2i.expert:"),
        ({"routes.t2i.weight": -1.0}, "config.routes.t2i.weight:"),
        ({"routes.t2i.weight": 0.0, "routes.edit.weight": 0.0}, "config.routes:"),
        ({"image_size": 9}, "config.student.patch_size:"),
        ({"rollout_steps": 0}, "config.rollout_steps:"),
        ({"routes.edit.bucket": "t2i"}, "config.routes.edit.bucket:"),
        ({"query_sampler": "late"}, "config.query_sampler:"),
        ({"student.preset": "huge"}, "config.student.preset:"),
        ({"batch_size": 3, "mesh.data": 2}, "config.mesh"),
        ({"routing": "per_sample", "batch_size": 1}, "config.batch_size: routing 'per_sample' splits the batch of 1 by route"),
        ({"fields.t2i.kind": "combination", "fields.t2i.terms": {"nope": 1.0}}, "config.fields.t2i.terms:"),
        ({"fields.t2i.kind": "combination", "fields.t2i.terms": {"t2i": 1.0}}, "config.fields.t2i: combination cycle"),
    ],
)
def test_bad_config_stops_with_one_line_naming_the_key(overrides, key):
    with pytest.raises((ConfigError, ValueError)) as error:
        setup_run(load_config(**overrides))
    message = str(error.value)
    assert message.startswith(key) and "\n" not in message, message


def test_flow_matching_expert_with_ema_loads_as_an_expert(tmp_path):
    """Train a model from data (flow matching, EMA), then use its checkpoint as a frozen expert."""
    from danceopd_jax.train import train_and_evaluate

    trained = train_and_evaluate(
        load_config(
            method="flow_matching",
            num_train_steps=3,
            condition_dropout=0.2,
            **{"student.zero_init": False, "optimizer.ema_decay": 0.5, "optimizer.warmup_steps": 0},
        ),
        str(tmp_path),
    )
    params, ema = jax.tree.leaves(trained.params), jax.tree.leaves(trained.ema_params)
    assert any(np.any(np.asarray(p) != np.asarray(e)) for p, e in zip(params, ema))
    config = load_config(
        **{"experts.edit_expert.init": "checkpoint", "experts.edit_expert.checkpoint": str(tmp_path)}
    )
    loaded = jax.tree.leaves(setup_run(config).experts["edit_expert"])
    for a, b in zip(loaded, ema):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_ema_is_the_decayed_average():
    run = setup_run(load_config(**{"optimizer.ema_decay": 0.9, "optimizer.warmup_steps": 0, "student.zero_init": False}))
    p0 = _host_copy(run.state.params)
    route, batch = run.global_batch(0)
    state, _ = run.train_step(run.state, run.experts, batch, jnp.int32(route))
    for e, a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(p0), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(e), 0.9 * a + 0.1 * np.asarray(b), rtol=1e-6, atol=1e-7)


def test_learning_rate_warms_up_then_decays():
    from danceopd_jax.core.step import make_lr_schedule

    schedule = make_lr_schedule(1e-3, 4, 20, "cosine")
    np.testing.assert_allclose([schedule(s) for s in (0, 2, 4)], [0.0, 5e-4, 1e-3], rtol=1e-6)
    assert float(schedule(12)) == pytest.approx(5e-4, rel=1e-5)  # half-way through the cosine
    assert float(schedule(20)) == pytest.approx(0.0, abs=1e-9)


def test_combination_field_is_the_weighted_sum_of_its_terms():
    """A route to ``0.5 * t2i`` has a quarter of the plain t2i route's loss (zero-init student: |target|^2)."""
    from ml_collections import ConfigDict

    plain = load_config(routing="per_sample")
    mixed = load_config(routing="per_sample", **{"routes.t2i.field": "half"})
    mixed.fields.half = ConfigDict(dict(kind="combination", expert="", cfg_scale=1.0, needs_source=False, terms={"t2i": 0.5}))
    run_plain, run_mixed = setup_run(plain), setup_run(mixed)
    _, batch = run_plain.global_batch(0)
    key = jax.random.key(0)
    a = run_plain.loss_fn(run_plain.state.params, run_plain.experts, batch, jnp.int32(0), key)
    b = run_mixed.loss_fn(run_plain.state.params, run_plain.experts, batch, jnp.int32(0), key)
    t2i_rows = np.repeat([name == "t2i" for name in plain.routes], 2)
    np.testing.assert_allclose(np.asarray(b)[t2i_rows], np.asarray(a)[t2i_rows] / 4.0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(b)[~t2i_rows], np.asarray(a)[~t2i_rows], rtol=1e-6)
