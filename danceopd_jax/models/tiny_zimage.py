"""Write a tiny random Z-Image diffusers folder: the whole Z-Image path, on a CPU, in seconds.

    python -m danceopd_jax.models.tiny_zimage --out workdirs/tiny_zimage

The folder has the layout and file formats of a Z-Image release (``Tongyi-MAI/Z-Image-Turbo``),
so ``ZImagePipeline.from_pretrained`` reads it, and so do this project's loaders:

  * ``model_index.json``: ``ZImagePipeline`` with ``ZImageTransformer2DModel``, ``AutoencoderKL``,
    ``FlowMatchEulerDiscreteScheduler``, ``Qwen3Model`` and ``Qwen2Tokenizer`` (the classes
    diffusers' own Z-Image pipeline tests build: the pipelines read ``hidden_states[-2]`` and
    need no LM head; ``Qwen2Tokenizer`` is the class Qwen3's tokenizer config names);
  * ``transformer/``: ``TRANSFORMER``, the release's config shrunk (patch 2, 16 latent channels,
    two heads of 32 channels split 8 + 12 + 12 over the three RoPE axes like the release's
    32 + 48 + 48, the release's RoPE tables, ``cap_feat_dim`` the text encoder's hidden size);
  * ``text_encoder/``: a Qwen3 decoder (``qwen3_config``: GQA with 4 query and 2 key/value heads,
    three layers so that ``hidden_states[-2]``, what Z-Image reads, is a real layer's output) in
    ``Qwen3Model``'s state-dict names, the last layer and final norm included, which our encoder
    does not build (``qwen3.unused_torch_keys``) but a real folder has;
  * ``tokenizer/``: Qwen3's byte-level BPE over ``WORDS`` (the shapes world's words and the chat
    template's) with Qwen's chat special tokens and template (``write_qwen_tokenizer``);
  * ``vae/``: ``VAE``, the 16-channel Flux VAE layout of ``tiny_sd3`` (8x downsampling, no quant
    convs) with Z-Image's latent ``scaling_factor`` 0.3611 and ``shift_factor`` 0.1159;
  * ``scheduler/``: ``SCHEDULER``, Z-Image's flow-matching Euler schedule: shift 3.0, no dynamic
    shifting (the pipeline's ``mu`` is then unused).

64 x 64 pixel images are 8 x 8 latents, 16 image tokens of the transformer. Beside the components,
for the smoke configs:

  * ``prompts.txt``: T2I prompts of the shapes world (``data/scenes.py``), one a line;
  * ``teacher_lora.safetensors``: a random rank-4 LoRA in diffusers naming
    (``transformer.<module>.lora_A.weight`` / ``lora_B.weight``) on ``to_q``, ``to_k``, ``to_v``
    and ``to_out.0`` of every attention of the transformer (refiners and main layers): a
    stand-in teacher over the same base;
  * ``edits/edits.jsonl``: one edit pair per edit kind of the shapes world (``EDIT_TASKS``), in
    the OmniEdit columns ``uid, task, prompt, source_image, target_image`` with image paths
    relative to the manifest, the images ``edits/<uid>_source.png`` / ``_target.png`` rendered at
    ``IMAGE_SIZE`` pixels. Its tasks are the shapes world's edit kinds, so a bucket selecting
    ``recolour,reshape,add,remove`` (local) or ``night,sketch,background`` (global) finds each.

Weights are our own NNX modules, randomly initialised (zero-initialised leaves, i.e. the pad
tokens, the adaLN modulations, the final layer and the biases, are drawn small instead, so every
part computes something) and written in PyTorch naming and layout (``tiny_sd3``'s writers). No
PyTorch is involved. Everything is a pure function of the seed.
"""

import argparse
import dataclasses
import json
import os
import sys

import numpy as np
from PIL import Image

from danceopd_jax.commands import fail
from danceopd_jax.data import scenes
from danceopd_jax.data.scene_buckets import scene_examples
from danceopd_jax.models import lora, qwen3, vae, zimage
from danceopd_jax.models.init_keys import InitKeys
from danceopd_jax.models.tiny_sd3 import (
    DIFFUSERS_VERSION,
    LORA_RANK,
    LORA_TARGETS,
    _write_component,
    _write_model,
    randomise_lora,
    randomised_state,
    torch_tensors,
)
from danceopd_jax.models.tiny_sd3 import VAE as SD3_VAE
from danceopd_jax.models.tiny_tokenizers import QWEN_IM_END, QWEN_PAD, write_qwen_tokenizer

IMAGE_SIZE = 64  # pixels of the edit images: 8 x 8 latents, 16 image tokens
NUM_PROMPTS = 8
SCENE_NAMES = (*scenes.COLOURS, *scenes.BACKGROUNDS, *scenes.SHAPES, *scenes.SIZES, *scenes.POSITIONS)
WORDS = sorted(
    {
        *" ".join(SCENE_NAMES).split(),
        *"a and at in on the background".split(),  # the rest of the scene prompts
        *"add remove make turn into change to it night pencil sketch".split(),  # edit instructions
        *"user assistant".split(),  # the chat template's roles
    }
)
EDIT_TASKS = (*scenes.LOCAL_EDITS, *scenes.GLOBAL_EDITS)

TRANSFORMER = dict(
    all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=64, n_layers=2, n_refiner_layers=1, n_heads=2,
    n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32, rope_theta=256.0, t_scale=1000.0,
    axes_dims=[8, 12, 12], axes_lens=[1024, 512, 512],
)  # fmt: skip
VAE = {**SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}
SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def qwen3_config(vocab: dict[str, int]) -> dict:
    """A transformers ``Qwen3Config`` dict laid out like Qwen3-4B's (Z-Image's text encoder), tiny;
    ``vocab`` is the tokenizer's (its size and special ids)."""
    return dict(
        architectures=["Qwen3Model"], model_type="qwen3", vocab_size=len(vocab), hidden_size=TRANSFORMER["cap_feat_dim"],
        intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        hidden_act="silu", max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling=None,
        attention_bias=False, attention_dropout=0.0, use_sliding_window=False, sliding_window=None, max_window_layers=3,
        tie_word_embeddings=True, bos_token_id=vocab[QWEN_PAD], eos_token_id=vocab[QWEN_IM_END], initializer_range=0.02,
        use_cache=True, torch_dtype="float32",
    )  # fmt: skip


def _qwen3_tensors(config: qwen3.Qwen3Config, seed: int) -> dict[str, np.ndarray]:
    """Random ``Qwen3Model`` tensors of ``config``, all of them: our encoder built one layer deeper
    builds every layer of ``config`` (it leaves out only its own last one), plus the final norm."""
    deeper = dataclasses.replace(config, num_hidden_layers=config.num_hidden_layers + 1)
    model = qwen3.Qwen3TextEncoder(deeper, rngs=InitKeys(seed))
    tensors = torch_tensors(randomised_state(model, seed), qwen3.torch_names(deeper))
    return {**tensors, "norm.weight": np.ones(config.hidden_size, np.float32)}


def _save_png(image: np.ndarray, path: str) -> None:
    """A render in [-1, 1] as an 8-bit RGB PNG."""
    Image.fromarray(np.round((image + 1.0) * 127.5).clip(0, 255).astype(np.uint8)).save(path)


def _write_edits(folder: str, seed: int) -> None:
    """``edits.jsonl`` and its images (module docstring): one pair per ``EDIT_TASKS`` kind."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng([seed, 1])
    rows = []
    for task in EDIT_TASKS:
        source = scenes.sample_scene(rng, num_objects={"add": 1, "remove": 2}.get(task))
        edit = scenes.local_edit if task in scenes.LOCAL_EDITS else scenes.global_edit
        prompt, target = edit(source, rng, task)
        uid = f"{task}-0"
        images = {"source_image": f"{uid}_source.png", "target_image": f"{uid}_target.png"}
        _save_png(scenes.render(source, IMAGE_SIZE), os.path.join(folder, images["source_image"]))
        _save_png(scenes.render(target, IMAGE_SIZE), os.path.join(folder, images["target_image"]))
        rows.append({"uid": uid, "task": task, "prompt": prompt, **images})
    with open(os.path.join(folder, "edits.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def write_tiny_zimage(out: str, seed: int = 0) -> str:
    """Write the tiny Z-Image folder (module docstring) to ``out``; returns ``out``."""
    os.makedirs(out, exist_ok=True)
    diffusers_meta = {"_diffusers_version": DIFFUSERS_VERSION}

    # transformer, vae, scheduler (diffusers components)
    transformer_config = zimage.config_from_diffusers(TRANSFORMER)
    _write_model(
        os.path.join(out, "transformer"), zimage.ZImageTransformer(transformer_config, rngs=InitKeys(seed)),
        zimage.torch_names(transformer_config), {"_class_name": "ZImageTransformer2DModel", **diffusers_meta, **TRANSFORMER},
        "diffusion_pytorch_model.safetensors", seed,
    )  # fmt: skip
    vae_config = vae.config_from_diffusers(VAE)
    _write_model(
        os.path.join(out, "vae"), vae.AutoencoderKL(vae_config, rngs=InitKeys(seed + 1)), vae.torch_names(vae_config),
        {"_class_name": "AutoencoderKL", **diffusers_meta, **VAE}, "diffusion_pytorch_model.safetensors", seed + 1,
    )  # fmt: skip
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
        json.dump({**SCHEDULER, **diffusers_meta}, f, indent=2)

    # tokenizer and text encoder (transformers components)
    write_qwen_tokenizer(os.path.join(out, "tokenizer"), WORDS)
    with open(os.path.join(out, "tokenizer", "tokenizer.json"), encoding="utf-8") as f:
        tokenizer = json.load(f)
    vocab = {**tokenizer["model"]["vocab"], **{t["content"]: t["id"] for t in tokenizer["added_tokens"]}}
    encoder_config = qwen3_config(vocab)
    _write_component(
        os.path.join(out, "text_encoder"), encoder_config, "model.safetensors",
        _qwen3_tensors(qwen3.config_from_hf(encoder_config), seed + 2),
    )  # fmt: skip

    index = {"_class_name": "ZImagePipeline", **diffusers_meta}
    index.update(
        scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"], text_encoder=["transformers", "Qwen3Model"],
        tokenizer=["transformers", "Qwen2Tokenizer"], transformer=["diffusers", "ZImageTransformer2DModel"],
        vae=["diffusers", "AutoencoderKL"],
    )  # fmt: skip
    with open(os.path.join(out, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)

    # extras for the smoke configs: prompts, a random LoRA teacher over this transformer, edit pairs
    with open(os.path.join(out, "prompts.txt"), "w", encoding="utf-8") as f:
        f.writelines(example.prompt + "\n" for example in scene_examples("scenes_t2i", NUM_PROMPTS, seed))
    teacher = zimage.ZImageTransformer(transformer_config, rngs=InitKeys(seed))
    lora.add_lora(teacher, rank=LORA_RANK, alpha=LORA_RANK, targets=LORA_TARGETS, rngs=InitKeys(seed + 10))
    randomise_lora(teacher, seed + 11)
    lora.export_lora(teacher, zimage.torch_names(transformer_config), os.path.join(out, "teacher_lora.safetensors"))
    _write_edits(os.path.join(out, "edits"), seed)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write (created; must not exist or be empty)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        fail(f"--out {args.out} exists and is not an empty folder")
    write_tiny_zimage(args.out, args.seed)
    print(f"wrote a tiny random Z-Image diffusers folder to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
