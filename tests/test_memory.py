"""Peak RSS while streaming a 1 GB model, measured in a fresh process."""

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, accel_nvme
    from torch import nn

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    torch.manual_seed(0)
    layers, width, depth = 16, 4096, 2
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).eval()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    device_map = {str(i): "nvme" for i in range(layers)}
    config = accel_nvme.NvmeConfig(prefetch_depth=depth)
    model = accel_nvme.dispatch_model(model, device_map, offload_dir=sys.argv[1], main_device="cpu", config=config)
    x = torch.randn(8, width)
    import torch._dynamo  # noqa: F401  (accelerate's root hook imports it on the first forward: library code, not data)
    baseline = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    with torch.inference_mode():
        for _ in range(4):
            model(x)
    group = (width * width + width) * 4
    print(json.dumps({"model_bytes": model_bytes, "baseline": baseline, "peak": status("VmHWM"),
                      "group": group, "depth": depth}))
    """
)


@pytest.mark.slow
def test_peak_rss_is_bounded_by_staging_buffers(tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["model_bytes"] >= 1 << 30
    budget = (figures["depth"] + 1) * figures["group"] + (100 << 20)
    growth = figures["peak"] - figures["baseline"]
    assert growth <= budget, f"forwards grew RSS by {growth >> 20} MiB, allowed {budget >> 20} MiB"
    assert figures["baseline"] < figures["model_bytes"] / 2, "the offloaded weights were not released from RAM"
