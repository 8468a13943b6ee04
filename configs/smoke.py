"""Smoke run: a tiny random student distilled from two tiny random experts on generated data.

    python -m danceopd_jax.main --config configs/smoke.py --workdir /tmp/smoke

Expected: 20 DanceOPD steps on CPU in well under two minutes; the loss is finite and the
routes alternate between ``t2i`` (prompt bucket) and ``edit`` (edit pairs with source images).
The experts are random, so the figures say nothing about quality: this checks the plumbing.
"""

from ml_collections import ConfigDict


def model(preset="tiny", **overrides) -> ConfigDict:
    """A DiT spec: preset plus overrides; ``init`` is ``random`` (with ``seed``) or ``checkpoint``.

    ``zero_init=False`` makes a random model a non-zero field (adaLN-Zero would output zero).
    """
    spec = dict(
        preset=preset, patch_size=2, dtype="float32", use_source=False, zero_init=True, init="random", seed=0, checkpoint=""
    )
    spec.update(overrides)
    return ConfigDict(spec)


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.seed = 0
    config.num_train_steps = 20
    config.batch_size = 4  # global samples per step

    # The method (PAPER.md): route, roll out, query one low-noise state, velocity MSE.
    config.method = "danceopd"  # danceopd | diffusionopd | offpolicy | flow_matching
    config.routing = "per_step"  # per_step | per_sample | soft
    config.rollout_steps = 4
    config.shift = 1.0
    config.query_sampler = "low_t"
    config.queries_per_rollout = 1
    config.condition_dropout = 0.0  # flow_matching only

    config.image_size = 8
    config.channels = 3
    config.condition = ConfigDict(dict(text_len=8, text_dim=16, num_classes=0, use_source=True))

    config.student = model(use_source=True, seed=0)
    config.experts = ConfigDict(
        {"t2i_expert": model(seed=1, zero_init=False), "edit_expert": model(use_source=True, seed=2, zero_init=False)}
    )
    config.fields = ConfigDict(
        {
            "t2i": dict(kind="expert", expert="t2i_expert", cfg_scale=1.0, terms={}),
            "edit": dict(kind="expert", expert="edit_expert", cfg_scale=1.0, terms={}),
        }
    )
    config.routes = ConfigDict(
        {"t2i": dict(field="t2i", bucket="t2i", weight=1.0), "edit": dict(field="edit", bucket="edit", weight=1.0)}
    )
    config.data = ConfigDict(
        dict(
            buckets={
                "t2i": dict(kind="t2i", size=64, seed=0),
                "edit": dict(kind="edit", size=64, seed=1),
            }
        )
    )

    config.optimizer = ConfigDict(
        dict(learning_rate=1e-3, warmup_steps=2, decay="cosine", weight_decay=0.0, grad_clip=1.0, b1=0.9, b2=0.999, ema_decay=0.0)
    )

    config.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    config.logical_axis_rules = ConfigDict(dict(embed="fsdp", heads="tensor", mlp="tensor"))

    config.log_every = 5
    config.checkpoint_every = 10
    config.keep_checkpoints = 3
    return config
