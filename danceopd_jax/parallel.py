"""Device mesh, logical-to-mesh axis rules and the shardings of the train step.

Mesh axes are ``data``, ``fsdp`` and ``tensor`` (``-1`` = fill with the remaining devices);
on several TPU slices or hosts, ``config.dcn_mesh`` splits them into an outer part across the
data-centre network and an inner part within a slice or host (``make_mesh``).
Parameters carry logical names (``embed``, ``heads``, ``mlp``, ...); the config's rules map them
to mesh axes. The batch is sharded over (``data``, ``fsdp``). Axes are GSPMD ``Auto`` so that
logical annotations propagate through the model. Activation
constraints (``models.layers.constrain``) take effect in code traced inside ``sharding_context``.
"""

import contextlib
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from danceopd_jax.config_validation import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = tuple[tuple[str, Any], ...]


def mesh_shape(axis_sizes: Mapping[str, int], num_devices: int, key: str = "config.mesh", unit: str = "devices") -> tuple[int, ...]:
    """Resolve the ``-1`` (fill) entry of ``axis_sizes`` against ``num_devices`` (counted in
    ``unit``); errors name ``key`` and the axis."""
    unknown = sorted(set(axis_sizes) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"{key}: unknown axis {unknown[0]!r}; valid: {', '.join(MESH_AXES)}")
    sizes = [int(axis_sizes.get(name, 1)) for name in MESH_AXES]
    fills = [name for name, size in zip(MESH_AXES, sizes) if size == -1]
    bad = [name for name, size in zip(MESH_AXES, sizes) if size == 0 or size < -1]
    if bad:
        raise ConfigError(f"{key}.{bad[0]}: size must be >= 1 or -1 (fill), got {axis_sizes[bad[0]]}")
    if len(fills) > 1:
        raise ConfigError(f"{key}: only one axis may be -1 (fill), got {', '.join(fills)}")
    fixed = math.prod(size for size in sizes if size != -1)
    if fills:
        if num_devices % fixed:
            raise ConfigError(f"{key}: {num_devices} {unit} do not divide by the fixed axes' product {fixed}")
        sizes[sizes.index(-1)] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(f"{key}: axes multiply to {fixed} but there are {num_devices} {unit}")
    return tuple(sizes)


def granules(devices: Sequence[jax.Device]) -> tuple[str, dict[int, list[jax.Device]]]:
    """The units of the slow (DCN) network the devices fall into, ``(attribute, {index: devices})``:
    TPU slices where the devices report more than one ``slice_index`` (multi-slice), else
    processes (hosts; CPU and GPU devices report one slice or none)."""
    for attribute in ("slice_index", "process_index"):
        groups: dict[int, list[jax.Device]] = {}
        for device in devices:
            groups.setdefault(getattr(device, attribute, None), []).append(device)
        if len(groups) > 1 and None not in groups:
            break
    return attribute, groups


def make_mesh(
    axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None, dcn_axis_sizes: Mapping[str, int] | None = None
) -> Mesh:
    """The ``data`` x ``fsdp`` x ``tensor`` mesh over ``devices`` (default all); ``dcn_axis_sizes``
    (``config.dcn_mesh``) other than all 1 makes it a hybrid mesh (``hybrid_layout``)."""
    devices = list(devices if devices is not None else jax.devices())
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    dcn_axis_sizes = dict(dcn_axis_sizes or {})
    if all(size == 1 for size in dcn_axis_sizes.values()):
        mesh_shape(dcn_axis_sizes, 1, key="config.dcn_mesh")  # names an unknown axis
        return jax.make_mesh(mesh_shape(axis_sizes, len(devices)), MESH_AXES, axis_types=axis_types, devices=devices)
    return Mesh(hybrid_layout(axis_sizes, dcn_axis_sizes, devices), MESH_AXES, axis_types=axis_types)


def hybrid_layout(axis_sizes: Mapping[str, int], dcn_axis_sizes: Mapping[str, int], devices: Sequence) -> np.ndarray:
    """The devices of a hybrid mesh as an array [data, fsdp, tensor].

    Each axis is split into an outer factor ``dcn_axis_sizes`` across granules joined by the
    data-centre network (TPU slices, or processes where devices carry no slice index) and an
    inner factor ``axis_sizes`` within one granule (ICI, NVLink): axis ``a`` spans
    ``dcn[a] * axis_sizes[a]`` devices, laid out by ``mesh_utils.create_hybrid_device_mesh``
    (granule-major, so collectives over an inner factor stay inside a granule).
    """
    attribute, groups = granules(devices)
    sizes = {len(group) for group in groups.values()}
    if len(sizes) > 1:
        raise ConfigError(f"config.dcn_mesh: the devices' {attribute} groups differ in size: {sorted(sizes)}")
    granule, plural = ("slice", "slices") if attribute == "slice_index" else ("process", "processes")
    dcn = mesh_shape(dcn_axis_sizes, len(groups), key="config.dcn_mesh", unit=plural)
    ici = mesh_shape(axis_sizes, sizes.pop(), unit=f"devices per {granule}")
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=attribute == "process_index")


def batch_blocks_by_process(layout: np.ndarray) -> dict[int, set[int]]:
    """``{process: the batch blocks its devices hold}`` of a [data, fsdp, tensor] device layout: the
    batch axis is split over (data, fsdp), data-major, into data x fsdp blocks, each one replicated
    over ``tensor`` (``batch_sharding``)."""
    fsdp = layout.shape[1]
    blocks: dict[int, set[int]] = {}
    for (d, f, _), device in np.ndenumerate(layout):
        blocks.setdefault(device.process_index, set()).add(d * fsdp + f)
    return blocks


def check_batch_layout(layout: np.ndarray, grouped: bool) -> None:
    """One-line ``ConfigError`` unless each process holds batch rows of its own: every process loads
    distinct rows (``jax.make_array_from_process_local_data``), so no two may hold the same block.
    ``grouped`` (route groups laid out per process, ``routing.split_groups``) also needs process p's
    rows to be the p-th contiguous block of the batch."""
    blocks = batch_blocks_by_process(layout)
    owner: dict[int, int] = {}
    for process, held in sorted(blocks.items()):
        for block in held:
            if block in owner:
                raise ConfigError(
                    f"config.mesh / config.dcn_mesh: processes {owner[block]} and {process} hold the same batch rows (the "
                    "tensor axis spans processes), but each process loads rows of its own; give the processes to data or fsdp"
                )
            owner[block] = process
    if not grouped:
        return
    per_process = len(owner) // len(blocks)
    for rank, (process, held) in enumerate(sorted(blocks.items())):
        if sorted(held) != list(range(rank * per_process, (rank + 1) * per_process)):
            raise ConfigError(
                f"config.dcn_mesh: per-sample route groups need each process's batch rows in one block, in process "
                f"order, but process {process} holds blocks {sorted(held)} of {len(owner)}; split the processes over "
                "the outer batch axis (config.dcn_mesh.data), or route per step"
            )


def axis_rules(rules: Mapping[str, Any], logical_axes: Sequence[str]) -> Rules:
    """Config rules ``{logical: mesh axis | list of axes | None}`` as the tuple NNX expects.

    Every logical axis the models use gets a rule: those the config leaves out are replicated.
    """
    resolved = []
    for logical, target in rules.items():
        if logical not in logical_axes:
            raise ConfigError(f"config.logical_axis_rules.{logical}: unknown logical axis; valid: {', '.join(logical_axes)}")
        targets = target if isinstance(target, (tuple, list)) else (target,)
        unknown = [axis for axis in targets if axis is not None and axis not in MESH_AXES]
        if unknown:
            raise ConfigError(f"config.logical_axis_rules.{logical}: unknown mesh axis {unknown[0]!r}; valid: {', '.join(MESH_AXES)}")
        resolved.append((logical, tuple(target) if isinstance(target, (tuple, list)) else target))
    resolved += [(logical, None) for logical in logical_axes if logical not in rules]
    return tuple(resolved)


def replicated_rules(rules: Rules) -> Rules:
    """``rules`` with every logical axis mapped to no mesh axis: a full copy of each parameter per device."""
    return tuple((logical, None) for logical, _ in rules)


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Rules):
    """Build or trace models with this mesh and rules active (NNX shards variables eagerly)."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        yield


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over ``data`` x ``fsdp``; every other axis replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree, mesh: Mesh):
    """Host arrays, the same on every process, placed whole on every device of ``mesh``."""
    return jax.tree.map(lambda a: jax.device_put(np.asarray(a), replicated(mesh)), tree)


def abstract_model_state(make_model: Callable[[], nnx.Module], mesh: Mesh, rules: Rules):
    """``(graphdef, abstract state, shardings)`` of a model, without allocating it."""
    with sharding_context(mesh, rules):
        graphdef, state = nnx.split(nnx.eval_shape(make_model))
    return graphdef, state, shardings_of(state, mesh, rules)


def create_sharded_state(make_model: Callable[[], nnx.Module], mesh: Mesh, rules: Rules):
    """Initialise a model directly into its sharded layout; returns ``(graphdef, state, shardings)``."""
    graphdef, _, shardings = abstract_model_state(make_model, mesh, rules)
    with sharding_context(mesh, rules):
        state = jax.jit(lambda: nnx.split(make_model())[1], out_shardings=shardings)()
    return graphdef, state, shardings


def shardings_of(abstract_tree, mesh: Mesh, rules: Rules):
    """NamedShardings of any pytree built from annotated params (train state, optimizer moments).

    NNX variables keep their logical names through ``jax.eval_shape`` / optax tree maps, so the
    moments get their param's sharding; plain arrays (step, counts, keys) are replicated.
    """
    with sharding_context(mesh, rules):
        specs = nnx.get_partition_spec(abstract_tree)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)
