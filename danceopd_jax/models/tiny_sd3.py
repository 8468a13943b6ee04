"""Write a tiny random SD3-family diffusers folder: the whole SD3 path, on a CPU, in seconds.

    python -m danceopd_jax.models.tiny_sd3 --out workdirs/tiny_sd3

The folder has the layout and file formats of a real SD3.5 download (``model_index.json``,
``transformer/`` with a dual-attention layer and RMS qk-norm, a 16-channel ``vae/`` with 8x
downsampling, CLIP-L, CLIP-G and T5 encoders with their tokenizers, the flow-matching
``scheduler/``), so ``StableDiffusion3Pipeline.from_pretrained`` reads it, and so does this
project's loader. Beside the components it writes ``prompts.txt`` (prompts over the tiny
vocabulary) and ``teacher_lora.safetensors`` (a random rank-4 LoRA in diffusers naming: a
stand-in realism teacher over the same base) for ``configs/sd3_smoke.py``.

Weights are our own NNX modules, randomly initialised (zero-initialised leaves are drawn
small instead, so every part computes something) and written in PyTorch naming and layout.
No PyTorch is involved.
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from danceopd_jax.models import clip, lora, mmdit, t5, vae
from danceopd_jax.models.init_keys import InitKeys
from danceopd_jax.models.tiny_tokenizers import write_clip_tokenizer, write_t5_tokenizer
from danceopd_jax.models.weights import from_nnx_layout, param_path, write_safetensors

DIFFUSERS_VERSION = "0.42.1"
WORDS = (
    "a photo of the red green blue yellow cat dog house tree car sky city night street portrait "
    "realistic painting small big on in with under mountain river"
).split()
PROMPTS = [
    "a photo of a red cat", "a blue car in the city", "a small house under a tree", "a dog on the street at night",
    "a portrait of a cat", "a realistic painting of a river", "a big yellow tree", "a green mountain with a sky",
]  # fmt: skip

TRANSFORMER = dict(
    sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
    pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=[0],
)  # fmt: skip
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=4,
    block_out_channels=[8, 8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, act_fn="silu", sample_size=64, scaling_factor=1.5305,
    shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
    force_upcast=True,
)  # fmt: skip
SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0)
LORA_RANK = 4
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out"]


def _clip_config(vocab: dict, hidden_act: str, eos_token_id: int, seed_name: str) -> dict:
    """A transformers ``CLIPTextConfig`` dict (CLIP-L: quick_gelu, legacy EOS id 2; CLIP-G: gelu)."""
    return dict(
        architectures=["CLIPTextModelWithProjection"], model_type="clip_text_model", vocab_size=len(vocab),
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, projection_dim=16,
        max_position_embeddings=77, hidden_act=hidden_act, layer_norm_eps=1e-5, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=eos_token_id, pad_token_id=1, initializer_range=0.02, initializer_factor=1.0,
        attention_dropout=0.0, dropout=0.0, torch_dtype="float32", _name_or_path=seed_name,
    )  # fmt: skip


def _t5_config(vocab_size: int) -> dict:
    return dict(
        architectures=["T5EncoderModel"], model_type="t5", vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64,
        num_layers=2, num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True, layer_norm_epsilon=1e-6,
        dropout_rate=0.0, is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
        tie_word_embeddings=False, torch_dtype="float32",
    )  # fmt: skip


def randomised_state(module: nnx.Module, seed: int) -> nnx.State:
    """The module's variables, with every all-zero parameter (adaLN-Zero, zero biases) drawn from N(0, 0.02^2)."""
    key = jax.random.key(seed)
    leaves = []
    for i, (path, leaf) in enumerate(nnx.to_flat_state(nnx.state(module))):
        value = leaf[...]
        if isinstance(leaf, nnx.Param) and not jnp.any(value):
            value = 0.02 * jax.random.normal(jax.random.fold_in(key, i), value.shape, value.dtype)
        leaves.append((path, leaf.replace(value)))
    return nnx.from_flat_state(leaves)


def torch_tensors(state: nnx.State, names: dict[str, str]) -> dict[str, np.ndarray]:
    """``state`` as a PyTorch-named state dict (``names``: dotted NNX path -> torch key), in torch layout."""
    tensors = {}
    for path, leaf in nnx.to_flat_state(state):
        dotted = param_path(path)
        tensors[names[dotted]] = np.ascontiguousarray(from_nnx_layout(np.asarray(leaf[...], np.float32), dotted))
    return tensors


def _write_component(folder: str, config: dict, weights_file: str, tensors: dict[str, np.ndarray], config_name="config.json"):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, config_name), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    write_safetensors(os.path.join(folder, weights_file), tensors, {"format": "pt"})


def _write_model(folder: str, module: nnx.Module, names: dict[str, str], config: dict, weights_file: str, seed: int):
    _write_component(folder, config, weights_file, torch_tensors(randomised_state(module, seed), names))


def write_tiny_sd3(out: str, seed: int = 0) -> str:
    """Write the tiny SD3-family folder (module docstring) to ``out``; returns ``out``."""
    os.makedirs(out, exist_ok=True)
    rngs = InitKeys(seed)

    # transformer and vae (diffusers components)
    transformer_config = mmdit.config_from_diffusers(TRANSFORMER)
    transformer = mmdit.MMDiT(transformer_config, rngs=rngs)
    diffusers_meta = {"_diffusers_version": DIFFUSERS_VERSION}
    _write_model(
        os.path.join(out, "transformer"), transformer, mmdit.torch_names(transformer_config),
        {"_class_name": "SD3Transformer2DModel", **diffusers_meta, **TRANSFORMER}, "diffusion_pytorch_model.safetensors", seed,
    )  # fmt: skip
    vae_config = vae.config_from_diffusers(VAE)
    _write_model(
        os.path.join(out, "vae"), vae.AutoencoderKL(vae_config, rngs=rngs), vae.torch_names(vae_config),
        {"_class_name": "AutoencoderKL", **diffusers_meta, **VAE}, "diffusion_pytorch_model.safetensors", seed + 1,
    )  # fmt: skip
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
        json.dump({**SCHEDULER, **diffusers_meta}, f, indent=2)

    # tokenizers and text encoders (transformers components)
    write_clip_tokenizer(os.path.join(out, "tokenizer"), WORDS, variant="clip-l")
    write_clip_tokenizer(os.path.join(out, "tokenizer_2"), WORDS, variant="clip-g")
    write_t5_tokenizer(os.path.join(out, "tokenizer_3"), WORDS)
    with open(os.path.join(out, "tokenizer", "vocab.json"), encoding="utf-8") as f:
        clip_vocab = json.load(f)
    with open(os.path.join(out, "tokenizer_3", "tokenizer.json"), encoding="utf-8") as f:
        t5_vocab_size = len(json.load(f)["model"]["vocab"])
    encoders = {
        "text_encoder": (clip, _clip_config(clip_vocab, "quick_gelu", 2, "clip-l")),
        "text_encoder_2": (clip, _clip_config(clip_vocab, "gelu", clip_vocab["<|endoftext|>"], "clip-g")),
        "text_encoder_3": (t5, _t5_config(t5_vocab_size)),
    }
    for i, (name, (family, config)) in enumerate(encoders.items()):
        model_config = family.config_from_hf(config)
        model = (clip.CLIPTextModelWithProjection if family is clip else t5.T5EncoderModel)(model_config, rngs=rngs)
        _write_model(os.path.join(out, name), model, family.torch_names(model_config), config, "model.safetensors", seed + 2 + i)

    index = {"_class_name": "StableDiffusion3Pipeline", **diffusers_meta}
    index.update(
        transformer=["diffusers", "SD3Transformer2DModel"], vae=["diffusers", "AutoencoderKL"],
        scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"], text_encoder=["transformers", "CLIPTextModelWithProjection"],
        text_encoder_2=["transformers", "CLIPTextModelWithProjection"], text_encoder_3=["transformers", "T5EncoderModel"],
        tokenizer=["transformers", "CLIPTokenizer"], tokenizer_2=["transformers", "CLIPTokenizer"],
        tokenizer_3=["transformers", "T5TokenizerFast"], image_encoder=[None, None], feature_extractor=[None, None],
    )  # fmt: skip
    with open(os.path.join(out, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)

    # extras for configs/sd3_smoke.py: prompts and a random LoRA teacher over this transformer
    with open(os.path.join(out, "prompts.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(PROMPTS) + "\n")
    teacher = mmdit.MMDiT(transformer_config, rngs=InitKeys(seed))
    lora.add_lora(teacher, rank=LORA_RANK, alpha=LORA_RANK, targets=LORA_TARGETS, rngs=InitKeys(seed + 10))
    randomise_lora(teacher, seed + 11)
    lora.export_lora(teacher, mmdit.torch_names(transformer_config), os.path.join(out, "teacher_lora.safetensors"))
    return out


def randomise_lora(model: nnx.Module, seed: int, scale: float = 0.3) -> None:
    """Draw every LoRA factor (B included, zero at init) from N(0, scale^2), in place."""
    key = jax.random.key(seed)
    leaves = [
        (path, leaf.replace(scale * jax.random.normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype)))
        for i, (path, leaf) in enumerate(nnx.to_flat_state(nnx.state(model, lora.LoRAParam)))
    ]
    nnx.update(model, nnx.from_flat_state(leaves))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write (created; existing files are overwritten)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_tiny_sd3(args.out, args.seed)
    print(f"wrote a tiny random SD3-family diffusers folder to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
