"""The backbone registry: every family answers the whole interface, and a folder's family is read from
its ``model_index.json``."""

import inspect
import json

import pytest

from danceopd_jax.models import backbones
from danceopd_jax.models.pipeline_folder import ModelFolderError

# The signatures callers rely on (``models.backbones`` module docstring), by parameter names.
SIGNATURES = {
    "pipeline_components": ["model_dir", "text_encoders"],
    "latent_channels": ["model_dir"],
    "check_condition": ["model_dir", "text_len", "text_dim", "pooled_dim"],
    "text_len_problem": ["text_len"],
    "check_transformer_file": ["path"],
    "model_factory": ["model_dir", "spec"],
    "load_base": ["model_dir", "abstract_base", "shardings", "transformer_path"],
    "torch_names_of": ["abstract"],
    "weight_modules": ["model_dir"],
    "check_prompts": ["model_dir", "prompts", "text_len", "edit_prompts"],
    "prompt_encoder": ["model_dir", "text_len", "dtype"],
    "prompt_table": ["model_dir", "prompts", "path", "text_len", "dtype", "edit_prompts"],
    "text_encoders_digest": ["model_dir"],
    "null_condition": ["table"],
    "with_null": ["null"],
}


@pytest.mark.parametrize("name", sorted(backbones.FAMILIES))
def test_every_family_answers_the_whole_interface(name):
    module = backbones.family(name)
    assert set(SIGNATURES) <= set(backbones.INTERFACE)
    missing = [attr for attr in backbones.INTERFACE if not hasattr(module, attr)]
    assert not missing, f"{name} lacks {missing}"
    for function, parameters in SIGNATURES.items():
        assert list(inspect.signature(getattr(module, function)).parameters) == parameters, function
    assert isinstance(module.READS_SOURCE, bool) and module.PIPELINE_CLASSES and module.LORA_PREFIX.endswith(".")
    others = [backbones.family(other) for other in backbones.FAMILIES if other != name]
    assert not any(set(module.PIPELINE_CLASSES) & set(other.PIPELINE_CLASSES) for other in others)
    assert not any(module.MODEL_KIND == other.MODEL_KIND for other in others) and module.MODEL_KIND != "dit"


def _folder(tmp_path, index) -> str:
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    return str(tmp_path)


def test_the_family_is_read_from_model_index(tmp_path):
    assert backbones.family_of(_folder(tmp_path, {"_class_name": "StableDiffusion3Pipeline"})) == "sd3"
    assert backbones.for_folder(str(tmp_path)) is backbones.family("sd3")


@pytest.mark.parametrize(
    "index, message",
    [
        ({"_class_name": "FluxPipeline"}, r"_class_name 'FluxPipeline' is not a pipeline of a known family \(SD3: StableDiffusion3Pipeline"),
        ({}, r"_class_name None is not a pipeline of a known family"),
        (None, r"model_index.json: file missing"),
    ],
)
def test_an_unknown_or_missing_family_is_one_error_naming_the_folder(tmp_path, index, message):
    folder = _folder(tmp_path, index) if index is not None else str(tmp_path)
    with pytest.raises(ModelFolderError, match=message):
        backbones.family_of(folder)
    with pytest.raises(ModelFolderError, match="no such model folder"):
        backbones.family_of(str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="unknown backbone family 'flux'; known: sd3"):
        backbones.family("flux")
