"""The shapes world's T2I anchor: flow matching on prompt -> plain render, with prompt dropout.

    python -m danceopd_jax.main --config configs/shapes_anchor.py --workdir W/anchor

Prompt dropout (10%) trains the unconditional branch, so the anchor's CFG field exists.
Expected: the loss falls from ~2 to ~0.2; samples follow colour, shape and position.
"""

from ml_collections import ConfigDict

from danceopd_jax.config_lib import base_config, model_spec


def shapes_world(config: ConfigDict) -> ConfigDict:
    """The shapes world's image and condition space, shared by every shapes config."""
    config.image_size = 32
    config.condition = ConfigDict(dict(text_len=24, text_dim=32, num_classes=0, use_source=True))
    return config


def get_config() -> ConfigDict:
    config = shapes_world(base_config())
    config.method = "flow_matching"
    config.condition_dropout = 0.1
    config.num_train_steps = 2000
    config.batch_size = 32
    config.student = model_spec("mini", patch_size=4, use_source=True)
    config.routes = ConfigDict({"t2i": dict(field="", bucket="t2i", weight=1.0)})
    config.data.buckets = ConfigDict({"t2i": dict(kind="scenes_t2i", size=20000, seed=0)})
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 100
    config.optimizer.ema_decay = 0.999
    config.log_every = 50
    config.checkpoint_every = 500
    return config
