"""Image-file buckets (``data/manifests.py``, ``data/image_files.py``, ``data/file_buckets.py``): real files
written with PIL, the pixels they become, edit pairs kept aligned, every bad input one line before
anything is built, a mid-epoch resume, and runs of the DiT on them."""

import hashlib
import io
import json
import math
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, load_config, main_command, module_command
from danceopd_jax.config_validation import ConfigError, validate
from danceopd_jax.data.example_files import write_example_files
from danceopd_jax.data.file_buckets import FileBucketSource
from danceopd_jax.data.manifests import ManifestOptions, checked
from danceopd_jax.data.pipeline import BucketBatches, ConditionSpec

SIZE = 16
EDIT_SPEC = ConditionSpec(text_len=4, text_dim=8, use_source=True)


def source_of(kind, path, size=SIZE, resize="center_crop", **options):
    return FileBucketSource(checked(ManifestOptions(kind, str(path), size, **options)), size, resize)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ---------------------------------------------------------------- the pixels of every kind of file


def gradient(width, height):
    """An RGB image whose every pixel differs, so a crop or a rotation off by one pixel shows."""
    y, x = np.mgrid[:height, :width]
    return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x * 7 + y * 13) % 256], -1).astype(np.uint8)


def write_odd_images(folder):
    """``{name: (file name, the upright 8-bit RGB image the model must see before cropping)}``; each
    expected image is computed here with numpy, not by the code under test."""
    upright = gradient(40, 24)
    files = {}
    Image.fromarray(upright).save(folder / "wide.png")
    files["png"] = ("wide.png", upright)
    tall = gradient(20, 36)
    Image.fromarray(tall).save(folder / "tall.jpg", quality=90)
    files["jpeg"] = ("tall.jpg", np.asarray(Image.open(folder / "tall.jpg")))  # JPEG is lossy: the file's own pixels
    grey = gradient(30, 30)[..., 0]
    Image.fromarray(grey).save(folder / "grey.png")
    files["grayscale"] = ("grey.png", np.repeat(grey[..., None], 3, -1))
    palette = Image.new("P", (24, 24))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    indices = (np.arange(24 * 24).reshape(24, 24) % 3).astype(np.uint8)
    palette.putdata(indices.ravel().tolist())
    palette.info["transparency"] = 2  # index 2 (blue) is transparent: white
    palette.save(folder / "palette.png", transparency=2)
    colours = np.array([[255, 0, 0], [0, 255, 0], [255, 255, 255]], np.uint8)
    files["palette"] = ("palette.png", colours[indices])
    rgba = np.concatenate([gradient(32, 20), np.where(gradient(32, 20)[..., :1] > 128, 255, 0).astype(np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    files["rgba"] = ("alpha.png", np.where(rgba[..., 3:] == 255, rgba[..., :3], 255).astype(np.uint8))
    # Orientation 6: the viewer turns the stored pixels 90 degrees clockwise; stored turned the other way.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(upright, 1)).save(folder / "rotated.jpg", exif=exif, quality=90)
    stored = np.asarray(Image.open(folder / "rotated.jpg"))
    files["exif_rotated"] = ("rotated.jpg", np.rot90(stored, -1))
    return files


def expected_pixels(upright, size, resize):
    """The crop and resize of the rule, written out: the centred square, then Lanczos to ``size``."""
    height, width = upright.shape[:2]
    if resize == "center_crop":
        side = min(width, height)
        top, left = (height - side) // 2, (width - side) // 2
        upright = upright[top : top + side, left : left + side]
    resized = Image.fromarray(np.ascontiguousarray(upright)).resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(resized, np.float32) / 127.5 - 1.0


@pytest.mark.parametrize("resize", ["center_crop", "stretch"])
def test_batches_hold_exactly_the_pixels_of_the_rule(tmp_path, resize):
    files = write_odd_images(tmp_path)
    manifest = write_jsonl(tmp_path / "captions.jsonl", [{"image": name, "prompt": kind} for kind, (name, _) in files.items()])
    source = source_of("image_text", manifest, resize=resize)
    expected = {kind: expected_pixels(upright, SIZE, resize) for kind, (_, upright) in files.items()}
    for index, kind in enumerate(files):
        record = source[index]
        assert record["prompt"] == kind and record["image"].dtype == np.float32
        np.testing.assert_array_equal(record["image"], expected[kind], err_msg=kind)
    # the EXIF-rotated JPEG is upright: its top rows are dark in green as the gradient's are (y = 0)
    upright = source[list(files).index("exif_rotated")]["image"]
    assert upright[0, :, 1].mean() < upright[-1, :, 1].mean()
    # through the grain pipeline: one epoch is every expected image once
    batches = BucketBatches({"files": source}, ConditionSpec(text_len=4, text_dim=8), (SIZE, SIZE, 3), seed=3)
    images = batches.next({"files": len(files)})["image"]
    matches = sorted(next(kind for kind, want in expected.items() if np.array_equal(image, want)) for image in images)
    assert matches == sorted(files)


def test_a_folder_and_a_csv_give_the_same_examples(tmp_path):
    files = write_odd_images(tmp_path)
    folder = tmp_path / "folder"
    folder.mkdir()
    for kind, (name, _) in files.items():
        (folder / name).write_bytes((tmp_path / name).read_bytes())
        (folder / name).with_suffix(".txt").write_text(f"\ufeff{kind}\n")  # a BOM and the newline are not the caption
    (tmp_path / "captions.csv").write_text("image,prompt,width\n" + "".join(f"{n},{k},0\n" for k, (n, _) in files.items()))
    from_folder, from_csv = source_of("image_text", folder), source_of("image_text", tmp_path / "captions.csv")
    by_prompt = {from_csv[i]["prompt"]: from_csv[i]["image"] for i in range(len(from_csv))}
    assert len(from_folder) == len(files) and sorted(by_prompt) == sorted(files)
    for index in range(len(from_folder)):
        np.testing.assert_array_equal(from_folder[index]["image"], by_prompt[from_folder[index]["prompt"]])


# ---------------------------------------------------------------- edit pairs


def write_pairs(folder, count):
    """Pairs whose source and target colours both encode the uid's number k (the OmniEdit columns, and an extra one)."""
    rows = []
    for k in range(count):
        Image.new("RGB", (20, 20), (10 * k, 0, 0)).save(folder / f"s{k}.png")
        Image.new("RGB", (20, 20), (0, 10 * k, 0)).save(folder / f"t{k}.png")
        rows.append(dict(uid=f"u{k}", task="recolour" if k % 2 else "night", prompt=f"edit {k}", source_image=f"s{k}.png",
                         target_image=f"t{k}.png", score=0.5))  # fmt: skip
    return write_jsonl(folder / "pairs.jsonl", rows)


def test_edit_pairs_keep_source_and_target_aligned_and_expose_digests(tmp_path):
    manifest = write_pairs(tmp_path, 10)
    source = source_of("edit_pairs", manifest)
    batches = BucketBatches({"edits": source}, EDIT_SPEC, (SIZE, SIZE, 3), seed=1)
    for _ in range(4):  # past the first epoch
        batch = batches.next({"edits": 4})
        red = np.round((batch["cond"]["source"][:, 0, 0, 0] + 1) * 127.5)
        green = np.round((batch["image"][:, 0, 0, 1] + 1) * 127.5)
        np.testing.assert_array_equal(red, green)  # the same k: the same uid's source and target
        assert batch["cond"]["source_mask"].all() and batch["has_image"].all()
    assert source.digests(3) == {
        "source": hashlib.sha256((tmp_path / "s3.png").read_bytes()).hexdigest(),
        "image": hashlib.sha256((tmp_path / "t3.png").read_bytes()).hexdigest(),
    }
    night = source_of("edit_instructions", manifest, tasks="night")  # sources and instructions only; target column unread
    assert [night[i]["prompt"] for i in range(len(night))] == ["edit 0", "edit 2", "edit 4", "edit 6", "edit 8"]
    assert set(night[0]) == {"source", "prompt"}


def test_a_file_changed_after_its_check_is_refused_when_read(tmp_path):
    source = source_of("edit_pairs", write_pairs(tmp_path, 2))
    Image.new("RGB", (20, 20), (1, 2, 3)).save(tmp_path / "t1.png")
    with pytest.raises(ValueError, match=r"t1\.png: changed since the bucket was checked"):
        source[1]


def test_a_resume_mid_epoch_continues_the_same_order_bit_for_bit(tmp_path):
    source = source_of("edit_pairs", write_pairs(tmp_path, 7))

    def make():
        return BucketBatches({"edits": source}, EDIT_SPEC, (SIZE, SIZE, 3), seed=4)

    batches = make()
    for _ in range(2):
        batches.next({"edits": 3})  # 6 of 7: mid-epoch
    state = json.loads(json.dumps(batches.get_state()))
    after = [batches.next({"edits": 3}) for _ in range(3)]
    resumed = make()
    resumed.set_state(state)
    for a, b in zip(after, [resumed.next({"edits": 3}) for _ in range(3)]):
        for key in ("image", "source", "text"):
            np.testing.assert_array_equal(a.get(key, a["cond"].get(key)), b.get(key, b["cond"].get(key)))


# ---------------------------------------------------------------- bad input: one line, before anything is built


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The example files, plus one file of every bad kind."""
    out = tmp_path_factory.mktemp("files")
    write_example_files(str(out))
    Image.new("RGB", (24, 24), (200, 30, 30)).save(out / "good.png")
    Image.new("RGB", (8, 12), (200, 30, 30)).save(out / "small.png")
    whole = io.BytesIO()
    Image.fromarray(gradient(64, 64)).save(whole, "PNG")
    (out / "truncated.png").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (out / "text.png").write_text("not an image at all\n")
    return out


def pair(uid, source="good.png", target="good.png", **changes):
    return {"uid": uid, "task": "add", "prompt": f"edit {uid}", "source_image": source, "target_image": target, **changes}


BAD_LINES = {  # a manifest's lines -> the start of its one error line (after the manifest's path)
    "missing": ([pair("a", source="nope.png")], ":1: source_image 'nope.png': no such file"),
    "truncated": ([pair("a", target="truncated.png")], ":1: target_image 'truncated.png': truncated or corrupt ("),
    "not_an_image": ([pair("a", source="text.png")], ":1: source_image 'text.png': not an image (no format PIL reads)"),
    "too_small": ([pair("a", source="small.png")],
                  ":1: source_image 'small.png': 8x12 is smaller than image_size 16 (set allow_upscale=True to upscale it)"),
    "missing_column": ([pair("a"), {k: v for k, v in pair("b").items() if k != "prompt"}], ":2: no 'prompt'"),
    "duplicate_uid": ([pair("a"), pair("a")], ":2: uid 'a' is also at "),
    "outside": ([pair("a", source="../elsewhere.png")], ":1: '../elsewhere.png' is outside the manifest's folder"),
    "not_json": (["{\"uid\": 1,"], ":1: not JSON ("),
    "not_an_object": (['"a JSON string"'], ":1: not a JSON object"),
}


def problem_of(config) -> str:
    with pytest.raises(ConfigError) as error:
        validate(config)
    assert "\n" not in str(error.value)
    return str(error.value)


def with_manifest(data_dir, name, lines, **bucket):
    """files_smoke on ``data_dir`` with bucket ``local_edit`` reading a manifest of ``lines``."""
    path = data_dir / f"{name}.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    config = load_config("files_smoke", str(data_dir))
    config.data.buckets.local_edit.update({"path": str(path), "tasks": "", **bucket})
    return config, path


@pytest.mark.parametrize("case", BAD_LINES)
def test_every_bad_line_is_named_with_its_manifest_and_line(data_dir, case):
    lines, message = BAD_LINES[case]
    config, path = with_manifest(data_dir, case, lines)
    assert problem_of(config).startswith(f"config.data.buckets.local_edit.path: {path}{message}")


def test_the_switches_allow_small_images_and_outside_paths(data_dir):
    (data_dir.parent / "elsewhere.png").write_bytes((data_dir / "good.png").read_bytes())
    validate(with_manifest(data_dir, "small_ok", BAD_LINES["too_small"][0], allow_upscale=True)[0])
    validate(with_manifest(data_dir, "outside_ok", BAD_LINES["outside"][0], allow_outside_paths=True)[0])


def test_many_bad_lines_list_the_first_five_and_the_count(data_dir):
    config, path = with_manifest(data_dir, "many", [pair(f"u{k}", source=f"gone{k}.png") for k in range(7)])
    message = problem_of(config)
    assert message.startswith("config.data.buckets.local_edit.path: 7 problems, the first 5: ")
    assert message.count("no such file") == 5 and f"{path}:5: source_image 'gone4.png'" in message and "gone5" not in message


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(lines=[]), "{path}: no examples (an empty bucket has nothing to draw)"),
        (dict(tasks="add,nothing"), "{path}: tasks 'nothing' select no line (its tasks: add)"),
        (dict(size=3), "{path}: bucket size 3 but the manifest has 1 examples"),
        (dict(lines=[{k: v for k, v in pair("a").items() if k != "target_image"}]),
         "{path}: no 'target_image' column (kind 'edit_pairs' reads prompt, source_image, target_image); "
         "a manifest without targets is kind 'edit_instructions'"),
    ],
)
def test_manifest_wide_problems_are_one_line(data_dir, change, message):
    lines = change.pop("lines", [pair("a")])
    config, path = with_manifest(data_dir, f"whole_{len(lines)}_{'_'.join(change)}", lines, **change)
    assert problem_of(config) == f"config.data.buckets.local_edit.path: {message.format(path=path)}"


def test_a_csv_row_with_another_field_count_is_named(data_dir):
    path = data_dir / "rows.csv"
    path.write_text("uid,prompt,source_image,target_image\na,edit,good.png,good.png\nb,edit,good.png\n")
    config = load_config("files_smoke", str(data_dir), **{"data.buckets.local_edit.path": str(path), "data.buckets.local_edit.tasks": ""})
    assert problem_of(config) == f"config.data.buckets.local_edit.path: {path}:3: 3 fields, the header has 4"


def test_a_folder_image_without_its_caption_is_named(data_dir):
    folder = data_dir / "uncaptioned"
    folder.mkdir()
    (folder / "a.png").write_bytes((data_dir / "good.png").read_bytes())
    (folder / "b.png").write_bytes((data_dir / "good.png").read_bytes())
    (folder / "b.txt").write_text("a red square")
    (folder / "notes.md").write_text("")
    config = load_config("files_smoke", str(data_dir))
    config.data.buckets.t2i.path = str(folder)
    assert problem_of(config) == (f"config.data.buckets.t2i.path: 2 problems, the first 2: {folder}/a.png: no caption file a.txt; "
                                  f"{folder}/notes.md: neither an image nor a .txt caption")  # fmt: skip


@pytest.mark.parametrize(
    "change,message",
    [
        ({"data.buckets.t2i.resize": "fit"}, "config.data.buckets.t2i.resize: unknown value 'fit'; valid: center_crop, stretch"),
        ({"data.buckets.t2i.kind": "scenes_t2i", "data.buckets.t2i.path": "", "data.buckets.t2i.size": 8},
         "config.data.buckets.t2i.tasks: kind 'scenes_t2i' reads no image files"),
        ({"channels": 1}, "config.channels: image files (bucket 'global_edit') are read as RGB: must be 3, got 1"),
        ({"method": "flow_matching", "data.buckets.local_edit.kind": "edit_instructions"},
         "config.routes.local_edit.bucket: method 'flow_matching' needs dataset images; bucket 'local_edit' has none"),
    ],
)
def test_file_bucket_keys_are_checked(data_dir, change, message):
    config = load_config("files_smoke", str(data_dir), **change)
    if "data.buckets.t2i.kind" in change:
        config.data.buckets.t2i.tasks = "add"
    assert problem_of(config).startswith(message)


@pytest.mark.parametrize(
    "lines,overrides,message",
    [
        ([pair("a", source="nope.png"), pair("b", target="truncated.png"), pair("c", source="text.png"), pair("d", source="small.png"),
          {k: v for k, v in pair("e").items() if k != "prompt"}],
         [], "5 problems, the first 5: {path}:1: source_image 'nope.png': no such file; {path}:2: target_image 'truncated.png'"),
        ([pair("a"), pair("a"), pair("b", source="../x.png")] + [pair(f"m{k}", source=f"m{k}.png") for k in range(4)],
         [], "6 problems, the first 5: {path}:2: uid 'a' is also at {path}:1; {path}:3: '../x.png' is outside"),
        ([], [], "{path}: no examples"),
        ([pair("a")], ["--config.data.buckets.local_edit.tasks=remove"], "{path}: tasks 'remove' select no line (its tasks: add)"),
    ],
    ids=["five_classes", "more_than_five", "empty", "tasks_select_nothing"],
)
def test_bad_files_stop_the_command_with_one_line_and_exit_code_2(data_dir, tmp_path, lines, overrides, message):
    path = data_dir / f"cli_{len(lines)}_{len(overrides)}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    flags = [f"--config.data.buckets.local_edit.path={path}", "--config.data.buckets.local_edit.tasks=", *overrides]
    command = main_command("--config", f"{ROOT}/configs/files_smoke.py:{data_dir}", "--workdir", str(tmp_path / "w"), *flags)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: config.data.buckets.local_edit.path: " + message.format(path=path)), lines[-1]
    assert "Traceback" not in result.stderr and not (tmp_path / "w" / "checkpoints").exists()


# ---------------------------------------------------------------- the DiT trains on files


def test_files_smoke_runs_danceopd_through_the_command(tmp_path):
    data = tmp_path / "files"
    subprocess.run(module_command("danceopd_jax.data.example_files", "--out", str(data)), cwd=ROOT, check=True, timeout=120)
    command = main_command("--config", f"{ROOT}/configs/files_smoke.py:{data}", "--workdir", str(tmp_path / "w"),
                           "--config.num_train_steps=6", "--config.loss_log=True")  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: step 6" in result.stdout
    losses = [json.loads(line) for line in (tmp_path / "w" / "losses.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(math.isfinite(entry["loss"]) for entry in losses)
    assert {entry["route"] for entry in losses} <= {"t2i", "local_edit", "global_edit"}


def test_flow_matching_trains_on_a_folder_of_captioned_images(data_dir, tmp_path):
    from danceopd_jax import train

    config = load_config("files_smoke", str(data_dir), method="flow_matching", num_train_steps=2, log_every=1, checkpoint_every=2)
    config.condition.use_source = False
    config.student.use_source = False
    config.experts, config.fields = {}, {}
    config.routes = {"t2i": dict(field="", bucket="t2i", weight=1.0)}
    config.data.buckets = {"t2i": config.data.buckets.t2i}
    state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 2
