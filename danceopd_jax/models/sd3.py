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

import hashlib
import json
import os
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from danceopd_jax.data.prompt_embeddings import Encoder, PromptEmbeddings, encode_table, load_table
from danceopd_jax.models import lora, mmdit, sd3_folder, sd3_original, sd3_prompts
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

    An expert's LoRA file is applied afterwards (``expert_delta``); here it is the plain base.
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


def expert_delta(lora_path: str, base_graphdef: nnx.GraphDef, abstract_base: nnx.State):
    """``(graphdef, delta)`` of a teacher that is the base plus the LoRA file ``lora_path``."""
    base = nnx.merge(base_graphdef, abstract_base)
    return lora.load_lora_deltas(base, mmdit.torch_names_of(abstract_base), *lora.read_lora(lora_path))


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


ENCODED_BY = "encoded_by"  # a cached prompt table's metadata key: ``encoder_identity`` of what encoded it


def _text_files(model_dir: str) -> list[tuple[str, str]]:
    """``(path in the folder, full path)`` of every file of the folder's text encoders and tokenizers,
    in a fixed order."""
    components = sd3_folder.pipeline_components(model_dir)
    files = []
    for name in sd3_folder.TEXT_COMPONENTS:
        if name not in components:
            continue
        for root, dirs, names in os.walk(components[name]):
            dirs.sort()
            files += [(os.path.relpath(os.path.join(root, file), model_dir), os.path.join(root, file)) for file in sorted(names)]
    return files


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


def encoder_identity(model_dir: str, text_len: int, dtype: str = "float32") -> str:
    """What a prompt's embeddings depend on besides the prompt, as one JSON string: the folder (its real
    path), a digest of the path, size and modification time of every file of its text encoders and
    tokenizers (weights replaced in place change it), ``text_len`` and the compute dtype."""
    stats = [(rel, os.stat(path)) for rel, path in _text_files(model_dir)]
    files = _digest([[rel, stat.st_size, stat.st_mtime_ns] for rel, stat in stats])
    return json.dumps(dict(model_dir=os.path.realpath(model_dir), text_files=files, text_len=text_len, dtype=dtype), sort_keys=True)


SAMPLED_BYTES = 1 << 20  # read from each end of a file by ``text_encoders_digest``


def _sampled(path: str) -> str:
    """sha256 of a file's first and last ``SAMPLED_BYTES`` (the whole of a smaller file): cheap on a
    multi-GB T5, and other weights of the same shapes differ there."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(SAMPLED_BYTES))
        size = os.fstat(f.fileno()).st_size
        if size > 2 * SAMPLED_BYTES:
            f.seek(size - SAMPLED_BYTES)
        digest.update(f.read())
    return digest.hexdigest()


def text_encoders_digest(model_dir: str) -> str:
    """A digest of the folder's text-encoder and tokenizer files (their names, sizes and ``_sampled``
    contents): the same for a copy of the folder on another machine, different for other encoders
    (``TEXT_ENCODERS`` in a table ``encode_prompts`` writes; checked against a run's folder by config
    validation)."""
    return _digest([[rel, os.path.getsize(path), _sampled(path)] for rel, path in _text_files(model_dir)])


TEXT_ENCODERS = "text_encoders"  # a prompt table's metadata key: ``text_encoders_digest`` of the folder that encoded it


def prompt_table(model_dir: str, prompts: Sequence[str], path: str, text_len: int, dtype: str = "float32") -> PromptEmbeddings:
    """The embeddings of ``prompts`` (and the empty prompt) at ``path``: read if it has them all and was
    encoded by this folder's text encoders as they are now, at this ``text_len`` and dtype
    (``encoder_identity``, recorded in the table), else encoded (``prompt_encoder``) and written there.
    A table another folder (or an older version of this code, which recorded nothing) encoded is
    encoded again, never reused."""
    identity = encoder_identity(model_dir, text_len, dtype)
    if os.path.isfile(path):
        table = load_table(path)
        if table.metadata.get(ENCODED_BY) == identity and not table.missing(["", *prompts]) and table.text_shape[0] == text_len:
            return table
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return encode_table(path, prompts, prompt_encoder(model_dir, text_len, dtype), metadata={ENCODED_BY: identity})


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
