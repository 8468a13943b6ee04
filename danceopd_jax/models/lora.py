"""LoRA adapters on the ``nnx.Linear`` projections of any NNX model: training, teachers, export.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, Eq. 3) gives
a frozen linear layer ``y = x W + b`` a trainable low-rank update::

    y = x W + b + (alpha / r) (x A) B,        A [in, r],  B [r, out],

with A random (PEFT's kaiming-uniform) and B zero, so a fresh adapter leaves the model unchanged.
A trained layer's forward pass runs the two thin matmuls and never forms ``W + (alpha / r) A B``.
A frozen student called many times (the rollout, the SD3 sampler) folds it in once instead (``fold_adapters``).

``LoRALinear`` *is* the ``nnx.Linear`` it wraps: it adopts that layer's ``kernel`` and ``bias``
variables (the same objects, not copies) and settings, and adds ``lora_a`` / ``lora_b``. The base
parameters therefore keep their paths (``blocks.0.q.kernel``): the state of the plain model is
the base state of every LoRA version of it, whichever modules each one adapts. That is what lets

  * training split a model into trainable adapters and a frozen base (``lora_split``);
  * M teachers be one base state plus M small adapter states (``load_lora_deltas``);
  * merged weights (``merge_lora``) load into the plain model and export under its names.

The factors are ``LoRAParam`` variables (an ``nnx.Param`` subclass), so ``nnx.split(model,
LoRAParam, ...)`` separates them from everything else. They carry logical axis names: A (the base
kernel's in-axis, ``"lora_rank"``), B (``"lora_rank"``, the base kernel's out-axis); sharding
rules must also name ``LORA_AXES``.

Which layers ``add_lora`` adapts: a target pattern selects the ``nnx.Linear`` at dotted path ``p``
when the regex fully matches ``p`` or a dotted suffix of ``p`` (PEFT's rule). So ``"to_q"``
selects every ``...attn.to_q``, ``r".*attn\\.(to_q|to_k)"`` is matched against whole paths, and
``r"transformer_blocks\\.0\\.attn\\.to_q"`` selects one layer.

Checkpoints in diffusers / PEFT naming (``read_lora``, ``export_lora``) name each adapter by its
torch module: ``<module>.lora_A.weight`` [r, in] and ``<module>.lora_B.weight`` [out, r], scaled
by PEFT's ``lora_alpha / r``. A model's weights table ``names`` (``{NNX param path: torch key}``,
e.g. ``mmdit.torch_names(config)``) gives the module names: ``X.kernel -> Y.weight`` says the
layer at NNX path X is torch module Y.
"""

import collections
import json
import os
import re
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from danceopd_jax.models.init_keys import InitKeys
from danceopd_jax.models.layers import ZEROS_INIT, partitioned
from danceopd_jax.models.weights import (
    TensorSource,
    WeightsError,
    WeightsMismatch,
    from_nnx_layout,
    open_safetensors,
    param_path,
    write_safetensors,
)

LORA_AXES = ("lora_rank",)

# Prefixes of the transformer's adapters in LoRA files: diffusers' pipeline ``save_lora_weights``
# ("transformer."; keys of other components, e.g. "text_encoder.", are then left out), PEFT's
# ``save_pretrained`` ("base_model.model.") and DiffSynth-Studio's Z-Image LoRAs ("pipe.dit.",
# "dit.", "diffusion_model."; its Z-Image DiT loads the release's transformer state dict as it is, so
# the module names behind the prefix are diffusers').
# diffusers' model-level ``save_lora_adapter`` has none.
LORA_FILE_PREFIXES = ("transformer.", "base_model.model.", "pipe.dit.", "dit.", "diffusion_model.")

# "<module>.lora_A.weight", or with PEFT's adapter name as in a live model's state dict:
# "<module>.lora_A.default.weight"; kohya-style per-module alphas: "<module>.alpha".
_FACTOR_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight")
_ALPHA_KEY = re.compile(r"(?P<module>.+)\.alpha")

# diffusers' safetensors metadata entry holding the adapter's PEFT LoraConfig as JSON.
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
UNSUPPORTED_CONFIG = ("use_dora", "use_rslora", "lora_bias")  # LoraConfig flags this module does not implement
PEFT_DEFAULT_ALPHA = 8  # LoraConfig's lora_alpha when a config leaves it out
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"  # the weights file of PEFT's save_pretrained folder

# PEFT's default init of A (``kaiming_uniform_(a=sqrt(5))`` on [r, in]): U(-1/sqrt(in), 1/sqrt(in)).
_kaiming_uniform = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class UnknownLoRATarget(ValueError):
    """A LoRA target pattern that matches no linear layer of the model."""


class LoRAParam(nnx.Param):
    """A LoRA factor: what the optimiser trains while every other variable stays frozen."""


def _adopt(layer: nnx.Linear, source: nnx.Linear, skip: tuple[str, ...] = ()) -> None:
    """Give ``layer`` the variables (the same objects) and settings of ``source``, but ``skip``."""
    for name, value in vars(source).items():
        if not name.startswith("_pytree__") and name not in skip:  # NNX's bookkeeping, rebuilt by setattr
            setattr(layer, name, value)


class LoRALinear(nnx.Linear):
    """``base`` (its own variables and settings) plus a low-rank update: y = base(x) + (alpha/r) (x A) B."""

    def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, rngs: nnx.Rngs):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        _adopt(self, base)
        in_axis, out_axis = base.kernel.get_metadata().get("out_sharding") or (None, None)
        shape_a, shape_b = (base.in_features, rank), (rank, base.out_features)
        self.lora_a = LoRAParam(partitioned(_kaiming_uniform, (in_axis, "lora_rank"))(rngs.params(), shape_a, base.param_dtype))
        self.lora_b = LoRAParam(partitioned(ZEROS_INIT, ("lora_rank", out_axis))(rngs.params(), shape_b, base.param_dtype))
        self.alpha = alpha

    @property
    def rank(self) -> int:
        return self.lora_a.shape[1]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def __call__(self, x: jax.Array) -> jax.Array:
        """The base layer's output plus the adapter's, both in the base's compute dtype."""
        y = super().__call__(x)
        x, a, b = self.promote_dtype((x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
        return y + (self.scale * (x @ a)) @ b

    def delta(self) -> jax.Array:
        """The update ``(alpha / r) A B`` [in, out] of the kernel, in float32 (for merging only)."""
        a, b = self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32)
        return self.scale * a @ b


# ------------------------------------------------------------------------------------------
# Adding adapters and splitting for training
# ------------------------------------------------------------------------------------------


def _linears(model: nnx.Module) -> dict[str, tuple[tuple, nnx.Linear]]:
    """``{dotted path: (path, layer)}`` of every ``nnx.Linear`` (``LoRALinear`` included) in ``model``."""
    return {param_path(p): (p, m) for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Linear)}


def _adapters(model: nnx.Module) -> dict[str, LoRALinear]:
    """``{dotted path: layer}`` of every ``LoRALinear`` in ``model``."""
    return {param_path(p): m for p, m in nnx.iter_graph(model) if isinstance(m, LoRALinear)}


def _replace(model: nnx.Module, path: tuple, new: nnx.Module):
    """Put ``new`` at ``path`` (attribute names and list indices) inside ``model``."""
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def _wrap(model: nnx.Module, specs: Mapping[str, tuple[int, float]], rngs: nnx.Rngs):
    """Replace the linear layer at each dotted path of ``specs`` by a ``LoRALinear(rank, alpha)``."""
    linears = _linears(model)
    for dotted, (rank, alpha) in specs.items():
        path, layer = linears[dotted]
        if isinstance(layer, LoRALinear):
            raise ValueError(f"{dotted} already has a LoRA adapter")
        _replace(model, path, LoRALinear(layer, rank=rank, alpha=alpha, rngs=rngs))


def target_matches(target: str, path: str) -> bool:
    """Whether regex ``target`` fully matches dotted ``path`` or one of its dotted suffixes (PEFT's rule)."""
    return re.fullmatch(rf"(?:.*\.)?(?:{target})", path) is not None


def add_lora(model: nnx.Module, *, rank: int, alpha: float, targets: Iterable[str], rngs: nnx.Rngs) -> list[str]:
    """Adapt, in place, every ``nnx.Linear`` matched by a pattern of ``targets``; returns their paths.

    See the module docstring for the matching rule. A pattern matching no linear layer raises
    ``ValueError("unknown LoRA target ...")`` naming the layers there are.
    """
    targets = list(targets)
    linears = _linears(model)
    for target in targets:
        if not any(target_matches(target, p) for p in linears):
            names = sorted({p.rsplit(".", 1)[-1] for p in linears})
            raise UnknownLoRATarget(
                f"unknown LoRA target {target!r}: it matches no nnx.Linear; layers are named "
                f"{', '.join(names[:12])}{', ...' if len(names) > 12 else ''} (e.g. {next(iter(linears), 'none')})"
            )
    chosen = [p for p in linears if any(target_matches(t, p) for t in targets)]
    _wrap(model, {p: (rank, alpha) for p in chosen}, rngs)
    return chosen


def lora_split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, lora_state, base_state)``: the adapters apart from everything else.

    Only ``lora_state`` goes to the optimiser; the base is an ordinary (not differentiated) input::

        graphdef, lora, base = lora_split(model)
        opt_state = optimizer.init(lora)

        @jax.jit
        def step(lora, opt_state, base, batch):
            loss = lambda lora: loss_fn(nnx.merge(graphdef, lora, base), batch)
            grads = jax.grad(loss)(lora)                  # gradients of the adapters only
            updates, opt_state = optimizer.update(grads, opt_state, lora)
            return optax.apply_updates(lora, updates), opt_state

    ``graphdef`` is static (closed over); ``nnx.merge(graphdef, lora, base)`` rebuilds the model.
    """
    return nnx.split(model, LoRAParam, ...)


class FoldedLinear(nnx.Linear):
    """A ``LoRALinear``'s base layer with its update folded into the kernel: ``x (W + (alpha/r) A B) + b``.

    One matrix product per call instead of the adapter's three. The sum is formed in float32 and
    stored in the kernel's dtype. It is the same function up to that rounding (Eq. 3).
    """

    def __init__(self, adapter: LoRALinear):
        _adopt(self, adapter, skip=("lora_a", "lora_b", "alpha"))
        kernel = adapter.kernel
        self.kernel = kernel.replace((kernel[...].astype(jnp.float32) + adapter.delta()).astype(kernel.dtype))


def _fold_in_place(model: nnx.Module) -> nnx.Module:
    """``model`` with every ``LoRALinear`` replaced by its ``FoldedLinear``."""
    for path, adapter in [(p, m) for p, m in nnx.iter_graph(model) if isinstance(m, LoRALinear)]:
        _replace(model, path, FoldedLinear(adapter))
    return model


def folded(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with every ``LoRALinear`` replaced by its ``FoldedLinear``; ``model`` keeps
    its adapters. The copy's variables have the paths of the model before ``add_lora``."""
    return _fold_in_place(nnx.merge(*nnx.split(model)))


def fold_adapters(graphdef: nnx.GraphDef, *states: nnx.State) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, state)`` of ``folded`` of the model that ``graphdef`` and ``states`` make.

    For a frozen field called many times: the student in the rollout loop
    (``build.StudentApply.frozen_field``) and in the SD3 sampler (``sd3_sampling``). The fold costs
    one thin product per adapter, once, and each call then skips two. A model with no adapters
    comes back as one state, unchanged.
    """
    return nnx.split(_fold_in_place(nnx.merge(graphdef, *states)))  # the merge is already a fresh model


def merge_lora(model: nnx.Module) -> nnx.State:
    """The plain model's state with each adapter folded in: kernel + (alpha / r) A B (in float32).

    Its paths are those of the model before ``add_lora``: ``nnx.update(plain_model, merged)``.
    """
    return nnx.state(folded(model))


# ------------------------------------------------------------------------------------------
# LoRA checkpoints in diffusers / PEFT naming
# ------------------------------------------------------------------------------------------


def module_names(names: Mapping[str, str]) -> dict[str, str]:
    """``{NNX layer path: torch module name}`` of the linear layers of a weights table (``X.kernel -> Y.weight``)."""
    return {
        p.removesuffix(".kernel"): t.removesuffix(".weight")
        for p, t in names.items()
        if p.endswith(".kernel") and t.endswith(".weight")
    }


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    """PEFT's ``alpha_pattern`` lookup: the first key matching a dotted suffix of ``module``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _file_prefix(keys: Iterable[str]) -> str:
    """The first of ``LORA_FILE_PREFIXES`` that a key starts with, else ``""``."""
    return next((p for p in LORA_FILE_PREFIXES if any(k.startswith(p) for k in keys)), "")


def _adapter_config(path: str, stored: TensorSource) -> dict | None:
    """The adapter's PEFT LoraConfig: from the file's diffusers metadata, else the ``adapter_config.json``
    of a PEFT ``save_pretrained`` folder (``path`` is the folder or its ``adapter_model.safetensors``;
    the config beside a file of another name describes another adapter, and is not read)."""
    raw = stored.metadata.get(ADAPTER_METADATA_KEY)
    if raw:
        config = json.loads(raw)
        prefix = _file_prefix(config)
        return {k.removeprefix(prefix): v for k, v in config.items() if k.startswith(prefix)}
    if os.path.isdir(path):
        folder = path
    elif os.path.basename(path) == PEFT_WEIGHTS_NAME:
        folder = os.path.dirname(path)
    else:
        return None
    config_path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(config_path):
        return None
    try:
        with open(config_path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise WeightsError(f"{config_path}: not readable JSON ({e})") from None


def read_lora(path: str) -> tuple[TensorSource, dict[str, float]]:
    """The adapters of a LoRA checkpoint (file or folder) and each module's alpha.

    Returns tensors named ``<torch module>.lora_A.weight`` / ``.lora_B.weight`` (file prefix and
    PEFT adapter name removed) and ``{torch module: alpha}``. Alphas come from per-module
    ``<module>.alpha`` tensors, else from the PEFT config (diffusers' safetensors metadata, or a
    PEFT folder's ``adapter_config.json``: ``lora_alpha`` and ``alpha_pattern``, ``_adapter_config``); modules with
    neither are absent (alpha = rank, diffusers' convention).
    """
    stored = open_safetensors(path)
    prefix = _file_prefix(stored)
    stored = stored.with_prefix_removed(prefix)
    readers, shapes, alphas, unexpected, adapter_names = {}, {}, {}, [], set()
    for key in stored:
        if factor := _FACTOR_KEY.fullmatch(key):
            name = f"{factor['module']}.lora_{factor['factor']}.weight"
            readers[name] = lambda key=key: stored[key]
            shapes[name] = stored.shape(key)
            adapter_names.add(factor["adapter"])
        elif alpha := _ALPHA_KEY.fullmatch(key):
            alphas[alpha["module"]] = float(stored[key].item())
        else:
            unexpected.append(prefix + key)
    if unexpected:
        raise WeightsMismatch(f"{path}: not LoRA A/B factors or alphas: {', '.join(sorted(unexpected)[:12])}")
    if len(adapter_names) > 1:
        raise WeightsError(f"{path}: holds several adapters ({', '.join(sorted(map(str, adapter_names)))})")
    config = _adapter_config(path, stored)
    if config:
        for flag in UNSUPPORTED_CONFIG:
            if config.get(flag):
                raise WeightsError(f"{path}: LoRA config {flag}=true is not supported")
        default = config.get("lora_alpha", PEFT_DEFAULT_ALPHA)
        for module in {k.rsplit(".lora_", 1)[0] for k in readers}:
            alphas.setdefault(module, _pattern_value(config.get("alpha_pattern") or {}, module, default))
    return TensorSource(readers, shapes, path), alphas


def _check_adapters(tensors: TensorSource, modules: Mapping[str, str], linears: Mapping[str, tuple]) -> list[str]:
    """The torch modules adapted in ``tensors``; raises ``WeightsMismatch`` for any that do not fit the model."""
    by_torch = {t: p for p, t in modules.items() if p in linears}
    stored = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    unknown = [m for m in stored if m not in by_torch]
    incomplete, misshaped = [], []
    for m in stored:
        a, b = f"{m}.lora_A.weight", f"{m}.lora_B.weight"
        if m in unknown:
            continue
        if a not in tensors or b not in tensors:
            incomplete.append(b if a in tensors else a)
            continue
        layer = linears[by_torch[m]][1]
        (rank, d_in), (d_out, rank_b) = tensors.shape(a), tensors.shape(b)
        if (d_in, d_out, rank_b) != (layer.in_features, layer.out_features, rank):
            misshaped.append(f"{m} A {[rank, d_in]} B {[d_out, rank_b]} -> {by_torch[m]} is {layer.in_features} -> {layer.out_features}")
    problems = [
        f"{len(items)} {label}: {', '.join(items[:12])}{', ...' if len(items) > 12 else ''}"
        for label, items in (("unknown modules", unknown), ("missing", incomplete), ("mis-shaped", misshaped))
        if items
    ]
    if problems:
        raise WeightsMismatch(f"{tensors.where}: LoRA weights do not fit the model; " + "; ".join(problems))
    return stored


def load_lora_deltas(
    model: nnx.Module,
    names: Mapping[str, str],
    tensors: TensorSource,
    alphas: Mapping[str, float] | None = None,
) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, delta)``: a LoRA checkpoint as adapters over ``model`` (the plain base, unchanged).

    ``names`` is the model's weights table; ``tensors``/``alphas`` are what ``read_lora`` returns
    (``load_lora_deltas(base, names, *read_lora(path))``; a module without an alpha gets alpha =
    rank). Ranks come from the stored shapes. The
    teacher is ``nnx.merge(graphdef, base_state, delta)`` with ``base_state = nnx.state(model)``,
    so M teachers are one base state (their layers hold the very same arrays) plus M deltas.
    Unknown modules, missing factors and mis-shaped ones raise one ``WeightsMismatch``.
    """
    alphas = alphas or {}
    modules = module_names(names)
    stored = _check_adapters(tensors, modules, _linears(model))
    by_torch = {t: p for p, t in modules.items()}
    specs = {}
    for m in stored:
        rank = tensors.shape(f"{m}.lora_A.weight")[0]
        specs[by_torch[m]] = (rank, alphas.get(m, rank))
    graphdef, base_state = nnx.split(model)

    def adapted() -> nnx.Module:
        teacher = nnx.merge(graphdef, base_state)
        _wrap(teacher, specs, InitKeys(0))
        return teacher

    graphdef, abstract_delta, _ = lora_split(nnx.eval_shape(adapted))
    factors = {"lora_a": "lora_A", "lora_b": "lora_B"}
    leaves = []
    for path, leaf in nnx.to_flat_state(abstract_delta):
        stored_name = f"{modules[param_path(path[:-1])]}.{factors[path[-1]]}.weight"
        leaves.append((path, leaf.replace(jnp.asarray(tensors[stored_name].T, leaf.dtype))))
    return graphdef, nnx.from_flat_state(leaves)


def _peft_config(adapters: Mapping[str, tuple[int, float]]) -> dict:
    """The LoraConfig fields diffusers needs to rebuild ``{torch module: (rank, alpha)}`` exactly.

    Like diffusers' own ``get_peft_kwargs``: the most common rank and alpha, the others as
    patterns anchored at the module name's start.
    """
    rank = collections.Counter(r for r, _ in adapters.values()).most_common(1)[0][0]
    alpha = collections.Counter(a for _, a in adapters.values()).most_common(1)[0][0]
    return {
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {f"^{m}": r for m, (r, _) in adapters.items() if r != rank},
        "alpha_pattern": {f"^{m}": a for m, (_, a) in adapters.items() if a != alpha},
        "target_modules": sorted(adapters),
    }


def _torch_modules(paths: Iterable[str], names: Mapping[str, str]) -> dict[str, str]:
    """``{NNX layer path: torch module}`` for ``paths``; raises ``WeightsMismatch`` for layers ``names`` lacks."""
    modules = module_names(names)
    missing = sorted(p for p in paths if p not in modules)
    if missing:
        raise WeightsMismatch(f"the weights table names no torch module for: {', '.join(missing[:12])}")
    return {p: modules[p] for p in paths}


def export_lora(model: nnx.Module, names: Mapping[str, str], path: str, *, prefix: str = "transformer."):
    """Write ``model``'s adapters as a diffusers LoRA file (what ``save_lora_weights`` writes).

    Keys ``<prefix><torch module>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r]; the
    ranks and alphas go in the ``lora_adapter_metadata`` entry (its keys prefixed the same way),
    from which diffusers' ``load_lora_adapter`` / ``load_lora_weights`` build the PEFT config, so
    A and B are stored as trained. A model from ``lora_split`` parts: ``nnx.merge(graphdef, lora,
    base)``. Name the file ``pytorch_lora_weights.safetensors`` for the pipeline's
    ``load_lora_weights(folder)`` to find it (the model's ``load_lora_adapter`` also needs
    ``weight_name=`` that name: without it, it looks for a ``.bin``).
    """
    adapters = _adapters(model)
    if not adapters:
        raise ValueError("the model has no LoRA adapters to export")
    modules = _torch_modules(adapters, names)
    tensors = {}
    for p, layer in adapters.items():
        tensors[f"{prefix}{modules[p]}.lora_A.weight"] = np.asarray(layer.lora_a[...]).T
        tensors[f"{prefix}{modules[p]}.lora_B.weight"] = np.asarray(layer.lora_b[...]).T
    config = _peft_config({modules[p]: (layer.rank, layer.alpha) for p, layer in adapters.items()})
    metadata = {ADAPTER_METADATA_KEY: json.dumps({prefix + k: v for k, v in config.items()}, sort_keys=True)}
    write_safetensors(path, tensors, {"format": "pt", **metadata})


def export_merged(model: nnx.Module, names: Mapping[str, str], path: str):
    """Write ``merge_lora(model)`` as full weights under torch names (a diffusers ``transformer`` file).

    ``path`` is the file, e.g. ``<folder>/transformer/diffusion_pytorch_model.safetensors``.
    """
    flat = {param_path(p): leaf[...] for p, leaf in nnx.to_flat_state(merge_lora(model))}
    missing = sorted(p for p in flat if p not in names)
    if missing:
        raise WeightsMismatch(f"the weights table names no torch key for: {', '.join(missing[:12])}")
    tensors = {names[p]: from_nnx_layout(np.asarray(v), p) for p, v in flat.items()}
    write_safetensors(path, tensors, {"format": "pt"})
