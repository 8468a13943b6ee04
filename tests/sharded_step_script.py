"""Run one train step of the smoke config on several meshes of 8 forced CPU devices.

Invoked by ``test_sharding.py`` in a subprocess (XLA_FLAGS must be set before JAX starts);
prints one JSON line: per mesh the loss, the updated parameters' fingerprints and the
sharding of a few parameters.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from conftest import load_config  # noqa: E402

from danceopd_jax.train import setup_run  # noqa: E402

MESHES = {
    "single": ({"data": 1, "fsdp": 1, "tensor": 1}, 1),
    "data8": ({"data": 8, "fsdp": 1, "tensor": 1}, 8),
    "fsdp8": ({"data": 1, "fsdp": 8, "tensor": 1}, 8),
    "data2_fsdp2_tensor2": ({"data": 2, "fsdp": 2, "tensor": 2}, 8),
}


def one_step(mesh_axes, num_devices):
    config = load_config(
        batch_size=8,
        **{
            "optimizer.warmup_steps": 0,
            "student.zero_init": False,  # gradients reach every layer
            "mesh.data": mesh_axes["data"],
            "mesh.fsdp": mesh_axes["fsdp"],
            "mesh.tensor": mesh_axes["tensor"],
        },
    )
    run = setup_run(config, devices=jax.devices()[:num_devices])
    route, batch = run.global_batch(0)
    key = jax.random.fold_in(jax.random.wrap_key_data(run.state.rng), 0)  # the step's key
    loss_of = lambda p: run.loss_fn(p, run.experts, batch, jnp.int32(route), key).mean()  # noqa: E731
    grads = jax.jit(jax.grad(loss_of))(run.state.params)
    state, metrics = run.train_step(run.state, run.experts, batch, jnp.int32(route))
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
        "batch_shard_rows": batch["image"].addressable_shards[0].data.shape[0],
    }


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.device_count()
    print(json.dumps({name: one_step(*spec) for name, spec in MESHES.items()}))
