"""What the student draws while it trains, for TensorBoard (``config.sample_every``).

Every ``sample_every`` steps, each route's first ``samples_per_route`` bucket records (prompts; for
edit routes also their source images) are sampled by the student from one fixed noise draw on the
run's rollout grid (``rollout_steps``, ``shift``, ``sigma_schedule``), without CFG, with the EMA
weights when the run keeps them (what evaluation and export use). One image per route, ``samples/ROUTE``:
the samples side by side, under their sources for edit routes. The same noise at every log point
shows the student's progress on the same inputs; nothing here touches the train state or its keys.
"""

import jax
import numpy as np
from ml_collections import ConfigDict

from danceopd_jax import build
from danceopd_jax.config_lib import run_sigma_schedule
from danceopd_jax.data.pipeline import RecordEncoder, stack_records
from danceopd_jax.data.sources import make_bucket_source
from danceopd_jax.sampling import generate, to_uint8

NOISE_SEED_OFFSET = 7_919  # the samples' noise is key(seed + this): apart from the training keys


def route_examples(config: ConfigDict) -> dict[str, tuple[dict, np.ndarray | None]]:
    """``{route: (batched condition, sources [K, H, W, C] or None)}``: the first ``samples_per_route``
    records of each route's bucket, encoded as the data pipeline encodes them."""
    image_shape = (config.image_size, config.image_size, config.channels)
    encode = RecordEncoder(build.condition_spec(config), image_shape)
    examples = {}
    for name, route in config.routes.items():
        bucket = make_bucket_source(config.data.buckets[route.bucket], config.image_size, config.channels, config.condition.num_classes)
        records = [bucket[index] for index in range(min(config.samples_per_route, len(bucket)))]
        cond = stack_records([encode(record)["cond"] for record in records])
        sources = np.stack([np.asarray(record["source"], np.float32) for record in records]) if "source" in records[0] else None
        examples[name] = (cond, sources)
    return examples


def sample_images(config: ConfigDict, graphdef, params, examples: dict) -> dict[str, np.ndarray]:
    """``{"samples/ROUTE": uint8 [1, H', W', C]}`` of the student ``(graphdef, params)`` on ``examples``
    (``route_examples``). Every process calls it (the parameters may be sharded over all of them)."""
    image_shape = (config.image_size, config.image_size, config.channels)
    images = {}
    for name, (cond, sources) in examples.items():
        samples = generate(graphdef, params, cond, jax.random.key(config.seed + NOISE_SEED_OFFSET), image_shape=image_shape,
                           steps=config.rollout_steps, shift=config.shift, schedule=run_sigma_schedule(config))  # fmt: skip
        grid = np.concatenate(list(samples), axis=1)
        if sources is not None:
            grid = np.concatenate([np.concatenate(list(sources), axis=1), grid], axis=0)
        images[f"samples/{name}"] = to_uint8(grid)[None]
    return images
