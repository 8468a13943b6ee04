"""A model folder's VAE (``vae/``, diffusers' ``AutoencoderKL``): its config, its identity, the module.

Any family of ``models.backbones`` names its VAE component ``vae``; sampling decodes with it
(``sd3_sampling``) and the latent cache encodes image buckets with it (``data.latent_cache``).
"""

import os

from danceopd_jax.models import backbones, pipeline_folder, vae
from danceopd_jax.models.init_keys import InitKeys
from danceopd_jax.models.weights import load_module, open_safetensors


def vae_folder(model_dir: str) -> str:
    """The folder's ``vae/`` component, checked (``ModelFolderError`` naming what is wrong)."""
    return backbones.for_folder(model_dir).pipeline_components(model_dir, text_encoders=False)["vae"]


def vae_config(model_dir: str) -> vae.VAEConfig:
    """The VAE's config from its ``config.json`` alone (``ValueError`` naming an unsupported setting)."""
    return vae.config_from_diffusers(pipeline_folder.read_json(os.path.join(vae_folder(model_dir), "config.json")))


def downsampling(config: vae.VAEConfig) -> int:
    """Pixels per latent along a side: 2 per down block but the last (``2 ** (len(block_out_channels) - 1)``)."""
    return 2 ** (len(config.block_out_channels) - 1)


def vae_digest(model_dir: str) -> str:
    """A digest of the VAE's files (``pipeline_folder.files_digest``): the same for a copy of the folder
    elsewhere, different for other weights or another config."""
    folder = vae_folder(model_dir)
    return pipeline_folder.files_digest(pipeline_folder.folder_files(model_dir, [folder]))


def load_vae(model_dir: str) -> vae.AutoencoderKL:
    """The folder's ``vae/`` (float32), checked like every weights load."""
    config = vae_config(model_dir)
    return load_module(lambda: vae.AutoencoderKL(config, rngs=InitKeys(0)), open_safetensors(vae_folder(model_dir)), vae.torch_names(config))
