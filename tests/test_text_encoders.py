"""SD3's text encoders in JAX against PyTorch: CLIP and T5 parity with transformers, the tiny
tokenizer folders, and ``encode_prompts`` against diffusers' ``StableDiffusion3Pipeline.encode_prompt``.

Every reference is a tiny random model whose weights (norms included) are re-drawn away from
their initial values, saved with ``save_pretrained`` and read back by our loader.
"""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from danceopd_jax.models import clip, t5  # noqa: E402
from danceopd_jax.models.sd3_prompts import (  # noqa: E402
    encode_prompts,
    load_clip_encoder,
    load_sd3_text_encoders,
    load_t5_encoder,
)
from danceopd_jax.models.tiny_tokenizers import (  # noqa: E402
    clip_bpe,
    t5_unigram_vocab,
    write_clip_tokenizer,
    write_t5_tokenizer,
)
from danceopd_jax.models.weights import (  # noqa: E402
    WeightsMismatch,
    load_module,
    open_safetensors,
    write_safetensors,
)

WORDS = ["a", "red", "cat", "sits", "on", "the", "mat", "blue", "dog"]
PROMPTS = ["a red cat sits on the mat", "Blue dog!", "cat"]
CLIP_VOCAB = len(clip_bpe(WORDS)[0])  # <|startoftext|> = CLIP_VOCAB - 2, <|endoftext|> = CLIP_VOCAB - 1
T5_VOCAB = len(t5_unigram_vocab(WORDS))
TOL = 1e-4


def randomise(model, seed: int, std: float = 0.2):
    """Re-draw every parameter: norm weights 1 + N(0, std), everything else N(0, std)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_weight = "norm" in name and name.endswith("weight")
            p.copy_((1.0 if is_norm_weight else 0.0) + std * torch.randn_like(p))
    return model.eval()


def tiny_clip(folder, hidden_act="quick_gelu", eos_token_id=2, hidden_size=32, projection_dim=24, seed=0):
    """A random CLIP text tower over the tiny vocabulary plus two tokens added after <|endoftext|>."""
    config = transformers.CLIPTextConfig(
        vocab_size=CLIP_VOCAB + 2, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=3,
        num_attention_heads=4, projection_dim=projection_dim, max_position_embeddings=77, hidden_act=hidden_act,
        bos_token_id=CLIP_VOCAB - 2, eos_token_id=eos_token_id, pad_token_id=1,
    )
    model = randomise(transformers.CLIPTextModelWithProjection(config), seed)
    model.save_pretrained(folder)
    return model


def tiny_t5(folder, feed_forward_proj="gated-gelu", d_model=32, seed=0):
    config = transformers.T5Config(
        vocab_size=T5_VOCAB, d_model=d_model, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj=feed_forward_proj,
    )
    model = randomise(transformers.T5EncoderModel(config), seed)
    model.save_pretrained(folder)
    return model


def clip_inputs():
    """Two sequences: BOS, words, EOS, then padding (EOS ids, with a 0 attention mask from the
    second one); sequence 1 holds an added token whose id is above the EOS's."""
    rng = np.random.RandomState(0)
    ids = rng.randint(0, CLIP_VOCAB - 2, (2, 12))
    ids[:, 0] = CLIP_VOCAB - 2
    ids[0, 6:], ids[1, 11] = CLIP_VOCAB - 1, CLIP_VOCAB - 1
    ids[1, 3] = CLIP_VOCAB + 1
    mask = np.ones_like(ids)
    mask[0, 7:] = 0
    return ids, mask


def t5_inputs():
    rng = np.random.RandomState(1)
    ids = rng.randint(2, T5_VOCAB, (2, 20))
    ids[0, 12], ids[0, 13:], ids[1, 19] = 1, 0, 1  # </s>, then <pad>
    mask = (np.arange(20) < np.array([[13], [20]])).astype(np.int64)
    return ids, mask


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


@pytest.mark.parametrize("hidden_act, eos_token_id", [("quick_gelu", 2), ("gelu", CLIP_VOCAB - 1)])
def test_clip_matches_transformers(tmp_path, hidden_act, eos_token_id):
    """Every hidden state (embeddings + each layer), the final-normed state and the projected EOS
    state, with a padding mask. eos_token_id 2 pools at the argmax of the ids (the added token in
    sequence 1), another id at its first occurrence (sequence 0 repeats the EOS as padding)."""
    reference = tiny_clip(tmp_path, hidden_act, eos_token_id)
    ours = load_clip_encoder(str(tmp_path))
    ids, mask = clip_inputs()
    with torch.no_grad():
        expected = reference(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    out = ours(jnp.asarray(ids), jnp.asarray(mask))
    assert len(out.hidden_states) == len(expected.hidden_states) == 4
    for ref_h, our_h in zip(expected.hidden_states, out.hidden_states):
        assert max_diff(ref_h, our_h) <= TOL
    assert max_diff(expected.last_hidden_state, out.last_hidden_state) <= TOL
    assert out.text_embeds.shape == (2, 24)
    assert max_diff(expected.text_embeds, out.text_embeds) <= TOL


@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "relu"])
def test_t5_matches_transformers(tmp_path, feed_forward_proj):
    """T5 v1.1's gated-gelu FFN (original T5's relu too), relative position bias of the first layer
    shared by all, RMS norms; sequence 0 is padded and masked."""
    reference = tiny_t5(tmp_path, feed_forward_proj)
    ours = load_t5_encoder(str(tmp_path))
    ids, mask = t5_inputs()
    with torch.no_grad():
        expected = reference(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    out = ours(jnp.asarray(ids), jnp.asarray(mask))
    assert out.dtype == jnp.float32
    assert max_diff(expected, out) <= TOL
    unmasked = ours(jnp.asarray(ids))
    assert max_diff(out[0], unmasked[0]) > 1e-3  # the mask matters


def test_t5_loads_a_duplicated_tied_embedding(tmp_path):
    """Checkpoints saved by older transformers hold the tied embedding twice (``shared.weight`` and
    ``encoder.embed_tokens.weight``): the duplicate is ignored."""
    tiny_t5(tmp_path)
    tensors = dict(open_safetensors(str(tmp_path)))
    write_safetensors(str(tmp_path / "model.safetensors"), {**tensors, "encoder.embed_tokens.weight": tensors["shared.weight"]})
    model = load_t5_encoder(str(tmp_path))
    np.testing.assert_array_equal(model.shared.embedding[...], tensors["shared.weight"])


def test_full_precision_file_is_chosen_beside_variants(tmp_path):
    """diffusers folders may hold ``model.fp16.safetensors`` beside ``model.safetensors``."""
    reference = tiny_clip(tmp_path)
    tensors = dict(open_safetensors(str(tmp_path / "model.safetensors")))
    write_safetensors(str(tmp_path / "model.fp16.safetensors"), {k: v.astype(np.float16) for k, v in tensors.items()})
    ids, _ = clip_inputs()
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).text_embeds
    assert max_diff(expected, load_clip_encoder(str(tmp_path))(jnp.asarray(ids)).text_embeds) <= TOL


def test_relative_position_buckets_match_transformers():
    """Bucket edges agree exactly, for SD3's T5 (32 buckets, distance 128) and small tables."""
    attention = transformers.models.t5.modeling_t5.T5Attention
    positions = np.arange(300)
    offsets = positions[None, :] - positions[:, None]
    for num_buckets, max_distance in [(32, 128), (8, 16), (16, 32)]:
        expected = attention._relative_position_bucket(torch.tensor(offsets), True, num_buckets, max_distance)
        np.testing.assert_array_equal(t5.relative_position_bucket(offsets, num_buckets, max_distance), expected.numpy())


def test_bfloat16_compute_is_close(tmp_path):
    """bfloat16 compute against the float32 reference: within 5% of the outputs' largest magnitude
    and at most twice the error of transformers' own bfloat16 forward (bfloat16 keeps 8 mantissa
    bits; rounding errors grow over the layers)."""
    clip_reference = tiny_clip(tmp_path / "clip", "gelu")
    t5_reference = tiny_t5(tmp_path / "t5")
    clip_ids, _ = clip_inputs()
    t5_ids, t5_mask = t5_inputs()

    def clip_forward(model):
        out = model(torch.tensor(clip_ids), output_hidden_states=True)
        return out.hidden_states[-2].float(), out.text_embeds.float()

    def t5_forward(model):
        return (model(torch.tensor(t5_ids), attention_mask=torch.tensor(t5_mask)).last_hidden_state.float(),)

    with torch.no_grad():
        expected = clip_forward(clip_reference) + t5_forward(t5_reference)
        torch_bf16 = clip_forward(clip_reference.to(torch.bfloat16)) + t5_forward(t5_reference.to(torch.bfloat16))
    clip_out = load_clip_encoder(str(tmp_path / "clip"), dtype="bfloat16")(jnp.asarray(clip_ids))
    t5_out = load_t5_encoder(str(tmp_path / "t5"), dtype="bfloat16")(jnp.asarray(t5_ids), jnp.asarray(t5_mask))
    ours = (clip_out.hidden_states[-2], clip_out.text_embeds, t5_out)
    for ref, ref_bf16, out in zip(expected, torch_bf16, ours):
        assert out.dtype == jnp.float32
        error = max_diff(ref, out)
        assert 0 < error <= 0.05 * float(ref.abs().max())
        assert error <= 2 * max_diff(ref, ref_bf16)


def test_mis_shaped_weights_raise_weights_mismatch(tmp_path):
    tiny_clip(tmp_path / "clip")
    tiny_t5(tmp_path / "t5")
    with open(tmp_path / "clip" / "config.json") as f:
        clip_config = clip.config_from_hf({**json.load(f), "intermediate_size": 80})
    with pytest.raises(WeightsMismatch, match=r"text_model\.encoder\.layers\.0\.mlp\.fc1\.weight \[64, 32\]"):
        load_module(
            lambda: clip.CLIPTextModelWithProjection(clip_config, rngs=nnx.Rngs(0)),
            open_safetensors(str(tmp_path / "clip")),
            clip.torch_names(clip_config),
        )
    with open(tmp_path / "t5" / "config.json") as f:
        t5_config = t5.config_from_hf({**json.load(f), "relative_attention_num_buckets": 16})
    with pytest.raises(WeightsMismatch, match=r"relative_attention_bias\.weight \[8, 4\]"):
        load_module(
            lambda: t5.T5EncoderModel(t5_config, rngs=nnx.Rngs(0)),
            open_safetensors(str(tmp_path / "t5")),
            t5.torch_names(t5_config),
            ignore=t5.IGNORED_TORCH_KEYS,
        )


def test_configs_reject_unsupported_settings():
    with pytest.raises(ValueError, match="hidden_act"):
        clip.config_from_hf({"model_type": "clip_text_model", "hidden_act": "relu"})
    with pytest.raises(ValueError, match="model_type"):
        clip.config_from_hf({"model_type": "clip_vision_model"})
    with pytest.raises(ValueError, match="eos_token_id"):
        clip.config_from_hf({"eos_token_id": [2, 3]})
    with pytest.raises(ValueError, match="feed_forward_proj"):
        t5.config_from_hf({"model_type": "t5", "feed_forward_proj": "gated-swish"})
    with pytest.raises(ValueError, match="is_decoder"):
        t5.config_from_hf({"model_type": "t5", "is_decoder": True})
    assert t5.config_from_hf({"feed_forward_proj": "gated-gelu"}).activation == "gelu_new"


@pytest.mark.parametrize("variant, pad", [("clip-l", "<|endoftext|>"), ("clip-g", "!")])
def test_tiny_clip_tokenizer_loads_in_transformers(tmp_path, variant, pad):
    write_clip_tokenizer(str(tmp_path), WORDS, variant)
    for cls in (transformers.CLIPTokenizer, transformers.AutoTokenizer):
        tokenizer = cls.from_pretrained(str(tmp_path), local_files_only=True)
        assert tokenizer.model_max_length == 77 and tokenizer.pad_token == pad
        ids = tokenizer("A red cat", padding="max_length", max_length=8).input_ids
        tokens = tokenizer.convert_ids_to_tokens(ids)
        assert tokens[:5] == ["<|startoftext|>", "a</w>", "red</w>", "cat</w>", "<|endoftext|>"]
        assert tokens[5:] == [pad] * 3
        assert max(ids) == tokenizer.eos_token_id == CLIP_VOCAB - 1  # the legacy argmax EOS rule holds


def test_tiny_t5_tokenizer_loads_in_transformers(tmp_path):
    write_t5_tokenizer(str(tmp_path), WORDS)
    for cls in (transformers.T5TokenizerFast, transformers.AutoTokenizer):
        tokenizer = cls.from_pretrained(str(tmp_path), local_files_only=True)
        assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
        ids = tokenizer("A red cat", padding="max_length", max_length=8).input_ids
        assert tokenizer.convert_ids_to_tokens(ids) == ["▁", "A", "▁red", "▁cat", "</s>"] + ["<pad>"] * 3


def test_tokenizer_writers_reject_bad_words(tmp_path):
    with pytest.raises(ValueError, match="lowercase"):
        write_clip_tokenizer(str(tmp_path), ["Cat"])
    with pytest.raises(ValueError, match="lowercase"):
        write_t5_tokenizer(str(tmp_path), [])


# ------------------------------------------------------------------------------------------
# SD3 prompt encoding against diffusers
# ------------------------------------------------------------------------------------------

T5_WIDTH = 96  # > CLIP-L 32 + CLIP-G 48, so the CLIP features are zero-padded
MAX_SEQUENCE_LENGTH = 24


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    """A tiny SD3 diffusers folder (CLIP-L, CLIP-G, T5, their tokenizers, a transformer config)
    and the diffusers pipeline built from the same torch modules."""
    root = tmp_path_factory.mktemp("sd3")
    clip_l = tiny_clip(root / "text_encoder", "quick_gelu", hidden_size=32, projection_dim=32, seed=1)
    clip_g = tiny_clip(root / "text_encoder_2", "gelu", hidden_size=48, projection_dim=48, seed=2)
    t5_model = tiny_t5(root / "text_encoder_3", d_model=T5_WIDTH, seed=3)
    write_clip_tokenizer(str(root / "tokenizer"), WORDS, "clip-l")
    write_clip_tokenizer(str(root / "tokenizer_2"), WORDS, "clip-g")
    write_t5_tokenizer(str(root / "tokenizer_3"), WORDS)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=16, pooled_projection_dim=80,
        pos_embed_max_size=8,
    )
    transformer.save_config(root / "transformer")

    def pipeline(with_t5: bool):
        load = lambda cls, name: cls.from_pretrained(root / name, local_files_only=True)
        return diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
            text_encoder=clip_l, tokenizer=load(transformers.CLIPTokenizer, "tokenizer"),
            text_encoder_2=clip_g, tokenizer_2=load(transformers.CLIPTokenizer, "tokenizer_2"),
            text_encoder_3=t5_model if with_t5 else None,
            tokenizer_3=load(transformers.T5TokenizerFast, "tokenizer_3") if with_t5 else None,
        )

    return root, pipeline


def diffusers_embeddings(pipeline):
    with torch.no_grad():
        text, _, pooled, _ = pipeline.encode_prompt(
            PROMPTS, None, None, device=torch.device("cpu"), do_classifier_free_guidance=False,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
    return text.numpy(), pooled.numpy()


@pytest.mark.parametrize("with_t5", [True, False])
def test_encode_prompts_matches_diffusers(sd3_folder, with_t5):
    """``encode_prompts`` equals ``StableDiffusion3Pipeline.encode_prompt`` (with T5, and with
    ``text_encoder_3=None``: zeros of the transformer's joint_attention_dim)."""
    root, pipeline = sd3_folder
    expected_text, expected_pooled = diffusers_embeddings(pipeline(with_t5))
    encoders = load_sd3_text_encoders(str(root), with_t5=with_t5)
    assert (encoders.t5 is None) == (not with_t5)
    out = encode_prompts(encoders, PROMPTS, max_sequence_length=MAX_SEQUENCE_LENGTH)
    assert out["text"].shape == expected_text.shape == (3, 77 + MAX_SEQUENCE_LENGTH, T5_WIDTH)
    assert out["pooled"].shape == expected_pooled.shape == (3, 32 + 48)
    assert max_diff(out["text"], expected_text) <= TOL
    assert max_diff(out["pooled"], expected_pooled) <= TOL
    t5_tokens = np.asarray(out["text"][:, 77:])
    assert (np.abs(t5_tokens).max() > 0) == with_t5


def test_missing_components_are_named(sd3_folder, tmp_path):
    root, _ = sd3_folder
    folder = tmp_path / "sd3"
    shutil.copytree(root, folder)
    shutil.rmtree(folder / "tokenizer_3")
    with pytest.raises(FileNotFoundError, match=r"tokenizer_3/"):
        load_sd3_text_encoders(str(folder))
    shutil.rmtree(folder / "text_encoder_3")
    assert load_sd3_text_encoders(str(folder)).t5 is None  # SD3 runs without T5
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match=r"text_encoder_2/"):
        load_sd3_text_encoders(str(folder))
