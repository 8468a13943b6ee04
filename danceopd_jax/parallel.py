"""Device mesh, logical-to-mesh axis rules and the shardings of the train step.

Mesh axes are ``data``, ``fsdp`` and ``tensor`` (``-1`` = fill with the remaining devices).
Parameters carry logical names (``embed``, ``heads``, ``mlp``, ...); the config's rules map them
to mesh axes. The batch is sharded over (``data``, ``fsdp``). Axes are GSPMD ``Auto`` so that
logical annotations propagate through the model (DESIGN.md, environment facts). Activation
constraints (``models.layers.constrain``) take effect in code traced inside ``sharding_context``.
"""

import contextlib
import math
from typing import Any, Callable, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from danceopd_jax.config_validation import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = tuple[tuple[str, Any], ...]


def mesh_shape(axis_sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolve the ``-1`` (fill) entry of ``axis_sizes`` against ``num_devices``; errors name the axis."""
    unknown = sorted(set(axis_sizes) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"config.mesh: unknown axis {unknown[0]!r}; valid: {', '.join(MESH_AXES)}")
    sizes = [int(axis_sizes.get(name, 1)) for name in MESH_AXES]
    fills = [name for name, size in zip(MESH_AXES, sizes) if size == -1]
    bad = [name for name, size in zip(MESH_AXES, sizes) if size == 0 or size < -1]
    if bad:
        raise ConfigError(f"config.mesh.{bad[0]}: size must be >= 1 or -1 (fill), got {axis_sizes[bad[0]]}")
    if len(fills) > 1:
        raise ConfigError(f"config.mesh: only one axis may be -1 (fill), got {', '.join(fills)}")
    fixed = math.prod(size for size in sizes if size != -1)
    if fills:
        if num_devices % fixed:
            raise ConfigError(f"config.mesh: {num_devices} devices do not divide by the fixed axes' product {fixed}")
        sizes[sizes.index(-1)] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(f"config.mesh: axes multiply to {fixed} but there are {num_devices} devices")
    return tuple(sizes)


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(axis_sizes, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


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
