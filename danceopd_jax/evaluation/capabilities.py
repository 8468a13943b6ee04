"""Score models on the shapes world's capabilities: held-out examples -> samples -> metrics, grids.

Each capability has a bucket kind (its examples, ``heldout.CAPABILITY_BUCKETS``) and a scorer
from ``metrics``. Evaluation examples are held out from every evaluated model's training inputs
(``heldout.py``), and the same examples and noise serve every model, so rows of a table differ
only by the model.
"""

import dataclasses

import jax
import numpy as np
from ml_collections import ConfigDict

from danceopd_jax.data import scenes
from danceopd_jax.data.scene_buckets import SceneExample
from danceopd_jax.evaluation import metrics
from danceopd_jax.evaluation.grids import caption_grid
from danceopd_jax.sampling import encode_conditions, generate


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How samples are drawn for evaluation."""

    steps: int = 16
    shift: float = 1.0
    sigma_schedule: str = "uniform"
    cfg_scale: float = 1.0
    batch_size: int = 64
    seed: int = 0


def sample_examples(config: ConfigDict, graphdef, params, examples: list[SceneExample], sampling: Sampling) -> np.ndarray:
    """The model's samples for the examples (prompt, and the source render for edits), batched."""
    outputs = []
    for start in range(0, len(examples), sampling.batch_size):
        chunk = examples[start : start + sampling.batch_size]
        sources = [scenes.render(e.source, config.image_size) if e.source is not None else None for e in chunk]
        cond = encode_conditions(config, [e.prompt for e in chunk], sources)
        key = jax.random.fold_in(jax.random.key(sampling.seed), start)
        outputs.append(
            generate(
                graphdef,
                params,
                cond,
                key,
                image_shape=(config.image_size, config.image_size, config.channels),
                steps=sampling.steps,
                shift=sampling.shift,
                schedule=sampling.sigma_schedule,
                cfg_scale=sampling.cfg_scale,
            )
        )
    return np.concatenate(outputs)


def score(capability: str, images: np.ndarray, examples: list[SceneExample]) -> dict[str, float]:
    """The capability's metrics, named ``capability/metric``."""
    targets = [e.target for e in examples]
    if capability == "t2i":
        values = metrics.t2i_scores(images, targets)
    elif capability == "realism":
        values = {**metrics.realism_score(images), **{f"t2i_{k}": v for k, v in metrics.t2i_scores(images, targets).items()}}
    else:
        scorer = metrics.local_edit_scores if capability == "local_edit" else metrics.global_edit_scores
        values = scorer(images, [e.source for e in examples], targets)
    return {f"{capability}/{name}": float(value) for name, value in values.items() if np.isscalar(value)}


def comparison_grid(capability: str, examples: list[SceneExample], outputs: dict[str, np.ndarray], image_size: int, rows: int = 8):
    """PNG grid: per example its caption, the source (edits) and the target render, then each model."""
    titles = (["source"] if examples[0].source is not None else []) + ["target"] + list(outputs)
    realistic = capability == "realism"
    grid_rows = []
    for index, example in enumerate(examples[:rows]):
        images = [scenes.render(example.source, image_size)] if example.source is not None else []
        images.append(scenes.render(example.target, image_size, realistic))
        images += [outputs[name][index] for name in outputs]
        grid_rows.append((example.prompt, images))
    return caption_grid(grid_rows, titles)
