"""Tests for danceopd_jax.models.dit (tiny configs, CPU)."""

import dataclasses
import functools
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from danceopd_jax.models import dit
from danceopd_jax.models.dit import DiT, DiTConfig, dit_config, forward_flops
from danceopd_jax.models.layers import patchify, unpatchify

from conftest import cpu_devices_env, xla_flops

B, L, TEXT_DIM, NUM_CLASSES = 2, 5, 12, 4
CFG = dit_config(
    "tiny", image_size=8, channels=3, num_classes=NUM_CLASSES, text_dim=TEXT_DIM, use_source=True
)


def make_inputs(cfg=CFG, seed=0, text_len=L):
    ks = jax.random.split(jax.random.key(seed), 4)
    shape = (B, cfg.image_size, cfg.image_size, cfg.channels)
    cond = {
        "label": jnp.array([1, -1], jnp.int32),
        "text": jax.random.normal(ks[2], (B, text_len, max(cfg.text_dim, 1))),
        "text_mask": jnp.arange(text_len)[None] < jnp.array([[3], [0]]),  # sample 1: empty prompt
        "source": jax.random.normal(ks[3], shape),
        "source_mask": jnp.array([True, False]),
    }
    return jax.random.normal(ks[0], shape), jax.random.uniform(ks[1], (B,)), cond


@jax.jit
def add_noise(tree, key):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [a + 0.1 * jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)]
    )


def perturbed(cfg=CFG, seed=1):
    """A DiT with noise added to every parameter (a fresh one outputs zero, blind to cond)."""
    model = DiT(cfg, rngs=nnx.Rngs(0))
    nnx.update(model, add_noise(nnx.state(model), jax.random.key(seed)))
    return model


@functools.partial(jax.jit, static_argnames="graphdef")
def _apply(params, x, t, cond, *, graphdef):
    return nnx.merge(graphdef, params)(x, t, cond)


def apply(model, x, t, cond):
    """The trainer's path: split outside jit, merge inside."""
    graphdef, params = nnx.split(model)
    return _apply(params, x, t, cond, graphdef=graphdef)


def max_diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_fresh_model_outputs_zero_velocity():
    x, t, cond = make_inputs()
    v = apply(DiT(CFG, rngs=nnx.Rngs(0)), x, t, cond)
    assert v.shape == x.shape and v.dtype == jnp.float32
    np.testing.assert_array_equal(v, 0.0)


def test_model_holds_only_params():
    _, state = nnx.split(perturbed())
    variables = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    assert variables and all(type(v) is nnx.Param for v in variables)
    assert all(v.dtype == jnp.float32 for v in variables)


def test_masked_text_is_ignored():
    model = perturbed()
    x, t, cond = make_inputs()
    v = apply(model, x, t, cond)
    assert np.abs(v).max() > 1e-2
    noise = 3.0 * jax.random.normal(jax.random.key(7), cond["text"].shape)
    masked_changed = dict(cond, text=jnp.where(cond["text_mask"][..., None], cond["text"], noise))
    assert max_diff(apply(model, x, t, masked_changed), v) < 1e-6
    real_changed = dict(cond, text=cond["text"] + noise)  # sample 0 has 3 real tokens
    assert max_diff(apply(model, x, t, real_changed)[0], v[0]) > 1e-3


def test_source_used_only_where_source_mask():
    model = perturbed()
    x, t, cond = make_inputs()
    v = apply(model, x, t, cond)
    v2 = apply(model, x, t, dict(cond, source=cond["source"] + 1.0))
    assert max_diff(v2[0], v[0]) > 1e-3  # source_mask True
    assert max_diff(v2[1], v[1]) < 1e-6  # source_mask False


def test_null_label_uses_last_row():
    model = perturbed()
    x, t, cond = make_inputs()
    v_null = apply(model, x, t, dict(cond, label=jnp.array([-1, -1])))
    v_zero = apply(model, x, t, dict(cond, label=jnp.array([0, 0])))
    v_last = apply(model, x, t, dict(cond, label=jnp.array([NUM_CLASSES, NUM_CLASSES])))
    assert max_diff(v_null, v_zero) > 1e-3
    assert max_diff(v_null, v_last) < 1e-6


def test_unconditional_config_ignores_condition_keys():
    cfg = dit_config("tiny", image_size=8)
    model = perturbed(cfg)
    x, t, cond = make_inputs(cfg)
    assert max_diff(apply(model, x, t, cond), apply(model, x, t, {})) == 0.0


def test_patchify_round_trip():
    x = jax.random.normal(jax.random.key(0), (2, 8, 12, 3))
    tokens = patchify(x, 4)
    assert tokens.shape == (2, 6, 48)
    np.testing.assert_array_equal(tokens[0, 1], x[0, :4, 4:8].reshape(-1))
    np.testing.assert_array_equal(unpatchify(tokens, 4, 8, 12, 3), x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_size=10, patch_size=4), "divisible by patch_size"),
        (dict(hidden_size=36, num_heads=8), "divisible by num_heads"),
        (dict(depth=0), "depth"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiTConfig(**{**dict(image_size=8, hidden_size=32, depth=1, num_heads=2), **kwargs})


def test_presets():
    with pytest.raises(ValueError, match="XL"):
        dit_config("huge", image_size=8)
    cfg = dit_config("XL", image_size=32, num_classes=1000)
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.num_classes) == (1152, 28, 16, 1000)


EXPECTED_AXES = {
    "q/kernel": ("embed", "heads"),
    "q/bias": ("heads",),
    "out/kernel": ("heads", "embed"),
    "fc1/kernel": ("embed", "mlp"),
    "fc2/kernel": ("mlp", "embed"),
    "modulation/kernel": ("embed", "adaln"),
    "final_modulation/bias": ("adaln",),
    "patch_embed/kernel": ("patch", "embed"),
    "final_proj/kernel": ("embed", "patch"),
    "text_proj/kernel": ("text_embed", "embed"),
    "label_embed/embedding": ("vocab", "embed"),
    "time_fc1/kernel": ("freq", "mlp"),
    "source_type": ("embed",),
}


def test_every_param_has_logical_axis_names():
    abstract = nnx.eval_shape(lambda: DiT(CFG, rngs=nnx.Rngs(0)))
    found = set()
    for path, var in nnx.to_flat_state(nnx.state(abstract)):
        name, axes = "/".join(map(str, path)), var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.shape), name
        assert set(axes) <= set(dit.LOGICAL_AXES), (name, axes)
        assert len(set(axes)) == len(axes), (name, axes)  # one mesh axis never used twice
        for suffix, expected in EXPECTED_AXES.items():
            if name == suffix or name.endswith("/" + suffix):
                assert tuple(axes) == expected, (name, axes)
                found.add(suffix)
    assert found == set(EXPECTED_AXES)


SHARDED_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from danceopd_jax.models import dit

    assert jax.device_count() == 8
    cfg = dit.dit_config("tiny", image_size=8, num_classes=4, text_dim=8, use_source=True)
    rules = (("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"))
    rules += tuple((a, None) for a in dit.LOGICAL_AXES if a not in dict(rules))
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    make = lambda: dit.DiT(cfg, rngs=nnx.Rngs(0))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(nnx.state(nnx.eval_shape(make)))
        model = make()
    block = specs["blocks"][0]
    assert block["q"]["kernel"].get_value() == P("fsdp", "tensor")
    assert block["fc2"]["kernel"].get_value() == P("tensor", "fsdp")
    assert block["modulation"]["kernel"].get_value() == P("fsdp", None)
    assert model.blocks[0].q.kernel[...].sharding.spec == P("fsdp", "tensor")

    # With perturbed params, a sharded jit forward equals the single-device one.
    graphdef, params = nnx.split(model)
    leaves, treedef = jax.tree.flatten(jax.device_get(params))
    noise = jax.jit(lambda key: [0.1 * jax.random.normal(k, a.shape) for k, a in
                                 zip(jax.random.split(key, len(leaves)), leaves)])
    params = jax.tree.unflatten(treedef, [a + n for a, n in zip(leaves, noise(jax.random.key(1)))])
    x = jax.random.normal(jax.random.key(2), (4, 8, 8, 3))
    t = jnp.linspace(0.1, 0.9, 4)
    cond = dict(label=jnp.array([0, 1, -1, 3]), text=jnp.ones((4, 3, 8)),
                text_mask=jnp.array([[1, 1, 0]] * 4, bool), source=x[::-1],
                source_mask=jnp.array([True, False, True, False]))
    forward = jax.jit(lambda p, x, t, c: nnx.merge(graphdef, p)(x, t, c))
    reference = np.asarray(forward(params, x, t, cond))
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    x, t, cond = jax.device_put((x, t, cond), batch)
    with jax.set_mesh(mesh):
        sharded = forward(jax.device_put(params, shardings), x, t, cond)
    assert np.abs(reference).max() > 1e-2
    np.testing.assert_allclose(np.asarray(sharded), reference, atol=1e-4, rtol=1e-4)
    print("OK")
    """
)


def test_sharded_construction_and_forward_on_8_cpu_devices():
    env = cpu_devices_env(8)
    result = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_forward_flops_matches_xla():
    cfg = DiTConfig(image_size=16, channels=4, hidden_size=128, depth=2, num_heads=4,
                    num_classes=10, text_dim=32, use_source=True)
    text_len = 8
    graphdef, params = nnx.split(DiT(cfg, rngs=nnx.Rngs(0)))
    x, t, cond = make_inputs(cfg, text_len=text_len)
    xla = xla_flops(lambda p, x, t, c: nnx.merge(graphdef, p)(x, t, c), params, x, t, cond)
    ours = forward_flops(cfg, B, text_len=text_len)
    assert abs(ours - xla) / xla < 0.15, (ours, xla)
    assert ours > forward_flops(dataclasses.replace(cfg, use_source=False), B, text_len)
    assert ours > forward_flops(cfg, B, text_len=0)


def test_bfloat16_compute_returns_float32():
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    model = perturbed(cfg)
    x, t, cond = make_inputs(cfg)
    v = apply(model, x, t, cond)
    assert v.dtype == jnp.float32 and v.shape == x.shape
    reference = DiT(CFG, rngs=nnx.Rngs(0))
    nnx.update(reference, nnx.state(model))
    v32 = apply(reference, x, t, cond)
    assert np.abs(v32).max() > 1e-2
    assert 0 < max_diff(v, v32) < 0.05 * np.abs(v32).max()  # bf16 differs, but only by rounding


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_changes_memory_not_math(remat):
    """Rematerialised blocks give the loss and gradients of the plain model, and the backward
    pass really contains the checkpointed blocks."""
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    t = jnp.array([0.3, 0.7])
    cond = {"text": jnp.ones((2, 3, 4)), "text_mask": jnp.ones((2, 3))}

    def loss_and_grads(policy):
        graph, params = nnx.split(DiT(dit_config("tiny", image_size=8, text_dim=4, zero_init=False, remat=policy), rngs=nnx.Rngs(0)))
        loss = lambda p: jnp.mean(jnp.square(nnx.merge(graph, p)(x, t, cond)))  # noqa: E731
        return jax.value_and_grad(loss)(params), str(jax.make_jaxpr(jax.grad(loss))(params))

    (plain_loss, plain_grads), plain_jaxpr = loss_and_grads("none")
    (loss, grads), jaxpr = loss_and_grads(remat)
    assert float(loss) == float(plain_loss)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert "remat" in jaxpr and "remat" not in plain_jaxpr  # the checkpointed blocks, replayed in the backward pass
    with pytest.raises(ValueError, match="remat must be one of none, dots, full"):
        dit_config("tiny", image_size=8, remat="some")


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_model_runs_inside_the_rollout_loops(remat):
    """A rematerialised model merged inside ``lax.scan`` / ``while_loop`` bodies (the rollout, both
    ways) gives the plain model's states; ``nnx.remat`` raised TraceContextError there."""
    from danceopd_jax.core.rollout import rollout_query_states
    from danceopd_jax.core.schedule import sigma_grid

    noise = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    cond = {"label": jnp.array([1, 2])}
    indices = jnp.array([[2], [3]])

    def rollout(policy, truncate):
        graph, params = nnx.split(DiT(dit_config("tiny", image_size=8, num_classes=4, zero_init=False, remat=policy), rngs=nnx.Rngs(0)))
        field = lambda p: lambda x, t, c: nnx.merge(graph, p)(x, t, c)  # noqa: E731
        run = jax.jit(lambda p: rollout_query_states(field(p), noise, sigma_grid(4), cond, indices, truncate)[0])
        return run(params)

    for truncate in (True, False):
        np.testing.assert_allclose(rollout(remat, truncate), rollout("none", truncate), rtol=0, atol=1e-6)
