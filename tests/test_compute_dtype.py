"""Tests for danceopd_jax.core.compute_dtype: parameters cast once for loops, with the same results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from danceopd_jax.build import StudentApply, frozen_in_compute_dtype
from danceopd_jax.config_lib import SD3_LORA_TARGETS
from danceopd_jax.core.compute_dtype import cast_to_compute_dtype, compute_dtypes
from danceopd_jax.core.fields import inference_field, model_field
from danceopd_jax.core.objectives import danceopd_loss
from danceopd_jax.core.schedule import sigma_grid
from danceopd_jax.models import dit, lora, mmdit

from conftest import SD35_TINY, jaxpr_equations, randomise_adapters

B = 2


def tiny_dit(seed: int, dtype="bfloat16"):
    config = dit.dit_config("tiny", image_size=8, channels=4, num_classes=4, dtype=dtype, zero_init=False)
    return dit.DiT(config, rngs=nnx.Rngs(seed))


def tiny_lora_mmdit():
    """SD3.5-style MMDiT (RMS qk-norm, conv patch embedding) in bf16 with non-zero LoRA adapters."""
    model = mmdit.MMDiT(mmdit.config_from_diffusers(SD35_TINY, dtype="bfloat16"), rngs=nnx.Rngs(0))
    lora.add_lora(model, rank=2, alpha=4, targets=SD3_LORA_TARGETS.split(","), rngs=nnx.Rngs(1))
    randomise_adapters(model, std=0.1)
    return model


def dit_inputs():
    keys = jax.random.split(jax.random.key(0), 2)
    return jax.random.normal(keys[0], (B, 8, 8, 4)), jax.random.uniform(keys[1], (B,)), {"label": jnp.array([1, -1])}


def mmdit_inputs():
    keys = jax.random.split(jax.random.key(0), 4)
    cond = {"text": jax.random.normal(keys[2], (B, 5, 12)), "pooled": jax.random.normal(keys[3], (B, 10))}
    return jax.random.normal(keys[0], (B, 8, 8, 4)), jax.random.uniform(keys[1], (B,)), cond


def test_casts_exactly_the_parameters_their_layers_cast():
    model = tiny_lora_mmdit()
    casts = compute_dtypes(model)
    block = model.transformer_blocks[0]
    assert casts[("transformer_blocks", 0, "attn", "to_q", "kernel")] == jnp.bfloat16
    assert ("transformer_blocks", 0, "attn", "to_q", "lora_a") in casts  # LoRALinear's factors
    assert ("transformer_blocks", 0, "attn", "to_q", "lora_b") in casts
    assert ("pos_embed", "proj", "kernel") in casts  # the patch embedding's Conv
    assert isinstance(block.attn.norm_q, nnx.RMSNorm)
    assert not any("norm" in str(part) for path in casts for part in path[-2:-1])  # norm scales stay float32
    params = nnx.state(model, nnx.Param)
    layer_params = [path for path, _ in nnx.to_flat_state(params) if path[-1] in ("kernel", "bias", "lora_a", "lora_b")]
    assert set(casts) < set(layer_params)
    assert ("time_text_embed", "timestep_embedder", "linear_2", "kernel") not in casts  # a float32 layer
    assert ("transformer_blocks", 0, "norm1_context", "linear", "kernel") not in casts  # adaLN runs in float32

    embedded = compute_dtypes(tiny_dit(0))
    assert embedded[("label_embed", "embedding")] == jnp.bfloat16
    assert compute_dtypes(tiny_dit(0, dtype="float32")) == {}  # nothing to cast when compute is float32


@pytest.mark.parametrize("kind", ["dit", "lora_mmdit"])
def test_inference_field_is_bit_identical(kind):
    if kind == "dit":
        graphdef, *states = nnx.split(tiny_dit(0))
        x, t, cond = dit_inputs()
    else:
        graphdef, *states = nnx.split(tiny_lora_mmdit(), lora.LoRAParam, ...)
        x, t, cond = mmdit_inputs()
    cast = cast_to_compute_dtype(graphdef, *states)
    assert len(cast) == len(states)
    assert jnp.dtype(jnp.bfloat16) in {leaf.dtype for leaf in jax.tree.leaves(cast)}
    assert {leaf.dtype for leaf in jax.tree.leaves(states)} == {jnp.dtype(jnp.float32)}  # inputs untouched
    plain = jax.jit(lambda s, x, t, c: model_field(graphdef, *s)(x, t, c))(states, x, t, cond)
    once = jax.jit(lambda s, x, t, c: inference_field(graphdef, *s)(x, t, c))(states, x, t, cond)
    assert float(jnp.abs(plain).max()) > 0
    np.testing.assert_array_equal(np.asarray(once), np.asarray(plain))


def _bf16_converts_in_loops(jaxpr) -> int:
    """float32 -> bfloat16 conversions of arrays inside ``while`` bodies (the rollout), recursively."""
    return sum(
        eqn.primitive.name == "convert_element_type" and eqn.params["new_dtype"] == jnp.bfloat16
        and eqn.invars[0].aval.dtype == jnp.float32 and eqn.invars[0].aval.ndim >= 1
        for eqn, in_loop in jaxpr_equations(jaxpr) if in_loop
    )  # fmt: skip


def test_rollout_loop_no_longer_casts_parameters_and_step_is_unchanged():
    """The train step's student rollout (``objectives.frozen_student`` with ``StudentApply``) casts
    the parameters before the Euler loop, not in it: the loop body loses one conversion per
    parameter, and loss and gradients stay bit-identical to a plain apply function."""
    graphdef, params = nnx.split(tiny_dit(0))
    _, expert = nnx.split(tiny_dit(1))
    x, _, cond = dit_inputs()
    batch, sigmas = {"image": x, "cond": cond}, sigma_grid(8, 3.0)
    plain = lambda p, x, t, c: nnx.merge(graphdef, p)(x, t, c)  # noqa: E731

    def loss_and_grads(student, params, key):
        loss = lambda p: danceopd_loss(student, p, model_field(graphdef, expert), batch, key, sigmas=sigmas).mean()  # noqa: E731
        return jax.value_and_grad(loss)(params)

    key = jax.random.key(3)
    in_loop = {
        name: _bf16_converts_in_loops(jax.make_jaxpr(loss_and_grads, static_argnums=0)(student, params, key).jaxpr)
        for name, student in (("plain", plain), ("cast once", StudentApply(graphdef)))
    }
    num_cast = len(compute_dtypes(nnx.merge(graphdef, params)))
    assert num_cast > 20
    assert in_loop["cast once"] <= in_loop["plain"] - num_cast

    plain_out = jax.jit(loss_and_grads, static_argnums=0)(plain, params, key)
    once_out = jax.jit(loss_and_grads, static_argnums=0)(StudentApply(graphdef), params, key)
    assert float(plain_out[0]) > 0
    for a, b in zip(jax.tree.leaves(plain_out), jax.tree.leaves(once_out), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_frozen_experts_are_stored_in_compute_dtype_with_the_same_field():
    """``build.frozen_in_compute_dtype`` (how a run stores its frozen base and LoRA teachers): the
    layer-cast parameters in bfloat16, the float32 layers and norm scales untouched, fewer bytes,
    the same sharding, and a teacher field equal bit for bit to the float32-stored one."""
    graphdef, delta, base = nnx.split(tiny_lora_mmdit(), lora.LoRAParam, ...)
    shardings = jax.tree.map(lambda leaf: leaf.sharding, (base, delta))
    stored_base = frozen_in_compute_dtype(graphdef, base, shardings[0], delta)
    stored_delta = frozen_in_compute_dtype(graphdef, delta, shardings[1], stored_base)
    casts = compute_dtypes(nnx.merge(graphdef, base, delta))
    for part in (stored_base, stored_delta):
        for path, leaf in nnx.to_flat_state(part):
            assert leaf.dtype == (jnp.bfloat16 if path in casts else jnp.float32), path
    nbytes = lambda tree: sum(leaf.nbytes for leaf in jax.tree.leaves(tree))  # noqa: E731
    assert nbytes(stored_base) < 0.75 * nbytes(base)
    assert jax.tree.map(lambda leaf: leaf.sharding, (stored_base, stored_delta)) == shardings
    x, t, cond = mmdit_inputs()
    field = jax.jit(lambda states, x, t, c: model_field(graphdef, *states)(x, t, c))
    np.testing.assert_array_equal(np.asarray(field((stored_base, stored_delta), x, t, cond)), np.asarray(field((base, delta), x, t, cond)))
