"""Write a few real image files of the shapes world, in the formats image buckets read (``manifests.py``).

    python -m danceopd_jax.data.example_files --out workdirs/example_files

  t2i/NNN.png|jpg + NNN.txt    captioned T2I scenes, PNG and JPEG alternately (an image_text folder)
  edits/NNN_source.png,        edit pairs of the shapes world: local (recolour, reshape, add, remove)
  edits/NNN_target.jpg         and global (night, sketch, background) edits
  edits.jsonl, edits.csv       the same pairs as manifests in the OmniEdit columns of the authors'
                               release: uid, task, prompt, source_image, target_image

``configs/files_smoke.py`` trains on it. Images are rendered at ``--size`` pixels (default 32).
"""

import argparse
import csv
import json
import os
import sys

import numpy as np
from PIL import Image

from danceopd_jax.data import scenes
from danceopd_jax.data.scene_buckets import scene_examples

EDIT_COLUMNS = ("uid", "task", "prompt", "source_image", "target_image")
JPEG_QUALITY = 95


def _save(image: np.ndarray, path: str) -> None:
    """A render in [-1, 1] as an 8-bit PNG or JPEG file."""
    pixels = np.round((image + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, **({"quality": JPEG_QUALITY} if path.endswith(".jpg") else {}))


def write_example_files(out: str, num_t2i: int = 16, num_edits: int = 24, size: int = 32, seed: int = 0) -> None:
    """The files of the module docstring under ``out`` (created; existing files are overwritten)."""
    t2i_dir, edits_dir = os.path.join(out, "t2i"), os.path.join(out, "edits")
    os.makedirs(t2i_dir, exist_ok=True)
    os.makedirs(edits_dir, exist_ok=True)
    for index, example in enumerate(scene_examples("scenes_t2i", num_t2i, seed)):
        _save(scenes.render(example.target, size), os.path.join(t2i_dir, f"{index:03d}.{'png' if index % 2 == 0 else 'jpg'}"))
        with open(os.path.join(t2i_dir, f"{index:03d}.txt"), "w", encoding="utf-8") as f:
            f.write(example.prompt + "\n")
    rows = []
    for index, example in enumerate(scene_examples("scenes_edit", num_edits, seed)):
        source, target = f"edits/{index:03d}_source.png", f"edits/{index:03d}_target.jpg"
        _save(scenes.render(example.source, size), os.path.join(out, source))
        _save(scenes.render(example.target, size), os.path.join(out, target))
        rows.append(dict(zip(EDIT_COLUMNS, (f"edit-{index:03d}", example.edit, example.prompt, source, target))))
    with open(os.path.join(out, "edits.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    with open(os.path.join(out, "edits.csv"), "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, EDIT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write (created; existing files are overwritten)")
    parser.add_argument("--size", type=int, default=32, help="side of the rendered images in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_example_files(args.out, size=args.size, seed=args.seed)
    print(f"wrote captioned images to {args.out}/t2i and edit pairs to {args.out}/edits.jsonl (and .csv)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
