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

import json
import os

PIPELINE_CLASSES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline")
REQUIRED = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
OPTIONAL = ("text_encoder_3", "tokenizer_3")
CONFIG_FILES = {"scheduler": "scheduler_config.json"}  # the components' config file, config.json otherwise
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", *TOKENIZERS)


class ModelFolderError(ValueError):
    """A model folder that is not a usable SD3 pipeline; the message names the folder and what is wrong."""


def read_json(path: str) -> dict:
    """A JSON object from ``path``, or a ``ModelFolderError`` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelFolderError(f"{path}: file missing") from None
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path}: expected a JSON object")
    return data


def pipeline_components(model_dir: str, text_encoders: bool = True) -> dict[str, str]:
    """``{component: folder}`` of an SD3 pipeline folder, checked: the index, and each component's folder
    and config; the text encoders and tokenizers only with ``text_encoders`` (else left out)."""
    if not os.path.isdir(model_dir):
        raise ModelFolderError(f"{model_dir}: no such model folder")
    index = read_json(os.path.join(model_dir, "model_index.json"))
    if index.get("_class_name") not in PIPELINE_CLASSES:
        raise ModelFolderError(
            f"{model_dir}/model_index.json: _class_name {index.get('_class_name')!r} is not an SD3 pipeline "
            f"({', '.join(PIPELINE_CLASSES)})"
        )
    components = {}
    for name in REQUIRED + OPTIONAL:
        if not text_encoders and name in TEXT_COMPONENTS:
            continue
        entry = index.get(name)
        if entry is None or entry == [None, None]:
            if name in REQUIRED:
                raise ModelFolderError(f"{model_dir}/model_index.json: the required component {name!r} is not named")
            continue
        folder = os.path.join(model_dir, name)
        if not os.path.isdir(folder):
            raise ModelFolderError(f"{model_dir}: missing component {name}/ (model_index.json names it)")
        if name not in TOKENIZERS:
            config = os.path.join(folder, CONFIG_FILES.get(name, "config.json"))
            if not os.path.isfile(config):
                raise ModelFolderError(f"{folder}: missing {os.path.basename(config)}")
        components[name] = folder
    if ("text_encoder_3" in components) != ("tokenizer_3" in components):
        raise ModelFolderError(f"{model_dir}: text_encoder_3 and tokenizer_3 come together (T5 needs its tokenizer)")
    return components


def component_config(model_dir: str, name: str) -> dict:
    """The config dict of component ``name`` of a checked pipeline folder (the text encoders are
    checked only when ``name`` is one of them)."""
    folder = pipeline_components(model_dir, text_encoders=name in TEXT_COMPONENTS)[name]
    return read_json(os.path.join(folder, CONFIG_FILES.get(name, "config.json")))


def scheduler_shift(model_dir: str) -> float:
    """The flow-matching sigma shift of the folder's scheduler (3.0 for SD3 and SD3.5)."""
    return float(component_config(model_dir, "scheduler").get("shift", 1.0))
