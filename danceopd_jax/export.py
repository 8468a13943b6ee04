"""Command: export the trained student of a run on a model folder (e.g. SD3) for diffusers.

    python -m danceopd_jax.export --workdir W --out DIR [--merged]

Writes, from the run's latest checkpoint (its EMA when the run kept one):

  * ``DIR/pytorch_lora_weights.safetensors``: the student's LoRA in diffusers naming
    (``models.lora.export_lora``, module names behind the backbone's ``LORA_PREFIX``), ranks and
    alphas in its metadata; diffusers loads it with
    ``pipe.load_lora_weights(DIR)`` or ``transformer.load_lora_adapter(DIR, weight_name=...)``;
  * with ``--merged``, ``DIR/transformer/``: the full transformer with the LoRA folded in
    (``models.lora.export_merged``, float32, diffusers' state-dict names) beside a copy of the
    folder's ``transformer/config.json``, so the family's transformer class (SD3:
    ``SD3Transformer2DModel``) loads it with ``from_pretrained(DIR/transformer)`` (e.g. in place of
    the pipeline's transformer).

Only runs on a model folder (``config.model_dir``) have a LoRA student to export; a DiT run's checkpoint is
already its whole model. Bad input (no run at ``W``, a DiT run, a run without checkpoints, a
moved model folder, an ``--out`` that is not empty or whose folder cannot be written) is one line
``error: ...`` on stderr and exit code 2, checked before the weights are read. Everything is
written to a temporary folder beside ``DIR`` and renamed to ``DIR`` when complete: a failed export
leaves nothing.
"""

import os
import shutil

from danceopd_jax.commands import fail, folder_problem, interrupt_quietly_while_starting, parse_flags, start

interrupt_quietly_while_starting(__name__)

from absl import app, flags  # noqa: E402
from absl.flags import FLAGS  # noqa: E402
from flax import nnx  # noqa: E402

from danceopd_jax import checkpoints, sd3_sampling  # noqa: E402
from danceopd_jax.models import backbones, lora  # noqa: E402
from danceopd_jax.models.pipeline_folder import ModelFolderError  # noqa: E402
from danceopd_jax.models.weights import WeightsError, WeightsMismatch  # noqa: E402

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights(folder) looks for
MERGED_FILE = os.path.join("transformer", "diffusion_pytorch_model.safetensors")


def check_export(workdir: str, out: str) -> None:
    """Raise a one-line error unless ``workdir`` is a model folder run with a checkpoint and ``out`` is free."""
    config = sd3_sampling.sd3_run_config(workdir)  # FileNotFoundError / ValueError (a DiT run)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"--out {out} exists and is not an empty folder")
    parent = os.path.dirname(os.path.abspath(out))
    if problem := folder_problem(parent):  # the export is staged beside ``out``
        raise ValueError(f"--out {out}: its folder {parent} {problem}")
    if checkpoints.latest_step(workdir) is None:
        raise FileNotFoundError(f"no checkpoints under {checkpoints.checkpoint_dir(workdir)}: nothing trained to export")
    backbones.of(config).pipeline_components(config.model_dir, text_encoders=False)  # ModelFolderError: the folder moved or is broken


def export_run(workdir: str, out: str, merged: bool = False) -> sd3_sampling.SD3Student:
    """Write the LoRA (and with ``merged`` the merged transformer) of the model folder run in ``workdir`` to ``out``.

    Checked first (``check_export``); written into a temporary folder renamed to ``out`` at the
    end. Returns the exported student.
    """
    check_export(workdir, out)
    student = sd3_sampling.load_student(workdir)
    model = student.model()
    target = os.path.abspath(out)
    staging = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed export of this pid
    os.makedirs(staging)
    try:
        lora.export_lora(model, student.torch_names, os.path.join(staging, LORA_FILE), prefix=student.backbone.LORA_PREFIX)
        if merged:
            os.makedirs(os.path.join(staging, "transformer"))
            lora.export_merged(model, student.torch_names, os.path.join(staging, MERGED_FILE))
            transformer = student.backbone.pipeline_components(student.config.model_dir, text_encoders=False)["transformer"]
            shutil.copyfile(os.path.join(transformer, "config.json"), os.path.join(staging, "transformer", "config.json"))
        os.replace(staging, out)  # replaces an empty folder at ``out``, atomically
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return student


def main(argv) -> None:
    start(argv, workdir=FLAGS.workdir, out=FLAGS.out)
    try:
        check_export(FLAGS.workdir, FLAGS.out)
    except (OSError, ValueError) as error:
        fail(error)
    try:
        student = export_run(FLAGS.workdir, FLAGS.out, FLAGS.merged)
    except (OSError, ModelFolderError, WeightsError, WeightsMismatch) as error:  # weights that do not fit, a full disk
        fail(error)
    layers = len(nnx.to_flat_state(student.adapters)) // 2
    weights = "EMA" if student.config.optimizer.ema_decay > 0 else "params"
    print(f"wrote {os.path.join(FLAGS.out, LORA_FILE)} ({layers} adapted layers, checkpoint step {student.step}, {weights})")
    if FLAGS.merged:
        print(f"wrote {os.path.join(FLAGS.out, 'transformer')}/ (merged transformer + config.json)")


def define_flags() -> None:
    """The command's flags, defined only when it runs as a command: importing the module for its
    functions defines none (two commands' ``--out`` would clash in one process)."""
    flags.DEFINE_string("workdir", None, "Workdir of a training run on a model folder, e.g. SD3 (config.json + checkpoints).")
    flags.DEFINE_string("out", None, "Output folder (created; must not exist or be empty).")
    flags.DEFINE_bool("merged", False, "Also write the merged full transformer (DIR/transformer/).")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
