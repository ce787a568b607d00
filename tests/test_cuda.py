"""The CUDA path: side-stream copies from pinned staging buffers. Skipped without a CUDA device."""

import pytest
import torch
from helpers import IDS_SEED, tiny_lm

import accel_nvme
from accel_nvme import NvmeConfig

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def ids():
    return torch.randint(0, 97, (4, 9), generator=torch.Generator().manual_seed(IDS_SEED))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "device_map",
    [
        {"": "nvme"},
        {
            "embed": 0,
            "body.layers.0": "nvme",
            "body.layers.1": "nvme",
            "body.layers.2": 0,
            "body.layers.3": "nvme",
            "body.final": 0,
            "head": "nvme",
        },
        {"embed": 0, "body.layers": "nvme", "body.final": "cpu", "head": 0},
    ],
    ids=["all_nvme", "nvme_between_gpu", "nvme_gpu_cpu"],
)
def test_cuda_outputs_equal_no_offload_with_wrap_around(offload_dir, dtype, device_map):
    expected = tiny_lm(dtype).to("cuda:0")
    with torch.inference_mode():
        expected = expected(ids().to("cuda:0")).cpu()
    model = accel_nvme.dispatch_model(
        tiny_lm(dtype), device_map, offload_dir=offload_dir, main_device=0, config=NvmeConfig(prefetch_depth=1)
    )
    with torch.inference_mode():
        for _ in range(5):
            assert torch.equal(model(ids().to("cuda:0")).cpu(), expected)
    prefetcher = next(
        m._hf_hook.prefetcher for m in model.modules() if hasattr(m, "_hf_hook") and hasattr(m._hf_hook, "prefetcher")
    )
    assert all(buffer.pinned for buffer in prefetcher._buffers)


def test_cuda_device_memory_is_bounded_by_depth(offload_dir):
    device_map = {"embed": 0, "body.layers": "nvme", "body.final": 0, "head": 0}
    model = accel_nvme.dispatch_model(
        tiny_lm(width=256, depth=8),
        device_map,
        offload_dir=offload_dir,
        main_device=0,
        config=NvmeConfig(prefetch_depth=2),
    )
    torch.cuda.synchronize()
    with torch.inference_mode():
        model(ids().to("cuda:0"))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        for _ in range(3):
            model(ids().to("cuda:0"))
        torch.cuda.synchronize()
    layer_bytes = sum(p.numel() * p.element_size() for p in tiny_lm(width=256, depth=8).body.layers[0].parameters())
    assert torch.cuda.max_memory_allocated() - start < 4 * layer_bytes + (16 << 20)
