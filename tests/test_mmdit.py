"""MMDiT (SD3 / SD3.5 transformer) against diffusers' ``SD3Transformer2DModel``.

Tiny random references are saved with ``save_pretrained`` and loaded through our safetensors
loader and ``config.json``; every weight is re-drawn at random (adaLN-Zero would otherwise be
the identity) so each term of the forward is exercised.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from flax import nnx

from danceopd_jax import parallel
from danceopd_jax.config_lib import base_config
from danceopd_jax.models import mmdit
from danceopd_jax.models.weights import WeightsMismatch, load_module, open_safetensors, write_safetensors

from conftest import SD35_TINY, cpu_devices_env, diffusers_velocity, xla_flops

# SD35_TINY (conftest), SD3.5-style: MMDiT-X attn2 in the first block and in the context_pre_only
# last block, RMS qk-norm; latents (8 x 6) smaller than the 6 x 6-patch table at patch 2, so the crop is
# off-centre in both axes (offsets 1, 1) and the table's scale comes from sample_size.
# SD3-medium-style: no attn2, no qk-norm.
SD3_TINY = {**SD35_TINY, "num_layers": 2, "dual_attention_layers": (), "qk_norm": None, "pos_embed_max_size": 5}

B, H, W, L = 2, 8, 6, 5


def save_reference(kwargs: dict, folder) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    reference = SD3Transformer2DModel(**kwargs).eval()
    with torch.no_grad():
        for p in reference.parameters():
            torch.nn.init.normal_(p, std=0.2)
    reference.save_pretrained(folder)
    return reference


@pytest.fixture(scope="module")
def sd35_saved(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd35_transformer"))
    return save_reference(SD35_TINY, folder), folder


@pytest.fixture(scope="module")
def sd3_saved(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd3_transformer"))
    return save_reference(SD3_TINY, folder), folder


@pytest.fixture(params=["sd35_saved", "sd3_saved"], ids=["sd35_dual_rmsnorm", "sd3_plain"])
def saved(request):
    return request.getfixturevalue(request.param)


def make_inputs(in_channels=4, joint_dim=12, pooled_dim=10):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, H, W, in_channels)).astype(np.float32)
    t = np.array([0.3, 0.9], np.float32)
    cond = {
        "text": rng.standard_normal((B, L, joint_dim)).astype(np.float32),
        "pooled": rng.standard_normal((B, pooled_dim)).astype(np.float32),
        "text_mask": np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], bool),  # ignored, as in SD3
    }
    return x, t, cond



def jitted_velocity(model: mmdit.MMDiT, x, t, cond) -> np.ndarray:
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c))
    return np.asarray(forward(state, x, t, cond))


def test_float32_parity_with_diffusers(saved):
    reference, folder = saved
    with open(os.path.join(folder, "config.json")) as f:
        config = mmdit.config_from_diffusers(json.load(f))
    model = mmdit.load_mmdit(folder)
    assert model.config == config
    assert mmdit.param_count(config) == sum(p.numel() for p in reference.parameters())

    x, t, cond = make_inputs()
    expected = diffusers_velocity(reference, x, t, cond)
    v = jitted_velocity(model, x, t, cond)
    assert v.dtype == np.float32 and v.shape == (B, H, W, 4)
    assert np.abs(expected).max() > 0.5
    assert np.abs(v - expected).max() <= 1e-4

    # The text mask is ignored; the text itself is not.
    unmasked = {**cond, "text_mask": np.ones((B, L), bool)}
    np.testing.assert_array_equal(jitted_velocity(model, x, t, unmasked), v)
    changed = {**cond, "text": cond["text"][:, ::-1] * 2}
    assert np.abs(jitted_velocity(model, x, t, changed) - v).max() > 1e-2


def test_loads_through_open_safetensors_and_config_json(sd35_saved):
    """The module-level contract: ``open_safetensors`` + ``config_from_diffusers`` + ``torch_names``."""
    reference, folder = sd35_saved
    with open(os.path.join(folder, "config.json")) as f:
        config = mmdit.config_from_diffusers(json.load(f))
    tensors = open_safetensors(folder)
    names = mmdit.torch_names(config)
    assert set(names.values()) == set(tensors)
    assert names["pos_embed.pos_embed"] == "pos_embed.pos_embed"
    assert names["transformer_blocks.0.attn.to_out.kernel"] == "transformer_blocks.0.attn.to_out.0.weight"
    assert names["transformer_blocks.0.ff.fc1.kernel"] == "transformer_blocks.0.ff.net.0.proj.weight"
    model = load_module(lambda: mmdit.MMDiT(config, rngs=nnx.Rngs(0)), tensors, names)
    x, t, cond = make_inputs()
    assert np.abs(jitted_velocity(model, x, t, cond) - diffusers_velocity(reference, x, t, cond)).max() <= 1e-4


def test_bfloat16_compute_close_to_float32_reference(sd35_saved):
    """bf16 token projections (float32 params, streams, norms, softmax, modulation): the output
    is float32 and within 3% of the reference's largest value (bf16 rounds to ~0.4%, compounded
    over the blocks)."""
    reference, folder = sd35_saved
    model = mmdit.load_mmdit(folder, dtype="bfloat16")
    x, t, cond = make_inputs()
    expected = diffusers_velocity(reference, x, t, cond)
    v = jitted_velocity(model, x, t, cond)
    assert v.dtype == np.float32
    error = np.abs(v - expected).max()
    assert 0 < error <= 0.03 * np.abs(expected).max(), error


def test_positional_table_init_matches_diffusers():
    """A fresh model's buffer is diffusers' persistent ``pos_embed.pos_embed`` (scaled, uncropped)."""
    config = mmdit.config_from_diffusers(SD35_TINY)
    reference = SD3Transformer2DModel(**SD35_TINY)
    ours = mmdit.PatchEmbed(config, rngs=nnx.Rngs(0)).pos_embed[...]
    np.testing.assert_allclose(np.asarray(ours), reference.pos_embed.pos_embed.numpy(), rtol=0, atol=1e-6)
    # At a larger scale (positions up to 32, 64 channels) float32 stays within 1e-5.
    table = mmdit.sincos_table(64, 48, base_size=32)
    expected = get_2d_sincos_pos_embed(64, 48, base_size=32, output_type="pt").float().numpy()
    np.testing.assert_allclose(np.asarray(table), expected, rtol=0, atol=1e-5)


def test_crop_center_and_size_limits():
    table = jnp.arange(5 * 5, dtype=jnp.float32)[:, None]  # token id = row * 5 + col
    crop = mmdit.crop_center(table, 5, 2, 3)  # offsets (5-2)//2 = 1, (5-3)//2 = 1
    np.testing.assert_array_equal(np.asarray(crop[:, 0]), [6, 7, 8, 11, 12, 13])
    patch_embed = mmdit.PatchEmbed(mmdit.config_from_diffusers(SD35_TINY), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="exceeds pos_embed_max_size 6"):
        patch_embed(jnp.zeros((B, 14, 6, 4)))
    with pytest.raises(ValueError, match="not divisible by patch_size 2"):
        patch_embed(jnp.zeros((B, 7, 6, 4)))


def test_misshaped_or_missing_tensor_raises_weights_mismatch(saved, tmp_path):
    _, folder = saved
    tensors = dict(open_safetensors(folder))
    key = "transformer_blocks.0.attn.to_q.weight"
    tensors[key] = tensors[key][:, :-1]
    del tensors["transformer_blocks.1.attn.add_k_proj.bias"]
    write_safetensors(str(tmp_path / "diffusion_pytorch_model.safetensors"), tensors)
    shutil.copy(os.path.join(folder, "config.json"), tmp_path / "config.json")
    with pytest.raises(WeightsMismatch, match=r"mis-shaped: transformer_blocks\.0\.attn\.to_q\.weight") as error:
        mmdit.load_mmdit(str(tmp_path))
    assert "missing: transformer_blocks.1.attn.add_k_proj.bias" in str(error.value)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"qk_norm": "layer_norm"}, "qk_norm 'layer_norm' is not supported"),
        ({"use_fancy_thing": True}, "unsupported SD3Transformer2DModel config keys: use_fancy_thing"),
        ({"pos_embed_max_size": None}, "pos_embed_max_size"),
        ({"dual_attention_layers": [0, 3]}, r"dual_attention_layers must be distinct block indices in \[0, 3\)"),
        ({"dual_attention_layers": 2}, "dual_attention_layers must be a list"),
        ({"caption_projection_dim": 24}, "caption_projection_dim 24 must equal"),
        ({"num_layers": 0}, "num_layers must be an integer >= 1"),
        ({"attention_head_dim": 3, "caption_projection_dim": 6}, "= 6 must be divisible by 4"),
    ],
)
def test_bad_config_raises_value_error(change, match):
    with pytest.raises(ValueError, match=match):
        mmdit.config_from_diffusers({"_class_name": "SD3Transformer2DModel", **SD35_TINY, **change})


def test_config_overrides_and_validation():
    config = mmdit.config_from_diffusers({**SD35_TINY, "out_channels": None, "dual_attention_layers": [0]}, dtype="bfloat16")
    assert config.out_channels == config.in_channels and config.dual_attention_layers == (0,) and config.dtype == "bfloat16"
    with pytest.raises(ValueError, match="remat must be one of none, dots, full"):
        dataclasses.replace(config, remat="some")
    with pytest.raises(ValueError, match="dtype must be a float dtype"):
        dataclasses.replace(config, dtype="int32")


@pytest.mark.parametrize("preset", sorted(mmdit.MMDIT_PRESETS))
def test_presets_are_valid_diffusers_configs(preset):
    """diffusers builds each preset (on the meta device), and its own config maps back to ours."""
    with torch.device("meta"):
        reference = SD3Transformer2DModel(**mmdit.MMDIT_PRESETS[preset])
    config = mmdit.mmdit_config(preset, remat="full")
    assert mmdit.config_from_diffusers(dict(reference.config), remat="full") == config
    assert config.inner_dim == 1536 and config.num_layers == 24 and config.remat == "full"
    assert (len(config.dual_attention_layers), config.qk_norm, config.pos_embed_max_size) == {
        "sd3_medium": (0, None, 192),
        "sd35_medium": (13, "rms_norm", 384),
    }[preset]
    with pytest.raises(ValueError, match="unknown MMDiT preset"):
        mmdit.mmdit_config("sd4")


EXPECTED_AXES = {
    "pos_embed.proj.kernel": (None, None, "patch", "embed"),
    "pos_embed.pos_embed": (None, None, "embed"),
    "time_text_embed.timestep_embedder.linear_1.kernel": ("freq", "mlp"),
    "time_text_embed.text_embedder.linear_1.kernel": ("pooled", "mlp"),
    "time_text_embed.text_embedder.linear_2.kernel": ("mlp", "embed"),
    "context_embedder.kernel": ("text_embed", "embed"),
    "transformer_blocks.0.norm1.linear.kernel": ("embed", "adaln"),
    "transformer_blocks.0.attn.to_q.kernel": ("embed", "heads"),
    "transformer_blocks.0.attn.add_v_proj.kernel": ("embed", "heads"),
    "transformer_blocks.0.attn.to_add_out.kernel": ("heads", "embed"),
    "transformer_blocks.0.attn.norm_added_k.scale": ("norm",),
    "transformer_blocks.0.attn2.to_out.kernel": ("heads", "embed"),
    "transformer_blocks.0.ff_context.fc1.kernel": ("embed", "mlp"),
    "transformer_blocks.2.ff.fc2.kernel": ("mlp", "embed"),
    "proj_out.kernel": ("embed", "patch"),
}


def test_every_variable_has_logical_axis_names():
    config = mmdit.config_from_diffusers(SD35_TINY)
    abstract = nnx.state(nnx.eval_shape(lambda: mmdit.MMDiT(config, rngs=nnx.Rngs(0))))
    found = {}
    for path, var in nnx.to_flat_state(abstract):
        name, axes = ".".join(map(str, path)), var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.shape), name
        named = [a for a in axes if a is not None]
        assert set(named) <= set(mmdit.LOGICAL_AXES) and len(set(named)) == len(named), (name, axes)
        found[name] = tuple(axes)
    assert {k: found[k] for k in EXPECTED_AXES} == EXPECTED_AXES
    # Only the positional table is not a parameter.
    assert [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(abstract, mmdit.Buffer))] == ["pos_embed.pos_embed"]


def test_forward_flops_matches_xla():
    config = mmdit.config_from_diffusers(
        {**SD35_TINY, "attention_head_dim": 32, "num_attention_heads": 4, "caption_projection_dim": 128,
         "pos_embed_max_size": 16, "joint_attention_dim": 64, "pooled_projection_dim": 64}
    )
    size, text_len = 16, 8
    graphdef, state = nnx.split(nnx.eval_shape(lambda: mmdit.MMDiT(config, rngs=nnx.Rngs(0))))
    x = jnp.zeros((B, size, size, 4))
    cond = {"text": jnp.zeros((B, text_len, 64)), "pooled": jnp.zeros((B, 64))}
    xla = xla_flops(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c), state, x, jnp.zeros(B), cond)
    ours = mmdit.forward_flops(config, B, size, text_len)
    assert abs(ours - xla) / xla < 0.15, (ours, xla)
    assert ours > mmdit.forward_flops(dataclasses.replace(config, dual_attention_layers=()), B, size, text_len)


def test_remat_changes_memory_not_math_and_buffer_gets_no_gradient(sd3_saved):
    _, folder = sd3_saved
    x, t, cond = make_inputs()

    def loss_and_grads(remat):
        graphdef, state = nnx.split(mmdit.load_mmdit(folder, remat=remat))
        loss = lambda s: jnp.mean(jnp.square(nnx.merge(graphdef, s)(x, t, cond)))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(state), str(jax.make_jaxpr(jax.grad(loss))(state))

    (plain_loss, plain_grads), plain_jaxpr = loss_and_grads("none")
    (loss, grads), jaxpr = loss_and_grads("full")
    assert float(plain_loss) > 0 and abs(float(loss) - float(plain_loss)) <= 1e-6 * float(plain_loss)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert "remat" in jaxpr and "remat" not in plain_jaxpr
    assert not np.any(np.asarray(grads["pos_embed"]["pos_embed"][...]))
    assert np.abs(np.asarray(grads["proj_out"]["kernel"][...])).max() > 0


RULES = parallel.axis_rules(base_config().logical_axis_rules, mmdit.LOGICAL_AXES)


def test_activation_constraints_are_no_ops_without_a_mesh(sd35_saved):
    """Rules active, no mesh (one device): the same program and output as without rules."""
    graphdef, state = nnx.split(mmdit.load_mmdit(sd35_saved[1]))
    x, t, cond = make_inputs()
    forward = lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c)  # noqa: E731
    plain = jax.jit(forward).lower(state, x, t, cond).as_text()
    with nnx.logical_axis_rules(RULES):
        ruled = jax.jit(forward).lower(state, x, t, cond).as_text()
        v = np.asarray(jax.jit(forward)(state, x, t, cond))
    assert "sharding_constraint" not in ruled and ruled == plain
    np.testing.assert_array_equal(v, jitted_velocity(nnx.merge(graphdef, state), x, t, cond))


# SD35_TINY on a data=2 x fsdp=2 x tensor=2 mesh of 8 forced CPU devices, the default rules
# (activation_batch -> (data, fsdp), activation_heads/mlp -> tensor): prints the constraint layouts
# of the lowered forward with their counts, and the largest difference to the unsharded output.
SHARDED_FORWARD = textwrap.dedent(
    r"""
    import collections, json, re, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from danceopd_jax import parallel
    from danceopd_jax.config_lib import base_config
    from danceopd_jax.models import mmdit

    config = mmdit.config_from_diffusers(json.loads(sys.argv[1]))
    rules = parallel.axis_rules(base_config().logical_axis_rules, mmdit.LOGICAL_AXES)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    make = lambda: mmdit.MMDiT(config, rngs=nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(0), 4)
    x, t = jax.random.normal(keys[0], (4, 8, 6, 4)), jnp.linspace(0.1, 0.9, 4)
    cond = {"text": jax.random.normal(keys[1], (4, 5, 12)), "pooled": jax.random.normal(keys[2], (4, 10))}
    graphdef, state, _ = parallel.create_sharded_state(make, mesh, rules)
    forward = lambda: jax.jit(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c))
    reference = np.asarray(forward()(jax.device_get(state), x, t, cond))  # one device, no mesh
    x, t, cond = jax.device_put((x, t, cond), parallel.batch_sharding(mesh))
    with parallel.sharding_context(mesh, rules):
        sharded = forward()
        text = sharded.lower(state, x, t, cond).as_text()
        v = np.asarray(sharded(state, x, t, cond))
    layouts = re.findall(r"sdy\.sharding_constraint %\S+ <@mesh, (\[.*?\])>", text)
    print(json.dumps({"constraints": collections.Counter(layouts), "max_abs": float(np.abs(reference).max()),
                      "max_diff": float(np.abs(v - reference).max())}))
    """
)


def test_activation_constraints_on_a_multi_device_mesh():
    """Both token streams after every residual update and at entry (TOKENS), each stream's q/k/v
    (HEADS) and the MLP hiddens (MLP_HIDDEN) are pinned; the sharded forward equals the unsharded
    one to 1e-5 (float32, other reduction orders)."""
    env = cpu_devices_env(8)
    command = [sys.executable, "-c", SHARDED_FORWARD, json.dumps(SD35_TINY)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # SD35_TINY: block 0 dual, block 1 plain, block 2 dual and context_pre_only (no text q, text
    # stream ends). Tokens: 2 at entry + image (3 + 2 + 3) + text (2 + 2). q/k/v: joint (6 + 6 + 5)
    # + attn2 (3 + 3). MLP hiddens: ff and ff_context (2 + 2 + 1).
    tokens, heads, mlp = '[{"data", "fsdp"}, {}, {}]', '[{"data", "fsdp"}, {}, {"tensor"}, {}]', '[{"data", "fsdp"}, {}, {"tensor"}]'
    assert result["constraints"] == {tokens: 14, heads: 23, mlp: 5}
    assert result["max_abs"] > 0.1 and result["max_diff"] <= 1e-5
