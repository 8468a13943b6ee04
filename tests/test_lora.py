"""Tests for danceopd_jax.models.lora: adapters on a tiny DiT, then SD3 parity with diffusers + PEFT."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from flax import nnx
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from danceopd_jax.build import StudentApply
from danceopd_jax.models import lora, mmdit
from danceopd_jax.models.dit import DiT, dit_config
from danceopd_jax.models.lora import LoRALinear, LoRAParam, add_lora, load_lora_deltas, lora_split, merge_lora, read_lora
from danceopd_jax.models.weights import (
    TensorSource,
    WeightsError,
    WeightsMismatch,
    load_module,
    open_safetensors,
    param_shapes,
    write_safetensors,
)

from conftest import SD35_TINY, diffusers_velocity, jaxpr_equations, randomise_adapters

B = 2
CFG = dit_config("tiny", image_size=8, channels=3, num_classes=4, zero_init=False)
PAPER_TARGETS = ("q", "k", "v", "out", "fc1", "fc2")  # attention q, k, v, out and the MLP


def make_dit(cfg=CFG):
    return DiT(cfg, rngs=nnx.Rngs(0))


def dit_names(cfg=CFG) -> dict[str, str]:
    """A torch-style weights table for the DiT: ``X.kernel -> X.weight``, other leaves as named."""
    paths = param_shapes(nnx.state(nnx.eval_shape(lambda: make_dit(cfg))))
    return {p: p.removesuffix(".kernel") + ".weight" if p.endswith(".kernel") else p for p in paths}


def inputs(cfg=CFG, seed=0):
    ks = jax.random.split(jax.random.key(seed), 2)
    x = jax.random.normal(ks[0], (B, cfg.image_size, cfg.image_size, cfg.channels))
    return x, jax.random.uniform(ks[1], (B,)), {"label": jnp.array([1, 3], jnp.int32)}


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x, t, cond):
    return nnx.merge(graphdef, state)(x, t, cond)


def forward(model, x, t, cond):
    """The model's output, compiled once per model structure (eager dispatch is slower here)."""
    return _forward(*nnx.split(model), x, t, cond)


def max_diff(a, b):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def nbytes(state) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(state))


# ------------------------------------------------------------------------------------------
# Adapters on the DiT
# ------------------------------------------------------------------------------------------


def test_fresh_adapter_is_the_identity_and_annotated():
    model = make_dit()
    x, t, cond = inputs()
    before = forward(model, x, t, cond)
    add_lora(model, rank=4, alpha=8, targets=PAPER_TARGETS, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(forward(model, x, t, cond), before)
    q = model.blocks[0].q
    assert isinstance(q, LoRALinear) and (q.rank, q.scale) == (4, 2.0)
    assert q.lora_a.shape == (32, 4) and q.lora_b.shape == (4, 32)
    assert float(jnp.abs(q.lora_a[...]).max()) > 0 and not jnp.any(q.lora_b[...])
    assert float(jnp.abs(q.lora_a[...]).max()) <= 1 / np.sqrt(32)  # PEFT's kaiming-uniform bound
    assert q.lora_a.get_metadata()["out_sharding"] == ("embed", "lora_rank")
    assert q.lora_b.get_metadata()["out_sharding"] == ("lora_rank", "heads")
    assert model.blocks[1].fc2.lora_a.get_metadata()["out_sharding"] == ("mlp", "lora_rank")


def test_add_lora_targets_plain_names_and_regexes():
    model = make_dit()
    kernel = model.blocks[0].q.kernel
    wrapped = add_lora(model, rank=2, alpha=2, targets=PAPER_TARGETS, rngs=nnx.Rngs(1))
    assert sorted(wrapped) == sorted(f"blocks.{i}.{n}" for i in range(CFG.depth) for n in PAPER_TARGETS)
    assert model.blocks[0].q.kernel is kernel  # the base variable itself, not a copy
    assert not isinstance(model.blocks[0].modulation, LoRALinear) and not isinstance(model.patch_embed, LoRALinear)
    graphdef, adapters, base = lora_split(model)
    assert set(param_shapes(base)) == set(param_shapes(nnx.state(make_dit())))  # base paths as in the plain model
    assert {p.rsplit(".", 1)[-1] for p in param_shapes(adapters)} == {"lora_a", "lora_b"}

    other = make_dit()
    assert add_lora(other, rank=2, alpha=2, targets=[r"blocks\.0\.(q|k)", r".*\.fc2"], rngs=nnx.Rngs(1)) == [
        "blocks.0.fc2",
        "blocks.0.k",
        "blocks.0.q",
        "blocks.1.fc2",
    ]


def test_add_lora_rejects_unknown_targets_and_double_adapters():
    model = make_dit()
    with pytest.raises(ValueError, match=r"unknown LoRA target 'to_q'.*fc1.*modulation"):
        add_lora(model, rank=2, alpha=2, targets=["q", "to_q"], rngs=nnx.Rngs(1))
    assert not isinstance(model.blocks[0].q, LoRALinear)  # nothing done on error
    with pytest.raises(ValueError, match="unknown LoRA target 'blocks'"):  # a module, not a linear layer
        add_lora(model, rank=2, alpha=2, targets=["blocks"], rngs=nnx.Rngs(1))
    add_lora(model, rank=2, alpha=2, targets=["q"], rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="blocks.0.q already has a LoRA adapter"):
        add_lora(model, rank=2, alpha=2, targets=["q"], rngs=nnx.Rngs(1))


def test_training_moves_only_the_adapters():
    """Gradients of a quadratic loss reach only LoRA factors (A's is zero while B = 0), and a
    few Adam steps on ``lora_state`` leave the frozen base state bit-identical."""
    model = make_dit()
    add_lora(model, rank=4, alpha=4, targets=PAPER_TARGETS, rngs=nnx.Rngs(1))
    graphdef, adapters, base = lora_split(model)
    x, t, cond = inputs()
    target = jax.random.normal(jax.random.key(5), x.shape)

    def loss_fn(adapters, base):
        return jnp.mean((nnx.merge(graphdef, adapters, base)(x, t, cond) - target) ** 2)

    grads = jax.jit(jax.grad(loss_fn))(adapters, base)
    assert {type(g) for _, g in nnx.to_flat_state(grads)} == {LoRAParam}
    assert set(param_shapes(grads)) == set(param_shapes(adapters)) and len(param_shapes(grads)) == 2 * len(PAPER_TARGETS) * CFG.depth
    a_grads = [g for p, g in nnx.to_flat_state(grads) if p[-1] == "lora_a"]
    b_grads = [g for p, g in nnx.to_flat_state(grads) if p[-1] == "lora_b"]
    assert not any(jnp.any(g[...]) for g in a_grads) and all(jnp.any(g[...]) for g in b_grads)

    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(adapters, opt_state, base):
        loss, grads = jax.value_and_grad(loss_fn)(adapters, base)
        updates, opt_state = optimizer.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    base_before = jax.tree.map(np.asarray, base)
    trained, opt_state, losses = adapters, optimizer.init(adapters), []
    for _ in range(5):
        trained, opt_state, loss = step(trained, opt_state, base)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, base, base_before)
    changed = [max_diff(a[...], b[...]) for (_, a), (_, b) in zip(nnx.to_flat_state(adapters), nnx.to_flat_state(trained))]
    assert min(changed) > 0


def test_merged_weights_match_the_adapted_model():
    plain = make_dit()
    model = make_dit()
    add_lora(model, rank=4, alpha=16, targets=PAPER_TARGETS, rngs=nnx.Rngs(1))
    randomise_adapters(model)
    x, t, cond = inputs()
    adapted = forward(model, x, t, cond)
    assert max_diff(adapted, forward(plain, x, t, cond)) > 1e-2  # the adapters matter
    merged = merge_lora(model)
    assert set(param_shapes(merged)) == set(param_shapes(nnx.state(plain)))
    nnx.update(plain, merged)
    assert max_diff(forward(plain, x, t, cond), adapted) <= 1e-5


def _dot_generals(jaxpr) -> int:
    """Matrix products in a jaxpr, counted through nested jaxprs (jit, remat)."""
    return sum(eqn.primitive.name == "dot_general" for eqn, _ in jaxpr_equations(jaxpr))


def test_rollout_student_folds_adapters_once_and_gives_the_same_field():
    """``StudentApply.frozen_field`` (the student in the rollout loop) folds each adapter into its
    kernel once: two calls run 3 x adapters fewer matrix products than the adapted model (one fold
    product each, then one product per call instead of three), with the same velocity."""
    model = make_dit()
    add_lora(model, rank=4, alpha=16, targets=PAPER_TARGETS, rngs=nnx.Rngs(1))
    randomise_adapters(model)
    adapters = len([m for _, m in nnx.iter_graph(model) if isinstance(m, LoRALinear)])
    graphdef, params = nnx.split(model)
    apply = StudentApply(graphdef)
    x, t, cond = inputs()

    def twice(field_of):  # a field built once from the params, then called twice (as in a loop)
        def run(p):
            field = field_of(p)
            return field(x, t, cond) + field(x, t, cond)

        return run

    unfolded = twice(lambda p: functools.partial(apply, p))
    folded = twice(apply.frozen_field)
    counts = [_dot_generals(jax.make_jaxpr(fn)(params).jaxpr) for fn in (unfolded, folded)]
    assert adapters == 6 * CFG.depth and counts[0] - counts[1] == 3 * adapters, counts
    assert max_diff(jax.jit(folded)(params), jax.jit(unfolded)(params)) <= 1e-5
    assert set(param_shapes(nnx.state(lora.folded(model)))) == set(param_shapes(nnx.state(make_dit())))
    assert len([m for _, m in nnx.iter_graph(model) if isinstance(m, LoRALinear)]) == adapters  # the model keeps its adapters


def test_bfloat16_compute_matches_float32():
    """Adapters run in the compute dtype: bf16 vs f32 output within 5e-2 (bf16 has 8 mantissa bits)."""
    outputs = []
    for dtype in ("float32", "bfloat16"):
        model = make_dit(dit_config("tiny", image_size=8, channels=3, num_classes=4, zero_init=False, dtype=dtype))
        add_lora(model, rank=4, alpha=16, targets=PAPER_TARGETS, rngs=nnx.Rngs(1))
        randomise_adapters(model)
        outputs.append(forward(model, *inputs()))
    assert outputs[1].dtype == jnp.float32
    assert max_diff(*outputs) <= 5e-2


# ------------------------------------------------------------------------------------------
# Teachers as deltas, checkpoints, export
# ------------------------------------------------------------------------------------------


def lora_teacher(targets, rank, alpha, seed):
    model = make_dit()
    add_lora(model, rank=rank, alpha=alpha, targets=targets, rngs=nnx.Rngs(seed))
    randomise_adapters(model, seed=seed)
    return model


def test_teachers_are_one_base_plus_small_deltas(tmp_path):
    base_model = make_dit()
    names = dit_names()
    teachers = [lora_teacher(PAPER_TARGETS, 4, 8, seed=1), lora_teacher(["q", "v"], 2, 1.0, seed=2)]
    base_state = nnx.state(base_model)
    x, t, cond = inputs()
    delta_bytes = []
    for i, teacher in enumerate(teachers):
        path = str(tmp_path / f"teacher{i}.safetensors")
        lora.export_lora(teacher, names, path)
        graphdef, delta = load_lora_deltas(base_model, names, *read_lora(path))
        assert {type(v) for _, v in nnx.to_flat_state(delta)} == {LoRAParam}
        rebuilt = nnx.merge(graphdef, base_state, delta)
        assert max_diff(forward(rebuilt, x, t, cond), forward(teacher, x, t, cond)) <= 1e-6
        assert rebuilt.blocks[0].q.kernel[...] is base_model.blocks[0].q.kernel[...]  # shared buffer
        assert rebuilt.blocks[1].fc1.kernel[...] is base_model.blocks[1].fc1.kernel[...]
        delta_bytes.append(nbytes(delta))
    d, m = CFG.hidden_size, CFG.mlp_hidden
    per_block = [4 * (4 * 4 * (d + d) + 2 * 4 * (d + m)), 4 * 2 * 2 * (d + d)]  # float32 r * (in + out) per layer
    assert delta_bytes == [CFG.depth * b for b in per_block]
    assert max(delta_bytes) < 0.1 * nbytes(base_state)  # M teachers: one base + M deltas under 10% of it each
    assert isinstance(base_model.blocks[0].q, nnx.Linear) and not isinstance(base_model.blocks[0].q, LoRALinear)


def test_export_lora_round_trip(tmp_path):
    model = lora_teacher(PAPER_TARGETS, 4, 8, seed=3)
    path = str(tmp_path / "pytorch_lora_weights.safetensors")
    lora.export_lora(model, dit_names(), path)
    stored = open_safetensors(path)
    np.testing.assert_array_equal(stored["transformer.blocks.1.fc2.lora_A.weight"], np.asarray(model.blocks[1].fc2.lora_a[...]).T)
    np.testing.assert_array_equal(stored["transformer.blocks.1.fc2.lora_B.weight"], np.asarray(model.blocks[1].fc2.lora_b[...]).T)
    with safe_open(path, "np") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (metadata["transformer.r"], metadata["transformer.lora_alpha"]) == (4, 8)
    assert "transformer.blocks.0.q" not in metadata["transformer.target_modules"]  # module names, unprefixed
    assert "blocks.0.q" in metadata["transformer.target_modules"]
    tensors, alphas = read_lora(path)
    assert set(alphas.values()) == {8} and len(tensors) == 2 * len(alphas) == 2 * 6 * CFG.depth


def write_peft_folder(folder, adapters, config):
    """A PEFT ``save_pretrained`` folder: prefixed keys plus ``adapter_config.json``."""
    folder.mkdir()
    write_safetensors(str(folder / "adapter_model.safetensors"), {f"base_model.model.{k}": v for k, v in adapters.items()})
    (folder / "adapter_config.json").write_text(json.dumps(config))


def test_read_lora_naming_variants(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 32)).astype(np.float32), rng.normal(size=(32, 4)).astype(np.float32)
    factors = {"blocks.0.q.lora_A.weight": a, "blocks.0.q.lora_B.weight": b, "blocks.1.k.lora_A.weight": a, "blocks.1.k.lora_B.weight": b}

    write_peft_folder(tmp_path / "peft", factors, {"r": 4, "lora_alpha": 16, "alpha_pattern": {"1.k": 2}})
    tensors, alphas = read_lora(str(tmp_path / "peft"))
    assert set(tensors) == set(factors) and alphas == {"blocks.0.q": 16, "blocks.1.k": 2}
    np.testing.assert_array_equal(tensors["blocks.0.q.lora_A.weight"], a)
    assert read_lora(str(tmp_path / "peft" / "adapter_model.safetensors"))[1] == alphas  # the folder's weights file
    write_safetensors(str(tmp_path / "peft" / "other.safetensors"), factors)  # another adapter beside it
    assert read_lora(str(tmp_path / "peft" / "other.safetensors"))[1] == {}  # its config is not this file's: alpha = rank

    live = {k.replace(".weight", ".default.weight"): v for k, v in factors.items()}  # a live PEFT state dict
    write_safetensors(str(tmp_path / "live.safetensors"), {**live, "blocks.1.k.alpha": np.float32(3.0)})
    tensors, alphas = read_lora(str(tmp_path / "live.safetensors"))
    assert set(tensors) == set(factors) and alphas == {"blocks.1.k": 3.0}  # blocks.0.q: alpha = rank

    base_model = make_dit()
    graphdef, delta = load_lora_deltas(base_model, dit_names(), tensors, alphas)
    teacher = nnx.merge(graphdef, nnx.state(base_model), delta)
    assert (teacher.blocks[0].q.scale, teacher.blocks[1].k.scale) == (1.0, 0.75)
    np.testing.assert_array_equal(teacher.blocks[1].k.lora_b[...], b.T)

    write_safetensors(str(tmp_path / "dora.safetensors"), {**factors, "blocks.0.q.lora_magnitude_vector": b[:, 0]})
    with pytest.raises(WeightsMismatch, match="blocks.0.q.lora_magnitude_vector"):
        read_lora(str(tmp_path / "dora.safetensors"))
    write_peft_folder(tmp_path / "rslora", factors, {"r": 4, "lora_alpha": 4, "use_rslora": True})
    with pytest.raises(WeightsError, match="use_rslora"):
        read_lora(str(tmp_path / "rslora"))


def test_load_lora_deltas_reports_what_does_not_fit():
    rng = np.random.default_rng(0)
    factor = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    tensors = TensorSource.from_dict(
        {
            "blocks.0.to_q.lora_A.weight": factor(4, 32),  # no such module
            "blocks.0.to_q.lora_B.weight": factor(32, 4),
            "blocks.0.q.lora_A.weight": factor(4, 33),  # in-features 32
            "blocks.0.q.lora_B.weight": factor(32, 4),
            "blocks.1.v.lora_A.weight": factor(4, 32),  # B missing
        },
        where="bad.safetensors",
    )
    with pytest.raises(WeightsMismatch) as error:
        load_lora_deltas(make_dit(), dit_names(), tensors)
    message = str(error.value)
    assert "bad.safetensors" in message and "1 unknown modules: blocks.0.to_q" in message
    assert "1 missing: blocks.1.v.lora_B.weight" in message and "blocks.0.q A [4, 33]" in message


def test_export_merged_loads_as_the_plain_model(tmp_path):
    model = lora_teacher(PAPER_TARGETS, 4, 8, seed=4)
    names = dit_names()
    path = str(tmp_path / "diffusion_pytorch_model.safetensors")
    lora.export_merged(model, names, path)
    stored = open_safetensors(path)
    assert set(stored) == set(names.values())
    plain = load_module(make_dit, stored, names)
    x, t, cond = inputs()
    assert max_diff(forward(plain, x, t, cond), forward(model, x, t, cond)) <= 1e-5
    with pytest.raises(WeightsMismatch, match="blocks.0.q.kernel"):
        lora.export_merged(model, {k: v for k, v in names.items() if k != "blocks.0.q.kernel"}, path)


# ------------------------------------------------------------------------------------------
# SD3 (MMDiT) against diffusers + PEFT
# ------------------------------------------------------------------------------------------

# SD3.5-style tiny transformer: MMDiT-X attn2 in block 0, RMS qk-norm, context_pre_only last block.
SD3_TINY = {**SD35_TINY, "num_layers": 2, "dual_attention_layers": (0,)}
# Attention q, k, v, out of both streams and both MLPs, in NNX names (``to_out`` is torch ``to_out.0``).
SD3_TARGETS = ("to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "fc1", "fc2")
H, W, L = 8, 6, 5


@pytest.fixture(scope="module")
def sd3_base(tmp_path_factory):
    """A random diffusers transformer saved with ``save_pretrained``: (folder, config, names)."""
    folder = tmp_path_factory.mktemp("sd3") / "transformer"
    torch.manual_seed(0)
    reference = SD3Transformer2DModel(**SD3_TINY).eval()
    with torch.no_grad():
        for p in reference.parameters():
            torch.nn.init.normal_(p, std=0.2)
    reference.save_pretrained(folder)
    config = mmdit.config_from_diffusers(json.loads((folder / "config.json").read_text()))
    return folder, config, mmdit.torch_names(config)


def sd3_inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, H, W, 4)).astype(np.float32)
    cond = {"text": rng.standard_normal((B, L, 12)).astype(np.float32), "pooled": rng.standard_normal((B, 10)).astype(np.float32)}
    return x, np.array([0.3, 0.9], np.float32), cond



def torch_reference(folder) -> SD3Transformer2DModel:
    return SD3Transformer2DModel.from_pretrained(folder).eval()


PEFT_CONFIG = dict(
    r=4,
    lora_alpha=8,
    rank_pattern={"to_v": 2},
    alpha_pattern={"to_k": 2},
    target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_k_proj"],
    init_lora_weights=False,  # random B: the adapter changes the output
)


def adapted_reference(folder, layout: str, adapter_folder) -> SD3Transformer2DModel:
    """diffusers' transformer with a random PEFT LoRA, saved to ``adapter_folder`` as diffusers'
    model / pipeline methods or PEFT's ``save_pretrained`` write it."""
    reference = torch_reference(folder)
    torch.manual_seed(1)
    config = peft.LoraConfig(**PEFT_CONFIG)
    if layout == "peft_folder":  # "base_model.model." keys, adapter_config.json beside them
        peft.get_peft_model(reference, config).save_pretrained(adapter_folder)  # adapts reference in place
        return reference
    reference.add_adapter(config)
    if layout == "diffusers_model":  # save_lora_adapter: unprefixed keys, the LoraConfig in the metadata
        reference.save_lora_adapter(adapter_folder)
    else:  # the pipeline's save_lora_weights: "transformer." keys and metadata
        StableDiffusion3Pipeline.save_lora_weights(
            adapter_folder,
            transformer_lora_layers=get_peft_model_state_dict(reference),
            transformer_lora_adapter_metadata=config.to_dict(),
        )
    return reference


@pytest.mark.parametrize("layout", ["diffusers_model", "diffusers_pipeline", "peft_folder"])
def test_sd3_peft_adapter_as_a_teacher_delta(sd3_base, tmp_path, layout):
    """(a) A PEFT LoRA (ranks 4 and 2, alphas 8 and 2) on diffusers' transformer, loaded as a delta
    over our base from ``save_pretrained``: same velocity as torch with the adapter, 1e-4."""
    folder, config, names = sd3_base
    reference = adapted_reference(folder, layout, tmp_path / "adapter")
    x, t, cond = sd3_inputs()
    expected = diffusers_velocity(reference, x, t, cond)

    base = mmdit.load_mmdit(str(folder))
    graphdef, delta = load_lora_deltas(base, names, *read_lora(str(tmp_path / "adapter")))
    teacher = nnx.merge(graphdef, nnx.state(base), delta)
    attn = teacher.transformer_blocks[0].attn
    assert (attn.to_q.rank, attn.to_q.scale, attn.to_k.scale, attn.to_v.rank, attn.to_v.scale) == (4, 2.0, 0.5, 2, 4.0)
    assert max_diff(expected, forward(base, x, t, cond)) > 1e-2  # the adapter matters
    assert max_diff(forward(teacher, x, t, cond), expected) <= 1e-4


def sd3_student(folder):
    """Our base with adapters of two ranks and alphas, randomised as if trained."""
    student = mmdit.load_mmdit(str(folder))
    add_lora(student, rank=4, alpha=8, targets=SD3_TARGETS[:8], rngs=nnx.Rngs(1))
    add_lora(student, rank=2, alpha=1, targets=SD3_TARGETS[8:], rngs=nnx.Rngs(2))
    randomise_adapters(student, std=0.2)
    return student


@pytest.mark.parametrize("loader", ["load_lora_adapter", "load_lora_into_transformer"])
def test_sd3_exported_student_loads_in_diffusers(sd3_base, tmp_path, loader):
    """(b) ``export_lora`` output loads in diffusers (the model's ``load_lora_adapter``, and the
    pipeline's ``load_lora_weights`` path: ``lora_state_dict`` + ``load_lora_into_transformer``)
    and reproduces our student, 1e-4."""
    folder, config, names = sd3_base
    student = sd3_student(folder)
    lora.export_lora(student, names, str(tmp_path / "pytorch_lora_weights.safetensors"))
    reference = torch_reference(folder)
    if loader == "load_lora_adapter":
        reference.load_lora_adapter(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    else:
        state_dict, metadata = StableDiffusion3Pipeline.lora_state_dict(str(tmp_path), return_lora_metadata=True)
        StableDiffusion3Pipeline.load_lora_into_transformer(state_dict, transformer=reference, metadata=metadata)
    adapted = [n for n, m in reference.named_modules() if hasattr(m, "lora_A")]
    assert len(adapted) == len(nnx.to_flat_state(lora_split(student)[1])) // 2 == 25  # 2 blocks, attn2, ff_context
    x, t, cond = sd3_inputs()
    ours = forward(student, x, t, cond)
    assert max_diff(ours, forward(mmdit.load_mmdit(str(folder)), x, t, cond)) > 1e-2
    assert max_diff(diffusers_velocity(reference, x, t, cond), ours) <= 1e-4


def test_sd3_export_merged_is_a_diffusers_transformer(sd3_base, tmp_path):
    """(c) ``export_merged`` writes a complete diffusers state dict (strict load) that matches, 1e-4."""
    folder, config, names = sd3_base
    student = sd3_student(folder)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    lora.export_merged(student, names, str(path))
    reference = torch_reference(folder)
    reference.load_state_dict(load_file(path), strict=True)
    x, t, cond = sd3_inputs()
    assert max_diff(diffusers_velocity(reference, x, t, cond), forward(student, x, t, cond)) <= 1e-4
