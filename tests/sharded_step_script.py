"""Run train steps on several meshes of 8 forced CPU devices; one part per invocation.

    python sharded_step_script.py dit             # configs/smoke.py: a DiT student and DiT experts
    python sharded_step_script.py sd3 TMPDIR      # configs/sd3_smoke.py on a tiny SD3 folder written in TMPDIR
    python sharded_step_script.py zimage TMPDIR   # configs/zimage_smoke.py on a tiny Z-Image folder

Invoked by ``test_sharding.py`` in subprocesses (XLA_FLAGS must be set before JAX starts); each
prints one JSON line with, per mesh, what the test compares with one device and checks against
the rules. Steps are traced inside ``parallel.sharding_context`` as the training loop does, so
the models' activation constraints are in them.

``dit``: per mesh the loss, the gradients, the updated parameters, the sharding of a few
parameters and of the experts, the activation constraints of the lowered step and the count of
data-moving collectives (all-to-all, collective-permute) in the compiled one;
``fsdp4_tensor2_replicated_experts`` only evaluates the loss (experts replicated instead of
sharded like the student), and ``data2_fsdp2_tensor2_accum2`` is that mesh's step in two
microbatches (``grad_accum_steps=2``).

``sd3`` and ``zimage``: a model folder's path (``models.backbones``: a LoRA student over the
shared frozen base, a teacher that is the base plus a LoRA delta, the base under CFG against the
family's null). Per mesh one step on each route from the fresh state (one compiled step, the route
is an argument): their losses and gradient norms, the LoRA parameters after both steps, the shard
shapes of base kernels and adapters, and the activation constraints of the lowered step. Z-Image
runs on the meshes its issue names (data 8, fsdp 8, tensor 2 x fsdp 4).
"""

import functools
import json
import re
import sys
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from conftest import load_config  # noqa: E402

from danceopd_jax import build, parallel  # noqa: E402
from danceopd_jax.models.tiny_sd3 import write_tiny_sd3  # noqa: E402
from danceopd_jax.models.tiny_zimage import write_tiny_zimage  # noqa: E402
from danceopd_jax.train import setup_run  # noqa: E402

MESHES = {
    "single": ({"data": 1, "fsdp": 1, "tensor": 1}, 1),
    "data8": ({"data": 8, "fsdp": 1, "tensor": 1}, 8),
    "fsdp8": ({"data": 1, "fsdp": 8, "tensor": 1}, 8),
    "fsdp4_tensor2": ({"data": 1, "fsdp": 4, "tensor": 2}, 8),
    "data2_fsdp2_tensor2": ({"data": 2, "fsdp": 2, "tensor": 2}, 8),
}
REPLICATED_EXPERTS = "fsdp4_tensor2_replicated_experts"
ACCUMULATED = "data2_fsdp2_tensor2_accum2"  # that mesh, the step in 2 microbatches of 4 samples


def make_run(mesh_axes, num_devices, expert_sharding="like_student", grad_accum_steps=1):
    config = load_config(
        batch_size=8,
        expert_sharding=expert_sharding,
        grad_accum_steps=grad_accum_steps,
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


def one_step(mesh_axes, num_devices, grad_accum_steps=1):
    run = make_run(mesh_axes, num_devices, grad_accum_steps=grad_accum_steps)
    loss, route, batch = loss_of(run)
    with parallel.sharding_context(run.mesh, run.rules):
        grads = jax.jit(jax.grad(loss))(run.state.params)
        args = (run.state, run.experts, batch, jnp.int32(route))
        lowered = run.train_step.lower(*args)
        constraints = constraint_specs(lowered.as_text())
        compiled = lowered.compile().as_text()
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
        "all_to_all_ops": compiled.count("all-to-all("),
        "collective_permute_ops": compiled.count("collective-permute("),
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


def dit_results() -> dict:
    results = {name: one_step(*spec) for name, spec in MESHES.items()}
    results[REPLICATED_EXPERTS] = replicated_experts_loss(*MESHES["fsdp4_tensor2"])
    results[ACCUMULATED] = one_step(*MESHES["data2_fsdp2_tensor2"], grad_accum_steps=2)
    return results


# ------------------------------------------------------------------------------------------
# Model folders: a LoRA student and teacher over one shared base (SD3's MMDiT, Z-Image)
# ------------------------------------------------------------------------------------------


class Family(NamedTuple):
    """Where a family's smoke run keeps what the test inspects: its config, the teacher expert, the
    paths (in the first block) of an attention query projection and of an MLP input projection, the
    tiny folder's writer and the meshes it runs on."""

    config: str
    teacher: str
    block: tuple
    query: tuple
    mlp: tuple
    write: Callable[[str], str]
    meshes: tuple[str, ...]


FAMILIES = {
    "sd3": Family("sd3_smoke", "realism", ("transformer_blocks", 0), ("attn", "to_q"), ("ff", "fc1"), write_tiny_sd3, tuple(MESHES)),
    "zimage": Family("zimage_smoke", "teacher", ("layers", 0), ("attention", "to_q"), ("feed_forward", "w1"), write_tiny_zimage,
                     ("single", "data8", "fsdp8", "fsdp4_tensor2")),
}  # fmt: skip


def _at(tree, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def folder_steps(family: Family, mesh_axes, num_devices, folder, workdir):
    config = load_config(
        family.config,
        model_dir=folder,
        batch_size=8,
        **{"mesh.data": mesh_axes["data"], "mesh.fsdp": mesh_axes["fsdp"], "mesh.tensor": mesh_axes["tensor"]},
    )
    run = setup_run(config, devices=jax.devices()[:num_devices], workdir=workdir)  # prompts encoded once per workdir
    base = _at(run.experts[build.SHARED_BASE], family.block)
    adapter = _at(run.state.params, family.block + family.query)
    arrays = {
        "base_to_q_kernel": _at(base, family.query)["kernel"],
        "base_fc1_kernel": _at(base, family.mlp)["kernel"],
        "student_to_q_lora_a": adapter["lora_a"],
        "student_to_q_lora_b": adapter["lora_b"],
        "teacher_to_q_lora_b": _at(run.experts[family.teacher], family.block + family.query)["lora_b"],
    }
    shapes = {name: list(array.shape) for name, array in arrays.items()}
    shard_shapes = {name: list(array.addressable_shards[0].data.shape) for name, array in arrays.items()}  # before donation
    _, batch = run.global_batch(0)  # every route draws from the one prompt bucket
    state, losses, grad_norms = run.state, [], []
    with parallel.sharding_context(run.mesh, run.rules):
        constraints = constraint_specs(run.train_step.lower(state, run.experts, batch, jnp.int32(0)).as_text())
        for route in range(len(config.routes)):
            state, metrics = run.train_step(state, run.experts, batch, jnp.int32(route))
            losses.append(float(metrics["loss"]))
            grad_norms.append(float(metrics["grad_norm"]))
    return {
        "routes": list(config.routes),
        "learning_rate": config.optimizer.learning_rate,  # the peak rate (no warmup)
        "losses": losses,
        "grad_norms": grad_norms,
        "params": [np.asarray(leaf).ravel().tolist() for leaf in jax.tree.leaves(state.params)],
        "shapes": shapes,
        "shard_shapes": shard_shapes,
        "batch_shard_rows": batch["image"].addressable_shards[0].data.shape[0],
        "constraints": constraints,
    }


def folder_results(name: str, tmp: str) -> dict:
    family = FAMILIES[name]
    folder = family.write(f"{tmp}/tiny_{name}")
    return {mesh: folder_steps(family, *MESHES[mesh], folder, f"{tmp}/workdir_{name}") for mesh in family.meshes}


PARTS = {"dit": dit_results, "sd3": functools.partial(folder_results, "sd3"), "zimage": functools.partial(folder_results, "zimage")}

if __name__ == "__main__":
    assert jax.device_count() == 8, jax.device_count()
    print(json.dumps(PARTS[sys.argv[1]](*sys.argv[2:])))
