"""The Z-Image family in a run (``models.backbones``): its folder, transformer, prompts and CFG null.

A run on a Z-Image diffusers folder (``config.model_dir``; ``model_index.json`` names a
``ZImagePipeline``) holds the folder's ``ZImageTransformer2DModel`` once, as the frozen shared
base (``models.zimage``), and every model spec of ``kind="zimage"`` is that base plus at most one
LoRA, as in an SD3 run (``models.sd3``): the student a fresh trainable LoRA (the authors' targets:
attention ``to_q``, ``to_k``, ``to_v``, ``to_out`` and the SwiGLU ``w1``, ``w2``, ``w3``), an
expert the deltas of its ``lora_path`` file or the plain base.

Prompts are encoded once by the folder's Qwen3 (``models.qwen3``, ``models.zimage_prompts``) into
the run's table (``models.prompt_cache``): a prompt alone through the T2I chat template, an edit
instruction (a record with a source image) through the three-segment in-context edit template,
each to ``condition.text_len`` tokens (a prompt longer than that is refused with one error naming
it, never cut: diffusers cuts silently at its ``max_sequence_length``). The condition is
``text`` [L, D], ``text_mask`` [L] and ``text_segments`` [3] (the transformer's docstring).

Classifier-free guidance: the null of a T2I sample is the empty prompt through the T2I template;
the null of an edit keeps the source image and drops the instruction (the edit template with an
empty instruction), as diffusers' Z-Image pipelines with their default negative prompt. The
project's CFG field is the paper's ``u + s (c - u)`` (``core.fields.cfg_field``); diffusers' Z-Image
pipelines compute ``c + g (c - u)``, so their ``guidance_scale`` g is our ``cfg_scale`` s = g + 1.
"""

from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from danceopd_jax.data.prompt_embeddings import Encoder, PromptEmbeddings
from danceopd_jax.models import lora, pipeline_folder, prompt_cache, zimage, zimage_prompts
from danceopd_jax.models.backbones import add_student_lora
from danceopd_jax.models.init_keys import InitKeys
from danceopd_jax.models.pipeline_folder import FolderLayout
from danceopd_jax.models.weights import load_state, open_safetensors

LAYOUT = FolderLayout(
    family="Z-Image",
    pipeline_classes=("ZImagePipeline", "ZImageImg2ImgPipeline"),
    required=("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
    optional=(),
    text_components=("text_encoder", "tokenizer"),
    tokenizers=("tokenizer",),
)
NAME = LAYOUT.family
MODEL_KIND = "zimage"
PIPELINE_CLASSES = LAYOUT.pipeline_classes
READS_SOURCE = True  # in-context editing: a clean source latent in the transformer's sequence
LOGICAL_AXES = zimage.LOGICAL_AXES + lora.LORA_AXES
LORA_PREFIX = "transformer."  # diffusers' Z-Image LoRA files: transformer.<module>.lora_A.weight
TEXT_ENCODERS = prompt_cache.TEXT_ENCODERS
TEXT_SEGMENTS_LEN = zimage_prompts.NUM_SEGMENTS
NULL_KEYS = ("text", "text_mask", "text_segments")
torch_names_of = zimage.torch_names_of


def pipeline_components(model_dir: str, text_encoders: bool = True) -> dict[str, str]:
    """``{component: folder}`` of a Z-Image pipeline folder, checked (``pipeline_folder.components``)."""
    return pipeline_folder.components(LAYOUT, model_dir, text_encoders)


def _transformer(model_dir: str) -> dict:
    return pipeline_folder.component_config(LAYOUT, model_dir, "transformer")


def latent_channels(model_dir: str) -> tuple[int, int]:
    """``(in_channels, out_channels)`` of the folder's transformer (one ``in_channels``, diffusers' default 16)."""
    channels = _transformer(model_dir).get("in_channels", 16)
    return channels, channels


def text_len_problem(text_len: int) -> str | None:
    """Why ``text_len`` caption tokens cannot be Z-Image's condition, or None."""
    return None if text_len >= 1 else "must be >= 1 caption tokens (the Z-Image pipelines use up to 512)"


def check_condition(model_dir: str, text_len: int, text_dim: int, pooled_dim: int) -> None:
    """Raise ``ValueError`` unless the run's condition fits the folder's transformer: Qwen3's width
    (``cap_feat_dim``) as ``text_dim``, no pooled embedding, at least one caption token."""
    want = dict(text_dim=_transformer(model_dir).get("cap_feat_dim", 2560), pooled_dim=0)
    got = dict(text_dim=text_dim, pooled_dim=pooled_dim)
    if got != want or text_len_problem(text_len):
        raise ValueError(f"config.condition {got} (text_len {text_len}) does not fit {model_dir}/transformer: it needs {want} "
                         "and text_len >= 1 caption tokens")  # fmt: skip


def check_transformer_file(path: str) -> None:
    """Raise ``ValueError`` unless ``path`` holds a Z-Image transformer in diffusers naming."""
    if "x_pad_token" not in open_safetensors(path):
        raise ValueError(f"{path}: not a Z-Image transformer checkpoint in diffusers naming (it has no x_pad_token)")


def transformer_config(model_dir: str, dtype: str, remat: str, attention: str = "xla", use_source: bool = False) -> zimage.ZImageConfig:
    """The ``ZImageConfig`` of the folder's transformer with a compute dtype, remat policy, attention
    and whether it reads a source image (in-context editing; no parameters of its own)."""
    return zimage.config_from_diffusers(_transformer(model_dir), dtype=dtype, remat=remat, attention=attention, use_source=use_source)


def model_factory(model_dir: str, spec) -> Callable[[], nnx.Module]:
    """The spec's model: the folder's transformer (reading sources where ``spec.use_source``), with a
    fresh LoRA for ``lora_rank`` > 0; an expert's LoRA file is applied afterwards (``backbones.expert_delta``)."""
    config = transformer_config(model_dir, spec.dtype, spec.remat, spec.get("attention", "xla"), spec.use_source)

    def make() -> nnx.Module:
        model = zimage.ZImageTransformer(config, rngs=InitKeys(spec.seed))
        return add_student_lora(model, spec) if spec.lora_rank else model

    return make


def load_base(model_dir: str, abstract_base: nnx.State, shardings, transformer_path: str = "") -> nnx.State:
    """The frozen base state, checked and read lazily: the folder's transformer weights, or those of
    the single diffusers-named file ``transformer_path`` in their place."""
    path = transformer_path or pipeline_components(model_dir, text_encoders=False)["transformer"]
    return load_state(abstract_base, open_safetensors(path), zimage.torch_names_of(abstract_base), shardings=shardings)


def weight_modules(model_dir: str) -> dict[str, str]:
    """``{NNX layer path: diffusers module}`` of the transformer's linear layers, from its config alone."""
    return lora.module_names(zimage.linear_torch_names(transformer_config(model_dir, "float32", "none")))


# ---------------------------------------------------------------- prompts


def prompt_encoder(model_dir: str, text_len: int, dtype: str = "float32") -> Encoder:
    """``(prompts, template="t2i") -> {"text": [B, text_len, D], "text_mask": [B, text_len],
    "text_segments": [B, 3]}`` (numpy) by the folder's Qwen3, loaded here; ``template`` ``edit``
    encodes edit instructions through the in-context edit template. A prompt over ``text_len``
    tokens is a ``ValueError`` naming it."""
    encoder = zimage_prompts.load_zimage_text_encoder(model_dir, dtype)

    def encode(batch: list[str], template: str = "t2i"):
        out = zimage_prompts.encode_prompts(encoder, batch, text_len, kind=template)
        return {k: np.asarray(v) for k, v in out.items()}

    return encode


def check_prompts(model_dir: str, prompts: Sequence[str], text_len: int, edit_prompts: Sequence[str] = ()) -> None:
    """Raise ``ValueError`` naming the first prompt (or edit instruction) whose tokens, in its template,
    exceed ``text_len``: it is refused, never cut (diffusers cuts at 512 silently). Reads the tokenizer only."""
    tokenizer = zimage_prompts.load_tokenizer(model_dir)
    for template, texts in (("t2i", prompts), ("edit", edit_prompts)):
        if texts:
            zimage_prompts.check_lengths(tokenizer, texts, text_len, template)


def text_encoders_digest(model_dir: str) -> str:
    """A digest of the folder's Qwen3 and tokenizer files (``prompt_cache.text_encoders_digest``)."""
    return prompt_cache.text_encoders_digest(LAYOUT, model_dir)


def prompt_table(
    model_dir: str, prompts: Sequence[str], path: str, text_len: int, dtype: str = "float32", edit_prompts: Sequence[str] = ()
) -> PromptEmbeddings:
    """The run's table of T2I ``prompts`` and ``edit_prompts`` encoded by the folder's Qwen3, cached at
    ``path`` (``prompt_cache.cached_table``)."""
    return prompt_cache.cached_table(LAYOUT, prompt_encoder, model_dir, prompts, path, text_len, dtype, edit_prompts)


def null_condition(table: PromptEmbeddings) -> dict[str, np.ndarray]:
    """The CFG nulls, stacked: row 0 the T2I null (the empty prompt), row 1 the edit null (an empty
    instruction) where the table has edit prompts; ``{key: [K, ...]}`` for the keys of ``NULL_KEYS``."""
    templates = ["t2i", "edit"] if "" not in table.missing([""], "edit") else ["t2i"]
    rows = [table("", template) for template in templates]
    return {key: np.stack([row[i] for row in rows]) for i, key in enumerate(NULL_KEYS)}


def with_null(null: dict) -> Callable[[dict], dict]:
    """``cond -> cond`` with each sample's text replaced by its null (``null_condition``): the edit
    null where the sample has a source (which is kept), the T2I null elsewhere."""

    def unconditional(cond: dict) -> dict:
        batch = cond["text"].shape[0]
        edits = cond["source_mask"].astype(jnp.int32) if "source_mask" in cond else jnp.zeros(batch, jnp.int32)
        row = jnp.minimum(edits, null["text"].shape[0] - 1)
        return {**cond, **{key: jnp.asarray(null[key])[row].astype(cond[key].dtype) for key in NULL_KEYS}}

    return unconditional
