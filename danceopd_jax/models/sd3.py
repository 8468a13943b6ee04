"""The SD3 family in a run: models over one shared frozen base, prompt embeddings, the CFG null.

A run on an SD3 / SD3.5 pipeline folder (``config.model_dir``) holds the folder's transformer
once, as the frozen *base* state: its weights, or those of the single file
``config.transformer_path`` (diffusers or Stability AI naming, ``models.sd3_original``) with the
folder's configs, text encoders and VAE. Every model spec of ``kind="mmdit"`` is that base plus
at most one LoRA:

  * the student: base + a fresh trainable LoRA (``lora_rank`` > 0; paper: rank 128 on the
    attention and MLP projections); only the LoRA is in the optimizer and the checkpoints;
  * an expert: base + the LoRA deltas of ``lora_path`` (diffusers/PEFT safetensors), or the base
    itself when ``lora_path`` is empty (e.g. the CFG-absorption teacher).

So a student and M teachers cost one base plus M + 1 small adapter states (``docs/MODELS.md``).
Prompts are encoded once, up front, with the folder's CLIP-L, CLIP-G and T5 encoders
(``models.sd3_prompts``) into a table under the workdir (``data.prompt_embeddings``); the
encoders are freed before training. A table encoded beforehand (``config.prompt_embeddings``,
``python -m danceopd_jax.encode_prompts``) replaces them: the folder then needs no text encoders.
The classifier-free-guidance null of SD3 is the encoding of the empty prompt (not zeros), so CFG
fields here use ``null_condition``.
"""

from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from danceopd_jax.data.prompt_embeddings import Encoder, PromptEmbeddings
from danceopd_jax.models import lora, mmdit, prompt_cache, sd3_folder, sd3_original, sd3_prompts
from danceopd_jax.models.backbones import add_student_lora
from danceopd_jax.models.init_keys import InitKeys
from danceopd_jax.models.weights import load_state, open_safetensors

# ---------------------------------------------------------------- the family (``models.backbones``)

NAME = "SD3"
MODEL_KIND = "mmdit"
PIPELINE_CLASSES = sd3_folder.PIPELINE_CLASSES
READS_SOURCE = False  # SD3's transformer has no source-image input: edit tasks cannot run on it
LOGICAL_AXES = mmdit.LOGICAL_AXES + lora.LORA_AXES  # both name the shared layers.ACTIVATION_AXES
LORA_PREFIX = "transformer."  # diffusers' SD3 LoRA files: transformer.<module>.lora_A.weight
TEXT_SEGMENTS_LEN = 0  # SD3's text is one sequence
pipeline_components = sd3_folder.pipeline_components
torch_names_of = mmdit.torch_names_of

CLIP_TOKENS = 77  # SD3's CLIP token count; the text sequence is CLIP_TOKENS + T5's max_sequence_length


def latent_channels(model_dir: str) -> tuple[int, int]:
    """``(in_channels, out_channels)`` of the folder's transformer (diffusers' defaults 16; out = in when null)."""
    transformer = sd3_folder.component_config(model_dir, "transformer")
    channels_in = transformer.get("in_channels", 16)
    channels_out = transformer.get("out_channels", 16)
    return channels_in, channels_in if channels_out is None else channels_out


def text_len_problem(text_len: int) -> str | None:
    """Why ``text_len`` text tokens cannot be SD3's condition (77 CLIP tokens + at least one T5 token), or None."""
    return None if text_len > CLIP_TOKENS else f"must be {CLIP_TOKENS} CLIP tokens + at least one T5 token"


def check_transformer_file(path: str) -> None:
    """Raise ``ValueError`` unless ``path`` is a transformer file in diffusers or Stability AI naming."""
    sd3_original.naming(open_safetensors(path))


def transformer_config(model_dir: str, dtype: str, remat: str, attention: str = "xla") -> mmdit.MMDiTConfig:
    """The ``MMDiTConfig`` of the folder's transformer with a compute dtype, remat policy and attention."""
    transformer = sd3_folder.component_config(model_dir, "transformer")
    return mmdit.config_from_diffusers(transformer, dtype=dtype, remat=remat, attention=attention)


def model_factory(model_dir: str, spec) -> Callable[[], nnx.Module]:
    """The spec's model: the folder's transformer, with a fresh LoRA for ``lora_rank`` > 0.

    An expert's LoRA file is applied afterwards (``backbones.expert_delta``); here it is the plain base.
    """
    config = transformer_config(model_dir, spec.dtype, spec.remat, spec.get("attention", "xla"))

    def make() -> nnx.Module:
        model = mmdit.MMDiT(config, rngs=InitKeys(spec.seed))
        return add_student_lora(model, spec) if spec.lora_rank else model

    return make


def load_base(model_dir: str, abstract_base: nnx.State, shardings, transformer_path: str = "") -> nnx.State:
    """The frozen base state, checked and read lazily: the folder's transformer weights, or those of
    the single file ``transformer_path`` in their place (diffusers or Stability AI naming, ``sd3_original``)."""
    path = transformer_path or sd3_folder.pipeline_components(model_dir, text_encoders=False)["transformer"]
    tensors = sd3_original.open_transformer(path)
    return load_state(abstract_base, tensors, mmdit.torch_names_of(abstract_base), shardings=shardings)


# ---------------------------------------------------------------- checks before loading


def weight_modules(model_dir: str) -> dict[str, str]:
    """``{NNX layer path: diffusers module}`` of the folder transformer's linear layers, the ones LoRA
    can adapt (not the patch conv), from its ``config.json`` alone: no weights are read, the model is
    traced abstractly once per config (``mmdit.linear_torch_names``)."""
    return lora.module_names(mmdit.linear_torch_names(transformer_config(model_dir, "float32", "none")))


# ---------------------------------------------------------------- prompts


def prompt_encoder(model_dir: str, text_len: int, dtype: str = "float32") -> Encoder:
    """``prompts -> {"text": [B, text_len, D], "pooled": [B, P]}`` (numpy) by the folder's CLIP-L, CLIP-G
    and T5, loaded here; ``text_len`` = 77 CLIP tokens + T5's ``max_sequence_length``."""
    encoders = sd3_prompts.load_sd3_text_encoders(model_dir, dtype=dtype)
    max_sequence_length = text_len - CLIP_TOKENS

    def encode(batch: list[str]):
        out = sd3_prompts.encode_prompts(encoders, batch, max_sequence_length)
        return {k: np.asarray(v) for k, v in out.items()}

    return encode


TEXT_ENCODERS = prompt_cache.TEXT_ENCODERS


def check_prompts(model_dir: str, prompts: Sequence[str], text_len: int, edit_prompts: Sequence[str] = ()) -> None:
    """Nothing to refuse: SD3 keeps the first 77 CLIP tokens and ``text_len - 77`` T5 tokens of a longer
    prompt, as diffusers' SD3 pipelines do (``models.sd3_prompts``); it has no edit prompts."""


def text_encoders_digest(model_dir: str) -> str:
    """A digest of the folder's CLIP, T5 and tokenizer files (``prompt_cache.text_encoders_digest``)."""
    return prompt_cache.text_encoders_digest(sd3_folder.LAYOUT, model_dir)


def prompt_table(
    model_dir: str, prompts: Sequence[str], path: str, text_len: int, dtype: str = "float32", edit_prompts: Sequence[str] = ()
) -> PromptEmbeddings:
    """The run's table of ``prompts`` encoded by the folder's CLIP-L, CLIP-G and T5, cached at ``path``
    (``prompt_cache.cached_table``). SD3 reads no source image: ``edit_prompts`` must be empty."""
    if edit_prompts:
        raise ValueError(f"{NAME} encodes prompts alone: it reads no source image, so it has no edit prompts")
    return prompt_cache.cached_table(sd3_folder.LAYOUT, prompt_encoder, model_dir, prompts, path, text_len, dtype)


def null_condition(table: PromptEmbeddings) -> dict[str, np.ndarray]:
    """SD3's CFG null: the empty prompt's ``text`` [L, D] and ``pooled`` [P]."""
    text, _, pooled = table("")
    return {"text": text, "pooled": pooled}


def with_null(null: dict) -> Callable[[dict], dict]:
    """``cond -> cond`` with every sample's text and pooled embedding replaced by the null's (``null_condition``)."""

    def unconditional(cond: dict) -> dict:
        batch = cond["text"].shape[0]
        out = dict(cond)
        out["text"] = jnp.broadcast_to(null["text"].astype(cond["text"].dtype), cond["text"].shape)
        out["pooled"] = jnp.broadcast_to(null["pooled"].astype(cond["pooled"].dtype), (batch, *null["pooled"].shape))
        return out

    return unconditional


def check_condition(model_dir: str, text_len: int, text_dim: int, pooled_dim: int) -> None:
    """Raise ``ValueError`` unless the run's condition shape is the folder transformer's."""
    t = sd3_folder.component_config(model_dir, "transformer")
    want = dict(text_dim=t["joint_attention_dim"], pooled_dim=t["pooled_projection_dim"])
    got = dict(text_dim=text_dim, pooled_dim=pooled_dim)
    if got != want or text_len <= CLIP_TOKENS:
        raise ValueError(
            f"config.condition {got} (text_len {text_len}) does not fit {model_dir}/transformer: it needs {want} "
            f"and text_len = {CLIP_TOKENS} + T5 tokens"
        )
