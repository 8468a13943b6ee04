"""``config.sample_every``: TensorBoard images of the student's samples per route while it trains,
without changing what it trains; configs it cannot draw for are refused."""

import io

import jax
import numpy as np
import pytest
from PIL import Image

from danceopd_jax import train
from danceopd_jax.config_validation import ConfigError, validate

from conftest import load_config

tf = pytest.importorskip("tensorflow")  # reads the event file (clu's SummaryWriter writes it with TensorFlow)


def _images(workdir) -> dict[tuple[int, str], np.ndarray]:
    """``{(step, tag): uint8 image}`` of the image summaries in ``workdir``'s event files."""
    images = {}
    for path in workdir.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "images":
                    encoded = tf.make_ndarray(value.tensor)[2]  # width, height, then the PNG
                    images[(event.step, value.tag)] = np.asarray(Image.open(io.BytesIO(encoded)))
    return images


def test_samples_are_written_per_route_and_leave_the_training_unchanged(tmp_path):
    config = load_config(num_train_steps=6, log_every=3, checkpoint_every=6)
    plain = train.train_and_evaluate(config, str(tmp_path / "plain"))
    sampled = train.train_and_evaluate(load_config(num_train_steps=6, log_every=3, checkpoint_every=6, sample_every=4,
                                                   samples_per_route=3), str(tmp_path / "sampled"))  # fmt: skip
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(sampled)):
        np.testing.assert_array_equal(a, b)  # the same train state, bit for bit
    images = _images(tmp_path / "sampled")
    size = config.image_size
    assert sorted(images) == [(4, "samples/edit"), (4, "samples/t2i"), (6, "samples/edit"), (6, "samples/t2i")]
    assert images[(6, "samples/t2i")].shape == (size, 3 * size, 3)  # three samples side by side
    assert images[(6, "samples/edit")].shape == (2 * size, 3 * size, 3)  # under their sources
    assert not np.array_equal(images[(4, "samples/t2i")], images[(6, "samples/t2i")])  # the student moved
    assert not _images(tmp_path / "plain")


@pytest.mark.parametrize(
    "overrides,problem",
    [
        ({"sample_every": -1}, "config.sample_every: must be an integer >= 0"),
        ({"sample_every": 5, "samples_per_route": 0}, "config.samples_per_route: must be an integer >= 1"),
        ({"sample_every": 5, "channels": 4}, "config.sample_every: training samples are shown as images, which need 1 or 3 channels"),
        ({"sample_every": 5, "model_dir": "/any/sd3"}, "config.sample_every: training samples are drawn for DiT runs"),
    ],
)
def test_configs_it_cannot_draw_for_are_one_line(overrides, problem):
    name = "sd3_smoke" if "model_dir" in overrides else "smoke"
    with pytest.raises(ConfigError, match="^" + problem.replace(".", r"\.")):
        validate(load_config(name, **overrides))
