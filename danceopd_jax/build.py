"""From a validated config to the pieces of a run: models, expert fields, data, the loss."""

import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from ml_collections import ConfigDict

from danceopd_jax import checkpoints, parallel
from danceopd_jax.config_lib import model_spec
from danceopd_jax.config_validation import ConfigError, with_defaults
from danceopd_jax.core import router, routing
from danceopd_jax.core.route_weights import RouteWeights
from danceopd_jax.core.compute_dtype import abstract_in_compute_dtype, cast_to_compute_dtype
from danceopd_jax.core.conditioning import unconditional
from danceopd_jax.core.fields import Field, cfg_field, inference_field, linear_combination, model_field
from danceopd_jax.core.flowopd import FlowOPDOptions
from danceopd_jax.core.schedule import sigma_grid
from danceopd_jax.core.step import LossFn, make_loss_fn
from danceopd_jax.data import latent_cache
from danceopd_jax.data.pipeline import BucketBatches, ConditionSpec, RecordEncoder, stack_records
from danceopd_jax.data.prompt_embeddings import load_table, source_prompts
from danceopd_jax.data.sources import MixedSource, make_bucket_source
from danceopd_jax.fieldworld.mlp import FieldMLP
from danceopd_jax.models import backbones, lora
from danceopd_jax.models.dit import LOGICAL_AXES as DIT_AXES
from danceopd_jax.models.dit import DiT, dit_config
from danceopd_jax.models.init_keys import InitKeys

# Reserved entries of the frozen pytree (``experts``) of a run on a model folder (``models.backbones``):
# the shared transformer base and the CFG null condition (e.g. the empty prompt's embeddings).
SHARED_BASE = "shared_base"
NULL_CONDITION = "null_condition"


def logical_axes(config: ConfigDict) -> tuple[str, ...]:
    """The logical axis names of the run's models (rules must map each; ``parallel.axis_rules``)."""
    return backbones.of(config).LOGICAL_AXES if config.model_dir else DIT_AXES


def axis_rules(config: ConfigDict) -> parallel.Rules:
    """The run's logical-axis rules (``config.logical_axis_rules`` over ``logical_axes``)."""
    return parallel.axis_rules(config.logical_axis_rules, logical_axes(config))


def model_config(config: ConfigDict, spec: ConfigDict):
    """The DiT config of a model spec (student or expert) in this run's image/condition space."""
    return dit_config(
        spec.preset,
        image_size=config.image_size,
        channels=config.channels,
        patch_size=spec.patch_size,
        num_classes=config.condition.num_classes,
        text_dim=config.condition.text_dim,
        use_source=spec.use_source,
        dtype=spec.dtype,
        remat=spec.get("remat", "none"),  # run configs saved before remat existed have no key
        attention=spec.get("attention", "xla"),  # nor before attention
        zero_init=spec.zero_init,
    )


def model_factory(config: ConfigDict, spec: ConfigDict) -> Callable[[], nnx.Module]:
    if spec.get("kind", "dit") == "field_mlp":  # parameters without logical axes: replicated on every mesh
        c = config.condition
        return lambda: FieldMLP(config.channels, c.num_classes, width=spec.width, depth=spec.depth, rngs=InitKeys(spec.seed))
    if spec.get("kind", "dit") != "dit":  # the folder's transformer; run configs saved before SD3 support have no kind
        return backbones.of(config).model_factory(config.model_dir, spec)
    dit = model_config(config, spec)
    return lambda: DiT(dit, rngs=InitKeys(spec.seed))


# What gives a model's parameters their shapes (``model_config``; a FieldMLP's width and depth): keys
# of its spec and of its run's config. The others (dtype, remat, attention, zero_init, seed,
# image_size: the positional table is computed) change values or how it computes, not which arrays a
# checkpoint of it holds.
SHAPE_KEYS = {
    "spec": ("kind", "preset", "patch_size", "use_source", "width", "depth"),
    "run": ("channels", "condition.num_classes", "condition.text_dim"),
}


def architecture_changes(config: ConfigDict, spec: ConfigDict, saved) -> list[tuple[str, Any, Any]]:
    """``(KEY, saved value, value here)`` for each ``SHAPE_KEYS`` key where the model ``spec`` of
    ``config`` differs from the student of the run whose config is ``saved`` (a ``config.json``: what
    that run's checkpoints hold), a spec key named ``student.KEY``; empty when a checkpoint of that
    run fits ``spec``. Keys a config saved by an older version lacks count as their defaults."""
    there, here = with_defaults(saved), with_defaults(config)
    here["student"] = {**model_spec().to_dict(), **spec.to_dict()}

    def get(tree: dict, key: str):
        for part in key.split("."):
            tree = tree.get(part) if isinstance(tree, dict) else None
        return tree

    keys = [f"student.{key}" for key in SHAPE_KEYS["spec"]] + list(SHAPE_KEYS["run"])
    return [(key, get(there, key), get(here, key)) for key in keys if get(there, key) != get(here, key)]


def shown_architecture_changes(changes: list[tuple[str, Any, Any]], prefix: str, model: str, source: str) -> str:
    """``architecture_changes`` as ``PREFIX.KEY is HERE, SOURCE has KEY SAVED; ...``, a ``student.KEY``
    shown as ``PREFIX.MODEL.KEY`` (``model``: the spec's key in the config, e.g. ``experts.edit``)."""
    return "; ".join(f"{prefix}.{name.replace('student', model, 1)} is {here!r}, {source} has {name} {there!r}" for name, there, here in changes)


def load_model(config: ConfigDict, spec: ConfigDict, mesh: Mesh, rules, *, frozen: bool = False) -> tuple[nnx.GraphDef, Any, Any]:
    """``(graphdef, state, shardings)``: random init (``seed``) or another run's checkpoint, sharded.

    ``frozen`` (an expert): parameters stored in their layers' compute dtype (``core.compute_dtype``),
    a checkpoint restored straight into it.
    """
    make = model_factory(config, spec)
    if spec.init == "random":
        graphdef, state, shardings = parallel.create_sharded_state(make, mesh, rules)
        return graphdef, frozen_in_compute_dtype(graphdef, state, shardings) if frozen else state, shardings
    graphdef, abstract, shardings = parallel.abstract_model_state(make, mesh, rules)
    target = abstract_in_compute_dtype(graphdef, abstract) if frozen else abstract
    return graphdef, checkpoints.restore_model_params(spec.checkpoint, target, shardings), shardings


def frozen_in_compute_dtype(graphdef: nnx.GraphDef, frozen: nnx.State, shardings, *context: nnx.State) -> nnx.State:
    """``frozen`` (a part of the model ``graphdef`` whose other parts are ``context``) with each
    parameter stored in the dtype its layer computes in (``core.compute_dtype``).

    A bf16 layer's float32 weights then take half the memory and are not converted on every
    call; the layers' outputs are the same bit for bit. Frozen states only: trained parameters
    keep their float32 master copy.
    """
    cast = jax.jit(lambda frozen, *context: cast_to_compute_dtype(graphdef, frozen, *context)[0], out_shardings=shardings)
    return cast(frozen, *context)


def load_folder_models(config: ConfigDict, mesh: Mesh, rules, expert_rules):
    """The models of a run on a model folder (``models.backbones``) over one shared base read from
    ``config.model_dir`` (or ``config.transformer_path``).

    Returns ``(student graphdef, student params, experts, expert shardings, expert graphdefs)``:
    the student's params are its LoRA; ``experts`` holds the base (``SHARED_BASE``) and each
    expert's LoRA delta (an empty state for the plain base), both stored in their layers' compute
    dtype (the base read straight into it: ``core.compute_dtype``). The full transformer is traced
    abstractly once, as the plain base; the student is that abstract base plus a fresh LoRA, so
    only the adapters are traced again (SD3.5-M's full trace: under a second, ``benchmarks/model_init.py``).
    """
    student = config.student
    backbone = backbones.of(config)
    plain = backbone.model_factory(config.model_dir, ConfigDict({**student.to_dict(), "lora_rank": 0}))
    base_graphdef, abstract_base, base_shardings = parallel.abstract_model_state(plain, mesh, rules)

    def make_student() -> nnx.Module:
        return backbones.add_student_lora(nnx.merge(base_graphdef, abstract_base), student)

    with parallel.sharding_context(mesh, rules):
        student_graphdef, abstract_lora, _ = nnx.split(nnx.eval_shape(make_student), lora.LoRAParam, ...)
    lora_shardings = parallel.shardings_of(abstract_lora, mesh, rules)
    with parallel.sharding_context(mesh, rules):
        params = jax.jit(lambda: nnx.split(make_student(), lora.LoRAParam, ...)[1], out_shardings=lora_shardings)()
    stored_base = abstract_in_compute_dtype(base_graphdef, abstract_base)  # read straight into the compute dtype
    experts = {SHARED_BASE: backbone.load_base(config.model_dir, stored_base, base_shardings, config.transformer_path)}
    shardings = {SHARED_BASE: base_shardings}
    graphdefs = {}
    for name, spec in config.experts.items():
        if spec.lora_path:
            graphdefs[name], delta = backbones.expert_delta(backbone, spec.lora_path, base_graphdef, abstract_base)
            delta_shardings = parallel.shardings_of(delta, mesh, expert_rules)
            experts[name] = frozen_in_compute_dtype(graphdefs[name], delta, delta_shardings, experts[SHARED_BASE])
            shardings[name] = delta_shardings
        else:
            graphdefs[name], experts[name], shardings[name] = base_graphdef, nnx.State({}), nnx.State({})
    return student_graphdef, params, experts, shardings, graphdefs


class StudentApply:
    """The student as ``apply(params, x, t, cond)``; an SD3 student's params are ``{"lora", "base"}``.

    ``frozen_field(params)`` is the student over constant params for the rollout loop
    (``objectives.frozen_student``). Its layers' parameters are cast to their compute dtype once
    per step instead of on every Euler step (``fields.inference_field``). A LoRA student's adapters
    are folded into their kernels, also once per step (``lora.fold_adapters``), so each Euler step
    runs one product per adapted layer instead of three.
    """

    def __init__(self, graphdef: nnx.GraphDef):
        self.graphdef = graphdef

    @staticmethod
    def states(params) -> tuple[nnx.State, ...]:
        return (params["lora"], params["base"]) if isinstance(params, dict) else (params,)

    def __call__(self, params, x, t, cond):
        return nnx.merge(self.graphdef, *self.states(params))(x, t, cond)

    def frozen_field(self, params) -> Field:
        return inference_field(*lora.fold_adapters(self.graphdef, *self.states(params)))


def _field(config: ConfigDict, name: str, expert_fields: dict[str, Field], null, cfg_scales: dict) -> Field:
    spec = config.fields[name]
    if spec.kind == "expert":
        return cfg_field(expert_fields[spec.expert], cfg_scales.get(name, spec.cfg_scale), null)
    terms = list(spec.terms.items())
    fields = [_field(config, term, expert_fields, null, cfg_scales) for term, _ in terms]
    return linear_combination(fields, [w for _, w in terms])


def route_fields_builder(config: ConfigDict, graphdefs: dict[str, nnx.GraphDef], cfg_scales: dict | None = None):
    """``experts -> [field of route m]`` (route order of ``config.routes``), traced inside the step.

    ``cfg_scales`` maps guided fields to their scale as step arguments (``step_numbers``); a
    field it omits guides with its config's scale."""
    with_null = backbones.of(config).with_null if config.model_dir else None

    def build(experts: dict[str, Any]) -> Sequence[Field]:
        if SHARED_BASE in experts:  # a model folder: base + each expert's LoRA delta; CFG against the backbone's null
            expert_fields = {name: model_field(graphdefs[name], experts[SHARED_BASE], experts[name]) for name in graphdefs}
            null = with_null(experts[NULL_CONDITION])
        else:
            expert_fields = {name: model_field(graphdefs[name], experts[name]) for name in graphdefs}
            null = unconditional
        return [_field(config, route.field, expert_fields, null, cfg_scales or {}) for route in config.routes.values()]

    return build


def route_weights(config: ConfigDict) -> list[float]:
    return [route.weight for route in config.routes.values()]


def step_group_sizes(config: ConfigDict) -> list[int]:
    """Samples per route group in one host's batch: ``[B / P]`` for per-step and learned routing; else
    the global batch's groups (``routing.group_sizes(B, weights)``), each split evenly over the P
    processes, so the global batch has the same groups for any number of processes. A group that
    does not divide by P times ``grad_accum_steps`` is a ``ConfigError`` (first met in
    ``train._check_layout``, before any build)."""
    processes = jax.process_count()
    if config.routing in ("per_step", "learned"):
        return [config.batch_size // processes]
    sizes = routing.group_sizes(config.batch_size, route_weights(config))
    if any(size % processes for size in sizes):
        raise ConfigError(
            f"config.batch_size: routing {config.routing!r} splits the batch of {config.batch_size} into route groups "
            f"{sizes}, and each process draws an equal share of every group: each must divide by {processes} processes"
        )
    accum = config.grad_accum_steps
    if any(size % (processes * accum) for size in sizes):
        raise ConfigError(
            f"config.grad_accum_steps: routing {config.routing!r} splits the batch of {config.batch_size} into route groups "
            f"{sizes}, and each of the {accum} microbatches holds an equal share of every group on each of the {processes} "
            f"process(es): each must divide by {processes * accum}"
        )
    return [size // processes for size in sizes]


def rollout_sigmas(config: ConfigDict) -> jax.Array:
    """The rollout's sigma grid, computed here, eagerly: traced with the step, XLA would compute it
    inside the program and round it, and what the step derives from it, differently."""
    return sigma_grid(config.rollout_steps, config.shift, config.sigma_schedule)


def make_loss(config: ConfigDict, student_graphdef: nnx.GraphDef, expert_graphdefs, numbers: dict, sigmas: jax.Array) -> LossFn:
    """The run's ``loss(params, experts, batch, route, key)`` with the step numbers ``numbers``
    (``step_numbers.step_numbers``: host values, or the traced arguments of a step) and the rollout's
    ``sigmas`` (``rollout_sigmas``); a model folder's student adds the shared base to its LoRA params."""
    loss = _make_loss(config, student_graphdef, expert_graphdefs, numbers, sigmas)
    if not config.model_dir:
        return loss
    return lambda params, experts, *rest: loss({"lora": params, "base": experts[SHARED_BASE]}, experts, *rest)


def _make_loss(config: ConfigDict, student_graphdef: nnx.GraphDef, expert_graphdefs, numbers: dict, sigmas: jax.Array) -> LossFn:
    query_beta = numbers["query_beta"]
    return make_loss_fn(
        config.method,
        StudentApply(student_graphdef),
        route_fields_builder(config, expert_graphdefs, numbers["cfg_scales"]),
        routing_mode=config.routing,
        route_weights=route_weights(config),
        group_sizes=step_group_sizes(config),
        group_blocks=jax.process_count(),
        sigmas=sigmas,
        num_queries=config.queries_per_rollout,
        sampler=config.query_sampler if query_beta is None else query_beta,
        shift=config.shift,
        condition_dropout=numbers["condition_dropout"],
        fm_time_sampler=config.fm_time_sampler,
        flowopd_options=flowopd_options(config),
        router_params=numbers["router"],
        router_assign=config.router.assign,
    )


def flowopd_options(config: ConfigDict) -> FlowOPDOptions:
    """``config.flowopd`` as the options ``make_loss_fn`` passes to ``flowopd_loss``."""
    f = config.flowopd
    return FlowOPDOptions(
        eta=float(f.eta), kl_scale=float(f.kl_scale), advantage_clip=float(f.advantage_clip), ppo_clip=float(f.ppo_clip)
    )


def condition_spec(config: ConfigDict) -> ConditionSpec:
    c = config.condition
    segments = backbones.of(config).TEXT_SEGMENTS_LEN if config.model_dir else 0
    return ConditionSpec(
        text_len=c.text_len, text_dim=c.text_dim, num_classes=c.num_classes, use_source=c.use_source, pooled_dim=c.pooled_dim,
        text_segments_len=segments,
    )  # fmt: skip


POOL = "pool"  # the one bucket of a learned-router run: every route's bucket, unlabelled


def bucket_sources(config: ConfigDict) -> dict:
    """``{bucket: source}``, image files read at ``latent_cache.pixel_size`` (a model folder run's VAE resolution)."""
    size = latent_cache.bucket_pixel_size(config)
    return {
        name: make_bucket_source(bucket, config.image_size, config.channels, config.condition.num_classes, size)
        for name, bucket in config.data.buckets.items()
    }


def pooled(config: ConfigDict, sources: dict) -> dict:
    """``sources``; with a learned router the routes' buckets pooled as ``{POOL: MixedSource}``."""
    if config.routing != "learned":
        return sources
    routes = list(config.routes.values())
    return {POOL: MixedSource([sources[route.bucket] for route in routes], route_weights(config), seed=config.seed)}


def make_sources(config: ConfigDict) -> dict:
    """The sources a run draws from: ``pooled(bucket_sources)`` (image files as pixels)."""
    return pooled(config, bucket_sources(config))


def make_batches(config: ConfigDict, sources: dict, text_embedder=None) -> BucketBatches:
    """One grain iterator per bucket of ``make_sources``, this host's shard of each."""
    image_shape = (config.image_size, config.image_size, config.channels)
    return BucketBatches(sources, condition_spec(config), image_shape, seed=config.seed, text_embedder=text_embedder)


PROMPT_TABLE = "prompt_embeddings.safetensors"  # a model folder run's encoded prompts, in its workdir


def folder_prompt_table(config: ConfigDict, sources: dict, workdir: str | None):
    """The embeddings of every prompt of the run's buckets: the table ``config.prompt_embeddings``
    (checked to hold them by ``config_validation``), or encoded by the folder's text encoders and
    cached in ``workdir`` (the backbone's ``prompt_table``).

    The condition shape was checked against the folder by ``config_validation``. In a multi-process
    run (one workdir all hosts see) process 0 encodes and writes the table, the others read it
    after a barrier."""
    if config.prompt_embeddings:
        return load_table(config.prompt_embeddings)
    if workdir is None:
        raise ValueError("a run on config.model_dir without config.prompt_embeddings needs a workdir to encode its prompts into")
    path = os.path.join(workdir, PROMPT_TABLE)

    def encode():
        prompts, edit_prompts = (source_prompts(sources.values(), template) for template in ("t2i", "edit"))
        return backbones.of(config).prompt_table(config.model_dir, prompts, path, config.condition.text_len, edit_prompts=edit_prompts)

    return _written_by_process_zero(encode, lambda: load_table(path), "prompt embeddings")


def image_latents(config: ConfigDict, sources: dict, workdir: str | None, log: Callable[[str], None] = print):
    """``(sources, table, encoded)``: a model folder run's image-file buckets with latents for their
    images (``data.latent_cache``), encoded by the folder's VAE where ``WORKDIR/image_latents.safetensors``
    lacks them (``encoded`` of them; ``log`` shows the progress); ``table`` is None without image buckets."""
    if not latent_cache.images_of(sources):
        return sources, None, 0
    if workdir is None:
        raise ValueError("a run on config.model_dir with image buckets needs a workdir to encode their images into")
    path = os.path.join(workdir, latent_cache.LATENT_TABLE)
    table, encoded = _written_by_process_zero(
        lambda: latent_cache.cached_latents(config.model_dir, sources, path, latent_cache.pixel_size(config), log),
        lambda: (latent_cache.load_latents(path), 0),
        "image latents",
    )
    return latent_cache.with_latents(sources, table), table, encoded


def _written_by_process_zero(write: Callable[[], Any], read: Callable[[], Any], what: str):
    """``write()`` (a file in the workdir all hosts see) on process 0; in a multi-process run the
    others wait for it at a barrier, then ``read()``."""
    result = write() if jax.process_index() == 0 else None
    if jax.process_count() == 1:
        return result
    multihost_utils.sync_global_devices(f"danceopd_jax: {what} written")
    return result if jax.process_index() == 0 else read()


def router_split(pool: MixedSource, label_fraction: float, heldout: int) -> tuple[list[int], list[int]]:
    """``(labelled, held out)`` pool positions: the last ``heldout`` positions are held out, the
    first ``label_fraction`` of the others labelled, except those repeating a held-out record (a
    pool cycles a source it draws more often than it has records), so no held-out record is seen."""
    held = list(range(len(pool) - heldout, len(pool)))
    unseen = {pool.record(i) for i in held}
    first = router.labelled_count(len(pool), label_fraction, heldout)
    return [i for i in range(first) if pool.record(i) not in unseen], held


def train_router(config: ConfigDict, pool: MixedSource) -> tuple[router.RouterParams, dict]:
    """Fit the learned router on the pool's first ``label_fraction`` labels; ``(params, report)``.

    The records of the last ``router.heldout`` positions are never labelled for training
    (``router_split``); the report gives the router's accuracy on them (and on its own training
    labels), the label counts and the held-out confusion matrix (rows: true route, columns: predicted).
    """
    r = config.router
    image_shape = (config.image_size, config.image_size, config.channels)
    encode = RecordEncoder(condition_spec(config), image_shape)
    labelled, heldout = router_split(pool, r.label_fraction, r.heldout)

    def features(positions):
        conds = stack_records([encode(pool[i])["cond"] for i in positions])
        return np.asarray(router.router_features(conds))

    train_x, train_y = features(labelled), pool.labels[labelled]
    params = router.train_router(
        train_x, train_y, len(config.routes), hidden=r.hidden, steps=r.train_steps, learning_rate=r.learning_rate,
        weight_decay=r.weight_decay, seed=config.seed,
    )  # fmt: skip
    test_x, test_y = features(heldout), pool.labels[heldout]
    predicted = np.asarray(router.router_logits(params, test_x)).argmax(axis=-1)
    confusion = np.zeros((len(config.routes),) * 2, int)
    np.add.at(confusion, (test_y, predicted), 1)
    report = dict(
        routes=list(config.routes),
        labelled=len(labelled),
        label_counts=np.bincount(train_y, minlength=len(config.routes)).tolist(),
        heldout=len(heldout),
        heldout_accuracy=float(np.mean(predicted == test_y)),
        train_accuracy=router.router_accuracy(params, train_x, train_y),
        confusion=confusion.tolist(),
    )
    return params, report


def make_route_weights(config: ConfigDict) -> RouteWeights:
    """The per-step route weight schedule of ``config.route_weights`` (fixed unless configured)."""
    w = config.route_weights
    end = [w.end[name] for name in config.routes] if w.schedule == "curriculum" else None
    return RouteWeights(
        route_weights(config), schedule=w.schedule, end=end, curriculum_steps=w.curriculum_steps,
        ema_decay=w.ema_decay, temperature=w.temperature, floor=w.floor,
    )  # fmt: skip


def step_route_and_groups(config: ConfigDict, step: int, weights=None) -> tuple[int, list[tuple[str, int]]]:
    """The route index of ``step`` and this host's ``(bucket, samples)`` groups, in route order.

    Per-step routing draws the whole batch from the routed bucket, the route drawn with
    ``weights`` (default: the route weights); a learned router's batch comes from the pool; the
    other modes draw each route group from its route's bucket. Counts are per host (the global
    batch over processes).
    """
    routes = list(config.routes.values())
    sizes = step_group_sizes(config)
    if config.routing == "per_step":
        route = routing.route_for_step(config.seed, step, route_weights(config) if weights is None else weights)
        return route, [(routes[route].bucket, sizes[0])]
    if config.routing == "learned":
        return 0, [(POOL, sizes[0])]
    return 0, [(route.bucket, size) for route, size in zip(routes, sizes) if size]


def draw_batch(batches: BucketBatches, groups: list[tuple[str, int]]) -> dict:
    """This host's batch: the groups drawn one after another and concatenated."""
    parts = [batches.next({bucket: size}) for bucket, size in groups]
    return jax.tree.map(lambda *arrays: np.concatenate(arrays, axis=0), *parts)
