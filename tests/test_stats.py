"""accel_nvme.stats(model): per-forward and total figures of the stream."""

import logging

import pytest
import torch
from torch import nn

import accel_nvme
from accel_nvme import NvmeConfig
from accel_nvme.format import align_up


def model(depth=6, width=64):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)]).eval()


def test_stats_per_forward_and_total(offload_dir):
    m = accel_nvme.dispatch_model(
        model(), {str(i): "nvme" for i in range(6)}, offload_dir=offload_dir, config=NvmeConfig(prefetch_depth=2)
    )
    group_bytes = align_up((64 * 64 + 64) * 4)  # what an aligned read of one group fetches
    x = torch.randn(2, 64)
    with torch.inference_mode():
        for _ in range(3):
            m(x)
    report = accel_nvme.stats(m)
    assert report.groups == 6
    assert report.modules == [str(i) for i in range(6)], "which modules are on the nvme tier"
    assert len(report.forwards) == 3
    for forward in report.forwards:
        assert forward.seconds > 0
        assert 1 <= forward.groups_read <= 6 + 2, "a forward's window holds its own reads and the wrap-around ones"
        assert forward.bytes_read == forward.groups_read * group_bytes
        assert 0 <= forward.overlap <= 1
        assert forward.read_seconds > 0 and forward.gb_per_s > 0
    assert report.total.groups_read == sum(f.groups_read for f in report.forwards) >= 18
    assert report.total.bytes_read == report.total.groups_read * group_bytes
    data = report.as_dict()
    assert set(data) == {"groups", "resident", "resident_bytes", "forwards", "total", "modules"}
    assert {"gb_per_s", "overlap", "stall_seconds", "bytes_read"} <= set(data["total"])


def test_history_keeps_the_last_64_forwards(offload_dir):
    m = accel_nvme.dispatch_model(model(depth=2, width=8), {"0": "nvme", "1": "nvme"}, offload_dir=offload_dir)
    with torch.inference_mode():
        for _ in range(70):
            m(torch.randn(1, 8))
    assert len(accel_nvme.stats(m).forwards) == 64


def test_debug_logging_shows_each_group(offload_dir, caplog):
    m = accel_nvme.dispatch_model(model(depth=2, width=8), {"0": "nvme", "1": "nvme"}, offload_dir=offload_dir)
    with caplog.at_level(logging.DEBUG, logger="accel_nvme.prefetch"), torch.inference_mode():
        m(torch.randn(1, 8))
    assert any("bytes read in" in r.getMessage() for r in caplog.records)


def test_stats_of_a_model_without_nvme_modules_is_a_clear_error():
    with pytest.raises(ValueError, match="no modules on the nvme tier"):
        accel_nvme.stats(model())


def test_merged_groups_count_one_forward_per_call(offload_dir):
    m = accel_nvme.dispatch_model(
        model(depth=4, width=16),
        {str(i): "nvme" for i in range(4)},
        offload_dir=offload_dir,
        config=NvmeConfig(group_bytes=1 << 30),
    )
    with torch.inference_mode():
        for _ in range(3):
            m(torch.randn(1, 16))
    assert len(accel_nvme.stats(m).forwards) == 3
