"""One train step on 8 forced CPU devices matches one device, and parameters, experts and
activations follow the rules: for the DiT (configs/smoke.py), for the MMDiT of an SD3 run
(configs/sd3_smoke.py: a LoRA student and a LoRA teacher over one shared frozen base, CFG) and for
the Z-Image transformer (configs/zimage_smoke.py, the same shape of run)."""

import json
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
from danceopd_jax.models.dit import LOGICAL_AXES
from danceopd_jax.models.layers import TOKENS, constrain

from conftest import cpu_devices_env

SCRIPT = pathlib.Path(__file__).with_name("sharded_step_script.py")

# Tolerances: float32 with different reduction orders across devices. The loss agrees to
# rtol 1e-5 and the gradients to 1e-4 of the largest gradient entry. One Adam step (lr 1e-3)
# moves each parameter by up to 1e-3, and by lr * g / (|g| + 1e-8) where |g| is tiny, which
# amplifies float noise in near-zero gradients: updated parameters agree to atol 1e-4 (10% of
# one step), and to 1e-5 for all entries whose gradient is above 1e-6. The SD3 steps' LoRA
# parameters agree to 10% of one step at their learning rate (STEP_FRACTION_ATOL); gradient norms
# to rtol 1e-4.
LOSS_RTOL = 1e-5
GRAD_RTOL_OF_MAX = 1e-4
PARAM_ATOL = 1e-4
STEP_FRACTION_ATOL = 0.1


@pytest.fixture(scope="module")
def script_outputs(tmp_path_factory):
    """Both parts of the script start at once; ``{part: finish() -> its JSON}``.

    Compiling a step per mesh is most of their time (XLA compiles mostly on one core), so they run
    side by side, with the tests' XLA flags (``conftest.TEST_XLA_FLAGS``: every mesh, the single
    device included, compiles alike)."""
    tmp = tmp_path_factory.mktemp("sharded_steps")
    env = cpu_devices_env(8)
    started = {}
    for part, args in (("dit", ()), ("sd3", (str(tmp),)), ("zimage", (str(tmp),))):
        out, err = open(tmp / f"{part}.out", "w+"), open(tmp / f"{part}.err", "w+")
        started[part] = (subprocess.Popen([sys.executable, str(SCRIPT), part, *args], env=env, stdout=out, stderr=err, text=True), out, err)

    def finish(part):
        process, out, err = started[part]
        returncode = process.wait(timeout=900)
        err.seek(0), out.seek(0)
        assert returncode == 0, err.read()[-3000:]
        return json.loads(out.read().strip().splitlines()[-1])

    yield finish
    for process, out, err in started.values():
        if process.poll() is None:
            process.kill()
            process.wait()
        out.close(), err.close()


@pytest.fixture(scope="module")
def results(script_outputs):
    return script_outputs("dit")


# The meshes each model-folder family runs on (``sharded_step_script.FAMILIES``) and its teacher's route.
FOLDER_MESHES = {"sd3": ("data8", "fsdp8", "fsdp4_tensor2", "data2_fsdp2_tensor2"), "zimage": ("data8", "fsdp8", "fsdp4_tensor2")}
FOLDER_ROUTES = {"sd3": ["cfg", "realism"], "zimage": ["cfg", "teacher"]}


@pytest.fixture(scope="module", params=sorted(FOLDER_MESHES))
def folder_results(request, script_outputs):
    """``(family, its part's JSON)`` for the SD3 and the Z-Image runs."""
    return request.param, script_outputs(request.param)


SHARDED_MESHES = ["data8", "fsdp8", "fsdp4_tensor2", "data2_fsdp2_tensor2"]
# The activation layouts under the configs' rules (activation_batch -> (data, fsdp), activation_heads
# and activation_mlp -> tensor): tokens [B, S, D], q/k/v [B, S, H, Dh], MLP hidden [B, S, mlp].
EXPECTED_CONSTRAINTS = sorted(['[{"data", "fsdp"}, {}, {}]', '[{"data", "fsdp"}, {}, {"tensor"}, {}]', '[{"data", "fsdp"}, {}, {"tensor"}]'])


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
    assert results[mesh]["constraints"] == EXPECTED_CONSTRAINTS


def test_accumulated_step_on_a_sharded_mesh_matches_one_device(results):
    """``grad_accum_steps=2`` on data=2 x fsdp=2 x tensor=2: two strided microbatches of 4 samples, one
    row of each per data-parallel device, give the one-device step without accumulation. The split
    is local to each device: the compiled step has exactly the data movement of the same mesh's
    step without accumulation (no all-to-all, no extra collective-permute) and the same activation
    layouts."""
    single, accumulated, plain = results["single"], results["data2_fsdp2_tensor2_accum2"], results["data2_fsdp2_tensor2"]
    assert accumulated["loss"] == pytest.approx(single["loss"], rel=LOSS_RTOL)
    for a, b in zip(single["params"], accumulated["params"]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=PARAM_ATOL)
    assert accumulated["all_to_all_ops"] == plain["all_to_all_ops"] == 0
    assert accumulated["collective_permute_ops"] == plain["collective_permute_ops"]
    assert accumulated["constraints"] == EXPECTED_CONSTRAINTS


def test_experts_are_sharded_like_the_student_or_replicated(results):
    """``expert_sharding``: like_student (the default) shards an expert's kernels by the rules;
    replicated keeps a whole copy per device. The loss is the same either way."""
    embed, heads = results["single"]["q_kernel_shape"]
    assert results["fsdp4_tensor2"]["expert_q_kernel_shard_shape"] == [embed // 4, heads // 2]
    replicated = results["fsdp4_tensor2_replicated_experts"]
    assert replicated["expert_q_kernel_spec"] == ["None", "None"]
    assert replicated["expert_q_kernel_shard_shape"] == [embed, heads]
    assert replicated["loss"] == pytest.approx(results["single"]["loss"], rel=LOSS_RTOL)


def test_folder_steps_match_one_device(folder_results):
    """One step on each route (the base under CFG, the base plus the teacher's LoRA) from the
    fresh state, on every mesh: same losses and gradient norms, same LoRA after both steps
    (tolerances above)."""
    family, results = folder_results
    single = results["single"]
    assert all(loss > 0 for loss in single["losses"]) and single["losses"][0] != single["losses"][1]
    for mesh in FOLDER_MESHES[family]:
        sharded = results[mesh]
        assert single["routes"] == sharded["routes"] == FOLDER_ROUTES[family]
        np.testing.assert_allclose(sharded["losses"], single["losses"], rtol=LOSS_RTOL, err_msg=mesh)
        np.testing.assert_allclose(sharded["grad_norms"], single["grad_norms"], rtol=GRAD_RTOL_OF_MAX, err_msg=mesh)
        assert len(sharded["params"]) == len(single["params"])
        for a, b in zip(single["params"], sharded["params"]):
            np.testing.assert_allclose(b, a, atol=STEP_FRACTION_ATOL * single["learning_rate"], err_msg=mesh)


def test_folder_base_and_adapters_are_sharded_as_the_rules_say(folder_results):
    """Rules (config_lib): embed -> fsdp, heads and mlp -> tensor; the LoRA factors follow their base
    kernel's axes (A: embed x lora_rank, B: lora_rank x heads), the teacher's delta too."""
    family, results = folder_results
    shapes = results["single"]["shapes"]
    embed, heads = shapes["base_to_q_kernel"]
    mlp, rank = shapes["base_fc1_kernel"][1], shapes["student_to_q_lora_a"][1]
    axes = {"data8": (8, 1, 1), "fsdp8": (1, 8, 1), "fsdp4_tensor2": (1, 4, 2), "data2_fsdp2_tensor2": (2, 2, 2)}
    for mesh in FOLDER_MESHES[family]:
        data, fsdp, tensor = axes[mesh]
        assert results[mesh]["shard_shapes"] == {
            "base_to_q_kernel": [embed // fsdp, heads // tensor],
            "base_fc1_kernel": [embed // fsdp, mlp // tensor],
            "student_to_q_lora_a": [embed // fsdp, rank],
            "student_to_q_lora_b": [rank, heads // tensor],
            "teacher_to_q_lora_b": [rank, heads // tensor],
        }, mesh
        assert results[mesh]["batch_shard_rows"] == 8 // (data * fsdp), mesh


def test_folder_activation_constraints_are_in_the_lowered_step(folder_results):
    """The MMDiT and the Z-Image transformer pin the same three layouts as the DiT (tokens, q/k/v,
    MLP hidden)."""
    family, results = folder_results
    for mesh in (mesh for mesh in FOLDER_MESHES[family] if "tensor" in mesh):
        assert results[mesh]["constraints"] == EXPECTED_CONSTRAINTS, mesh


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
