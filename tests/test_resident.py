"""Resident budget: groups that fit a budget are loaded once and stay; only the others are streamed."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import accel_nvme
from accel_nvme import NvmeConfig
from accel_nvme.format import align_up
from accel_nvme.residency import spread_resident

WIDTH = 64
GROUP = align_up((WIDTH * WIDTH + WIDTH) * 4)


def model(depth=8):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(depth)]).eval()


@pytest.mark.parametrize("share", [0, 0.25, 0.5, 0.75, 1.0])
def test_outputs_are_exact_at_every_budget_and_only_the_rest_is_streamed(offload_dir, share):
    x = torch.randn(3, WIDTH)
    expected = model()(x).detach()
    budget = int(share * 8 * GROUP)
    m = accel_nvme.dispatch_model(
        model(), {str(i): "nvme" for i in range(8)}, offload_dir=offload_dir, config=NvmeConfig(resident_budget=budget)
    )
    with torch.inference_mode():
        assert torch.equal(m(x), expected)
        first = accel_nvme.stats(m).total.groups_read
        for _ in range(4):
            assert torch.equal(m(x), expected)
    report = accel_nvme.stats(m)
    assert len(report.resident) == round(share * 8)
    assert report.resident_bytes <= budget
    streamed = 8 - len(report.resident)
    reads = streamed if streamed > 3 else 0  # up to prefetch_depth + 1 streamed groups stay in the staging buffers
    assert abs(report.total.groups_read - first - 4 * reads) <= 2, "resident groups are never read again"


def test_resident_groups_are_spread_evenly():
    assert spread_resident([10] * 8, 40) == {1, 3, 5, 7}
    assert spread_resident([10] * 8, 20) == {3, 7}
    assert spread_resident([10] * 8, 80) == set(range(8))
    assert spread_resident([10] * 8, 0) == set()
    assert spread_resident([10] * 8, 9) == set()
    kept = spread_resident([30, 10, 10, 30, 10, 10], 50)
    assert sum([30, 10, 10, 30, 10, 10][i] for i in kept) <= 50 and len(kept) >= 2


def test_budget_settable_as_size_string_env_and_kwarg(monkeypatch, offload_dir):
    assert NvmeConfig(resident_budget="1MiB").resident_budget == 1 << 20
    assert NvmeConfig(resident_budget="auto").resident_budget == "auto"
    with pytest.raises(ValueError, match="size"):
        NvmeConfig(resident_budget="lots")
    monkeypatch.setenv("ACCEL_NVME_RESIDENT_BUDGET", "auto")
    assert accel_nvme.config.load_config().resident_budget == "auto"
    m = accel_nvme.dispatch_model(model(), {str(i): "nvme" for i in range(8)}, offload_dir=offload_dir)
    assert len(accel_nvme.stats(m).resident) == 8, "auto keeps a small model whole"


RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, accel_nvme
    from torch import nn
    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    torch.manual_seed(0)
    width, layers, share = 2048, 16, float(sys.argv[2])
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).eval()
    group = (width * width + width) * 4
    budget = int(share * layers * group)
    baseline_model = nn.Linear(1, 1)
    config = accel_nvme.NvmeConfig(resident_budget=budget)
    model = accel_nvme.dispatch_model(model, {str(i): "nvme" for i in range(layers)}, offload_dir=sys.argv[1],
                                      main_device="cpu", config=config)
    with torch.inference_mode():
        for _ in range(3):
            model(torch.randn(4, width))
    print(json.dumps({"peak": status("VmHWM"), "group": group, "budget": budget}))
    """
)


@pytest.mark.slow
def test_rss_honours_the_budget(tmp_path):
    """Peak RSS <= import baseline + budget + (depth + 1) x group + the model built in RAM before dispatch."""
    baseline = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "a"), "0"], capture_output=True, text=True, check=True
    )
    half = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "b"), "0.5"], capture_output=True, text=True, check=True
    )
    import json

    zero, fifty = json.loads(baseline.stdout.splitlines()[-1]), json.loads(half.stdout.splitlines()[-1])
    assert fifty["peak"] - zero["peak"] <= fifty["budget"] + (32 << 20)
