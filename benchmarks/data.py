"""Input throughput: image files decoded and resized (cold) against cached VAE latents read (warm), in
samples/s, beside the samples/s the train step consumes on one H100.

    python benchmarks/data.py                                  # 512 and 1024 px, 32 images each
    python benchmarks/data.py --px 256 --images 8 --repeats 1  # a quick look

Per resolution P, ``--images`` random JPEG files of P x 5P/4 pixels (photo-like: smooth noise, so
the files are compressed like photos rather than like flat colour) are written to a temporary folder
as an ``image_text`` bucket, checked once (``data.manifests``), then read as a run reads them:

  cold      ``FileBucketSource`` records: decode, centre crop, Lanczos resize to P (``image_files.pixels``),
            the digest checked, by a grain pipeline with ``--workers`` read threads (and with 1)
  warm      ``LatentBucketSource`` records from a latent table of the same images (random float32
            latents [P/8, P/8, 16], as SD3's VAE gives), read from the safetensors file (memory-mapped),
            and the same records through ``BucketBatches`` (the run's encoder, grain, batches of 8)

Files and table are in the page cache (written just before): ``cold`` is the decode, not the disk.

The step's need (samples/s the train step consumes) is from docs/PERFORMANCE.md's H100 rows:
DiT-XL/2 at 256 px (B 32, 362.8 ms: 88.2 samples/s), DiT-XL/2 at 512 px (B 8: 19.9) and SD3.5-M
at 256 px (B 8: 16.4, an upper bound for its 1024 px step). A resolution's need is the largest of
the rows at or above it (512 px: 19.9; 1024 px: 16.4); ``x need`` is samples/s over it. On this
CPU the absolute figures are noisy: read the ratios of one run.
"""

import os
import sys
import tempfile
import time

import grain
import numpy as np
from PIL import Image

from danceopd_jax.commands import ArgumentParser
from danceopd_jax.data import latent_cache
from danceopd_jax.data.file_buckets import FileBucketSource
from danceopd_jax.data.manifests import ManifestOptions, checked
from danceopd_jax.data.pipeline import BucketBatches, ConditionSpec
from danceopd_jax.models.weights import write_safetensors

STEP_NEEDS = {256: 88.2, 512: 19.9, 1024: 16.4}  # px -> samples/s of the H100 step (module docstring)
LATENT_CHANNELS, DOWNSAMPLING = 16, 8  # SD3's VAE
BATCH = 8


def parse_args(argv):
    parser = ArgumentParser(prog="benchmarks/data.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--px", default="512,1024", help="comma-separated resolutions P (multiples of 8)")
    parser.add_argument("--images", type=int, default=32, help="images per resolution")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="grain read threads of the cold pipeline")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the images per figure (the best is kept)")
    args = parser.parse_args(argv)
    try:
        args.px = [int(p) for p in args.px.split(",")]
    except ValueError:
        parser.error(f"--px: {args.px!r} is not a comma-separated list of integers")
    if any(p < 8 or p % 8 for p in args.px):
        parser.error(f"--px: {args.px} must be multiples of 8 (the VAE's downsampling)")
    for name in ("images", "workers", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: must be >= 1, got {getattr(args, name)}")
    return args


def write_images(folder: str, px: int, count: int) -> None:
    """``count`` photo-like JPEGs of ``px`` x ``5 px / 4`` with captions, an ``image_text`` folder."""
    rng = np.random.default_rng(px)
    for i in range(count):
        coarse = rng.uniform(0, 255, (px // 16 + 1, 5 * px // 64 + 1, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((5 * px // 4, px), Image.Resampling.BICUBIC), np.int16)
        noisy = np.clip(smooth + rng.integers(-8, 9, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(os.path.join(folder, f"{i:04d}.jpg"), quality=90)
        with open(os.path.join(folder, f"{i:04d}.txt"), "w") as f:
            f.write(f"photo {i}\n")


def samples_per_second(read, count: int, repeats: int) -> float:
    """The best of ``repeats`` passes of ``read()`` (which reads ``count`` samples), after one untimed pass, in samples/s."""
    read()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        read()
        best = min(best, time.perf_counter() - start)
    return count / best


def grain_pass(source, workers: int):
    """A function reading every record of ``source`` once through grain with ``workers`` read threads."""
    options = grain.ReadOptions(num_threads=workers, prefetch_buffer_size=2 * workers)
    return lambda: sum(1 for _ in grain.MapDataset.source(source).to_iter_dataset(options))


def latent_table(files: FileBucketSource, path: str) -> latent_cache.LatentTable:
    """A table of random latents for every image of ``files``, as ``latent_cache`` writes one."""
    side = files.image_size // DOWNSAMPLING
    rng = np.random.default_rng(0)
    tensors = {latent_cache.entry_key(example.images["image"], files.resize): rng.standard_normal((side, side, LATENT_CHANNELS), np.float32)
               for example in files.examples}  # fmt: skip
    write_safetensors(path, tensors, {latent_cache.ENCODED_BY: "benchmark"})
    return latent_cache.load_latents(path)


def measure(px: int, args, folder: str) -> list[tuple[str, float]]:
    """``[(what, samples/s)]`` at resolution ``px`` (module docstring)."""
    images = os.path.join(folder, f"images_{px}")
    os.makedirs(images)
    write_images(images, px, args.images)
    files = FileBucketSource(checked(ManifestOptions("image_text", images, px)), px, "center_crop")
    n, r = len(files), args.repeats
    latents = latent_cache.LatentBucketSource(files, latent_table(files, os.path.join(folder, f"latents_{px}.safetensors")))
    side = px // DOWNSAMPLING
    batches = BucketBatches({"b": latents}, ConditionSpec(text_len=8, text_dim=16), (side, side, LATENT_CHANNELS))
    rows = [(f"cold: decode + resize, {threads} thread{'s' * (threads > 1)}", samples_per_second(grain_pass(files, threads), n, r))
            for threads in dict.fromkeys([1, args.workers])]  # fmt: skip
    rows.append(("warm: cached latents, records", samples_per_second(lambda: [latents[i] for i in range(n)], n, r)))
    rows.append((f"warm: cached latents, batches of {BATCH}", samples_per_second(lambda: [batches.next({"b": BATCH}) for _ in range(n // BATCH or 1)], (n // BATCH or 1) * BATCH, r)))
    return rows


def need(px: int) -> float:
    """The step's samples/s at ``px``: the largest need of the measured rows at or above it (module docstring)."""
    above = [value for size, value in STEP_NEEDS.items() if size >= px]
    return max(above) if above else STEP_NEEDS[max(STEP_NEEDS)]


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    print(f"{os.cpu_count()} CPU cores, {args.images} images per resolution, best of {args.repeats} passes")
    print("| px | read | samples/s | step needs | x need |")
    print("|---|---|---|---|---|")
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for px in args.px:
            for what, rate in measure(px, args, folder):
                results.append(dict(px=px, read=what, samples_per_s=rate, need=need(px)))
                print(f"| {px} | {what} | {rate:.1f} | {need(px):.1f} | {rate / need(px):.1f}x |", flush=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
