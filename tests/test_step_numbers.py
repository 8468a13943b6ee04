"""The step numbers (``step_numbers``) are arguments of the compiled train step: runs that differ
only in them lower to the same program, and a step computes the same bits with its numbers as
arguments as with them compiled in as constants."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from danceopd_jax import step_numbers
from danceopd_jax.train import setup_run

from conftest import load_config

LEARNED = {"routing": "learned", "router.heldout": 32, "batch_size": 8}
FLOW_MATCHING = {"method": "flow_matching", "student.zero_init": False}
GUIDED = {"fields.t2i.cfg_scale": 2.0}
RUN_COMPILER = {"xla_cpu_use_fusion_emitters": True}  # as a run compiles (conftest.TEST_XLA_FLAGS turns them off)
NUMBERS = {  # every step number of a DanceOPD run changed at once
    "optimizer.learning_rate": 3e-4,
    "optimizer.weight_decay": 0.01,
    "optimizer.grad_clip": 0.5,
    "query_sampler": "mid_t",
    "fields.t2i.cfg_scale": 3.0,
}


@functools.cache
def _lowered(overrides: frozenset) -> str:
    run = setup_run(load_config(**dict(overrides)))
    route, batch = run.global_batch(0)
    return run.train_step.lower(run.state, run.experts, batch, jnp.int32(route)).as_text()


def _program(**overrides) -> str:
    """The text of the train step a run of the smoke config with ``overrides`` compiles."""
    return _lowered(frozenset(overrides.items()))


@pytest.mark.parametrize(
    "a,b",
    [
        (GUIDED, NUMBERS),
        ({**LEARNED, "router.label_fraction": 1.0}, {**LEARNED, "router.label_fraction": 0.5}),
        ({**FLOW_MATCHING, "condition_dropout": 0.1}, {**FLOW_MATCHING, "condition_dropout": 0.3}),
    ],
    ids=["optimizer, query sampler, cfg scale", "router weights", "condition dropout"],
)
def test_runs_that_differ_only_in_step_numbers_share_one_program(a, b):
    assert _program(**a) == _program(**b)


@pytest.mark.parametrize(
    "other",
    [{**GUIDED, "rollout_steps": 6}, {**GUIDED, "fields.t2i.cfg_scale": 1.0}, {**GUIDED, "query_sampler": "uniform"}],
    ids=["rollout length", "an unguided field", "a sampler of another kind"],
)
def test_what_changes_the_computation_changes_the_program(other):
    assert _program(**GUIDED) != _program(**other)


@pytest.mark.parametrize(
    "overrides",
    [
        {**NUMBERS, "optimizer.warmup_steps": 1, "num_train_steps": 4},
        {**LEARNED, "router.label_fraction": 0.5},
        {**FLOW_MATCHING, "condition_dropout": 0.3},
    ],
    ids=["danceopd", "learned routing", "flow matching"],
)
def test_a_step_computes_the_same_bits_with_its_numbers_as_arguments_or_as_constants(overrides):
    """Both compiled with XLA's CPU fusion emitters, as a run is (``conftest.TEST_XLA_FLAGS`` turns them
    off to compile faster; without them the two programs may differ in the last bit)."""
    run = setup_run(load_config(**overrides))
    route, batch = run.global_batch(0)
    args = (run.state, run.experts, batch, jnp.int32(route))
    as_run = run.train_step.step.lower(*args, run.train_step.numbers).compile(compiler_options=RUN_COMPILER)
    baked = jax.jit(step_numbers.with_constants(run.step_fn.step, run.step_fn.numbers))
    baked = baked.lower(*args).compile(compiler_options=RUN_COMPILER)
    as_arguments, as_constants = run.state, jax.tree.map(jnp.copy, run.state)
    for step in range(2):
        route, batch = run.global_batch(step)
        as_arguments, metrics = as_run(as_arguments, run.experts, batch, jnp.int32(route), run.train_step.numbers)
        as_constants, expected = baked(as_constants, run.experts, batch, jnp.int32(route))
        for got, want in zip(jax.tree.leaves((as_arguments, metrics)), jax.tree.leaves((as_constants, expected))):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
