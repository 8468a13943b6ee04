"""Command: sample a trained model to a PNG.

    python -m danceopd_jax.sample --workdir W --prompt "a small red circle at the top left on a gray background" \\
        [--task t2i|realism|edit|local_edit|global_edit] [--source in.png] [--cfg_scale 1.0] [--steps 16] \\
        [--num 4] [--seed 0] [--base] --out out.png

``--out`` is a PNG (or ``.jpg``, ``.webp``, ...: ``IMAGE_EXTENSIONS``), written once complete (to
a temporary name, then renamed). The task flag (``danceopd_jax/tasks.py``) sets the conditioning
the student was trained with for that capability; edit tasks need ``--source``. Bad input (a bad
flag, ``--num`` or ``--steps`` < 1, a ``--cfg_scale`` that is not a finite number >= 0, an
``--out`` of another extension or in a folder that cannot be written, a missing workdir or image,
a source that is not an image or not square, an unknown task, an edit task without a source, a
source for t2i, an edit task on a model trained without sources) is one line ``error: ...`` on stderr and exit code 2, before any
weights are read; the same message as the Python API's (``sampling.sample_task``).

An SD3 run (``config.model_dir``) is sampled the same way (``sd3_sampling``): its student is the
folder's transformer plus the trained LoRA, prompts go through the folder's text encoders, the
latents through its VAE (a 64 x 64 latent is a 512 x 512 image); it runs the prompt tasks only.
``--base`` samples the folder's untrained transformer instead, for comparison.
"""

import os

from danceopd_jax.commands import fail, folder_problem, interrupt_quietly_while_starting, parse_flags, start

interrupt_quietly_while_starting(__name__)

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from absl.flags import FLAGS  # noqa: E402
from PIL import Image  # noqa: E402

from danceopd_jax import sd3_sampling  # noqa: E402
from danceopd_jax.config_validation import read_run_config  # noqa: E402
from danceopd_jax.data.latent_cache import pixel_size  # noqa: E402
from danceopd_jax.models.pipeline_folder import ModelFolderError  # noqa: E402
from danceopd_jax.models.weights import WeightsError, WeightsMismatch  # noqa: E402
from danceopd_jax.sampling import check_run_task, check_sampling, read_image, sample_task  # noqa: E402
from danceopd_jax.tasks import TASKS, get_task  # noqa: E402

_TASK_HELP = "; ".join(f"{name}: {task.description}" for name, task in TASKS.items())
# The --out extensions (those of them this PIL can write; the format follows the extension).
IMAGE_EXTENSIONS = tuple(
    ext for ext in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff") if Image.registered_extensions().get(ext) in Image.SAVE
)


def check_out(out: str) -> None:
    """``ValueError`` unless ``out`` names an image file (``IMAGE_EXTENSIONS``) in a folder this process
    can create and write in (probed; nothing is left behind)."""
    extension = os.path.splitext(out)[1].lower()
    if extension not in IMAGE_EXTENSIONS:
        given = f"unknown extension {extension!r}" if extension else "no extension"
        raise ValueError(f"--out {out!r}: {given}; valid extensions: {', '.join(IMAGE_EXTENSIONS)}")
    if os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a folder; give the image's file name")
    folder = os.path.dirname(os.path.abspath(out))
    problem = folder_problem(folder)
    if problem:
        raise ValueError(f"--out {out!r}: its folder {folder!r} {problem}")


def save_image(image: np.ndarray, out: str) -> None:
    """Write ``image`` to ``out`` (format from its extension) through a temporary file renamed at the end."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    extension = os.path.splitext(out)[1].lower()
    staging = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.tmp-{os.getpid()}")
    try:
        Image.fromarray(image).save(staging, format=Image.registered_extensions()[extension])
        os.replace(staging, out)
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise


def main(argv) -> None:
    start(argv, workdir=FLAGS.workdir, out=FLAGS.out)
    if FLAGS.num < 1:
        fail(f"--num must be >= 1, got {FLAGS.num}")
    prompts = [FLAGS.prompt] * FLAGS.num
    try:
        check_sampling(FLAGS.steps, FLAGS.cfg_scale)
        task = get_task(FLAGS.task)  # the task is checked before any image or weights are read
        config = read_run_config(FLAGS.workdir)
        check_run_task(config, task, prompts, [FLAGS.source] * FLAGS.num if FLAGS.source else None)
        if FLAGS.base and not config.get("model_dir"):
            raise ValueError(f"--base samples the untrained transformer of an SD3 run; {FLAGS.workdir} is a DiT run")
        sources = [read_image(FLAGS.source, pixel_size(config))] * FLAGS.num if FLAGS.source else None
        check_out(FLAGS.out)  # before the weights are read: a bad --out would fail only after sampling
    except (ValueError, OSError) as error:
        fail(error)
    try:
        model = sd3_sampling.load_student(FLAGS.workdir, trained=False) if FLAGS.base else FLAGS.workdir
        images = sample_task(model, task, prompts, sources, steps=FLAGS.steps, cfg_scale=FLAGS.cfg_scale, seed=FLAGS.seed)
    except (OSError, ModelFolderError, WeightsError, WeightsMismatch) as error:  # no checkpoint, a moved or broken model folder
        fail(error)
    try:
        save_image(np.concatenate(list(images), axis=1), FLAGS.out)
    except OSError as error:  # a full disk, a folder removed meanwhile
        fail(f"--out {FLAGS.out!r}: {error}")
    print(
        f"wrote {FLAGS.out} ({FLAGS.num} sample(s), task {task.name}, "
        f"{FLAGS.steps or config.rollout_steps} steps, cfg {FLAGS.cfg_scale}{', untrained base' if FLAGS.base else ''})"
    )


def define_flags() -> None:
    """The command's flags, defined only when it runs as a command (see ``export.define_flags``)."""
    flags.DEFINE_string("workdir", None, "Workdir of a training run (config.json + checkpoints).")
    flags.DEFINE_string("prompt", "", "Prompt, or edit instruction for an edit task.")
    flags.DEFINE_string("task", "t2i", f"One of {', '.join(TASKS)} ({_TASK_HELP}); edit tasks need --source.")
    flags.DEFINE_string("source", None, "Source image of an edit (any size; resized).")
    flags.DEFINE_float("cfg_scale", 1.0, "Classifier-free guidance scale at sampling (1 = none).")
    flags.DEFINE_integer("steps", None, "Euler steps (default: the run's rollout_steps).")
    flags.DEFINE_integer("num", 1, "Number of samples, written side by side.")
    flags.DEFINE_integer("seed", 0, "Noise seed.")
    flags.DEFINE_string("out", None, f"Output image path ({', '.join(IMAGE_EXTENSIONS)}).")
    flags.DEFINE_bool("base", False, "SD3 runs: sample the folder's untrained transformer (no LoRA), for comparison.")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
