"""An SD3 / SD3.5 diffusers pipeline folder: its components, checked before anything is loaded.

A diffusers pipeline folder (what ``save_pretrained`` writes and what users download) holds a
``model_index.json`` naming each component and one subfolder per component::

    model_index.json            {"_class_name": "StableDiffusion3Pipeline", "transformer": [...], ...}
    transformer/                config.json + diffusion_pytorch_model[-0000k-of-0000n].safetensors (+ index)
    vae/                        config.json + diffusion_pytorch_model.safetensors
    text_encoder/, text_encoder_2/, text_encoder_3/    config.json + model*.safetensors (CLIP-L, CLIP-G, T5)
    tokenizer/, tokenizer_2/, tokenizer_3/
    scheduler/                  scheduler_config.json (FlowMatchEulerDiscreteScheduler: ``shift``)

SD3 runs without T5 (``text_encoder_3: [null, null]``), so the third encoder and tokenizer are
optional; every other component must be present, with its config. A run given precomputed prompt
embeddings (``config.prompt_embeddings``) never loads the text encoders: their components are then
not needed (``text_encoders=False``).
"""

from danceopd_jax.models import pipeline_folder
from danceopd_jax.models.pipeline_folder import FolderLayout, ModelFolderError

PIPELINE_CLASSES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline")
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", *TOKENIZERS)
LAYOUT = FolderLayout(
    family="SD3",
    pipeline_classes=PIPELINE_CLASSES,
    required=("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    optional=("text_encoder_3", "tokenizer_3"),
    text_components=TEXT_COMPONENTS,
    tokenizers=TOKENIZERS,
)


def pipeline_components(model_dir: str, text_encoders: bool = True) -> dict[str, str]:
    """``{component: folder}`` of an SD3 pipeline folder, checked (``pipeline_folder.components``): the
    index, and each component's folder and config; the text encoders and tokenizers only with
    ``text_encoders`` (else left out). T5 comes with its tokenizer or not at all."""
    components = pipeline_folder.components(LAYOUT, model_dir, text_encoders)
    if ("text_encoder_3" in components) != ("tokenizer_3" in components):
        raise ModelFolderError(f"{model_dir}: text_encoder_3 and tokenizer_3 come together (T5 needs its tokenizer)")
    return components


def component_config(model_dir: str, name: str) -> dict:
    """The config dict of component ``name`` of a checked SD3 pipeline folder (the text encoders are
    checked only when ``name`` is one of them)."""
    pipeline_components(model_dir, text_encoders=name in TEXT_COMPONENTS)  # SD3's own checks too
    return pipeline_folder.component_config(LAYOUT, model_dir, name)


def scheduler_shift(model_dir: str) -> float:
    """The flow-matching sigma shift of the folder's scheduler (3.0 for SD3 and SD3.5)."""
    return float(component_config(model_dir, "scheduler").get("shift", 1.0))
