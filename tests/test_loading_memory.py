"""Peak RSS of a whole ``from_pretrained(..., offload_backend="nvme")`` load of a >= 2 GB checkpoint.

The bench's writer puts the checkpoint on disk shard by shard (random tensors, one layer per shard), so it never
exists whole in RAM, here or in the loading process. A fresh subprocess imports accel_nvme and transformers, loads
it with every module on nvme, runs one short forward and reports its VmHWM, counted from process start.
"""

import json
import subprocess
import sys
import textwrap
import time

import pytest

from accel_nvme import bench

PREFETCH_DEPTH = 2  # NvmeConfig's default; the loading script passes it explicitly
MIN_CHECKPOINT_BYTES = 2_000_000_000
SHAPE = bench.LlamaShape(hidden=2048, layers=10, vocab=4096)  # fp32, one shard per decoder layer: 2.12 GB

SCRIPT = textwrap.dedent(
    """
    import json, pathlib, sys, time
    start = time.perf_counter()
    import torch, transformers, accel_nvme
    from transformers import AutoModelForCausalLM

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    checkpoint, offload, depth = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3])
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint,
        device_map="auto",
        max_memory={"cpu": "20KB"},
        offload_backend="nvme",
        offload_folder=str(offload),
        nvme_prefetch_depth=depth,
        nvme_copy=True,  # what this bounds is the writing of group files; streamed in place, nothing is written
    )
    loaded = time.perf_counter()
    after_load = status("VmHWM")
    ids = torch.randint(3, 4000, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = model(ids).logits
    groups = sorted(offload.rglob("group-*.safetensors"))
    manifests = list(offload.rglob("manifest.json"))
    data_bytes = [g["data_bytes"] for m in manifests for g in json.loads(m.read_text())["groups"]]
    print(json.dumps({
        "peak": status("VmHWM"),
        "peak_after_load": after_load,
        "rss_end": status("VmRSS"),
        "largest_group_file": max(p.stat().st_size for p in groups),
        "largest_group_data": max(data_bytes),
        "groups": len(groups),
        "devices": sorted(set(model.nvme_device_map.values())),
        "checkpoint_bytes": sum(p.stat().st_size for p in checkpoint.glob("*.safetensors")),
        "logits_shape": list(logits.shape),
        "logits_finite": bool(torch.isfinite(logits).all()),
        "load_s": loaded - start,
        "total_s": time.perf_counter() - start,
    }))
    """
)


@pytest.mark.slow
def test_peak_rss_of_a_2gb_nvme_load_is_bounded(tmp_path):
    checkpoint, offload = tmp_path / "checkpoint", tmp_path / "offload"
    checkpoint.mkdir()
    offload.mkdir()
    total = bench.write_llama_checkpoint(SHAPE, checkpoint)
    assert total >= MIN_CHECKPOINT_BYTES

    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(checkpoint), str(offload), str(PREFETCH_DEPTH)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    wall = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-4000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])

    assert figures["checkpoint_bytes"] >= MIN_CHECKPOINT_BYTES
    assert figures["devices"] == ["nvme"], figures["devices"]
    assert figures["groups"] >= 12, "expected a group per decoder layer plus embeddings, norm and head"
    assert figures["logits_shape"] == [1, 8, SHAPE.vocab] and figures["logits_finite"]
    group = figures["largest_group_file"]
    assert group >= figures["largest_group_data"]
    budget = (1 << 30) + group * (PREFETCH_DEPTH + 2)
    print(
        f"peak RSS {figures['peak'] / 2**20:.0f} MiB (after load {figures['peak_after_load'] / 2**20:.0f} MiB), "
        f"largest group {group / 2**20:.1f} MiB, bound {budget / 2**20:.0f} MiB, "
        f"checkpoint {figures['checkpoint_bytes'] / 1e9:.2f} GB, subprocess {wall:.1f} s"
    )
    assert figures["peak"] <= budget, (
        f"loading a {figures['checkpoint_bytes'] / 1e9:.2f} GB checkpoint peaked at {figures['peak'] >> 20} MiB RSS, "
        f"allowed {budget >> 20} MiB (1 GiB + {PREFETCH_DEPTH + 2} x {group >> 20} MiB group)"
    )
