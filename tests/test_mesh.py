"""Tests for danceopd_jax.parallel's meshes: -1 fill, the hybrid (DCN x ICI) layout, one-line errors."""

import dataclasses

import jax
import numpy as np
import pytest

from danceopd_jax import parallel
from danceopd_jax.config_validation import ConfigError


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """What ``mesh_utils`` reads of a non-TPU device, with the granule attributes under test."""

    id: int
    process_index: int
    slice_index: int | None = None
    platform: str = "gpu"
    device_kind: str = "fake"


def hosts(num_hosts: int, per_host: int) -> list[FakeDevice]:
    """GPU-like devices: no slice index, so each process (host) is a granule."""
    return [FakeDevice(i, i // per_host) for i in range(num_hosts * per_host)]


def ids(layout: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda device: device.id)(layout)


def test_mesh_shape_fills_one_axis():
    assert parallel.mesh_shape({"data": -1, "tensor": 2}, 8) == (4, 1, 2)
    assert parallel.mesh_shape({}, 1) == (1, 1, 1)


def test_hybrid_layout_puts_the_outer_factor_across_hosts():
    # 2 hosts x 4 GPUs: data across hosts (DCN), fsdp within a host (NVLink).
    layout = parallel.hybrid_layout({"fsdp": -1}, {"data": 2}, hosts(2, 4))
    assert layout.shape == (2, 4, 1)
    np.testing.assert_array_equal(ids(layout)[:, :, 0], [[0, 1, 2, 3], [4, 5, 6, 7]])
    # fsdp split over both networks: each host holds one contiguous half of the fsdp axis.
    layout = parallel.hybrid_layout({"data": 2, "fsdp": 2}, {"fsdp": 2}, hosts(2, 4))
    assert layout.shape == (2, 4, 1)
    np.testing.assert_array_equal(ids(layout)[:, :, 0], [[0, 1, 4, 5], [2, 3, 6, 7]])


def test_each_process_must_feed_batch_rows_of_its_own():
    """Processes load distinct rows, so no two may hold the same batch block; per-sample route
    groups, laid out per process, also need each process's rows in one block, in process order."""
    data_across_hosts = parallel.hybrid_layout({"fsdp": -1}, {"data": 2}, hosts(2, 4))
    assert parallel.batch_blocks_by_process(data_across_hosts) == {0: {0, 1, 2, 3}, 1: {4, 5, 6, 7}}
    parallel.check_batch_layout(data_across_hosts, grouped=True)

    fsdp_across_hosts = parallel.hybrid_layout({"data": 2, "fsdp": 2}, {"fsdp": 2}, hosts(2, 4))  # rows interleave
    assert parallel.batch_blocks_by_process(fsdp_across_hosts) == {0: {0, 1, 4, 5}, 1: {2, 3, 6, 7}}
    parallel.check_batch_layout(fsdp_across_hosts, grouped=False)  # per-step routing: any distinct rows will do
    with pytest.raises(ConfigError, match=r"^config\.dcn_mesh: per-sample route groups .* process 0 holds blocks \[0, 1, 4, 5\] of 8;"):
        parallel.check_batch_layout(fsdp_across_hosts, grouped=True)

    tensor_across_hosts = parallel.hybrid_layout({"data": 2, "fsdp": 2}, {"tensor": 2}, hosts(2, 4))
    with pytest.raises(ConfigError, match=r"^config\.mesh / config\.dcn_mesh: processes 0 and 1 hold the same batch rows"):
        parallel.check_batch_layout(tensor_across_hosts, grouped=False)


def test_hybrid_layout_groups_by_slice_where_devices_have_one():
    # 2 TPU slices served by 4 processes: slices, not processes, are the granules.
    devices = [FakeDevice(i, i // 2, slice_index=i // 4, platform="cpu") for i in range(8)]
    layout = parallel.hybrid_layout({"fsdp": 2, "tensor": 2}, {"data": -1}, devices)
    assert layout.shape == (2, 2, 2)
    assert {d.slice_index for d in layout[0].ravel()} == {0} and {d.slice_index for d in layout[1].ravel()} == {1}


@pytest.mark.parametrize(
    "ici, dcn, devices, message",
    [
        ({"fsdp": -1}, {"data": 4}, hosts(2, 4), "config.dcn_mesh: axes multiply to 4 but there are 2 processes"),
        ({"fsdp": 3}, {"data": 2}, hosts(2, 4), "config.mesh: axes multiply to 3 but there are 4 devices per process"),
        ({"fsdp": -1}, {"dta": 2}, hosts(2, 4), "config.dcn_mesh: unknown axis 'dta'; valid: data, fsdp, tensor"),
        ({"fsdp": -1}, {"data": 2}, hosts(2, 4)[:7], "config.dcn_mesh: the devices' process_index groups differ in size: [3, 4]"),
    ],
)
def test_hybrid_layout_errors_name_the_setting(ici, dcn, devices, message):
    with pytest.raises(ConfigError) as error:
        parallel.hybrid_layout(ici, dcn, devices)
    assert str(error.value) == message


def test_flat_mesh_when_every_dcn_factor_is_one():
    mesh = parallel.make_mesh({"data": -1}, jax.devices()[:1], {"data": 1, "fsdp": 1, "tensor": 1})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(ConfigError, match=r"^config.dcn_mesh: unknown axis 'dat'"):
        parallel.make_mesh({"data": -1}, jax.devices()[:1], {"dat": 1})
