"""Single-file SD3 / SD3.5 transformer checkpoints, in diffusers' naming or Stability AI's original one.

A user may hold the transformer as one ``.safetensors`` file rather than a diffusers
``transformer/`` folder: a fine-tune exported by diffusers (``save_pretrained`` names:
``transformer_blocks.N.attn.to_q.weight``), or a checkpoint in the naming of Stability AI's
reference code (``sd3_medium.safetensors``, ``sd3.5_medium.safetensors``), which may also hold
the VAE (``first_stage_model.``) and the text encoders (``text_encoders.``)::

    model.diffusion_model.joint_blocks.N.x_block.attn.qkv.weight        fused q, k, v of the image stream
    model.diffusion_model.joint_blocks.N.context_block.attn.qkv.weight  fused q, k, v of the text stream
    model.diffusion_model.joint_blocks.N.x_block.attn2.qkv.weight       SD3.5's extra self-attention
    ...attn.ln_q.weight / ln_k.weight                                  RMS qk-norms
    model.diffusion_model.x_embedder / t_embedder / y_embedder / pos_embed / final_layer

``open_transformer`` reads either as diffusers-named tensors, lazily: each original tensor is
renamed by the tables below; a fused ``qkv`` becomes three tensors, each read as its third of
the stored one when asked for; the two adaLN linears that diffusers orders (scale, shift) rather
than (shift, scale) — ``final_layer`` and the text stream of the last (``context_pre_only``)
block — have their halves swapped on read. That is the mapping of diffusers'
``convert_sd3_transformer_checkpoint_to_diffusers`` (``loaders/single_file_utils.py``, 0.42),
which ``tests/test_sd3_original.py`` checks it against. With the ``model.diffusion_model.``
prefix present, keys outside it (VAE, text encoders) are ignored; inside it, a key no table
names keeps its name, so the loader's check reports it as unexpected, as it reports any missing
or mis-shaped transformer tensor (``weights.WeightsMismatch``).
"""

import re

import numpy as np

from danceopd_jax.models.weights import TensorSource, WeightsError, open_safetensors

ORIGINAL_PREFIX = "model.diffusion_model."  # the transformer's keys in Stability AI's all-in-one files
NAMINGS = ("diffusers", "original")

# Original module -> diffusers module, outside the blocks.
_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
# Inside block N: original module of each stream -> diffusers module under transformer_blocks.N
# (a tuple: the fused q, k, v, split in thirds along the output axis).
_IMAGE_STREAM = {
    "attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "attn.ln_q": "attn.norm_q",
    "attn.ln_k": "attn.norm_k",
    "attn.proj": "attn.to_out.0",
    "attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "attn2.ln_q": "attn2.norm_q",
    "attn2.ln_k": "attn2.norm_k",
    "attn2.proj": "attn2.to_out.0",
    "adaLN_modulation.1": "norm1.linear",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
_TEXT_STREAM = {
    "attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "attn.ln_q": "attn.norm_added_q",
    "attn.ln_k": "attn.norm_added_k",
    "attn.proj": "attn.to_add_out",
    "adaLN_modulation.1": "norm1_context.linear",
    "mlp.fc1": "ff_context.net.0.proj",
    "mlp.fc2": "ff_context.net.2",
}
_STREAMS = {"x_block": _IMAGE_STREAM, "context_block": _TEXT_STREAM}
_BLOCK_KEY = re.compile(r"joint_blocks\.(?P<index>\d+)\.(?P<stream>x_block|context_block)\.(?P<module>.+)")


def _transformer_keys(tensors: TensorSource) -> TensorSource:
    """The transformer's tensors: those under ``ORIGINAL_PREFIX`` (renamed without it) when a key has it, else all."""
    if any(k.startswith(ORIGINAL_PREFIX) for k in tensors):
        return tensors.with_prefix_removed(ORIGINAL_PREFIX)
    return tensors


def naming(tensors: TensorSource) -> str:
    """``"diffusers"`` or ``"original"``: the naming of an SD3 transformer checkpoint; ``WeightsError`` if neither."""
    if any(k.startswith("transformer_blocks.") for k in tensors):
        return "diffusers"
    if any(k.startswith("joint_blocks.") for k in _transformer_keys(tensors)):
        return "original"
    shown = ", ".join(sorted(tensors)[:3]) or "no tensors"
    raise WeightsError(
        f"{tensors.where}: not an SD3 transformer checkpoint: neither diffusers names (transformer_blocks.N...) "
        f"nor Stability AI's ({ORIGINAL_PREFIX}joint_blocks.N...); it holds {shown}"
    )


def _diffusers_module(module: str, last_block: int) -> tuple[str | tuple[str, ...], bool] | None:
    """``(diffusers module or fused q/k/v triple, halves swapped)`` of an original module, None if unknown."""
    if module in _TOP:
        return _TOP[module], module == "final_layer.adaLN_modulation.1"
    match = _BLOCK_KEY.fullmatch(module)
    if match is None or match["module"] not in _STREAMS[match["stream"]]:
        return None
    i, stream = int(match["index"]), match["stream"]
    target = _STREAMS[stream][match["module"]]
    prefix = f"transformer_blocks.{i}."
    renamed = tuple(prefix + t for t in target) if isinstance(target, tuple) else prefix + target
    swapped = stream == "context_block" and match["module"] == "adaLN_modulation.1" and i == last_block
    return renamed, swapped


def _stored(tensors: TensorSource, key: str):
    return lambda: tensors[key]


def _third(read, part: int):
    """The ``part``-th third (q, k or v) of a fused tensor, along its output axis."""

    def reader() -> np.ndarray:
        array = read()
        n = array.shape[0] // 3
        return array[part * n : (part + 1) * n]

    return reader


def _halves_swapped(read):
    """(shift, scale) rows -> (scale, shift): diffusers' ``swap_scale_shift``."""

    def reader() -> np.ndarray:
        array = read()
        n = array.shape[0] // 2
        return np.concatenate([array[n:], array[:n]])

    return reader


def diffusers_view(tensors: TensorSource) -> TensorSource:
    """An original-naming transformer checkpoint read under diffusers names (module docstring), lazily."""
    stored = _transformer_keys(tensors)
    blocks = {int(m["index"]) for k in stored if (m := _BLOCK_KEY.fullmatch(k.rsplit(".", 1)[0]))}
    last_block = max(blocks, default=-1)
    readers, shapes = {}, {}
    for key in stored:
        shape = stored.shape(key)
        read = _stored(stored, key)
        if key == "pos_embed":
            readers["pos_embed.pos_embed"], shapes["pos_embed.pos_embed"] = read, shape
            continue
        module, _, leaf = key.rpartition(".")
        found = _diffusers_module(module, last_block)
        if found is None:  # not a transformer tensor the model has: reported as unexpected by the loader
            readers[key], shapes[key] = read, shape
            continue
        target, swapped = found
        if isinstance(target, tuple):
            for part, name in enumerate(target):
                readers[f"{name}.{leaf}"] = _third(read, part)
                shapes[f"{name}.{leaf}"] = (shape[0] // 3, *shape[1:])
        else:
            readers[f"{target}.{leaf}"] = _halves_swapped(read) if swapped else read
            shapes[f"{target}.{leaf}"] = shape
    return TensorSource(readers, shapes, f"{tensors.where} (Stability AI naming, read as diffusers names)", tensors.metadata)


def open_transformer(path: str) -> TensorSource:
    """The SD3 transformer weights at ``path`` (a safetensors file, or a diffusers ``transformer/`` folder)
    under diffusers names, whichever naming they are stored in; ``WeightsError`` when neither."""
    tensors = open_safetensors(path)
    return tensors if naming(tensors) == "diffusers" else diffusers_view(tensors)
