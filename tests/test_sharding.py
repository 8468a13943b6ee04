"""One train step on 8 forced CPU devices matches one device, and parameters, experts and
activations follow the rules."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from danceopd_jax import parallel
from danceopd_jax.config_lib import base_config
from danceopd_jax.config_validation import ConfigError
from danceopd_jax.models.dit import LOGICAL_AXES, TOKENS, constrain

SCRIPT = pathlib.Path(__file__).with_name("sharded_step_script.py")

# Tolerances: float32 with different reduction orders across devices. The loss agrees to
# rtol 1e-5 and the gradients to 1e-4 of the largest gradient entry. One Adam step (lr 1e-3)
# moves each parameter by up to 1e-3, and by lr * g / (|g| + 1e-8) where |g| is tiny, which
# amplifies float noise in near-zero gradients: updated parameters agree to atol 1e-4 (10% of
# one step), and to 1e-5 for all entries whose gradient is above 1e-6.
LOSS_RTOL = 1e-5
GRAD_RTOL_OF_MAX = 1e-4
PARAM_ATOL = 1e-4


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


SHARDED_MESHES = ["data8", "fsdp8", "fsdp4_tensor2", "data2_fsdp2_tensor2"]


@pytest.mark.parametrize("mesh", SHARDED_MESHES)
def test_same_loss_and_update_as_one_device(results, mesh):
    single, sharded = results["single"], results[mesh]
    assert sharded["loss"] == pytest.approx(single["loss"], rel=LOSS_RTOL)
    scale = max(np.max(np.abs(g)) for g in single["grads"])
    for a, b in zip(single["grads"], sharded["grads"]):
        np.testing.assert_allclose(b, a, atol=GRAD_RTOL_OF_MAX * scale)
    for a, b, g in zip(single["params"], sharded["params"], single["grads"]):
        a, b, g = np.asarray(a), np.asarray(b), np.abs(np.asarray(g))
        np.testing.assert_allclose(b, a, atol=PARAM_ATOL)
        np.testing.assert_allclose(b[g > 1e-6], a[g > 1e-6], atol=1e-5)


def test_parameters_are_sharded_as_the_rules_say(results):
    """Rules: embed -> fsdp, heads -> tensor, mlp -> tensor (configs/smoke.py)."""
    embed, heads = results["single"]["q_kernel_shape"]
    _, mlp = results["single"]["fc1_kernel_shape"]
    assert results["fsdp8"]["q_kernel_spec"] == ["fsdp", "tensor"]
    assert results["fsdp8"]["q_kernel_shard_shape"] == [embed // 8, heads]
    assert results["data8"]["q_kernel_shard_shape"] == [embed, heads]  # data parallel: replicated
    assert results["data2_fsdp2_tensor2"]["q_kernel_shard_shape"] == [embed // 2, heads // 2]
    assert results["data2_fsdp2_tensor2"]["fc1_kernel_shard_shape"] == [embed // 2, mlp // 2]
    assert results["fsdp4_tensor2"]["q_kernel_spec"] == ["fsdp", "tensor"]
    assert results["fsdp4_tensor2"]["q_kernel_shard_shape"] == [embed // 4, heads // 2]
    assert results["fsdp4_tensor2"]["fc1_kernel_shard_shape"] == [embed // 4, mlp // 2]


def test_batch_is_split_over_data_and_fsdp(results):
    assert results["single"]["batch_shard_rows"] == 8
    assert results["data8"]["batch_shard_rows"] == 1
    assert results["fsdp8"]["batch_shard_rows"] == 1
    assert results["fsdp4_tensor2"]["batch_shard_rows"] == 2
    assert results["data2_fsdp2_tensor2"]["batch_shard_rows"] == 2


@pytest.mark.parametrize("mesh", ["fsdp4_tensor2", "data2_fsdp2_tensor2"])
def test_activation_constraints_are_in_the_lowered_step(results, mesh):
    """Rules (config_lib): activation_batch -> (data, fsdp), activation_heads and activation_mlp ->
    tensor, length and embed replicated: tokens [B, S, D], q/k/v [B, S, H, Dh], MLP hidden [B, S, mlp]."""
    tokens, heads, mlp = '[{"data", "fsdp"}, {}, {}]', '[{"data", "fsdp"}, {}, {"tensor"}, {}]', '[{"data", "fsdp"}, {}, {"tensor"}]'
    assert results[mesh]["constraints"] == sorted([tokens, heads, mlp])


def test_experts_are_sharded_like_the_student_or_replicated(results):
    """``expert_sharding``: like_student (the default) shards an expert's kernels by the rules;
    replicated keeps a whole copy per device. The loss is the same either way."""
    embed, heads = results["single"]["q_kernel_shape"]
    assert results["fsdp4_tensor2"]["expert_q_kernel_shard_shape"] == [embed // 4, heads // 2]
    replicated = results["fsdp4_tensor2_replicated_experts"]
    assert replicated["expert_q_kernel_spec"] == ["None", "None"]
    assert replicated["expert_q_kernel_shard_shape"] == [embed, heads]
    assert replicated["loss"] == pytest.approx(results["single"]["loss"], rel=LOSS_RTOL)


def test_rules_name_every_logical_axis_including_the_activations():
    rules = dict(parallel.axis_rules(base_config().logical_axis_rules, LOGICAL_AXES))
    assert set(rules) == set(LOGICAL_AXES)
    assert rules["activation_batch"] == ("data", "fsdp")
    assert (rules["activation_heads"], rules["activation_mlp"]) == ("tensor", "tensor")
    assert rules["activation_length"] is rules["activation_embed"] is None
    with pytest.raises(ConfigError, match=r"^config\.logical_axis_rules\.activation_btch: unknown logical axis; valid: "):
        parallel.axis_rules({"activation_btch": "data"}, LOGICAL_AXES)


def test_constraints_are_no_ops_without_a_mesh():
    """Rules active but no mesh (one device, unsharded tracing): nothing is added to the program."""
    rules = parallel.axis_rules(base_config().logical_axis_rules, LOGICAL_AXES)
    x = jnp.ones((2, 3, 4))
    with nnx.logical_axis_rules(rules):
        assert constrain(x, TOKENS) is x
        assert "sharding_constraint" not in jax.jit(lambda y: constrain(y, TOKENS)).lower(x).as_text()
