"""Sampling a trained run on a model folder: the student rebuilt from the folder, prompts, Euler, the VAE.

A run on a diffusers folder (``config.model_dir``, its family in ``models.backbones``, e.g. SD3:
``models/sd3.py``) checkpoints only its student's LoRA; the frozen transformer, the text encoders
and the VAE are read again from the folder:

  * student: the folder's transformer (the backbone's ``load_base``; the run's ``transformer_path``
    file when it set one) plus the LoRA of the run's latest
    checkpoint, its EMA when the run kept one (``checkpoints.restore_model_params``, as a DiT
    student is loaded); or the plain transformer (``trained=False``) to compare against;
  * prompts: encoded by the folder's text encoders (the backbone's ``prompt_encoder``; SD3: CLIP-L,
    CLIP-G and T5) to the run's ``condition.text_len`` tokens, as training encoded them (float32);
    the classifier-free guidance null is the backbone's (``with_null``; SD3: the empty prompt's
    encoding), as in training;
  * sampling: Euler from N(0, I) latents [B, image_size, image_size, channels] over the run's
    shifted sigma grid (``core.rollout.sample``, ``core.schedule.sigma_grid``), CFG
    ``v_u + s (v_c - v_u)`` (``core.fields.cfg_field``), the LoRA folded into its kernels once
    (``lora.fold_adapters``), as in the training rollout;
  * decoding: the folder's ``AutoencoderKL`` on ``latents / scaling_factor + shift_factor``
    (``vae.images_from_latents``, diffusers' ``StableDiffusion3Pipeline``), images clipped to
    [-1, 1].
"""

import dataclasses
import functools
from collections.abc import Sequence
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from danceopd_jax import build, checkpoints, parallel
from danceopd_jax.config_lib import run_sigma_schedule
from danceopd_jax.config_validation import read_run_config
from danceopd_jax.core.fields import cfg_field, inference_field
from danceopd_jax.core.rollout import sample
from danceopd_jax.core.schedule import sigma_grid
from danceopd_jax.data.prompt_embeddings import in_memory_table
from danceopd_jax.models import backbones, lora, vae
from danceopd_jax.models.folder_vae import load_vae


@dataclasses.dataclass(frozen=True)
class SD3Student:
    """The student of a run on a model folder: ``nnx.merge(graphdef, adapters, base)``.

    ``adapters`` is the trained LoRA state (empty for the untrained base), ``base`` the folder's
    transformer; ``torch_names`` the base's weights table (the backbone's ``torch_names_of``), which
    names the adapted modules on export. ``step`` is the checkpoint's step (None for the base).
    ``backbone`` is the folder's family module (``models.backbones``).
    """

    backbone: ModuleType
    config: ConfigDict
    graphdef: nnx.GraphDef
    adapters: nnx.State
    base: nnx.State
    torch_names: dict[str, str]
    step: int | None

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.adapters, self.base)


def sd3_run_config(workdir: str) -> ConfigDict:
    """The run config of ``workdir``; a ``ValueError`` unless it is a run on a model folder (``config.model_dir`` set)."""
    config = read_run_config(workdir)
    if not config.get("model_dir"):
        raise ValueError(f"{workdir} is not an SD3 run: its config.json has no model_dir (a DiT run)")
    return config


def load_student(workdir: str, *, trained: bool = True) -> SD3Student:
    """The student of the model folder run in ``workdir`` on the local devices (replicated).

    ``trained=False`` gives the plain transformer (no LoRA, no checkpoint read). The LoRA is
    restored before the base is read, so a run without checkpoints fails before the big read.
    """
    config = sd3_run_config(workdir)
    backbone = backbones.of(config)
    spec = config.student if trained else ConfigDict({**config.student.to_dict(), "lora_rank": 0})
    mesh = parallel.make_mesh({"data": -1})
    rules = parallel.axis_rules({}, build.logical_axes(config))
    graphdef, abstract, _ = parallel.abstract_model_state(backbone.model_factory(config.model_dir, spec), mesh, rules)
    graphdef, abstract_adapters, abstract_base = nnx.split(nnx.merge(graphdef, abstract), lora.LoRAParam, ...)
    adapters, step = abstract_adapters, None
    if trained:
        step = checkpoints.latest_step(workdir)
        adapters = checkpoints.restore_model_params(workdir, abstract_adapters, parallel.shardings_of(abstract_adapters, mesh, rules))
    base_shardings = parallel.shardings_of(abstract_base, mesh, rules)
    base = backbone.load_base(config.model_dir, abstract_base, base_shardings, config.get("transformer_path", ""))
    return SD3Student(backbone, config, graphdef, adapters, base, backbone.torch_names_of(abstract_base), step)


def encode_prompts(config: ConfigDict, prompts: Sequence[str], template: str = "t2i") -> tuple[dict, dict]:
    """``(cond, null)``: ``prompts`` (edit instructions with ``template="edit"``) encoded by the run
    folder's text encoders as training did.

    ``cond`` is the batch's condition (SD3: ``{"text": [B, L, D], "pooled": [B, P]}``; Z-Image:
    ``text``, ``text_mask``, ``text_segments``; L = ``condition.text_len``); ``null`` the CFG null the
    backbone makes of the empty prompt's encodings (its ``null_condition``; an edit's null is the
    empty instruction's). The encoders are freed on return.
    """
    backbone = backbones.of(config)
    encode = backbone.prompt_encoder(config.model_dir, config.condition.text_len)
    out = encode([*prompts, ""]) if template == "t2i" else encode([*prompts, ""], template)
    cond = {key: value[:-1] for key, value in out.items()}
    nulls = [("t2i", encode([""]) if template != "t2i" else out)] + ([(template, out)] if template != "t2i" else [])
    table = in_memory_table([""] * len(nulls), {key: np.concatenate([o[key][-1:] for _, o in nulls]) for key in out},
                            templates=[t for t, _ in nulls])  # fmt: skip
    return cond, backbone.null_condition(table)


def source_latents(autoencoder: vae.AutoencoderKL, sources: Sequence[np.ndarray]) -> np.ndarray:
    """Latents [B, h, w, C] of edit sources (float32 images in [-1, 1] at the VAE's resolution): the
    posterior mode, shifted and scaled, as training's latent cache encodes them (``data.latent_cache``)."""
    graphdef, state = nnx.split(autoencoder)
    return np.asarray(_encoder(graphdef)(state, np.stack(sources).astype(np.float32)))


@functools.lru_cache(maxsize=8)
def _sampler(graphdef: nnx.GraphDef, with_null, latent_shape: tuple, steps: int, shift: float, schedule: str, cfg_scale: float):
    """The jitted Euler sampler of one student structure and setting, compiled once; ``with_null`` is
    the backbone's CFG null. The adapters are folded into their kernels once per call
    (``lora.fold_adapters``), as the training rollout does."""

    @jax.jit
    def run(adapters, base, cond, null, key):
        student = inference_field(*lora.fold_adapters(graphdef, adapters, base))
        field = cfg_field(student, cfg_scale, with_null(null))
        noise = jax.random.normal(key, (cond["text"].shape[0], *latent_shape), jnp.float32)
        return sample(field, noise, sigma_grid(steps, shift, schedule), cond)

    return run


def sample_latents(student: SD3Student, cond: dict, null: dict, key: jax.Array, *, steps: int, cfg_scale: float = 1.0) -> np.ndarray:
    """Euler samples [B, image_size, image_size, channels] of the student under ``cond`` (``encode_prompts``),
    from noise ``jax.random.normal(key, ...)``, over the run's sigma grid (its shift and schedule); CFG when ``cfg_scale != 1``."""
    c = student.config
    latent_shape = (c.image_size, c.image_size, c.channels)
    schedule = run_sigma_schedule(c)
    run = _sampler(student.graphdef, student.backbone.with_null, latent_shape, int(steps), float(c.shift), schedule, float(cfg_scale))
    return np.asarray(run(student.adapters, student.base, cond, null, key))


@functools.lru_cache(maxsize=4)
def _encoder(graphdef: nnx.GraphDef):
    return jax.jit(lambda state, images: vae.latents_from_images(nnx.merge(graphdef, state), images))


@functools.lru_cache(maxsize=4)
def _decoder(graphdef: nnx.GraphDef):
    @jax.jit
    def decode(state, latents):
        return jnp.clip(vae.images_from_latents(nnx.merge(graphdef, state), latents), -1.0, 1.0)

    return decode


def decode_latents(autoencoder: vae.AutoencoderKL, latents: np.ndarray) -> np.ndarray:
    """Images [B, H, W, 3] float32 in [-1, 1] of diffusion-model latents (``vae.images_from_latents``)."""
    if latents.shape[-1] != autoencoder.config.latent_channels:
        raise ValueError(f"latents have {latents.shape[-1]} channels, the VAE takes {autoencoder.config.latent_channels}")
    graphdef, state = nnx.split(autoencoder)
    return np.asarray(_decoder(graphdef)(state, latents))


def generate(
    student: SD3Student,
    prompts: Sequence[str],
    *,
    steps: int | None = None,
    cfg_scale: float = 1.0,
    seed: int = 0,
    sources: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """Images [B, H, W, 3] float32 in [-1, 1] of ``prompts``: encode, Euler-sample (``steps``
    default: the run's rollout steps), decode. The noise is ``jax.random.key(seed)``'s. With
    ``sources`` (one image per prompt at the VAE's resolution, for a family that reads them,
    ``READS_SOURCE``) the prompts are edit instructions and each sample edits its source, whose
    latent joins the condition clean (``source``, ``source_mask``)."""
    config = student.config
    cond, null = encode_prompts(config, prompts, "t2i" if sources is None else "edit")
    autoencoder = load_vae(config.model_dir)
    if sources is not None:
        cond.update(source=source_latents(autoencoder, sources), source_mask=np.ones(len(prompts), bool))
    latents = sample_latents(student, cond, null, jax.random.key(seed), steps=steps or config.rollout_steps, cfg_scale=cfg_scale)
    return decode_latents(autoencoder, latents)

