"""The numbers a run's train step takes as arguments rather than compiling in as constants.

A number closed over by the traced step becomes a constant of its program, so runs that differ
only in it compile their own step, and the persistent compilation cache does not serve them (a
learning-rate or CFG sweep, a reproduction's ablation rows, routers trained on other labels).
These numbers are instead arguments of the compiled step (``make_step``), so such runs share one
program:

* ``learning_rate``, ``weight_decay``, ``grad_clip`` of ``config.optimizer``;
* ``condition_dropout`` of flow matching;
* ``query_beta``, the ``(a, b)`` of a Beta query sampler (``low_t``, ``mid_t``, ``high_t``);
* ``cfg_scales``, the scale of each guided expert field (scale 1 is the plain field, a program
  of its own: one forward instead of two);
* ``router``, a learned router's weights.

None of them divides a value the step computes or enters it as ``1 - x``, so on XLA's CPU backend
the step computes the same bits with them as arguments as with them as constants
(``tests/test_step_numbers.py``; the quick reproduction's checkpoints are unchanged bit for bit).
That holds with its default fusion emitters; with the older ones (the tests' faster setting) some
values differ in the last bit, and the GPU backend was not checked. Other numbers stay constants,
as their bits would change:

* those the step uses through ``1 - x`` (Adam's ``b1``/``b2``, the EMA decay, Flow-OPD's clips,
  the flow-matching shift): Python computes ``1 - x`` in float64 before rounding, the program in
  float32;
* divisors (the sigma grid, which Flow-OPD divides by; ``num_train_steps``, the cosine decay's):
  XLA turns a division by a constant into a product with its reciprocal, one rounding more.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import ConfigDict

from danceopd_jax import build
from danceopd_jax.core.fields import is_guided
from danceopd_jax.core.schedule import beta_parameters
from danceopd_jax.core.step import make_lr_schedule, make_optimizer, make_train_step


def step_numbers(config: ConfigDict, router_params=None) -> dict:
    """The run's step numbers as host arrays (float32; ``router``: the learned router's params or None)."""
    opt = config.optimizer
    beta = beta_parameters(config.query_sampler)
    return {
        "learning_rate": np.float32(opt.learning_rate),
        "weight_decay": np.float32(opt.weight_decay),
        "grad_clip": np.float32(opt.grad_clip),
        "condition_dropout": np.float32(config.condition_dropout),
        "query_beta": None if beta is None else np.asarray(beta, np.float32),
        "cfg_scales": {
            name: np.float32(spec.cfg_scale)
            for name, spec in config.fields.items()
            if spec.kind == "expert" and is_guided(spec.cfg_scale)
        },
        "router": None if router_params is None else jax.tree.map(np.asarray, router_params),
    }


def make_lr_and_optimizer(config: ConfigDict, numbers: dict) -> tuple[optax.Schedule, optax.GradientTransformation]:
    """The run's learning-rate schedule and AdamW (``core.step``) with the step numbers ``numbers``."""
    opt = config.optimizer
    lr_schedule = make_lr_schedule(numbers["learning_rate"], opt.warmup_steps, config.num_train_steps, opt.decay)
    optimizer = make_optimizer(
        lr_schedule, weight_decay=numbers["weight_decay"], grad_clip=numbers["grad_clip"], b1=opt.b1, b2=opt.b2
    )
    return lr_schedule, optimizer


def make_step(config: ConfigDict, student_graphdef: nnx.GraphDef, expert_graphdefs: dict) -> Callable:
    """``step(state, experts, batch, route, numbers) -> (state, metrics)``: ``core.step.make_train_step``
    of the run's loss and optimizer, both built from the traced ``numbers`` inside the step."""
    sigmas = build.rollout_sigmas(config)

    def step(state, experts, batch, route, numbers):
        lr_schedule, optimizer = make_lr_and_optimizer(config, numbers)
        train_step = make_train_step(
            build.make_loss(config, student_graphdef, expert_graphdefs, numbers, sigmas),
            optimizer,
            lr_schedule,
            group_sizes=build.step_group_sizes(config),
            group_blocks=jax.process_count(),
            ema_decay=config.optimizer.ema_decay,
            skip_nonfinite=config.skip_nonfinite_steps,
            router_params=numbers["router"],
            grad_accum_steps=config.grad_accum_steps,
        )
        return train_step(state, experts, batch, route)

    return step


@dataclasses.dataclass(frozen=True, eq=False)
class BoundStep:
    """A step taking ``numbers`` last, called (and lowered) as ``step(state, experts, batch, route)``."""

    step: Any  # jitted or not: step(state, experts, batch, route, numbers)
    numbers: Any

    def __call__(self, state, experts, batch, route):
        return self.step(state, experts, batch, route, self.numbers)

    def lower(self, state, experts, batch, route):
        return self.step.lower(state, experts, batch, route, self.numbers)


def with_constants(step: Callable, numbers: dict) -> Callable:
    """``step(state, experts, batch, route)`` of a ``make_step`` step with ``numbers`` compiled in as
    constants (Python floats and arrays), as the step took them before they were arguments: what
    the comparisons of programs and bits hold a run's step against."""
    constants = jax.tree.map(lambda a: float(a) if np.ndim(a) == 0 else jnp.asarray(a), numbers)

    def constant_step(state, experts, batch, route):
        return step(state, experts, batch, route, constants)

    return constant_step
