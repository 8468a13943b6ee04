"""Sampling a trained SD3 run: the student rebuilt from the pipeline folder, prompts, Euler, the VAE.

An SD3 run (``config.model_dir``, ``models/sd3.py``) checkpoints only its student's LoRA; the
frozen transformer, the text encoders and the VAE are read again from the diffusers folder:

  * student: the folder's transformer (``sd3.load_base``; the run's ``transformer_path`` file
    when it set one) plus the LoRA of the run's latest
    checkpoint, its EMA when the run kept one (``checkpoints.restore_model_params``, as a DiT
    student is loaded); or the plain transformer (``trained=False``) to compare against;
  * prompts: encoded by the folder's CLIP-L, CLIP-G and T5 (``models.sd3_prompts``) to the run's
    ``condition.text_len`` tokens, as training encoded them (float32); the classifier-free
    guidance null is the empty prompt's encoding (``sd3.with_null``), as in training;
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
from danceopd_jax.models import lora, mmdit, sd3, sd3_folder, sd3_prompts, vae
from danceopd_jax.models.init_keys import InitKeys
from danceopd_jax.models.weights import load_module, open_safetensors


@dataclasses.dataclass(frozen=True)
class SD3Student:
    """The student of an SD3 run: ``nnx.merge(graphdef, adapters, base)``.

    ``adapters`` is the trained LoRA state (empty for the untrained base), ``base`` the folder's
    transformer; ``torch_names`` the base's weights table (``mmdit.torch_names``), which names
    the adapted modules on export. ``step`` is the checkpoint's step (None for the base).
    """

    config: ConfigDict
    graphdef: nnx.GraphDef
    adapters: nnx.State
    base: nnx.State
    torch_names: dict[str, str]
    step: int | None

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.adapters, self.base)


def sd3_run_config(workdir: str) -> ConfigDict:
    """The run config of ``workdir``; a ``ValueError`` unless it is an SD3 run (``config.model_dir`` set)."""
    config = read_run_config(workdir)
    if not config.get("model_dir"):
        raise ValueError(f"{workdir} is not an SD3 run: its config.json has no model_dir (a DiT run)")
    return config


def load_student(workdir: str, *, trained: bool = True) -> SD3Student:
    """The student of the SD3 run in ``workdir`` on the local devices (replicated).

    ``trained=False`` gives the plain transformer (no LoRA, no checkpoint read). The LoRA is
    restored before the base is read, so a run without checkpoints fails before the big read.
    """
    config = sd3_run_config(workdir)
    spec = config.student if trained else ConfigDict({**config.student.to_dict(), "lora_rank": 0})
    mesh = parallel.make_mesh({"data": -1})
    rules = parallel.axis_rules({}, build.logical_axes(config))
    graphdef, abstract, _ = parallel.abstract_model_state(sd3.model_factory(config.model_dir, spec), mesh, rules)
    graphdef, abstract_adapters, abstract_base = nnx.split(nnx.merge(graphdef, abstract), lora.LoRAParam, ...)
    adapters, step = abstract_adapters, None
    if trained:
        step = checkpoints.latest_step(workdir)
        adapters = checkpoints.restore_model_params(workdir, abstract_adapters, parallel.shardings_of(abstract_adapters, mesh, rules))
    base_shardings = parallel.shardings_of(abstract_base, mesh, rules)
    base = sd3.load_base(config.model_dir, abstract_base, base_shardings, config.get("transformer_path", ""))
    return SD3Student(config, graphdef, adapters, base, mmdit.torch_names_of(abstract_base), step)


def encode_prompts(config: ConfigDict, prompts: Sequence[str]) -> tuple[dict, dict]:
    """``(cond, null)``: ``prompts`` encoded by the run folder's text encoders as training did.

    ``cond`` = ``{"text": [B, L, D], "pooled": [B, P]}`` with L = ``condition.text_len``; ``null``
    is the empty prompt's ``{"text": [L, D], "pooled": [P]}`` (``sd3.null_condition``). The
    encoders are freed on return.
    """
    encoders = sd3_prompts.load_sd3_text_encoders(config.model_dir)
    out = sd3_prompts.encode_prompts(encoders, [*prompts, ""], config.condition.text_len - sd3.CLIP_TOKENS)
    cond = {key: value[:-1] for key, value in out.items()}
    return cond, {key: value[-1] for key, value in out.items()}


@functools.lru_cache(maxsize=8)
def _sampler(graphdef: nnx.GraphDef, latent_shape: tuple, steps: int, shift: float, schedule: str, cfg_scale: float):
    """The jitted Euler sampler of one student structure and setting, compiled once. The adapters are
    folded into their kernels once per call (``lora.fold_adapters``), as the training rollout does."""

    @jax.jit
    def run(adapters, base, cond, null, key):
        student = inference_field(*lora.fold_adapters(graphdef, adapters, base))
        field = cfg_field(student, cfg_scale, sd3.with_null(null))
        noise = jax.random.normal(key, (cond["text"].shape[0], *latent_shape), jnp.float32)
        return sample(field, noise, sigma_grid(steps, shift, schedule), cond)

    return run


def sample_latents(student: SD3Student, cond: dict, null: dict, key: jax.Array, *, steps: int, cfg_scale: float = 1.0) -> np.ndarray:
    """Euler samples [B, image_size, image_size, channels] of the student under ``cond`` (``encode_prompts``),
    from noise ``jax.random.normal(key, ...)``, over the run's sigma grid (its shift and schedule); CFG when ``cfg_scale != 1``."""
    c = student.config
    latent_shape = (c.image_size, c.image_size, c.channels)
    run = _sampler(student.graphdef, latent_shape, int(steps), float(c.shift), run_sigma_schedule(c), float(cfg_scale))
    return np.asarray(run(student.adapters, student.base, cond, null, key))


def load_vae(model_dir: str) -> vae.AutoencoderKL:
    """The folder's ``vae/`` (float32), checked like every weights load."""
    config = vae.config_from_diffusers(sd3_folder.component_config(model_dir, "vae"))
    folder = sd3_folder.pipeline_components(model_dir)["vae"]
    return load_module(lambda: vae.AutoencoderKL(config, rngs=InitKeys(0)), open_safetensors(folder), vae.torch_names(config))


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


def generate(student: SD3Student, prompts: Sequence[str], *, steps: int | None = None, cfg_scale: float = 1.0, seed: int = 0) -> np.ndarray:
    """Images [B, H, W, 3] float32 in [-1, 1] of ``prompts``: encode, Euler-sample (``steps``
    default: the run's rollout steps), decode. The noise is ``jax.random.key(seed)``'s."""
    config = student.config
    cond, null = encode_prompts(config, prompts)
    latents = sample_latents(student, cond, null, jax.random.key(seed), steps=steps or config.rollout_steps, cfg_scale=cfg_scale)
    return decode_latents(load_vae(config.model_dir), latents)

