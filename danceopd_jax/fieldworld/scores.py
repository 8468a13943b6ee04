"""Exact scores of samples in the field world, each a mean with its standard error.

* ``nll``: ``-log p(x0 | cond)`` under the exact target density (``exact_fields.log_density`` at
  ``t = 0``). For a single Gaussian ``N(m, s I)`` in D dimensions its expectation under exact
  samples is the entropy ``D/2 log(2 pi e s)``.
* ``energy_distance``: ``E|X - Y| - (E|X - X'| + E|Y - Y'|) / 2`` (Szekely & Rizzo), zero iff the
  laws agree; unbiased U-statistics (pairs of a sample with itself left out) on ``blocks``
  disjoint blocks, the standard error from the spread of the block estimates. It sees coarse
  errors (4 Euler steps of the exact ring: 0.012 +- 0.001 with 2000 samples) but not fine ones:
  the realism target against the plain one (the same modes at half the width) measures
  0.0002 +- 0.0005, so sharpness is scored by the NLL under the realism density instead.
  NLL of samples is a cross-entropy and rewards collapse onto mode centres (samples narrower
  than the target score below its entropy): read it with the energy distance and the shares.
* ``mode_shares``: each sample of class c assigned to the class mode of highest posterior
  ``argmax_j log w_j + log N(x; m_j, S_j)`` (the plane), the share of each mode against its weight
  ``w_j``, their total variation ``(1/2) sum_j |share_j - w_j|``, and the stray share: samples
  outside the 99.9% ellipse of the mode they are assigned to (``(x - m_j)^T S_j^{-1} (x - m_j) >
  chi2_2(0.999)``; 0.1% for exact samples).
* ``edit_hits``: a sample of an edit inside the 99% ball of its target ``N(mu(y), EDIT_STD^2 I)``
  (``|x - mu(y)|^2 / EDIT_STD^2 <= chi2_D(0.99)``); ``local_edit_mode_hits``: its own mode is the
  intended neighbouring mode of the source's.
* ``effective_guidance``: ``evaluation/guidance.py``'s fit for fields. On states x of the
  anchor's unguided rollout, with anchor velocities a_c, a_u and the model's velocity u,
  ``gamma = sum <u - a_u, a_c - a_u> / sum ||a_c - a_u||^2``; its standard error by the delta
  method over samples, ``sqrt(B / (B - 1) sum_b (n_b - gamma d_b)^2) / sum_b d_b`` with ``n_b``,
  ``d_b`` sample b's terms.

Per-source scores: samples laid out source-major (``repeats`` consecutive samples per source)
are averaged per source first, and the standard error is taken over sources.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from danceopd_jax.core.conditioning import Condition, unconditional
from danceopd_jax.core.fields import Field
from danceopd_jax.core.rollout import rollout_trajectory
from danceopd_jax.fieldworld.exact_fields import log_density
from danceopd_jax.fieldworld.targets import EDIT_STD, FieldWorld, components, plane_log_posterior, source_modes, to_layout


class Estimate(NamedTuple):
    mean: float
    stderr: float


def mean_estimate(values, repeats: int = 1) -> Estimate:
    """Mean and standard error of ``values`` [N]; with ``repeats`` the mean of each run of
    ``repeats`` consecutive values (one source) is one observation."""
    groups = np.asarray(values, np.float64).reshape(-1, repeats).mean(1)
    return Estimate(float(groups.mean()), float(groups.std(ddof=1) / np.sqrt(len(groups))))


def nll(world: FieldWorld, samples: jax.Array, cond: Condition, realism: bool = False, repeats: int = 1) -> Estimate:
    """Mean negative log-likelihood of ``samples`` [B, ..., D] under their exact targets."""
    t = jnp.zeros((samples.shape[0],), jnp.float32)
    return mean_estimate(-np.asarray(log_density(world, samples, t, cond, realism)), repeats)


def _mean_distance(x: np.ndarray, y: np.ndarray, same: bool) -> float:
    distances = np.linalg.norm(x[:, None] - y[None], axis=-1)
    if same:
        return distances.sum() / (len(x) * (len(x) - 1))
    return distances.mean()


def energy_distance(x, y, blocks: int = 10) -> Estimate:
    """Energy distance between point sets [N, ..., D] and [N', ..., D] (module docstring)."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    per_block = [
        _mean_distance(a, b, False) - (_mean_distance(a, a, True) + _mean_distance(b, b, True)) / 2
        for a, b in zip(np.array_split(x, blocks), np.array_split(y, blocks))
    ]
    return mean_estimate(per_block)


@dataclasses.dataclass(frozen=True)
class ModeShares:
    shares: np.ndarray  # [n] share of the samples assigned to each of the class's modes
    weights: np.ndarray  # [n] the modes' weights
    total_variation: float
    stray: float


def mode_shares(world: FieldWorld, samples: jax.Array, label: int, realism: bool = False) -> ModeShares:
    """Mode shares of samples [B, ..., D] of T2I class ``label`` (module docstring)."""
    modes = world.class_modes(label)
    variances = (world.realism_variances if realism else world.mode_variances)[modes, :2]
    layout = np.asarray(to_layout(world, samples))
    log_posterior = plane_log_posterior(jnp.asarray(layout), world.mode_means[modes], variances, world.class_log_weights[label, modes])
    assigned = np.asarray(jnp.argmax(log_posterior, -1))
    shares = np.bincount(assigned, minlength=len(modes)) / len(assigned)
    weights = world.mode_weights[modes]
    offset = layout[:, :2] - world.mode_means[modes][assigned, :2]
    distance = np.sum(offset**2 / variances[assigned], -1)
    stray = float(np.mean(distance > scipy.stats.chi2.ppf(0.999, 2)))
    return ModeShares(shares, weights, float(0.5 * np.abs(shares - weights).sum()), stray)


def edit_target_means(world: FieldWorld, cond: Condition) -> jax.Array:
    """[B, D] layout-frame mean of each edit-labelled sample's target (its only component)."""
    means, _, log_weights = components(world, cond)
    return means[jnp.arange(means.shape[0]), jnp.argmax(log_weights, -1)]


def edit_hits(world: FieldWorld, samples: jax.Array, cond: Condition) -> np.ndarray:
    """bool [B]: the sample lies in the 99% ball of its edit target (module docstring)."""
    offset = to_layout(world, samples) - edit_target_means(world, cond)
    distance = np.asarray(jnp.sum(jnp.square(offset), -1)) / EDIT_STD**2
    return distance <= scipy.stats.chi2.ppf(0.99, world.dim)


def local_edit_mode_hits(world: FieldWorld, samples: jax.Array, cond: Condition) -> np.ndarray:
    """bool [B]: the sample's own mode is the mode its local edit moves the source to."""
    intended = source_modes(world, edit_target_means(world, cond))
    return np.asarray(source_modes(world, to_layout(world, samples)) == intended)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _guidance_terms(model: Field, anchor: Field, cond: Condition, noise: jax.Array, sigmas: jax.Array):
    """Per-sample ``(sum_i <u - a_u, a_c - a_u>, sum_i ||a_c - a_u||^2)`` [B] over the rollout's states."""
    states, _ = rollout_trajectory(anchor, noise, sigmas, cond)

    def terms(x, sigma):
        t = jnp.full((x.shape[0],), sigma, jnp.float32)
        a_u = anchor(x, t, unconditional(cond))
        direction = (anchor(x, t, cond) - a_u).reshape(x.shape[0], -1)
        u = (model(x, t, cond) - a_u).reshape(x.shape[0], -1)
        return jnp.sum(u * direction, -1), jnp.sum(jnp.square(direction), -1)

    numerators, denominators = jax.vmap(terms)(states, sigmas[:-1])
    return numerators.sum(0), denominators.sum(0)


def effective_guidance(model: Field, anchor: Field, cond: Condition, noise: jax.Array, sigmas: jax.Array) -> Estimate:
    """``gamma`` (module docstring) of ``model`` (e.g. a guided field) in units of ``anchor``'s CFG
    direction, on the anchor's Euler rollouts from ``noise`` over ``sigmas``."""
    n, d = (np.asarray(a, np.float64) for a in _guidance_terms(model, anchor, cond, noise, sigmas))
    gamma = n.sum() / d.sum()
    residual = n - gamma * d
    return Estimate(float(gamma), float(np.sqrt(len(n) / (len(n) - 1) * np.sum(residual**2)) / d.sum()))
