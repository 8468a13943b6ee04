"""One train step on 8 forced CPU devices matches one device, and parameters follow the rules."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

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


@pytest.mark.parametrize("mesh", ["data8", "fsdp8", "data2_fsdp2_tensor2"])
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


def test_batch_is_split_over_data_and_fsdp(results):
    assert results["single"]["batch_shard_rows"] == 8
    assert results["data8"]["batch_shard_rows"] == 1
    assert results["fsdp8"]["batch_shard_rows"] == 1
    assert results["data2_fsdp2_tensor2"]["batch_shard_rows"] == 2
