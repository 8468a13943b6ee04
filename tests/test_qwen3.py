"""Z-Image's text encoder in JAX against PyTorch: Qwen3's ``hidden_states[-2]`` against transformers'
``Qwen3Model``, the tiny Qwen3 tokenizer folder, and the prompt encodings against diffusers'
``ZImagePipeline._encode_prompt`` and ``ZImageOmniPipeline._encode_prompt``.

Every reference is a tiny random model with grouped-query attention whose weights (norms included)
are re-drawn away from their initial values, saved with ``save_pretrained`` and read back by our
loader.
"""

import shutil
import types

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from danceopd_jax.models import qwen3  # noqa: E402
from danceopd_jax.models.tiny_tokenizers import QWEN_CHAT_TEMPLATE, write_qwen_tokenizer  # noqa: E402
from danceopd_jax.models.weights import WeightsMismatch, open_safetensors, write_safetensors  # noqa: E402
from danceopd_jax.models.zimage_prompts import (  # noqa: E402
    check_lengths,
    encode_null,
    encode_prompts,
    load_zimage_text_encoder,
    segment_token_ids,
    tokens_over,
)

WORDS = ["a", "red", "cat", "sits", "on", "the", "mat", "make", "it", "blue", "user", "assistant"]
PROMPTS = ["a red cat sits on the mat", "Make it BLUE!", "红色的猫"]  # known words, unknown text, multi-byte text
MAX_SEQUENCE_LENGTH = 32  # diffusers' max_sequence_length in these tests (512 in the pipelines)
TOL = 1e-4


def randomise(model, seed: int, std: float = 0.2):
    """Re-draw every parameter: norm weights 1 + N(0, std), everything else N(0, std)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + std * torch.randn_like(p))
    return model.eval()


def tiny_qwen3(folder, vocab_size: int = 300, num_hidden_layers: int = 3, seed: int = 0):
    """A random Qwen3Model: 4 query heads over 2 key/value heads, head_dim 16 != hidden 32 / 4."""
    config = transformers.Qwen3Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=num_hidden_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6, max_position_embeddings=128,
    )
    model = randomise(transformers.Qwen3Model(config), seed)
    model.save_pretrained(folder)
    return model


def padded_batch(vocab_size: int = 300):
    """Three right-padded sequences of 20, 13 and 5 tokens."""
    ids = np.random.RandomState(0).randint(0, vocab_size, (3, 20))
    mask = (np.arange(20) < np.array([[20], [13], [5]])).astype(np.int64)
    return ids, mask


def reference_hidden(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    return out.hidden_states[-2].float().numpy()


def max_diff_valid(a, b, mask) -> float:
    valid = np.asarray(mask, bool)
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))[valid].max())


@pytest.mark.parametrize("num_hidden_layers", [3, 1])
def test_qwen3_matches_transformers_hidden_states_minus_2(tmp_path, num_hidden_layers):
    """hidden_states[-2] (layer n-2's output; the embeddings for one layer) on the valid tokens of a
    right-padded batch; the last layer is not built. Measured: 4.2e-6 (3 layers, values up to 8.7)."""
    reference = tiny_qwen3(tmp_path, num_hidden_layers=num_hidden_layers)
    ours = qwen3.load_text_encoder(str(tmp_path))
    assert len(ours.layers) == num_hidden_layers - 1
    assert ours.config.rope_theta == 1e6 and ours.config.num_key_value_heads == 2
    ids, mask = padded_batch()
    out = ours(jnp.asarray(ids), jnp.asarray(mask))
    assert out.dtype == jnp.float32 and out.shape == (3, 20, 32)
    assert max_diff_valid(out, reference_hidden(reference, ids, mask), mask) <= TOL


def test_bfloat16_compute_is_close(tmp_path):
    """bfloat16 compute against the float32 reference on the valid tokens: within 5% of the largest
    magnitude and at most twice the error of transformers' own bfloat16 forward (measured: 0.12 against
    torch's 0.11, values up to 8.7)."""
    reference = tiny_qwen3(tmp_path)
    ids, mask = padded_batch()
    expected = reference_hidden(reference, ids, mask)
    torch_bf16 = reference_hidden(reference.to(torch.bfloat16), ids, mask)
    out = qwen3.load_text_encoder(str(tmp_path), dtype="bfloat16")(jnp.asarray(ids), jnp.asarray(mask))
    assert out.dtype == jnp.float32
    error = max_diff_valid(out, expected, mask)
    assert 0 < error <= 0.05 * np.abs(expected).max()
    assert error <= 2 * max_diff_valid(torch_bf16, expected, mask)


def test_causal_lm_checkpoint_loads(tmp_path):
    """A ``Qwen3ForCausalLM`` checkpoint (``model.*`` keys and ``lm_head.weight``) loads as the decoder."""
    reference = tiny_qwen3(tmp_path / "base")
    tensors = dict(open_safetensors(str(tmp_path / "base")))
    (tmp_path / "lm").mkdir()
    shutil.copy(tmp_path / "base" / "config.json", tmp_path / "lm" / "config.json")
    lm = {f"model.{k}": v for k, v in tensors.items()} | {"lm_head.weight": tensors["embed_tokens.weight"]}
    write_safetensors(str(tmp_path / "lm" / "model.safetensors"), lm)
    ids, mask = padded_batch()
    out = qwen3.load_text_encoder(str(tmp_path / "lm"))(jnp.asarray(ids), jnp.asarray(mask))
    assert max_diff_valid(out, reference_hidden(reference, ids, mask), mask) <= TOL


def test_missing_and_misshaped_weights_are_listed(tmp_path):
    tiny_qwen3(tmp_path)
    tensors = dict(open_safetensors(str(tmp_path)))
    del tensors["layers.1.mlp.up_proj.weight"]
    tensors["layers.0.self_attn.k_norm.weight"] = np.ones(8, np.float32)
    write_safetensors(str(tmp_path / "model.safetensors"), tensors)
    with pytest.raises(WeightsMismatch) as error:
        qwen3.load_text_encoder(str(tmp_path))
    assert "1 missing: layers.1.mlp.up_proj.weight" in str(error.value)
    assert "layers.0.self_attn.k_norm.weight [8] -> layers.0.self_attn.k_norm.scale expects [16]" in str(error.value)


def test_config_from_hf():
    old_style = qwen3.config_from_hf({"model_type": "qwen3", "rope_theta": 5e5, "rope_scaling": None, "num_key_value_heads": None,
                                      "num_attention_heads": 8, "hidden_size": 64, "head_dim": 8})
    assert (old_style.rope_theta, old_style.num_key_value_heads) == (5e5, 8)
    assert qwen3.config_from_hf({"rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}).rope_theta == 7.0
    for bad, match in [
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "RoPE type 'yarn'"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE type 'linear'"),
        ({"use_sliding_window": True}, "sliding-window"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding-window"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "qwen2"}, "model_type"),
        ({"num_attention_heads": 6, "num_key_value_heads": 4}, "not a multiple"),
    ]:
        with pytest.raises(ValueError, match=match):
            qwen3.config_from_hf(bad)


# ------------------------------------------------------------------------------------------
# The tiny tokenizer and Z-Image's prompt encoding against diffusers
# ------------------------------------------------------------------------------------------


def test_tiny_qwen_tokenizer_loads_in_transformers(tmp_path):
    write_qwen_tokenizer(str(tmp_path), WORDS)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer" and tokenizer.chat_template == QWEN_CHAT_TEMPLATE
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.padding_side) == ("<|endoftext|>", "<|im_end|>", "right")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "a red cat"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)
    assert chat == "<|im_start|>user\na red cat<|im_end|>\n<|im_start|>assistant\n"
    no_thinking = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                add_generation_prompt=True, enable_thinking=False)
    assert no_thinking.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    ids = tokenizer(chat + "<|vision_start|>", padding="max_length", max_length=16).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<|im_start|>", "user", "Ċ", "a", "Ġred", "Ġcat", "<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ",
        "<|vision_start|>", *["<|endoftext|>"] * 4,
    ]
    assert tokenizer.decode(tokenizer("红色的猫 Blue!").input_ids) == "红色的猫 Blue!"  # bytes cover any text


@pytest.fixture(scope="module")
def zimage_folder(tmp_path_factory):
    """A tiny Z-Image folder (``text_encoder/``, ``tokenizer/``) and the torch reference objects
    diffusers' ``_encode_prompt`` methods run on."""
    root = tmp_path_factory.mktemp("zimage")
    write_qwen_tokenizer(str(root / "tokenizer"), WORDS)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    text_encoder = tiny_qwen3(root / "text_encoder", vocab_size=len(tokenizer), seed=1)
    return root, types.SimpleNamespace(tokenizer=tokenizer, text_encoder=text_encoder)


@pytest.fixture(scope="module")
def encoder(zimage_folder):
    return load_zimage_text_encoder(str(zimage_folder[0]))


def diffusers_segments(pipeline, prompts, kind) -> list[list[np.ndarray]]:
    """Per prompt, diffusers' embedding of each segment ([tokens, D] each)."""
    cpu = torch.device("cpu")
    with torch.no_grad():
        if kind == "t2i":
            out = diffusers.ZImagePipeline._encode_prompt(pipeline, list(prompts), cpu, max_sequence_length=MAX_SEQUENCE_LENGTH)
            return [[e.numpy()] for e in out]
        out = diffusers.ZImageOmniPipeline._encode_prompt(
            pipeline, list(prompts), cpu, max_sequence_length=MAX_SEQUENCE_LENGTH, num_condition_images=int(kind == "edit")
        )
        return [[e.numpy() for e in segments] for segments in out]


def assert_matches(cond, expected, capacity):
    """``cond`` holds ``expected``'s segments one after another in its valid prefix, zeros after."""
    assert cond["text"].dtype == jnp.float32 and cond["text_segments"].dtype == jnp.int32
    assert cond["text"].shape[:2] == cond["text_mask"].shape == (len(expected), capacity)
    for row, segments in enumerate(expected):
        lengths = [len(s) for s in segments]
        assert list(np.asarray(cond["text_segments"][row])) == lengths + [0] * (3 - len(lengths))
        n = sum(lengths)
        assert list(np.asarray(cond["text_mask"][row])) == [True] * n + [False] * (capacity - n)
        assert np.abs(np.asarray(cond["text"][row, :n]) - np.concatenate(segments)).max() <= TOL
        assert not np.asarray(cond["text"][row, n:]).any()


@pytest.mark.parametrize("kind, capacity", [("t2i", 32), ("t2i_omni", 32), ("edit", 48)])
def test_encode_prompts_matches_diffusers(zimage_folder, encoder, kind, capacity):
    """Same token counts per segment and embeddings within 1e-4 (the edit segments, encoded by
    diffusers as three sequences, share one row here)."""
    expected = diffusers_segments(zimage_folder[1], PROMPTS, kind)
    # "<|im_start|> user \n a red cat sits on the mat <|im_end|> \n <|im_start|> assistant \n", split in three for edit
    assert [len(s) for s in expected[0]] == ([15] if kind != "edit" else [4, 14, 2])
    assert_matches(encode_prompts(encoder, PROMPTS, capacity, kind), expected, capacity)


@pytest.mark.parametrize("kind, capacity", [("t2i", 32), ("edit", 48)])
def test_null_matches_diffusers_negative_prompt(zimage_folder, encoder, kind, capacity):
    """The CFG null is the pipelines' default negative prompt "" through the same template (edit:
    the instruction dropped, the vision segments kept)."""
    assert_matches(encode_null(encoder, capacity, kind), diffusers_segments(zimage_folder[1], [""], kind), capacity)


def test_overlong_prompts_are_reported_not_truncated(zimage_folder, encoder):
    """diffusers cuts a prompt at max_sequence_length silently; here it is counted and refused."""
    long = "a red cat sits on the mat " * 5  # 35 words
    prompts = ["a red cat", long]
    counts = [sum(map(len, parts)) for parts in segment_token_ids(encoder.tokenizer, prompts, "t2i")]
    assert counts[1] > MAX_SEQUENCE_LENGTH
    assert tokens_over(encoder.tokenizer, prompts, MAX_SEQUENCE_LENGTH, "t2i") == [0, counts[1] - MAX_SEQUENCE_LENGTH]
    edit_counts = [sum(map(len, parts)) for parts in segment_token_ids(encoder.tokenizer, prompts, "edit")]
    assert tokens_over(encoder.tokenizer, prompts, 40, "edit") == [0, edit_counts[1] - 40]
    message = rf"prompt 1 'a red cat sits on the mat a red .*\.\.\.' is {counts[1] - 32} tokens over the text capacity of 32"
    with pytest.raises(ValueError, match=message):
        check_lengths(encoder.tokenizer, prompts, MAX_SEQUENCE_LENGTH, "t2i")
    with pytest.raises(ValueError, match=message):
        encode_prompts(encoder, prompts, MAX_SEQUENCE_LENGTH, "t2i")
    check_lengths(encoder.tokenizer, prompts, counts[1], "t2i")  # fits exactly
    with pytest.raises(ValueError, match="kind must be one of"):
        tokens_over(encoder.tokenizer, prompts, 40, "i2i")
    truncated = diffusers_segments(zimage_folder[1], prompts, "t2i")[1][0]
    assert len(truncated) == MAX_SEQUENCE_LENGTH  # what we refuse to do silently


def test_missing_subfolders_are_named(zimage_folder, tmp_path):
    folder = tmp_path / "zimage"
    shutil.copytree(zimage_folder[0], folder)
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(FileNotFoundError, match=r"tokenizer/"):
        load_zimage_text_encoder(str(folder))
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(FileNotFoundError, match=r"text_encoder/"):
        load_zimage_text_encoder(str(folder))
