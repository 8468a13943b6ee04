"""Your own image files: DanceOPD on a folder of captioned images and an edit-pair manifest split by task.

    python -m danceopd_jax.data.example_files --out workdirs/example_files
    python -m danceopd_jax.main --config configs/files_smoke.py --workdir workdirs/files_smoke

Expected: the image files are checked (every one decoded) before anything is built, then 12
DanceOPD steps on CPU in well under a minute with a finite loss; the steps' routes are ``t2i``
(the captioned PNG and JPEG images of ``t2i/``), ``local_edit`` and ``global_edit`` (the pairs of
``edits.jsonl`` whose task is a local or a global edit). The experts are random: this checks the
plumbing from files to the train step. ``configs/files_smoke.py:DIR`` reads the files from DIR.
"""

import os

from ml_collections import ConfigDict

from danceopd_jax.config_lib import base_config, random_smoke_models

LOCAL_TASKS = "recolour,reshape,add,remove"  # the shapes world's edit kinds, the manifest's task column
GLOBAL_TASKS = "night,sketch,background"


def get_config(data_dir: str = "workdirs/example_files") -> ConfigDict:
    config = base_config()
    config.num_train_steps = 12
    config.batch_size = 4
    config.rollout_steps = 4

    config.image_size = 16  # the example files are 32 x 32: downscaled, never upscaled
    config.condition.update(dict(text_len=8, text_dim=16, use_source=True))

    random_smoke_models(config)
    config.routes = ConfigDict(
        {
            "t2i": dict(field="t2i", bucket="t2i", weight=1.0),
            "local_edit": dict(field="edit", bucket="local_edit", weight=1.0),
            "global_edit": dict(field="edit", bucket="global_edit", weight=1.0),
        }
    )
    edits = os.path.join(data_dir, "edits.jsonl")
    config.data.buckets = ConfigDict(
        {
            "t2i": dict(kind="image_text", size=0, seed=0, path=os.path.join(data_dir, "t2i")),
            "local_edit": dict(kind="edit_pairs", size=0, seed=1, path=edits, tasks=LOCAL_TASKS),
            "global_edit": dict(kind="edit_pairs", size=0, seed=2, path=edits, tasks=GLOBAL_TASKS),
        }
    )
    config.optimizer.warmup_steps = 2
    config.log_every = 4
    config.checkpoint_every = 12
    return config
