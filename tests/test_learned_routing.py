"""Routing beyond fixed buckets: the learned router, and route weight schedules in real runs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from danceopd_jax import build, train
from danceopd_jax.config_validation import ConfigError, validate
from danceopd_jax.core import router
from danceopd_jax.core.conditioning import repeat_condition
from danceopd_jax.data.sources import MixedSource
from danceopd_jax.train import setup_run, train_and_evaluate

from conftest import load_config

LEARNED = {"routing": "learned", "router.label_fraction": 1.0, "router.heldout": 32, "batch_size": 8}


def _zeroed(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def test_router_learns_a_separable_labelling_from_few_labels():
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(3, 16))
    features = rng.normal(size=(6000, 16)).astype(np.float32)
    scores = np.sort(features @ directions.T, axis=1)
    features = features[scores[:, -1] - scores[:, -2] > 1.0][:2000]  # keep a margin between the classes
    labels = np.argmax(features @ directions.T, axis=1)  # three linearly separable classes
    params = router.train_router(
        features[:200], labels[:200], 3, hidden=32, steps=400, learning_rate=1e-2, weight_decay=1e-4, seed=0
    )
    assert router.router_accuracy(params, features[200:], labels[200:]) >= 0.95
    untrained = router.init_router(jax.random.key(0), 16, 3, 32)
    assert router.router_accuracy(untrained, features[200:], labels[200:]) < 0.8


def _source_router(scale: float) -> router.RouterParams:
    """By hand: route 0 without a source image, route 1 with one (logits +-scale)."""
    num_features = 16 + 1  # smoke text_dim + source flag
    w1 = np.zeros((num_features, 1), np.float32)
    w1[-1, 0] = 1.0
    return {"w1": jnp.asarray(w1), "b1": jnp.zeros(1), "w2": jnp.asarray([[-2 * scale, 2 * scale]]), "b2": jnp.asarray([scale, -scale])}


def test_routed_field_argmax_sample_and_soft():
    cond = {"text": jnp.zeros((4, 8, 16)), "text_mask": jnp.ones((4, 8), bool), "source_mask": jnp.asarray([False, True, False, True])}
    fields = [lambda x, t, c: jnp.ones_like(x), lambda x, t, c: 3.0 * jnp.ones_like(x)]
    x, t = jnp.zeros((4, 2, 2, 3)), jnp.zeros(4)
    key = jax.random.key(0)
    hard = router.routed_field(fields, _source_router(2.0), "argmax", key, 4)(x, t, cond)
    np.testing.assert_array_equal(hard[:, 0, 0, 0], [1.0, 3.0, 1.0, 3.0])
    p_second = float(jax.nn.sigmoid(-4.0))  # logits (2, -2) without a source, (-2, 2) with one
    soft = router.routed_field(fields, _source_router(2.0), "soft", key, 4)(x, t, cond)
    expected = np.where(np.asarray(cond["source_mask"]), 3.0 - 2.0 * p_second, 1.0 + 2.0 * p_second)
    np.testing.assert_allclose(soft[:, 0, 0, 0], expected, rtol=1e-6)
    sampled = router.routed_field(fields, _source_router(50.0), "sample", key, 4)(x, t, cond)
    np.testing.assert_array_equal(sampled, hard)  # a certain router samples its argmax
    uncertain = [router.routed_field(fields, _source_router(0.0), "sample", jax.random.key(k), 4)(x, t, cond) for k in range(8)]
    values = np.unique(np.concatenate([np.asarray(u).ravel() for u in uncertain]))
    np.testing.assert_array_equal(values, [1.0, 3.0])  # p = 1/2: both fields drawn, nothing in between


def test_a_sampled_route_is_one_field_for_all_of_a_samples_query_states():
    """With K query states per rollout (rows repeated sample-major), ``assign="sample"`` draws one
    field per sample, not per row: every sample's K rows get the same field, and over the batch
    both fields of a 50/50 router are drawn."""
    samples, k = 64, 3
    cond = repeat_condition({"text": jnp.zeros((samples, 8, 16)), "text_mask": jnp.ones((samples, 8), bool),
                             "source_mask": jnp.zeros((samples,), bool)}, k)  # fmt: skip
    fields = [lambda x, t, c: jnp.ones_like(x), lambda x, t, c: 3.0 * jnp.ones_like(x)]
    x, t = jnp.zeros((samples * k, 2)), jnp.zeros(samples * k)
    out = router.routed_field(fields, _source_router(0.0), "sample", jax.random.key(0), samples)(x, t, cond)
    per_sample = np.asarray(out[:, 0]).reshape(samples, k)
    assert (per_sample == per_sample[:, :1]).all(), per_sample
    assert set(np.unique(per_sample)) == {1.0, 3.0}
    with pytest.raises(ValueError, match="rows are not whole repeats of 5 samples"):
        router.routed_field(fields, _source_router(0.0), "sample", jax.random.key(0), 5)(x, t, cond)


def test_mixed_source_pools_buckets_in_proportion_and_keeps_labels():
    a, b = [{"id": ("a", i)} for i in range(300)], [{"id": ("b", i)} for i in range(100)]
    pool = MixedSource([a, b], [3.0, 1.0], seed=0)
    assert len(pool) == 400
    assert 0.68 < np.mean(pool.labels == 0) < 0.82
    for i in range(len(pool)):
        name, index = pool[i]["id"]
        assert name == "ab"[pool.labels[i]] and index == pool.indices[i]
    np.testing.assert_array_equal(pool.labels, MixedSource([a, b], [3.0, 1.0], seed=0).labels)
    assert np.any(pool.labels != MixedSource([a, b], [3.0, 1.0], seed=1).labels)


def test_router_labels_never_include_a_held_out_record():
    """A source drawn more often than it has records is cycled; its repeats of held-out records stay unlabelled."""
    a, b = [{"id": ("a", i)} for i in range(100)], [{"id": ("b", i)} for i in range(100)]
    pool = MixedSource([a, b], [3.0, 1.0], seed=0)  # ~150 draws of a's 100 records
    labelled, heldout = build.router_split(pool, 1.0, 40)
    held_ids = {pool[i]["id"] for i in heldout}
    assert heldout == list(range(160, 200)) and not held_ids & {pool[i]["id"] for i in labelled}
    dropped = [i for i in range(160) if pool[i]["id"] in held_ids]
    assert dropped and labelled == [i for i in range(160) if i not in dropped]  # only the repeats left out
    assert len(build.router_split(pool, 0.5, 40)[0]) < 80


@pytest.fixture(scope="module")
def learned_run():
    return setup_run(load_config(**LEARNED))


def test_learned_routing_sends_each_sample_of_the_pool_to_its_predicted_field(learned_run):
    """Smoke routes separate by the source flag: the router is perfect, and with the edit expert
    zeroed a zero-init student has loss exactly 0 on the edit samples of a mixed batch only."""
    run = learned_run
    labelled = build.router_split(build.make_sources(run.config)[build.POOL], 1.0, 32)[0]
    assert run.router_report["heldout_accuracy"] == 1.0 and run.router_report["labelled"] == len(labelled) <= 128 - 32
    experts = dict(run.experts, edit_expert=_zeroed(run.experts["edit_expert"]))
    mixed = 0
    for step in range(4):
        run.state = run.state.replace(params=_zeroed(run.state.params))  # a zero field: loss = |target|^2
        route, batch = run.global_batch(step)
        is_edit = np.asarray(batch["cond"]["source_mask"])
        mixed += 0 < is_edit.sum() < len(is_edit)
        per_sample = np.asarray(run.loss_fn(run.state.params, experts, batch, jnp.int32(route), jax.random.key(step)))
        assert np.all(per_sample[is_edit] == 0) and np.all(per_sample[~is_edit] > 0), step
        run.state, metrics = run.train_step(run.state, experts, batch, jnp.int32(route))  # the old state is donated
        group_loss = dict(zip(run.config.routes, np.asarray(metrics["group_loss"])))  # by the router's assignment
        t2i_loss, edit_loss = group_loss["t2i"], group_loss["edit"]
        assert edit_loss == 0 if is_edit.any() else np.isnan(edit_loss)
        assert t2i_loss > 0 if not is_edit.all() else np.isnan(t2i_loss)
    assert mixed >= 2, "the pool's batches should mix the buckets"


def test_learned_routing_is_one_jitted_step_without_host_round_trips(learned_run):
    run = learned_run
    route, batch = run.global_batch(0)
    lowered = run.train_step.lower(run.state, run.experts, batch, jnp.int32(route))
    assert "callback" not in lowered.as_text()
    state = run.state
    for step in range(2):
        route, batch = run.global_batch(step)
        state, _ = run.train_step(state, run.experts, batch, jnp.int32(route))
    assert run.train_step.step._cache_size() == 1  # every batch, whatever its routes, runs the same program
    run.state = state


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({**LEARNED, "method": "flow_matching"}, "config.routing:"),
        ({**LEARNED, "router.assign": "vote"}, "config.router.assign:"),
        ({**LEARNED, "router.label_fraction": 0.0}, "config.router.label_fraction:"),
        ({**LEARNED, "router.label_fraction": 0.001}, "config.router.label_fraction:"),
        ({"route_weights.schedule": "bandit"}, "config.route_weights.schedule:"),
        ({"route_weights.schedule": "adaptive", "routing": "soft"}, "config.route_weights.schedule:"),
        ({"route_weights.floor": 0.0}, "config.route_weights.floor:"),
        ({"route_weights.schedule": "curriculum", "route_weights.curriculum_steps": 10}, "config.route_weights.end:"),
        ({"route_weights.schedule": "curriculum", "route_weights.end": {"t2i": 1.0, "edit": 1.0}}, "config.route_weights.curriculum_steps:"),
        ({"route_weights.schedule": "curriculum", "route_weights.curriculum_steps": 10,
          "route_weights.end": {"t2i": 1.0, "edti": 1.0}}, "config.route_weights.end:"),
    ],
)
def test_bad_routing_configs_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(load_config(**overrides))


ADAPTIVE = {"route_weights.schedule": "adaptive", "route_weights.floor": 0.3, "num_train_steps": 16, "checkpoint_every": 4,
            "log_every": 1, "loss_log": True, "routes.t2i.weight": 3.0}  # fmt: skip


def _logged(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / train.LOSS_LOG).read_text().splitlines()]


def test_adaptive_weights_move_stay_bounded_and_resume_exactly(tmp_path, monkeypatch):
    config = load_config(**ADAPTIVE)
    straight_state = train_and_evaluate(config, str(tmp_path / "straight"))
    straight = _logged(tmp_path / "straight")
    weights = np.asarray([entry["weights"] for entry in straight])
    base = np.asarray([{"t2i": 0.75, "edit": 0.25}[name] for name in config.routes])
    np.testing.assert_allclose(weights[:2], [base, base])  # nothing observed before the one-step lag
    assert np.all(weights >= 0.3 * base - 1e-12) and np.allclose(weights.sum(axis=1), 1.0)
    assert len({tuple(w) for w in weights}) > 3, "the weights should follow the running losses"
    # Stop at step 6 (as SIGTERM would), then resume: same routes, weights, losses and parameters.
    monkeypatch.setattr(train._Preemption, "reached", lambda self, step: step == 6)
    with pytest.raises(train.Preempted):
        train_and_evaluate(config, str(tmp_path / "resumed"))
    monkeypatch.undo()
    resumed_state = train_and_evaluate(config, str(tmp_path / "resumed"))
    assert _logged(tmp_path / "resumed") == straight
    for a, b in zip(jax.tree.leaves(straight_state.params), jax.tree.leaves(resumed_state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_curriculum_moves_the_drawn_routes_toward_the_end_weights():
    config = load_config(**{"route_weights.schedule": "curriculum", "route_weights.curriculum_steps": 100,
                            "route_weights.end": {"t2i": 0.0, "edit": 1.0}, "routes.edit.weight": 0.0})  # fmt: skip
    schedule = build.make_route_weights(config)
    names = list(config.routes)
    drawn = [names[build.step_route_and_groups(config, step, schedule.weights(step))[0]] for step in range(200)]
    assert drawn[0] == "t2i" and set(drawn[100:]) == {"edit"}
    assert drawn[:50].count("edit") < drawn[50:100].count("edit")
