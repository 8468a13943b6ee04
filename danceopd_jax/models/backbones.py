"""Backbones: the families of pretrained diffusers folders a run can post-train (``config.model_dir``).

A run on a real model names a local diffusers pipeline folder; its family is read from the
folder's ``model_index.json`` (``_class_name``, e.g. ``StableDiffusion3Pipeline``) and answers,
through one module per family, every question build, training, sampling, export, prompt encoding
and config validation ask of the model. Nothing outside a family's module branches on the
family: callers get the module from ``of(config)`` or ``for_folder(model_dir)`` and call its
functions. A family's module defines:

  ``NAME``                      the family's name in messages ("SD3")
  ``MODEL_KIND``                ``config.student.kind`` / ``experts.NAME.kind`` of the folder's transformer
  ``PIPELINE_CLASSES``          the ``model_index.json`` ``_class_name`` values of its pipelines
  ``READS_SOURCE``              whether its transformer can be conditioned on a clean source image
  ``LOGICAL_AXES``              the logical axis names of its models (LoRA adapters included)
  ``LORA_PREFIX``               the module-name prefix of a diffusers LoRA file of the transformer
  ``TEXT_ENCODERS``             a prompt table's metadata key recording which text encoders encoded it
  ``TEXT_SEGMENTS_LEN``         the length of the ``text_segments`` its prompt encoding gives (0: none)
  ``pipeline_components(model_dir, text_encoders=True)``   ``{component: folder}``, checked
  ``latent_channels(model_dir)``                            ``(in, out)`` channels of the transformer
  ``check_condition(model_dir, text_len, text_dim, pooled_dim)``   the run's condition fits the transformer
  ``text_len_problem(text_len)``                            why a text length cannot be encoded, or None
  ``check_transformer_file(path)``                          a single-file transformer we can read
  ``model_factory(model_dir, spec)``                        ``() -> nnx.Module``: the folder's transformer (+ a fresh LoRA)
  ``load_base(model_dir, abstract_base, shardings, transformer_path="")``   the frozen base state, checked
  ``torch_names_of(abstract)``                              ``{NNX path: diffusers tensor name}``
  ``weight_modules(model_dir)``                             ``{NNX layer path: diffusers module}`` LoRA can adapt
  ``check_prompts(model_dir, prompts, text_len, edit_prompts)``   refuse prompts the encoding would cut
  ``prompt_encoder(model_dir, text_len, dtype)``            ``(prompts, template) -> {"text", ...}`` (numpy)
  ``prompt_table(model_dir, prompts, path, text_len, dtype, edit_prompts)``   the run's cached prompt
                                                            embeddings (``models.prompt_cache``)
  ``text_encoders_digest(model_dir)``                       identity of the folder's text encoders
  ``null_condition(table)``, ``with_null(null)``            the CFG null and ``cond -> null cond``

``tests/test_backbones.py`` checks that every registered family defines all of them.
"""

import importlib
import os
from types import ModuleType

from flax import nnx
from ml_collections import ConfigDict

from danceopd_jax.models import lora
from danceopd_jax.models.init_keys import InitKeys
from danceopd_jax.models.pipeline_folder import ModelFolderError, read_json
from danceopd_jax.models.weights import WeightsMismatch

# family -> the module that implements it (imported when first asked for)
FAMILIES = {"sd3": "danceopd_jax.models.sd3", "zimage": "danceopd_jax.models.zimage_backbone"}

INTERFACE = (
    "NAME", "MODEL_KIND", "PIPELINE_CLASSES", "READS_SOURCE", "LOGICAL_AXES", "LORA_PREFIX", "TEXT_ENCODERS", "TEXT_SEGMENTS_LEN",
    "pipeline_components", "latent_channels", "check_condition", "text_len_problem", "check_transformer_file", "model_factory", "load_base",
    "torch_names_of", "weight_modules", "check_prompts", "prompt_encoder", "prompt_table", "text_encoders_digest",
    "null_condition", "with_null",
)  # fmt: skip


def family(name: str) -> ModuleType:
    """The module of family ``name`` (a key of ``FAMILIES``)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown backbone family {name!r}; known: {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])


def family_of(model_dir: str) -> str:
    """The family of the diffusers folder ``model_dir``, from its ``model_index.json``'s ``_class_name``;
    a ``ModelFolderError`` naming the folder for a missing folder or index, or a pipeline no family runs."""
    if not os.path.isdir(model_dir):
        raise ModelFolderError(f"{model_dir}: no such model folder")
    class_name = read_json(os.path.join(model_dir, "model_index.json")).get("_class_name")
    for name in FAMILIES:
        if class_name in family(name).PIPELINE_CLASSES:
            return name
    known = "; ".join(f"{family(name).NAME}: {', '.join(family(name).PIPELINE_CLASSES)}" for name in FAMILIES)
    raise ModelFolderError(f"{model_dir}/model_index.json: _class_name {class_name!r} is not a pipeline of a known family ({known})")


def for_folder(model_dir: str) -> ModuleType:
    """The family module of the diffusers folder ``model_dir`` (``family_of``)."""
    return family(family_of(model_dir))


def of(config: ConfigDict) -> ModuleType:
    """The family module of a run's ``config.model_dir`` (which must be set)."""
    return for_folder(config.model_dir)


# ---------------------------------------------------------------- LoRA, the same for every family


def lora_targets(targets: str) -> list[str]:
    """``"to_q,to_k"`` -> ``["to_q", "to_k"]`` (a config string of ``models.lora`` target patterns)."""
    return [t.strip() for t in targets.split(",") if t.strip()]


def add_student_lora(model: nnx.Module, spec) -> nnx.Module:
    """``model`` with the student spec's fresh LoRA: ``lora_rank``, ``lora_alpha`` (0 = rank) on the
    layers ``lora_targets`` selects, drawn from the keys of seed + 1 (``InitKeys``); in place, returned."""
    alpha = spec.lora_alpha or spec.lora_rank
    lora.add_lora(model, rank=spec.lora_rank, alpha=alpha, targets=lora_targets(spec.lora_targets), rngs=InitKeys(spec.seed + 1))
    return model


def expert_delta(backbone: ModuleType, lora_path: str, base_graphdef: nnx.GraphDef, abstract_base: nnx.State):
    """``(graphdef, delta)`` of a teacher that is the base plus the LoRA file ``lora_path``."""
    base = nnx.merge(base_graphdef, abstract_base)
    return lora.load_lora_deltas(base, backbone.torch_names_of(abstract_base), *lora.read_lora(lora_path))


def check_lora_targets(backbone: ModuleType, model_dir: str, targets: str) -> None:
    """Raise ``lora.UnknownLoRATarget`` for the first pattern of ``targets`` that selects no layer of
    the folder's transformer (``lora.target_matches``, the rule ``lora.add_lora`` applies)."""
    layers = backbone.weight_modules(model_dir)
    for target in lora_targets(targets):
        if not any(lora.target_matches(target, path) for path in layers):
            names = sorted({path.rsplit(".", 1)[-1] for path in layers})
            raise lora.UnknownLoRATarget(
                f"unknown LoRA target {target!r}: it matches no linear layer of {model_dir}/transformer; layers are named "
                f"{', '.join(names)} (e.g. {next(iter(layers))})"
            )


def check_lora_file(backbone: ModuleType, model_dir: str, lora_path: str) -> None:
    """Raise ``WeightsMismatch`` when the LoRA file adapts modules the folder's transformer does not have
    (names only: ranks and shapes are checked when the file is loaded, ``lora.load_lora_deltas``)."""
    tensors, _ = lora.read_lora(lora_path)
    known = set(backbone.weight_modules(model_dir).values())
    unknown = sorted({k.rsplit(".lora_", 1)[0] for k in tensors} - known)
    if unknown:
        shown = ", ".join(unknown[:6]) + (f", ... ({len(unknown) - 6} more)" if len(unknown) > 6 else "")
        raise WeightsMismatch(f"{lora_path}: adapts {len(unknown)} modules {model_dir}/transformer does not have: {shown}")
