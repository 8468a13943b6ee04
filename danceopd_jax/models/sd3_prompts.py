"""Stable Diffusion 3's prompt encoding from a local diffusers folder, in JAX.

What diffusers' ``StableDiffusion3Pipeline.encode_prompt`` computes (0.42.1,
``pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py``; Esser et al., "Scaling Rectified
Flow Transformers for High-Resolution Image Synthesis", ICML 2024), for one prompt per image and
no classifier-free guidance branch (encode the negative prompts as another call):

  * CLIP-L (``text_encoder/``) and CLIP-G (``text_encoder_2/``) each read the prompt padded to
    ``tokenizer.model_max_length`` (77) tokens, without an attention mask; their penultimate
    hidden states (``hidden_states[-2]``, before the final layer norm) are concatenated on the
    feature axis (768 + 1280 = 2048) and zero-padded to T5's width (4096);
  * T5 (``text_encoder_3/``) reads the prompt padded to ``max_sequence_length`` tokens (no mask);
    its last hidden state is appended on the sequence axis: ``text`` [B, 77 + T, 4096];
    without T5 (no ``text_encoder_3/``, or ``with_t5=False``) those T tokens are zeros of the
    transformer's ``joint_attention_dim``, as diffusers does with ``text_encoder_3=None``;
  * ``pooled`` [B, 768 + 1280] concatenates the two CLIP projections of the EOS state.

Tokenisation runs on the host with the folder's ``transformers`` tokenizers (longer prompts are
truncated, as diffusers does after a warning); the encoders run jitted. Outputs are float32
``jax.Array``s.
"""

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from danceopd_jax.models import clip, t5
from danceopd_jax.models.init_keys import InitKeys
from danceopd_jax.models.weights import TensorSource, load_module, open_safetensors

DEFAULT_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's max_sequence_length


@dataclasses.dataclass(frozen=True)
class SD3TextEncoders:
    """SD3's text encoders and their tokenizers; ``t5``/``tokenizer_3`` are None without T5.

    ``joint_attention_dim`` is the width of the text tokens: T5's ``d_model``, or the
    transformer's ``joint_attention_dim`` when T5 is not loaded.
    """

    clip_l: clip.CLIPTextModelWithProjection
    clip_g: clip.CLIPTextModelWithProjection
    t5: t5.T5EncoderModel | None
    tokenizer: Any
    tokenizer_2: Any
    tokenizer_3: Any | None
    joint_attention_dim: int


def _subfolder(pipeline_dir: str, name: str, needed_for: str) -> str:
    path = os.path.join(pipeline_dir, name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{pipeline_dir}: missing subfolder {name}/ ({needed_for})")
    return path


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: missing config.json")
    with open(path) as f:
        return json.load(f)


def _weights(folder: str) -> TensorSource:
    """The folder's full-precision weights: ``model.safetensors`` when present beside variants
    (``model.fp16.safetensors``), else its one file or sharded index."""
    single = os.path.join(folder, "model.safetensors")
    return open_safetensors(single if os.path.isfile(single) else folder)


def load_clip_encoder(folder: str, dtype: str = "float32") -> clip.CLIPTextModelWithProjection:
    """A ``CLIPTextModelWithProjection`` from a transformers folder (config.json + safetensors)."""
    config = clip.config_from_hf(_read_config(folder), dtype=dtype)
    make = lambda: clip.CLIPTextModelWithProjection(config, rngs=InitKeys(0))
    return load_module(make, _weights(folder), clip.torch_names(config))


def load_t5_encoder(folder: str, dtype: str = "float32") -> t5.T5EncoderModel:
    """A ``T5EncoderModel`` from a transformers folder (config.json + safetensors, possibly sharded)."""
    config = t5.config_from_hf(_read_config(folder), dtype=dtype)
    make = lambda: t5.T5EncoderModel(config, rngs=InitKeys(0))
    return load_module(make, _weights(folder), t5.torch_names(config), ignore=t5.IGNORED_TORCH_KEYS)


def load_sd3_text_encoders(pipeline_dir: str, dtype: str = "float32", with_t5: bool = True) -> SD3TextEncoders:
    """SD3's three text encoders (compute ``dtype``) and tokenizers from a diffusers folder, offline.

    ``text_encoder_3/`` is optional (then, or with ``with_t5=False``, T5's tokens are zeros of
    ``transformer/config.json``'s ``joint_attention_dim``). A missing subfolder raises
    ``FileNotFoundError`` naming it; weights that do not fit raise ``WeightsMismatch``.
    """
    from transformers import CLIPTokenizer, T5TokenizerFast  # host-side tokenisation only

    def tokenizer(cls, name, needed_for):
        return cls.from_pretrained(_subfolder(pipeline_dir, name, needed_for), local_files_only=True)

    clip_l = load_clip_encoder(_subfolder(pipeline_dir, "text_encoder", "CLIP-L text encoder"), dtype)
    clip_g = load_clip_encoder(_subfolder(pipeline_dir, "text_encoder_2", "CLIP-G text encoder"), dtype)
    tokenizer_l = tokenizer(CLIPTokenizer, "tokenizer", "CLIP-L tokenizer")
    tokenizer_g = tokenizer(CLIPTokenizer, "tokenizer_2", "CLIP-G tokenizer")
    t5_folder = os.path.join(pipeline_dir, "text_encoder_3")
    if with_t5 and os.path.isdir(t5_folder):
        t5_model = load_t5_encoder(t5_folder, dtype)
        tokenizer_t5 = tokenizer(T5TokenizerFast, "tokenizer_3", "T5 tokenizer of text_encoder_3/")
        width = t5_model.config.d_model
    else:
        t5_model, tokenizer_t5 = None, None
        transformer = _read_config(_subfolder(pipeline_dir, "transformer", "joint_attention_dim when T5 is absent"))
        width = transformer["joint_attention_dim"]
    return SD3TextEncoders(clip_l, clip_g, t5_model, tokenizer_l, tokenizer_g, tokenizer_t5, width)


def _token_ids(tokenizer, prompts: list[str], max_length: int) -> np.ndarray:
    """[B, max_length] int32 ids, truncated and padded to ``max_length`` as the pipeline does."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np").input_ids
    return ids.astype(np.int32)


@nnx.jit
def _clip_embeds(model: clip.CLIPTextModelWithProjection, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(penultimate hidden states [B, S, D], projected pooled output [B, P])."""
    out = model(input_ids)
    return out.hidden_states[-2], out.text_embeds


@nnx.jit
def _t5_embeds(model: t5.T5EncoderModel, input_ids: jax.Array) -> jax.Array:
    return model(input_ids)


def join_embeddings(clip_l: jax.Array, clip_g: jax.Array, t5_tokens: jax.Array) -> jax.Array:
    """[B, S, Dl] + [B, S, Dg] -> concat, zero-padded to T5's width, then T5's [B, T, W] appended."""
    clip_tokens = jnp.concatenate([clip_l, clip_g], axis=-1)
    pad = t5_tokens.shape[-1] - clip_tokens.shape[-1]
    if pad < 0:
        raise ValueError(f"CLIP features ({clip_tokens.shape[-1]}) are wider than the T5 tokens ({t5_tokens.shape[-1]})")
    clip_tokens = jnp.pad(clip_tokens, ((0, 0), (0, 0), (0, pad)))
    return jnp.concatenate([clip_tokens, t5_tokens], axis=1)


def encode_prompts(
    encoders: SD3TextEncoders,
    prompts: Sequence[str],
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
) -> dict[str, jax.Array]:
    """``{"text": [B, 77 + T, W], "pooled": [B, Pl + Pg]}`` for ``prompts``, T = ``max_sequence_length``."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    clip_length = encoders.tokenizer.model_max_length
    hidden_l, pooled_l = _clip_embeds(encoders.clip_l, _token_ids(encoders.tokenizer, prompts, clip_length))
    hidden_g, pooled_g = _clip_embeds(encoders.clip_g, _token_ids(encoders.tokenizer_2, prompts, clip_length))
    if encoders.t5 is None:
        t5_tokens = jnp.zeros((len(prompts), max_sequence_length, encoders.joint_attention_dim), jnp.float32)
    else:
        t5_tokens = _t5_embeds(encoders.t5, _token_ids(encoders.tokenizer_3, prompts, max_sequence_length))
    return {
        "text": join_embeddings(hidden_l, hidden_g, t5_tokens),
        "pooled": jnp.concatenate([pooled_l, pooled_g], axis=-1),
    }
