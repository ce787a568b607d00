"""The resident budget's "auto" rule: what is free at dispatch, less the staging buffers and a stated headroom."""

import torch
from torch import nn

import accel_nvme
from accel_nvme.residency import AUTO_HEADROOM_BYTES, auto_headroom, own_file_pages, resident_budget

GB = 1_000_000_000


def test_auto_is_the_free_memory_less_staging_and_headroom():
    assert auto_headroom(4 * GB) == AUTO_HEADROOM_BYTES + 200_000_000
    assert resident_budget("auto", 4 * GB, 300_000_000) == 4 * GB - 300_000_000 - auto_headroom(4 * GB)
    # the squeezed regime of the bench: ~0.85 GB free in the worker, three 51 MB staging buffers
    assert 0.35 * GB < resident_budget("auto", 850_000_000, 154_000_000) < 0.45 * GB


def test_auto_keeps_the_process_own_file_pages_free():
    own = own_file_pages()
    assert own > 1 << 20  # the interpreter and torch's libraries run from mapped files
    assert auto_headroom(4 * GB, own) == auto_headroom(4 * GB) + own
    assert resident_budget("auto", 4 * GB, 0, own) == resident_budget("auto", 4 * GB, 0) - own


def test_auto_never_goes_negative_and_sizes_pass_through():
    assert resident_budget("auto", 200_000_000, 150_000_000) == 0
    assert resident_budget(123_456, 200_000_000, 150_000_000) == 123_456


def test_auto_keeps_a_small_model_whole_through_dispatch(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(64, 64) for _ in range(4))).eval()
    x = torch.randn(2, 64)
    with torch.inference_mode():
        expected = model(x)
    config = accel_nvme.NvmeConfig(resident_budget="auto")
    model = accel_nvme.dispatch_model(model, {str(i): "nvme" for i in range(4)}, offload_dir=tmp_path, config=config)
    with torch.inference_mode():
        assert torch.equal(model(x), expected)
    stats = accel_nvme.stats(model)
    assert len(stats.resident) == 4 and stats.total.bytes_read == 0  # read once at dispatch, never streamed
