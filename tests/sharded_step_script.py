"""Run one train step of the smoke config on several meshes of 8 forced CPU devices.

Invoked by ``test_sharding.py`` in a subprocess (XLA_FLAGS must be set before JAX starts);
prints one JSON line: per mesh the loss, the gradients, the updated parameters, the sharding of
a few parameters and of the experts, and the activation constraints of the lowered step. The
step is traced inside ``parallel.sharding_context`` as the training loop does, so the models'
activation constraints are in it. ``fsdp4_tensor2_replicated_experts`` only evaluates the loss
(experts replicated instead of sharded like the student).
"""

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from conftest import load_config  # noqa: E402

from danceopd_jax import parallel  # noqa: E402
from danceopd_jax.train import setup_run  # noqa: E402

MESHES = {
    "single": ({"data": 1, "fsdp": 1, "tensor": 1}, 1),
    "data8": ({"data": 8, "fsdp": 1, "tensor": 1}, 8),
    "fsdp8": ({"data": 1, "fsdp": 8, "tensor": 1}, 8),
    "fsdp4_tensor2": ({"data": 1, "fsdp": 4, "tensor": 2}, 8),
    "data2_fsdp2_tensor2": ({"data": 2, "fsdp": 2, "tensor": 2}, 8),
}
REPLICATED_EXPERTS = "fsdp4_tensor2_replicated_experts"


def make_run(mesh_axes, num_devices, expert_sharding="like_student"):
    config = load_config(
        batch_size=8,
        expert_sharding=expert_sharding,
        **{
            "optimizer.warmup_steps": 0,
            "student.zero_init": False,  # gradients reach every layer
            "mesh.data": mesh_axes["data"],
            "mesh.fsdp": mesh_axes["fsdp"],
            "mesh.tensor": mesh_axes["tensor"],
        },
    )
    return setup_run(config, devices=jax.devices()[:num_devices])


def loss_of(run):
    """``(params -> mean loss of step 0, route, batch)``: the train step's loss on its first batch and key."""
    route, batch = run.global_batch(0)
    key = jax.random.fold_in(jax.random.wrap_key_data(run.state.rng), 0)  # the step's key
    return lambda p: run.loss_fn(p, run.experts, batch, jnp.int32(route), key).mean(), route, batch


def expert_kernel(run):
    return run.experts["edit_expert"]["blocks"][0]["q"]["kernel"]


def constraint_specs(lowered_text: str) -> list[str]:
    """The distinct shardings of the ``sdy.sharding_constraint`` ops in a lowered program."""
    return sorted(set(re.findall(r"sdy\.sharding_constraint %\S+ <@mesh, (\[.*?\])>", lowered_text)))


def one_step(mesh_axes, num_devices):
    run = make_run(mesh_axes, num_devices)
    loss, route, batch = loss_of(run)
    with parallel.sharding_context(run.mesh, run.rules):
        grads = jax.jit(jax.grad(loss))(run.state.params)
        args = (run.state, run.experts, batch, jnp.int32(route))
        constraints = constraint_specs(run.train_step.lower(*args).as_text())
        state, metrics = run.train_step(*args)
    blocks = state.params["blocks"][0]
    return {
        "loss": float(metrics["loss"]),
        "grads": [np.asarray(leaf).ravel().tolist() for leaf in jax.tree.leaves(grads)],
        "params": [np.asarray(leaf).ravel().tolist() for leaf in jax.tree.leaves(state.params)],
        "q_kernel_spec": [str(axis) for axis in blocks["q"]["kernel"].sharding.spec],
        "q_kernel_shard_shape": list(blocks["q"]["kernel"].addressable_shards[0].data.shape),
        "fc1_kernel_shard_shape": list(blocks["fc1"]["kernel"].addressable_shards[0].data.shape),
        "q_kernel_shape": list(blocks["q"]["kernel"].shape),
        "fc1_kernel_shape": list(blocks["fc1"]["kernel"].shape),
        "expert_q_kernel_shard_shape": list(expert_kernel(run).addressable_shards[0].data.shape),
        "batch_shard_rows": batch["image"].addressable_shards[0].data.shape[0],
        "constraints": constraints,
    }


def replicated_experts_loss(mesh_axes, num_devices):
    run = make_run(mesh_axes, num_devices, expert_sharding="replicated")
    loss = loss_of(run)[0]
    with parallel.sharding_context(run.mesh, run.rules):
        value = jax.jit(loss)(run.state.params)
    return {
        "loss": float(value),
        "expert_q_kernel_shard_shape": list(expert_kernel(run).addressable_shards[0].data.shape),
        "expert_q_kernel_spec": [str(axis) for axis in expert_kernel(run).sharding.spec],
    }


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.device_count()
    results = {name: one_step(*spec) for name, spec in MESHES.items()}
    results[REPLICATED_EXPERTS] = replicated_experts_loss(*MESHES["fsdp4_tensor2"])
    print(json.dumps(results))
