"""The field world: exact target distributions, Gaussian mixtures in a low-dimensional state space.

Every capability's target given its condition is a Gaussian mixture with diagonal covariances,

    p(x0 | cond) = sum_k w_k N(x0; m_k, diag(s_k)),

so its flow fields, densities and scores are exact (``exact_fields.py``, ``scores.py``).

**Layout.** Four T2I classes, one per quadrant of the plane (centres ``(+-1.25, +-1.25)``), each a
mixture of modes: ``a ring of eight`` (8 equal isotropic modes on a circle), ``two moons`` (two
interleaved arcs of 5 modes each), ``four clusters`` (unequal weights 0.4/0.3/0.2/0.1,
anisotropic diagonal covariances) and ``a grid of nine`` (3 x 3 equal modes). The classes are
equally likely. Each class orders its modes in a cycle (around the ring, along one moon and back
along the other, ...): the local edits move along that cycle.

**Dimension.** ``dim = 2`` is the plane itself. For ``dim = D > 2`` the *layout frame* holds the
plane in its first two coordinates and ``D - 2`` extra coordinates, isotropic ``N(0, EXTRA_STD^2)``
in every component, and the world frame is a random rotation ``Q`` of it (seeded):
``x_world = Q x_layout`` (rows: ``x_world = x_layout Q^T``). Every coordinate then mixes layout and
noise, so a model cannot read the layout off two inputs. The noise ``eps ~ N(0, I)`` is isotropic,
so the flow commutes with ``Q`` and every computation happens in the layout frame, where the
covariances are diagonal.

**Prompts** (``label``, one id space): ``0 .. C-1`` the T2I classes, then the local edits, then
the global edits; ``NULL_LABEL`` (-1) is the CFG null. ``FieldWorld.prompts`` holds their text.

* **T2I** (label ``c``): the class mixture.
* **Realism** (label ``c``, the realism target): the same modes and weights with every layout
  standard deviation times ``REALISM_SHARPNESS`` (a sharper picture of the same layout).
* **Local edit** (an instruction and a source ``y``): ``N(y + (m_j' - m_j), EDIT_STD^2 I)``, where
  ``j`` is the source's own mode (the mode of highest posterior under the unconditional mixture,
  from the layout plane) and ``j'`` its next (``+1``) or previous (``-1``) mode in the class's
  cycle: the source moves to the neighbouring mode, keeping its offset within the mode and its
  extra coordinates.
* **Global edit** (an instruction and a source ``y``): ``N(A y, EDIT_STD^2 I)`` with ``A`` a map of
  the whole plane about the origin (a quarter turn, a left-right mirror, a halving), identity on
  the extra coordinates. Decision: the target is a narrow Gaussian around the transformed source,
  not the transformed class mixture, so that an edit is a per-source map as in image editing and
  its success is measurable per source.
* **CFG null** (``NULL_LABEL``): without a source the unconditional T2I mixture
  ``sum_c p(c) p(x0 | c)`` (what condition dropout teaches); with a source (the null keeps the
  source, ``core.conditioning.unconditional``) the instruction-averaged edit target
  ``(1/E) sum_e p(x0 | y, e)``.

Conditions are the project's (``core.conditioning``): ``label`` int32 [B] in ``[-1, C + E)``,
``source`` [B, ..., D] and ``source_mask`` bool [B] (both optional: a condition without them
has no source, and only T2I targets). An edit label reads ``source`` as given.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from danceopd_jax.core.conditioning import NULL_LABEL, Condition

CLASS_CENTRES = ((-1.25, 1.25), (1.25, 1.25), (-1.25, -1.25), (1.25, -1.25))
EXTRA_STD = 0.5  # standard deviation of the extra (non-layout) coordinates when dim > 2
REALISM_SHARPNESS = 0.5  # realism target: layout standard deviations times this
EDIT_STD = 0.05  # standard deviation of every edit target around its edited source
LOCAL_EDITS = (("move it to the next mode", 1), ("move it to the previous mode", -1))
GLOBAL_EDITS = (
    ("rotate it a quarter turn", ((0.0, -1.0), (1.0, 0.0))),
    ("mirror it left to right", ((-1.0, 0.0), (0.0, 1.0))),
    ("shrink it by half", ((0.5, 0.0), (0.0, 0.5))),
)


def _ring(centre, radius: float, count: int, std: float):
    angles = 2 * np.pi * np.arange(count) / count
    means = np.asarray(centre) + radius * np.stack([np.cos(angles), np.sin(angles)], -1)
    return means, np.full((count, 2), std), np.full(count, 1.0 / count)


def _moons(centre, scale: float, per_moon: int, std: float):
    """Two interleaved half circles (the classic two moons), ``per_moon`` modes each; the cycle runs
    along the upper moon (right to left), then along the lower one (left to right)."""
    angles = np.linspace(0.0, np.pi, per_moon)
    upper = np.stack([np.cos(angles), np.sin(angles)], -1)
    lower = np.stack([1.0 - np.cos(angles), 0.5 - np.sin(angles)], -1)
    means = np.asarray(centre) + scale * (np.concatenate([upper, lower]) - np.array([0.5, 0.25]))
    count = 2 * per_moon
    return means, np.full((count, 2), std), np.full(count, 1.0 / count)


def _clusters(centre):
    """Four anisotropic clusters with unequal weights, clockwise from the top left."""
    offsets = np.array([(-0.45, 0.45), (0.45, 0.45), (0.45, -0.45), (-0.45, -0.45)])
    stds = np.array([(0.14, 0.06), (0.06, 0.14), (0.11, 0.07), (0.07, 0.11)])
    return np.asarray(centre) + offsets, stds, np.array([0.4, 0.3, 0.2, 0.1])


def _grid(centre, spacing: float, std: float):
    """3 x 3 equal modes; the cycle snakes through the rows."""
    rows = [[(col, 1 - row) for col in (range(-1, 2) if row % 2 == 0 else range(1, -2, -1))] for row in range(3)]
    means = np.asarray(centre) + spacing * np.array([p for row in rows for p in row], float)
    return means, np.full((9, 2), std), np.full(9, 1.0 / 9)


CLASSES = (
    ("a ring of eight", _ring(CLASS_CENTRES[0], 0.7, 8, 0.08)),
    ("two moons", _moons(CLASS_CENTRES[1], 0.9, 5, 0.06)),
    ("four clusters", _clusters(CLASS_CENTRES[2])),
    ("a grid of nine", _grid(CLASS_CENTRES[3], 0.4, 0.06)),
)


@dataclasses.dataclass(frozen=True, eq=False)
class FieldWorld:
    """The world's tables (numpy, layout frame); build it with ``make_world``.

    ``M`` modes over all classes (global mode index ``j``), ``C`` classes, ``E`` edit instructions
    (local first), layout plane = the first two layout coordinates.
    """

    dim: int
    rotation: np.ndarray  # Q [D, D]: x_world = Q x_layout
    mode_means: np.ndarray  # [M, D] (zero beyond the plane)
    mode_variances: np.ndarray  # [M, D] diagonal covariances of the T2I target
    realism_variances: np.ndarray  # [M, D] of the realism target
    mode_class: np.ndarray  # [M] class of each mode
    mode_weights: np.ndarray  # [M] weight of each mode within its class
    class_log_weights: np.ndarray  # [C + 1, M]: row c = log w_j on class c's modes (-inf elsewhere); row C = unconditional
    next_mode: np.ndarray  # [M] the next mode in its class's cycle
    previous_mode: np.ndarray  # [M]
    edit_matrices: np.ndarray  # [E, D, D] A_e of every edit (identity for local edits)
    edit_steps: np.ndarray  # [E] the cycle step of a local edit (+-1), 0 for global edits
    class_prompts: tuple[str, ...]
    edit_prompts: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_prompts)

    @property
    def num_edits(self) -> int:
        return len(self.edit_prompts)

    @property
    def num_prompts(self) -> int:
        """The size of the label space: T2I classes and edit instructions."""
        return self.num_classes + self.num_edits

    @property
    def prompts(self) -> tuple[str, ...]:
        """The text of every label."""
        return self.class_prompts + self.edit_prompts

    @property
    def local_edit_labels(self) -> np.ndarray:
        return self.num_classes + np.arange(len(LOCAL_EDITS))

    @property
    def global_edit_labels(self) -> np.ndarray:
        return self.num_classes + len(LOCAL_EDITS) + np.arange(len(GLOBAL_EDITS))

    def class_modes(self, label: int) -> np.ndarray:
        """The global mode indices of class ``label``."""
        return np.flatnonzero(self.mode_class == label)


def make_world(dim: int = 2, seed: int = 0) -> FieldWorld:
    """The world in ``dim >= 2`` dimensions; ``seed`` draws the rotation (dim > 2 only)."""
    if dim < 2:
        raise ValueError(f"the field world needs dim >= 2, got {dim}")
    means, stds, weights, classes, nexts, previous = [], [], [], [], [], []
    for c, (_, (m, s, w)) in enumerate(CLASSES):
        first, count = sum(len(x) for x in means), len(m)
        cycle = first + np.arange(count)
        means.append(m), stds.append(s), weights.append(w), classes.append(np.full(count, c))
        nexts.append(np.roll(cycle, -1)), previous.append(np.roll(cycle, 1))
    plane_means, plane_stds = np.concatenate(means), np.concatenate(stds)
    extra = dim - 2
    mode_means = np.concatenate([plane_means, np.zeros((len(plane_means), extra))], 1)
    variances = np.concatenate([plane_stds**2, np.full((len(plane_means), extra), EXTRA_STD**2)], 1)
    realism = np.concatenate([(REALISM_SHARPNESS * plane_stds) ** 2, variances[:, 2:]], 1)
    mode_class, mode_weights = np.concatenate(classes), np.concatenate(weights)
    num_classes = len(CLASSES)
    log_weights = np.full((num_classes + 1, len(mode_class)), -np.inf)
    for c in range(num_classes):
        log_weights[c, mode_class == c] = np.log(mode_weights[mode_class == c])
    log_weights[num_classes] = np.log(mode_weights / num_classes)
    matrices, steps = [], []
    for _, step in LOCAL_EDITS:
        matrices.append(np.eye(dim)), steps.append(step)
    for _, plane_map in GLOBAL_EDITS:
        a = np.eye(dim)
        a[:2, :2] = plane_map
        matrices.append(a), steps.append(0)
    rotation = np.eye(dim)
    if extra:
        q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
        rotation = q * np.sign(np.diag(r))  # Haar-distributed orthogonal matrix
    return FieldWorld(
        dim=dim,
        rotation=rotation,
        mode_means=mode_means,
        mode_variances=variances,
        realism_variances=realism,
        mode_class=mode_class,
        mode_weights=mode_weights,
        class_log_weights=log_weights,
        next_mode=np.concatenate(nexts),
        previous_mode=np.concatenate(previous),
        edit_matrices=np.stack(matrices),
        edit_steps=np.array(steps),
        class_prompts=tuple(prompt for prompt, _ in CLASSES),
        edit_prompts=tuple(prompt for prompt, _ in LOCAL_EDITS + GLOBAL_EDITS),
    )


def flat_points(x: jax.Array) -> jax.Array:
    """Points [B, ..., D] (e.g. the pipeline's images [B, 1, 1, D]) as [B, D]."""
    return x.reshape(x.shape[0], x.shape[-1])


def to_layout(world: FieldWorld, x: jax.Array) -> jax.Array:
    """World-frame points [B, ..., D] -> layout frame [B, D]: ``Q^T x`` (rows: ``x Q``)."""
    return flat_points(x).astype(jnp.float32) @ jnp.asarray(world.rotation, jnp.float32)


def to_world(world: FieldWorld, x_layout: jax.Array) -> jax.Array:
    """Layout-frame points [B, D] -> world frame [B, D]: ``Q x`` (rows: ``x Q^T``)."""
    return x_layout @ jnp.asarray(world.rotation, jnp.float32).T


def plane_log_posterior(x_layout: jax.Array, means, variances, log_weights) -> jax.Array:
    """``log w_j + log N(x_plane; m_j, diag(s_j))`` [B, n] of points [B, D] over n modes (``means``,
    ``variances`` [n, >= 2], ``log_weights`` [n]), from the layout plane only: the extra
    coordinates have the same law in every mode."""
    plane = x_layout[:, None, :2]
    means = jnp.asarray(means, jnp.float32)[:, :2]
    variances = jnp.asarray(variances, jnp.float32)[:, :2]
    log_normal = -0.5 * jnp.sum(jnp.square(plane - means) / variances + jnp.log(2 * jnp.pi * variances), -1)
    return jnp.asarray(log_weights, jnp.float32) + log_normal


def source_modes(world: FieldWorld, source_layout: jax.Array) -> jax.Array:
    """int32 [B]: each source's own mode, the maximum posterior under the unconditional mixture."""
    log_weights = world.class_log_weights[world.num_classes]
    return jnp.argmax(plane_log_posterior(source_layout, world.mode_means, world.mode_variances, log_weights), -1).astype(jnp.int32)


def edit_means(world: FieldWorld, source_layout: jax.Array) -> jax.Array:
    """[B, E, D]: every edit's target mean ``A_e y + (m_{j'} - m_j)`` for each source ``y`` (layout frame)."""
    own = source_modes(world, source_layout)
    means = jnp.asarray(world.mode_means, jnp.float32)
    moved = {1: jnp.asarray(world.next_mode)[own], -1: jnp.asarray(world.previous_mode)[own], 0: own}
    shifts = jnp.stack([means[moved[int(step)]] - means[own] for step in world.edit_steps], 1)
    return jnp.einsum("eij,bj->bei", jnp.asarray(world.edit_matrices, jnp.float32), source_layout) + shifts


def components(world: FieldWorld, cond: Condition, realism: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each sample's target mixture in the layout frame: ``(means [B, K, D], variances [B, K, D],
    log_weights [B, K])`` with ``K = M + E`` components, the M modes then the E edit targets.

    A T2I sample (a class label, or the null without a source) weights the modes by its class row
    (the unconditional row for the null) and gives the edit targets ``-inf``; an edit sample (an
    edit label, or the null with a source) the reverse: weight 1 on its instruction's target, or
    ``1/E`` on each for the null. ``realism`` swaps the mode variances for the realism target's.
    A condition without ``source`` has the M modes only (``K = M``): an edit label there has no
    target and its velocity is NaN.
    """
    label = cond["label"]
    batch, c = label.shape[0], world.num_classes
    null = label == NULL_LABEL
    has_source = cond["source_mask"].astype(bool) if "source" in cond else jnp.zeros((batch,), bool)
    is_edit = (label >= c) | (null & has_source)
    table = jnp.asarray(world.class_log_weights, jnp.float32)
    log_weights = jnp.where(is_edit[:, None], -jnp.inf, table[jnp.where((label >= 0) & (label < c), label, c)])
    mode_variances = world.realism_variances if realism else world.mode_variances
    means = jnp.broadcast_to(jnp.asarray(world.mode_means, jnp.float32), (batch,) + world.mode_means.shape)
    variances = jnp.asarray(mode_variances, jnp.float32)
    if "source" in cond:
        instruction = jnp.arange(world.num_edits)[None] == (label - c)[:, None]
        edit_logw = jnp.where(null[:, None], -jnp.log(world.num_edits), jnp.where(instruction, 0.0, -jnp.inf))
        log_weights = jnp.concatenate([log_weights, jnp.where(is_edit[:, None], edit_logw, -jnp.inf)], 1)
        means = jnp.concatenate([means, edit_means(world, to_layout(world, cond["source"]))], 1)
        variances = jnp.concatenate([variances, jnp.full((world.num_edits, world.dim), EDIT_STD**2, jnp.float32)])
    return means, jnp.broadcast_to(variances, means.shape), log_weights


def sample_targets(world: FieldWorld, key: jax.Array, cond: Condition, realism: bool = False) -> jax.Array:
    """Exact samples [B, D] (world frame) of each sample's target: a component ``k ~ Cat(w)``, then
    ``x0 = m_k + sqrt(s_k) * n``, ``n ~ N(0, I)``, rotated to the world frame."""
    means, variances, log_weights = components(world, cond, realism)
    pick_key, noise_key = jax.random.split(key)
    k = jax.random.categorical(pick_key, log_weights, axis=-1)
    rows = jnp.arange(means.shape[0])
    noise = jax.random.normal(noise_key, means.shape[::2], jnp.float32)
    return to_world(world, means[rows, k] + jnp.sqrt(variances[rows, k]) * noise)
