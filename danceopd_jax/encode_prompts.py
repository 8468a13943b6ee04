"""Command: encode a prompt file with a model folder's text encoders into a prompt-embedding table.

    python -m danceopd_jax.encode_prompts --model_dir D --prompts FILE --out TABLE.safetensors \\
        [--text_len 333] [--batch_size 16]

``FILE`` is a prompt file as prompt-file buckets read it (``.txt``: one prompt per line, ``.jsonl``:
``{"prompt": ...}`` per line; ``data.prompt_files``). Its distinct prompts and the empty prompt
(the CFG null) are encoded by ``D``'s text encoders (its family's ``prompt_encoder``,
``models.backbones``; SD3: CLIP-L, CLIP-G and T5, ``models.sd3``) in batches of ``--batch_size``, as
a run encodes its own (SD3: ``text`` [text_len, D] = 77 CLIP tokens + ``text_len - 77`` T5 tokens,
``pooled`` [P]), and written to ``TABLE`` (``data.prompt_embeddings``;
written to a temporary name, then renamed). A run given ``--config.prompt_embeddings=TABLE``
reads it instead of loading the text encoders (the run's ``model_dir`` may then lack them; where it
has them, they must be the ones that encoded the table: the table records a digest of their
files, the backbone's ``text_encoders_digest``).

Bad input (a missing or malformed prompt file, a folder that is not a pipeline of a known family or
whose text encoders do not load, a ``--text_len`` the family cannot encode (SD3: <= 77), an ``--out`` that is a folder or in a folder that cannot
be written) is one line
``error: ...`` on stderr and exit code 2, before any prompt is encoded.
"""

import os
import time

from danceopd_jax.commands import fail, folder_problem, interrupt_quietly_while_starting, parse_flags, start

interrupt_quietly_while_starting(__name__)

from absl import app, flags  # noqa: E402
from absl.flags import FLAGS  # noqa: E402

from danceopd_jax.data.prompt_embeddings import Encoder, encode_table, table_prompts  # noqa: E402
from danceopd_jax.data.prompt_files import read_prompts  # noqa: E402
from danceopd_jax.models import backbones  # noqa: E402


def with_progress(encode: Encoder, total: int) -> Encoder:
    """``encode`` printing ``encoded n/total prompts`` after each batch."""
    done, started = 0, time.time()

    def encode_and_report(batch: list[str]):
        nonlocal done
        out = encode(batch)
        done += len(batch)
        print(f"encoded {done}/{total} prompts ({time.time() - started:.1f}s)", flush=True)
        return out

    return encode_and_report


def check_arguments(model_dir: str, out: str, text_len: int, batch_size: int) -> None:
    """Raise ``ValueError`` for a bad flag value or a folder that is not a known pipeline with its text encoders."""
    backbone = backbones.for_folder(model_dir)  # ModelFolderError: no folder, or a pipeline no family runs
    if problem := backbone.text_len_problem(text_len):
        raise ValueError(f"--text_len {text_len}: {problem}")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    if os.path.isdir(out):
        raise ValueError(f"--out {out} is a folder; give the table's file name")
    parent = os.path.dirname(os.path.abspath(out))
    if problem := folder_problem(parent):
        raise ValueError(f"--out {out}: its folder {parent} {problem}")
    backbone.pipeline_components(model_dir)  # ModelFolderError names what is missing


def main(argv) -> None:
    start(argv, model_dir=FLAGS.model_dir, prompts=FLAGS.prompts, out=FLAGS.out)
    try:
        check_arguments(FLAGS.model_dir, FLAGS.out, FLAGS.text_len, FLAGS.batch_size)
        prompts = read_prompts(FLAGS.prompts)
        backbones.for_folder(FLAGS.model_dir).check_prompts(FLAGS.model_dir, prompts, FLAGS.text_len)  # before any weights are read
    except ValueError as error:  # PromptFileError and ModelFolderError are ValueErrors
        fail(error)
    total = len(table_prompts(prompts))
    print(f"encoding {total} prompts (the distinct ones of {FLAGS.prompts} and the empty prompt) with {FLAGS.model_dir}")
    try:
        backbone = backbones.for_folder(FLAGS.model_dir)
        encode = backbone.prompt_encoder(FLAGS.model_dir, FLAGS.text_len)
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        encoded_by = {backbone.TEXT_ENCODERS: backbone.text_encoders_digest(FLAGS.model_dir)}  # checked against a run's folder
        table = encode_table(FLAGS.out, prompts, with_progress(encode, total), FLAGS.batch_size, metadata=encoded_by)
    except (OSError, ValueError) as error:  # a missing subfolder, weights that do not fit, an unwritable --out
        fail(error)
    print(f"wrote {FLAGS.out}: {len(table.prompts)} prompts, text {list(table.text_shape)}, pooled [{table.pooled_dim}]")


def define_flags() -> None:
    """The command's flags, defined only when it runs as a command: importing the module for its
    functions defines none (two commands' ``--out`` would clash in one process)."""
    flags.DEFINE_string("model_dir", None, "Diffusers pipeline folder of a known family, e.g. SD3 / SD3.5 (its text encoders).")
    flags.DEFINE_string("prompts", None, "Prompt file: .txt (one per line) or .jsonl ({\"prompt\": ...} per line).")
    flags.DEFINE_string("out", None, "Output table (.safetensors); replaced if it exists.")
    flags.DEFINE_integer("text_len", 333, "Text tokens: 77 CLIP + T5 tokens (the run's config.condition.text_len).")
    flags.DEFINE_integer("batch_size", 16, "Prompts per encoder call.")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
