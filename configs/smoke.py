"""Smoke run: a tiny random student distilled from two tiny random experts on generated data.

    python -m danceopd_jax.main --config configs/smoke.py --workdir /tmp/smoke

Expected: 20 DanceOPD steps on CPU in well under two minutes; the loss is finite and the
routes alternate between ``t2i`` (prompt bucket) and ``edit`` (edit pairs with source images).
The experts are random, so the figures say nothing about quality: this checks the plumbing.
"""

from ml_collections import ConfigDict

from danceopd_jax.config_lib import base_config, random_smoke_models


def get_config() -> ConfigDict:
    config = base_config()
    config.num_train_steps = 20
    config.batch_size = 4
    config.rollout_steps = 4

    config.image_size = 8
    config.condition.update(dict(text_len=8, text_dim=16, use_source=True))

    random_smoke_models(config)
    config.routes = ConfigDict(
        {"t2i": dict(field="t2i", bucket="t2i", weight=1.0), "edit": dict(field="edit", bucket="edit", weight=1.0)}
    )
    config.data.buckets = ConfigDict(
        {"t2i": dict(kind="t2i", size=64, seed=0), "edit": dict(kind="edit", size=64, seed=1)}
    )
    config.optimizer.warmup_steps = 2
    config.log_every = 5
    config.checkpoint_every = 10
    return config
