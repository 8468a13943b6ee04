"""benchmarks/model_memory.py on a tiny MMDiT: its counts agree with a direct count of a built
model, with r (in + out) per adapted layer, with its closed form and with PEFT on diffusers'
model; its memory formulas give the hand-computed bytes; the document renders."""

import pathlib
import re

import numpy as np
import pytest
from flax import nnx

from danceopd_jax.models.lora import LoRAParam, add_lora, target_matches
from danceopd_jax.models.mmdit import MMDiT, MMDiTConfig, Buffer, param_count

from conftest import SD35_TINY, load_benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]
RANK = 3

# Dual attention in the last (context_pre_only) block too, RMS qk-norm: every kind of block.
TINY = MMDiTConfig(**{**SD35_TINY, "pos_embed_max_size": 8})


mm = load_benchmark("model_memory")


def _elements(state) -> int:
    return sum(int(np.prod(leaf.shape)) for _, leaf in nnx.to_flat_state(state))


@pytest.fixture(scope="module")
def sizes():
    return mm.transformer_sizes(TINY, RANK)


def _tiny_model() -> MMDiT:
    """``MMDiT(TINY)`` built abstractly (shapes only: compiling its initialisers would take seconds)."""
    return nnx.eval_shape(lambda: MMDiT(TINY, rngs=nnx.Rngs(0)))


def test_counts_match_a_direct_count(sizes):
    plain = _tiny_model()
    assert sizes.params == _elements(nnx.state(plain, nnx.Param)) == param_count(TINY)
    assert sizes.buffer == _elements(nnx.state(plain, Buffer)) == TINY.pos_embed_max_size**2 * TINY.inner_dim

    def adapted() -> MMDiT:
        model = MMDiT(TINY, rngs=nnx.Rngs(0))
        add_lora(model, rank=RANK, alpha=RANK, targets=mm.LORA_TARGETS, rngs=nnx.Rngs(1))
        return model

    _, lora, rest = nnx.split(nnx.eval_shape(adapted), LoRAParam, ...)
    assert sizes.lora == _elements(lora)
    assert _elements(rest) == sizes.params + sizes.buffer  # the adapters adopt the base, add nothing else


def test_lora_count_is_r_in_plus_out_per_layer_and_the_closed_form(sizes):
    model = _tiny_model()
    linears = {".".join(map(str, p)): m for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Linear)}
    targeted = {p: m for p, m in linears.items() if any(target_matches(t, p) for t in mm.LORA_TARGETS)}
    assert sum(RANK * (m.in_features + m.out_features) for m in targeted.values()) == sizes.lora
    assert sizes.lora == mm.lora_count_formula(TINY, RANK)
    # Exactly the attention projections and MLP layers of the blocks are adapted.
    in_blocks = {p for p in linears if re.fullmatch(r"transformer_blocks\.\d+\.(attn2?|ff|ff_context)\..+", p)}
    assert set(targeted) == in_blocks == set(sizes.adapted)
    # 8 projections + 4 MLP layers per block; the last block 7 + 2; attn2 4 more.
    assert len(targeted) == 12 * (TINY.num_layers - 1) + 9 + 4 * len(TINY.dual_attention_layers)


def test_counts_match_diffusers_with_peft(sizes):
    """The same config in diffusers (parameters, buffer) with PEFT LoRA on the diffusers names of LORA_TARGETS."""
    torch = pytest.importorskip("torch")
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig

    fields = ("sample_size", "patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
              "num_attention_heads", "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim",
              "pos_embed_max_size", "qk_norm")  # fmt: skip
    with torch.device("meta"):
        reference = SD3Transformer2DModel(
            **{f: getattr(TINY, f) for f in fields}, dual_attention_layers=list(TINY.dual_attention_layers)
        )
        assert sum(p.numel() for p in reference.parameters()) == sizes.params
        assert sum(b.numel() for b in reference.buffers()) == sizes.buffer
        torch_targets = [{"to_out": "to_out.0", "fc1": "net.0.proj", "fc2": "net.2"}.get(t, t) for t in mm.LORA_TARGETS]
        reference.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=torch_targets))
    lora = sum(p.numel() for name, p in reference.named_parameters() if "lora_" in name)
    assert lora == sizes.lora


def test_training_memory_formulas():
    fake = mm.TransformerSizes(params=10, buffer=2, lora=1, adapted=())
    totals = {s: {k: sum(b for _, _, b in items) for k, items in mm.training_memory(fake, s).items()} for s in (4, 2)}
    a, b, c = mm.training_memory(fake, 4)
    # A: 3 (P+T) s + P s + 8 P (+ 4 P master weights when s = 2)
    assert totals[4][a] == 3 * 12 * 4 + 10 * 4 + 80
    assert totals[2][a] == 3 * 12 * 2 + 10 * 2 + 80 + 40
    # B: 3 (P+T) s + 16 L;  C: (P+T) s + 16 L + 2 L s
    assert (totals[4][b], totals[2][b]) == (144 + 16, 72 + 16)
    assert (totals[4][c], totals[2][c]) == (48 + 16 + 8, 24 + 16 + 4)


def test_render_runs_on_the_tiny_config(sizes):
    document = mm.render({"tiny": (TINY, sizes)}, {"tiny encoder": 1000}, RANK, "python some command", "2000-01-02")
    assert "`python some command`" in document and "2000-01-02" in document
    assert f"| tiny | transformer (`nnx.Param`): P | {sizes.params:,} |" in document
    assert f"| tiny | LoRA r = {RANK} on {len(sizes.adapted)} layers: L | {sizes.lora:,} |" in document
    assert f"L = {sizes.lora:,}; counted: {sizes.lora:,}." in document
    assert document.count("**total**") == 3
    assert "| SD3 / SD3.5 (frozen) | tiny encoder | 1,000 |" in document


def test_render_names_the_settings_that_do_not_fit(sizes):
    huge = mm.TransformerSizes(params=10**10, buffer=0, lora=10**8, adapted=sizes.adapted)  # 40 GB per float32 copy
    document = mm.render({"huge": (TINY, huge)}, {}, RANK, "cmd", "2000-01-02")
    assert "exceed JAX's default share for A with s = 4, A with s = 2, B with s = 4" in document
    assert "the whole device for A with s = 4, A with s = 2, B with s = 4." in document


def test_zimage_counts_match_diffusers_and_transformers_and_the_section_renders():
    """Z-Image's P equals diffusers' parameter count and L is r (in + out) on the 7 targets of every block;
    the Qwen3 count equals transformers' ``Qwen3Model`` (the last layer and final norm included)."""
    import torch
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config as HFQwen3Config
    from transformers import Qwen3Model

    from danceopd_jax.models import zimage
    from danceopd_jax.models.qwen3 import Qwen3Config

    config = zimage.zimage_config("tiny")
    sizes = mm.zimage_sizes(config, RANK)
    with torch.device("meta"):
        reference = ZImageTransformer2DModel(**zimage.ZIMAGE_PRESETS["tiny"])
    assert sizes.params == sum(p.numel() for p in reference.parameters()) and sizes.buffer == 0
    blocks = config.n_layers + 2 * config.n_refiner_layers
    assert len(sizes.adapted) == 7 * blocks
    d, f = config.dim, int(config.dim / 3 * 8)
    assert sizes.lora == blocks * RANK * (4 * 2 * d + 2 * (d + f) + (f + d))  # q, k, v, out; w1, w3; w2

    qwen = dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8)  # fmt: skip
    with torch.device("meta"):
        hf = Qwen3Model(HFQwen3Config(**qwen, tie_word_embeddings=True))
    assert mm.qwen3_params(Qwen3Config(**qwen)) == sum(p.numel() for p in hf.parameters())

    section = mm.render_zimage(config, sizes, {"tiny encoder": 1000}, RANK)
    assert f"| transformer (`nnx.Param`): P | {sizes.params:,} |" in section
    assert f"| LoRA r = {RANK} on {7 * blocks} layers: L | {sizes.lora:,} |" in section
    assert "| tiny encoder (frozen) | 1,000 |" in section and section.count("**total**") == 3
