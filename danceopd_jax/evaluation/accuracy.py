"""The scorers measured on ground truth, and on images that show nothing.

Ground truth: renders of random scenes and edits (``scenes.sample_scene`` / ``local_edit`` /
``global_edit``), plain, realistic, with mild gaussian noise, and "degraded" (blurred, then noised
more). Controls: pure noise, blank (uniform) images, and "swapped" images (each scored against
another item's spec, i.e. the chance level of a scorer that reads the image perfectly), and for
realism, realistic renders with the objects left out (a realistic background but no scene). At
any image size (the benchmark samples 16 px); used by the tests and the results report, and
printed by ``python -m danceopd_jax.evaluation.accuracy [IMAGE_SIZE]``.
"""

import dataclasses
import sys

import numpy as np
from scipy import ndimage

from danceopd_jax.data import scenes
from danceopd_jax.evaluation import metrics

IMAGE_SIZE = 32  # the default: the parser's native size (the benchmark samples 16 px)


def render_all(items, realistic: bool = False, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Renders [N, S, S, 3] of a list of scenes (S = ``image_size``)."""
    return np.stack([scenes.render(scene, image_size, realistic) for scene in items])


def with_noise(images: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Images plus gaussian noise of ``std`` ([-1, 1] units), clipped to [-1, 1]."""
    return np.clip(images + rng.normal(0.0, std, images.shape), -1.0, 1.0).astype(np.float32)


def degraded(images: np.ndarray, rng: np.random.Generator, blur: float = 0.7, std: float = 0.1) -> np.ndarray:
    """Images blurred (gaussian, ``blur`` pixels) then noised (``std``): roughly a small model's softness."""
    return with_noise(ndimage.gaussian_filter(images, (0, blur, blur, 0)), std, rng)


def noise_images(num: int, rng: np.random.Generator, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Pure noise: half standard normal (clipped to [-1, 1], as a rollout starts), half uniform."""
    half = num // 2
    normal = np.clip(rng.normal(size=(half, image_size, image_size, 3)), -1.0, 1.0)
    uniform = rng.uniform(-1.0, 1.0, (num - half, image_size, image_size, 3))
    return np.concatenate([normal, uniform]).astype(np.float32)


def blank_images(num: int, rng: np.random.Generator, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Uniform images of random colours."""
    return np.broadcast_to(rng.uniform(-1.0, 1.0, (num, 1, 1, 3)), (num, image_size, image_size, 3)).astype(np.float32)


def edit_pairs(num: int, rng: np.random.Generator, edit) -> tuple[list, list]:
    """``num`` random (source, target) scene pairs of ``edit`` (``scenes.local_edit`` or ``global_edit``)."""
    sources = [scenes.sample_scene(rng) for _ in range(num)]
    return sources, [edit(source, rng)[1] for source in sources]


def _prefixed(prefix: str, scores: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}/{name}": value for name, value in scores.items()}


def measure(num_scenes: int = 300, seed: int = 0, image_size: int = IMAGE_SIZE) -> dict[str, float]:
    """Accuracy of every scorer on ground truth and on the controls at ``image_size``, as one flat dict."""
    rng = np.random.default_rng(seed)
    prompts = [scenes.sample_scene(rng) for _ in range(num_scenes)]
    plain, realistic = render_all(prompts, image_size=image_size), render_all(prompts, True, image_size)
    backgrounds = render_all([dataclasses.replace(scene, objects=()) for scene in prompts], True, image_size)
    local_pairs = edit_pairs(num_scenes, rng, scenes.local_edit)
    global_pairs = edit_pairs(num_scenes, rng, scenes.global_edit)
    local_images = render_all(local_pairs[1], image_size=image_size)
    global_images = render_all(global_pairs[1], image_size=image_size)
    swap = np.roll(np.arange(num_scenes), 1)
    local_noisy, global_noisy = with_noise(local_images, 0.05, rng), with_noise(global_images, 0.05, rng)
    local_degraded, global_degraded = degraded(local_images, rng), degraded(global_images, rng)
    results = {
        **_prefixed("t2i/plain", metrics.t2i_scores(plain, prompts)),
        **_prefixed("t2i/realistic", metrics.t2i_scores(realistic, prompts)),
        **_prefixed("t2i/noisy_0.05", metrics.t2i_scores(with_noise(plain, 0.05, rng), prompts)),
        **_prefixed("t2i/noisy_0.1", metrics.t2i_scores(with_noise(plain, 0.1, rng), prompts)),
        **_prefixed("t2i/degraded", metrics.t2i_scores(degraded(plain, rng), prompts)),
        **_prefixed("t2i/swapped", metrics.t2i_scores(plain[swap], prompts)),
        **_prefixed("local_edit/renders", metrics.local_edit_scores(local_images, *local_pairs)),
        **_prefixed("local_edit/noisy_0.05", metrics.local_edit_scores(local_noisy, *local_pairs)),
        **_prefixed("local_edit/degraded", metrics.local_edit_scores(local_degraded, *local_pairs)),
        **_prefixed("local_edit/swapped", metrics.local_edit_scores(local_images[swap], *local_pairs)),
        **_prefixed("global_edit/renders", metrics.global_edit_scores(global_images, *global_pairs)),
        **_prefixed("global_edit/noisy_0.05", metrics.global_edit_scores(global_noisy, *global_pairs)),
        **_prefixed("global_edit/degraded", metrics.global_edit_scores(global_degraded, *global_pairs)),
        **_prefixed("global_edit/swapped", metrics.global_edit_scores(global_images[swap], *global_pairs)),
        **_prefixed("realism/plain", metrics.realism_score(plain)),
        **_prefixed("realism/realistic", metrics.realism_score(realistic)),
        **_prefixed("realism/realistic_noisy_0.05", metrics.realism_score(with_noise(realistic, 0.05, rng))),
        **_prefixed("realism/plain_degraded", metrics.realism_score(degraded(plain, rng))),
        **_prefixed("realism/realistic_degraded", metrics.realism_score(degraded(realistic, rng))),
        **_prefixed("realism/realistic_background", metrics.realism_score(backgrounds)),
    }
    for name, images in (("noise", noise_images(num_scenes, rng, image_size)), ("blank", blank_images(num_scenes, rng, image_size))):
        results.update(_prefixed(f"t2i/{name}", metrics.t2i_scores(images, prompts)))
        results.update(_prefixed(f"local_edit/{name}", metrics.local_edit_scores(images, *local_pairs)))
        results.update(_prefixed(f"global_edit/{name}", metrics.global_edit_scores(images, *global_pairs)))
        results.update(_prefixed(f"realism/{name}", metrics.realism_score(images)))
    return results


if __name__ == "__main__":
    for key, value in measure(image_size=int(sys.argv[1]) if len(sys.argv) > 1 else IMAGE_SIZE).items():
        print(f"{key:45s} {value:.3f}")
