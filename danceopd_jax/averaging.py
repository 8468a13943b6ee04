"""Weight averaging of trained models (the "model soup" baseline): ``theta = sum_k w_k theta_k``.

The models must share one architecture and condition space (e.g. teachers fine-tuned from one
anchor). The average is written as a run workdir (``config.json`` plus a checkpoint holding only
``params``), so it is sampled, evaluated and used as an init like any trained model.
"""

import os

import jax
from ml_collections import ConfigDict

from danceopd_jax import checkpoints
from danceopd_jax.config_validation import read_run_config
from danceopd_jax.sampling import load_trained_model

_SAME = ("image_size", "channels", "condition", "student")  # config parts the averaged models must share


def average_weights(weights: dict[str, float], out_dir: str) -> None:
    """Write the ``weights``-weighted average (``{workdir: w}``, normalised to sum 1) to ``out_dir``."""
    if not weights or sum(weights.values()) <= 0:
        raise ValueError(f"weight averaging needs positive weights, got {weights}")
    total = sum(weights.values())
    dirs = list(weights)
    configs = [read_run_config(d) for d in dirs]
    for key in _SAME:
        described = [_comparable(c, key) for c in configs]
        if any(d != described[0] for d in described):
            raise ValueError(f"cannot average {dirs}: their config.{key} differ")
    params = [load_trained_model(d)[2] for d in dirs]
    shares = [weights[d] / total for d in dirs]
    average = jax.tree.map(lambda *leaves: sum(w * leaf for w, leaf in zip(shares, leaves)), *params)
    config = ConfigDict(configs[0].to_dict())
    config.weight_average = [dict(workdir=os.path.abspath(d), weight=w) for d, w in zip(dirs, shares)]
    checkpoints.save_run_config(config, out_dir)
    with checkpoints.make_manager(out_dir, keep=1) as manager:
        checkpoints.save(manager, 0, {"params": average}, {})
        manager.wait_until_finished()


def _comparable(config: ConfigDict, key: str):
    value = config[key]
    if key == "student":  # where the weights came from differs; the architecture must not
        return {k: v for k, v in value.to_dict().items() if k not in ("init", "checkpoint", "seed")}
    return value.to_dict() if isinstance(value, ConfigDict) else value
