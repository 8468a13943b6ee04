"""Safetensors reading (files, sharded folders, bfloat16), checked loading, prompt tables and prompt files."""

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from danceopd_jax.data.pipeline import ConditionSpec, RecordEncoder
from danceopd_jax.data.prompt_embeddings import encode_table, load_table, save_table
from danceopd_jax.data.prompt_files import PromptFileError, PromptFileSource
from danceopd_jax.models.weights import (
    WeightsError,
    WeightsMismatch,
    load_module,
    open_safetensors,
    param_shapes,
    write_safetensors,
)


class Small(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(3, 4, rngs=rngs)
        self.conv = nnx.Conv(2, 5, (3, 3), padding="VALID", rngs=rngs)
        self.norm = nnx.LayerNorm(4, rngs=rngs)


NAMES = {f"{m}.{p}": f"{m}.{t}" for m, p, t in [
    ("fc", "kernel", "weight"), ("fc", "bias", "bias"), ("conv", "kernel", "weight"), ("conv", "bias", "bias"),
    ("norm", "scale", "weight"), ("norm", "bias", "bias"),
]}  # fmt: skip


def _torch_small():
    torch.manual_seed(0)
    return torch.nn.ModuleDict(dict(fc=torch.nn.Linear(3, 4), conv=torch.nn.Conv2d(2, 5, 3), norm=torch.nn.LayerNorm(4)))


def _state_dict(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def test_loaded_linear_and_conv_compute_what_torch_computes(tmp_path):
    reference = _torch_small()
    save_file(_state_dict(reference), str(tmp_path / "model.safetensors"))
    model = load_module(lambda: Small(nnx.Rngs(1)), open_safetensors(str(tmp_path)), NAMES)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_allclose(model.fc(x), reference["fc"](torch.tensor(x)).detach().numpy(), atol=1e-6)
    image = np.random.default_rng(1).standard_normal((1, 6, 6, 2)).astype(np.float32)
    expected = reference["conv"](torch.tensor(image).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    np.testing.assert_allclose(model.conv(image), expected, atol=1e-5)


def test_sharded_folder_with_index_reads_every_shard(tmp_path):
    tensors = _state_dict(_torch_small())
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    source = open_safetensors(str(tmp_path))
    assert sorted(source) == names
    for k in names:
        np.testing.assert_array_equal(source[k], tensors[k])
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="shard files missing: model-00002-of-00002"):
        open_safetensors(str(tmp_path))


def test_bfloat16_and_metadata_round_trip(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
    write_safetensors(str(tmp_path / "x.safetensors"), {"a": a, "b": np.ones(2, np.int32)}, {"k": "v"})
    source = open_safetensors(str(tmp_path / "x.safetensors"))
    assert source["a"].dtype == ml_dtypes.bfloat16 and source.metadata == {"k": "v"}
    np.testing.assert_array_equal(source["a"], a)
    # the file is a real safetensors file: the reference reader agrees
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "x.safetensors"))["a"].dtype == torch.bfloat16


def test_every_mismatch_is_listed_and_nothing_is_loaded(tmp_path):
    tensors = _state_dict(_torch_small())
    tensors["fc.weight"] = np.zeros((4, 5), np.float32)  # mis-shaped
    del tensors["norm.bias"]  # missing
    tensors["extra.weight"] = np.zeros(1, np.float32)  # unexpected
    save_file(tensors, str(tmp_path / "m.safetensors"))
    with pytest.raises(WeightsMismatch) as error:
        load_module(lambda: Small(nnx.Rngs(1)), open_safetensors(str(tmp_path / "m.safetensors")), NAMES)
    message = str(error.value)
    assert "1 missing: norm.bias" in message and "1 unexpected: extra.weight" in message
    assert "fc.weight [4, 5] -> fc.kernel expects [3, 4]" in message


def test_bad_files_are_one_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="no such safetensors file or folder"):
        open_safetensors(str(tmp_path / "absent"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        open_safetensors(str(tmp_path / "junk.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="expected one .safetensors file or an index, found none"):
        open_safetensors(str(tmp_path / "empty"))


def test_truncated_or_inconsistent_file_fails_at_open_naming_the_tensor(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": np.ones((2, 3), np.float32), "b": np.ones(4, np.float32)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-4])  # the last tensor's data cut short
    with pytest.raises(WeightsError, match=r"tensor 'b' is corrupt \(data_offsets \[24, 40\] outside"):
        open_safetensors(str(path))
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n].replace(b"[2,3]", b"[3,3]")  # same length: 36 bytes no longer fit 24
    path.write_bytes(data[:8] + header + data[8 + n :])
    with pytest.raises(WeightsError, match=r"tensor 'a' is corrupt \(24 bytes for shape \[3, 3\] of F32\)"):
        open_safetensors(str(path))


def test_param_shapes_names_every_leaf():
    shapes = param_shapes(nnx.split(nnx.eval_shape(lambda: Small(nnx.Rngs(0))))[1])
    assert shapes == {"fc.kernel": (3, 4), "fc.bias": (4,), "conv.kernel": (3, 3, 2, 5), "conv.bias": (5,),
                      "norm.scale": (4,), "norm.bias": (4,)}  # fmt: skip


# ---------------------------------------------------------------- prompt tables and files


def _fake_encoder(prompts):
    """Deterministic stand-in encoder: text [B, 3, 2] and pooled [B, 4] from the prompt lengths."""
    lengths = np.array([len(p) for p in prompts], np.float32)
    return {"text": np.ones((len(prompts), 3, 2), np.float32) * lengths[:, None, None],
            "pooled": np.ones((len(prompts), 4), np.float32) * -lengths[:, None]}  # fmt: skip


def test_prompt_table_encodes_distinct_prompts_and_the_empty_one(tmp_path):
    calls = []
    table = encode_table(str(tmp_path / "t.safetensors"), ["ab", "abc", "ab"], lambda p: calls.append(p) or _fake_encoder(p), batch_size=2)
    assert table.prompts == ["", "ab", "abc"] and calls == [["", "ab"], ["abc"]]
    text, mask, pooled = load_table(str(tmp_path / "t.safetensors"))("abc")
    assert text.shape == (3, 2) and mask.all() and np.all(text == 3) and np.all(pooled == -3)
    with pytest.raises(KeyError, match="no embedding for prompt 'zz'"):
        table("zz")
    spec = ConditionSpec(text_len=3, text_dim=2, pooled_dim=4)
    record = RecordEncoder(spec, (2, 2, 1), table)({"prompt": "ab"})
    assert record["cond"]["pooled"].shape == (4,) and np.all(record["cond"]["text"] == 2)
    with pytest.raises(ValueError, match="spec wants"):
        RecordEncoder(ConditionSpec(text_len=3, text_dim=2, pooled_dim=5), (2, 2, 1), table)


def test_a_table_file_is_checked(tmp_path):
    save_table(str(tmp_path / "t.safetensors"), ["a"], np.zeros((1, 2, 2)), np.zeros((1, 3)))
    write_safetensors(str(tmp_path / "bad.safetensors"), {"text/0": np.zeros((2, 2), np.float32)})
    with pytest.raises(WeightsError, match="not a prompt-embedding table"):
        load_table(str(tmp_path / "bad.safetensors"))
    assert load_table(str(tmp_path / "t.safetensors")).pooled_dim == 3


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\na cat\n\na dog\n")
    assert PromptFileSource(str(tmp_path / "p.txt")).prompts == ["a cat", "a dog"]
    assert PromptFileSource(str(tmp_path / "p.txt"), size=1)[0] == {"prompt": "a cat"}
    (tmp_path / "p.jsonl").write_text('{"prompt": "x", "id": 1}\n{"text": "y"}\n')
    with pytest.raises(PromptFileError, match=r"p.jsonl:2: expected a JSON object"):
        PromptFileSource(str(tmp_path / "p.jsonl"))
    with pytest.raises(PromptFileError, match="bucket size 3 but the file has 2"):
        PromptFileSource(str(tmp_path / "p.txt"), size=3)
    (tmp_path / "e.txt").write_text("\n# only comments\n")
    with pytest.raises(PromptFileError, match="no prompts"):
        PromptFileSource(str(tmp_path / "e.txt"))
    with pytest.raises(PromptFileError, match="no such prompt file"):
        PromptFileSource(str(tmp_path / "absent.txt"))


def test_prompt_files_are_utf8_with_or_without_a_bom(tmp_path):
    """Before: a Latin-1 file was a UnicodeDecodeError traceback without the file's name, and a BOM
    (as Windows editors write) became part of the first prompt."""
    (tmp_path / "bom.txt").write_bytes("\ufeffa café\r\na dog\r\n".encode("utf-8"))
    assert PromptFileSource(str(tmp_path / "bom.txt")).prompts == ["a café", "a dog"]
    (tmp_path / "latin1.txt").write_bytes("a cat\na café\n".encode("latin-1"))
    with pytest.raises(PromptFileError, match=r"latin1.txt:2: not UTF-8 text \(invalid continuation byte at byte 5 of the line\)$"):
        PromptFileSource(str(tmp_path / "latin1.txt"))
