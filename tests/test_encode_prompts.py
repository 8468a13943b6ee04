"""Precomputed prompt embeddings: ``python -m danceopd_jax.encode_prompts`` writes the table an SD3
run would encode itself; a run given it as ``config.prompt_embeddings`` trains through
``python -m danceopd_jax.main`` on a folder without text encoders; a table that does not fit the
run, and bad command input, are one line naming what is wrong."""

import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from danceopd_jax import build
from danceopd_jax.config_validation import ConfigError, validate
from danceopd_jax.data.prompt_embeddings import encode_table, load_table, save_table
from danceopd_jax.data.prompt_files import read_prompts
from danceopd_jax.encode_prompts import check_arguments, with_progress
from danceopd_jax.models.tiny_sd3 import write_tiny_sd3

from conftest import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "sd3_smoke.py"
TEXT_LEN = 77 + 16  # configs/sd3_smoke.py's condition.text_len


def _command(module: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *flags], capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return write_tiny_sd3(str(tmp_path_factory.mktemp("tiny_sd3")))


@pytest.fixture(scope="module")
def encoded(folder, tmp_path_factory):
    """``(table path, command output)``: the folder's prompt file encoded by the command."""
    out = tmp_path_factory.mktemp("table") / "prompts.safetensors"
    result = _command("danceopd_jax.encode_prompts", f"--model_dir={folder}", f"--prompts={folder}/prompts.txt",
                      f"--out={out}", f"--text_len={TEXT_LEN}")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return str(out), result.stdout


@pytest.fixture(scope="module")
def bare(folder, tmp_path_factory) -> str:
    """A copy of the folder without its text encoders and tokenizers (model_index.json still names them)."""
    copy = tmp_path_factory.mktemp("bare") / "tiny_sd3"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("text_encoder*", "tokenizer*"))
    return str(copy)


def smoke_config(model_dir: str, **overrides):
    return load_config("sd3_smoke", model_dir=model_dir, **overrides)


def test_the_command_writes_the_table_a_run_encodes_itself(folder, encoded, tmp_path):
    """Every prompt of the run and the empty prompt, equal within 1e-5 to the run's own encoding.

    Both encode in batches of 16: on XLA's CPU backend the tiny random T5's outputs move by up to
    ~1e-4 with the batch shape (PyTorch's do not), so other batch sizes agree to ~1e-4 only."""
    path, stdout = encoded
    assert "encoded 9/9 prompts" in stdout
    assert f"wrote {path}: 9 prompts, text [{TEXT_LEN}, 32], pooled [32]" in stdout
    assert not list(pathlib.Path(path).parent.glob("*.tmp"))  # written atomically
    config = smoke_config(folder)
    own = build.folder_prompt_table(config, build.make_sources(config), str(tmp_path))
    table = load_table(path)
    assert sorted(table.prompts) == sorted(own.prompts) == sorted(["", *read_prompts(f"{folder}/prompts.txt")])
    for prompt in own.prompts:
        (text, mask, pooled), (own_text, _, own_pooled) = table(prompt), own(prompt)
        assert np.abs(text - own_text).max() <= 1e-5 and np.abs(pooled - own_pooled).max() <= 1e-5
        assert mask.all() and np.abs(text).max() > 0


def test_progress_is_printed_after_each_batch(tmp_path, capsys):
    def encode(batch):
        return {"text": np.full((len(batch), 3, 2), len(batch), np.float32), "pooled": np.zeros((len(batch), 2), np.float32)}

    prompts = ["a", "b", "a", "c", "d"]
    table = encode_table(str(tmp_path / "t.safetensors"), prompts, with_progress(encode, 5), batch_size=2)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"encoded {n}/5 prompts" for n in (2, 4, 5)]
    assert table.prompts == ["", "a", "b", "c", "d"] and table("d")[0][0, 0] == 1  # the last batch held one prompt


def test_a_run_given_the_table_trains_without_text_encoders(bare, encoded, tmp_path):
    """The folder without text encoders trains 2 steps from the table (nothing encoded into the workdir);
    without the table the same run stops with one line naming the missing encoder."""
    table, _ = encoded
    flags = [f"--config={SMOKE}", f"--config.model_dir={bare}", "--config.num_train_steps=2"]
    result = _command("danceopd_jax.main", *flags, f"--workdir={tmp_path / 'run'}", f"--config.prompt_embeddings={table}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"prompt embeddings: 9 prompts in {table}" in result.stdout and "done: step 2" in result.stdout
    assert not (tmp_path / "run" / build.PROMPT_TABLE).exists()

    result = _command("danceopd_jax.main", *flags, f"--workdir={tmp_path / 'encoding'}")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert result.stderr.startswith("error: config.model_dir: ") and "missing component text_encoder/" in result.stderr
    assert "config.prompt_embeddings" in result.stderr


def test_a_table_that_does_not_fit_the_run_is_one_clear_error(folder, bare, encoded, tmp_path):
    path, _ = encoded
    table = load_table(path)
    prompts = table.prompts
    text = np.stack([table(p)[0] for p in prompts])
    pooled = np.stack([table(p)[2] for p in prompts])
    validate(smoke_config(bare, prompt_embeddings=path))  # the table fits

    def check(problem: str, model_dir: str = bare, **overrides):
        with pytest.raises(ConfigError, match=rf"^config\.prompt_embeddings: {problem}"):
            validate(smoke_config(model_dir, **overrides))

    check("no such file: .*absent.safetensors", prompt_embeddings=str(tmp_path / "absent.safetensors"))
    check(".*lora.safetensors: not a prompt-embedding table", prompt_embeddings=f"{folder}/teacher_lora.safetensors")

    short = str(tmp_path / "short.safetensors")
    save_table(short, prompts, text[:, :85], pooled)
    check(rf".*short.safetensors holds text \[85, 32\], pooled \[32\] embeddings; config.condition needs text \[{TEXT_LEN}, 32\]",
          prompt_embeddings=short)  # fmt: skip

    kept = [i for i, p in enumerate(prompts) if p not in ("a blue car in the city", "a photo of a red cat")]
    partial = str(tmp_path / "partial.safetensors")
    save_table(partial, [prompts[i] for i in kept], text[kept], pooled[kept])
    check(r".*partial.safetensors lacks 2 of the run's prompts, first 'a blue car in the city'; encode them",
          prompt_embeddings=partial)  # fmt: skip
    no_null = str(tmp_path / "no_null.safetensors")
    save_table(no_null, prompts[1:], text[1:], pooled[1:])
    check(r".*lacks 1 of the run's prompts, first the empty prompt \(the CFG null\)", prompt_embeddings=no_null)

    dit = load_config("smoke", prompt_embeddings=path)
    with pytest.raises(ConfigError, match=r"^config.prompt_embeddings: .*config.model_dir is not set"):
        validate(dit)


def test_a_table_is_checked_against_the_text_encoders_of_a_folder_that_has_them(folder, bare, encoded, tmp_path):
    """The command records which text encoders encoded the table (names, sizes and sampled contents of
    their files): a copy of the folder passes, a folder with other encoders of the same shapes is one
    line (before: its run trained on embeddings of the wrong encoders), a folder without them cannot
    be checked and passes."""
    path, _ = encoded
    copy = shutil.copytree(folder, tmp_path / "copy")
    for model_dir in (folder, str(copy), bare):
        validate(smoke_config(model_dir, prompt_embeddings=path))
    other = write_tiny_sd3(str(tmp_path / "other"), seed=1)  # the same architecture, other random weights
    with pytest.raises(ConfigError) as error:
        validate(smoke_config(other, prompt_embeddings=path))
    assert str(error.value) == (f"config.prompt_embeddings: {path} was encoded by other text encoders than {other}'s "
                                "(their files differ); encode the prompts with this folder")  # fmt: skip


def test_the_command_refuses_bad_input_in_one_line(folder, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    for args, problem in (
        ((folder, f"{tmp_path}/out.safetensors", 77, 16), "--text_len 77: must be 77 CLIP tokens"),
        ((folder, f"{tmp_path}/out.safetensors", TEXT_LEN, 0), "--batch_size must be >= 1"),
        ((folder, str(tmp_path), TEXT_LEN, 16), "is a folder"),
        ((folder, f"{tmp_path}/a_file/out.safetensors", TEXT_LEN, 16), "its folder .*a_file exists and is not a folder"),
        ((str(tmp_path), f"{tmp_path}/out.safetensors", TEXT_LEN, 16), "model_index.json: file missing"),
    ):
        with pytest.raises(ValueError, match=problem):
            check_arguments(*args)
    result = _command("danceopd_jax.encode_prompts", f"--model_dir={folder}", f"--prompts={tmp_path}/absent.txt",
                      f"--out={tmp_path}/out.safetensors")  # fmt: skip
    assert result.returncode == 2 and result.stderr == f"error: {tmp_path}/absent.txt: no such prompt file\n"
    assert not (tmp_path / "out.safetensors").exists()


def test_the_workdir_table_is_reused_only_for_the_folder_that_encoded_it(folder, tmp_path, monkeypatch):
    """A run's table cached in its workdir is keyed on the folder's text encoders: a new run in the same
    workdir on another folder encodes its prompts again (before: it read the first folder's table)."""
    from danceopd_jax.models import sd3

    other = write_tiny_sd3(str(tmp_path / "other"), seed=1)  # the same architecture, other random weights

    def run_table(model_dir: str, workdir: pathlib.Path):
        config = smoke_config(model_dir)
        table = build.folder_prompt_table(config, build.make_sources(config), str(workdir))
        return {p: table(p)[0] for p in table.prompts}  # read now: the file may be replaced later

    first = run_table(folder, tmp_path / "run")
    second = run_table(other, tmp_path / "run")
    fresh = run_table(other, tmp_path / "fresh")
    assert second.keys() == fresh.keys() == first.keys()
    for prompt in fresh:
        assert np.abs(second[prompt] - fresh[prompt]).max() <= 1e-6
        assert np.abs(second[prompt] - first[prompt]).max() > 1e-3

    def no_encoding(*args, **kwargs):
        raise AssertionError("the cached table was encoded again")

    monkeypatch.setattr(sd3, "prompt_encoder", no_encoding)
    again = run_table(other, tmp_path / "run")  # the same folder again: the cached table is read
    assert all(np.array_equal(again[p], second[p]) for p in again)
    old = str(tmp_path / "old.safetensors")  # a table that records no encoder (older code): not trusted
    save_table(old, list(fresh), np.stack(list(fresh.values())), np.zeros((len(fresh), 32), np.float32))
    with pytest.raises(AssertionError, match="encoded again"):
        sd3.prompt_table(other, list(fresh)[1:], old, TEXT_LEN)
