"""The README's main command, on a small model: every mode runs and the offloaded outputs are exact."""

import json
import subprocess
import sys


def test_bench_runs_and_reports_exact_outputs(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "accel_nvme.cli",
        "bench",
        "--layers",
        "3",
        "--hidden",
        "256",
        "--batch",
        "4,16",
        "--forwards",
        "2",
        "--modes",
        "ram,raw_direct,nvme,accelerate_disk",
        "--offload-folder",
        str(tmp_path),
        "--json",
        str(out),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "nvme" in result.stdout
    report = json.loads(out.read_text())
    modes = {m["mode"]: m for m in report["modes"]}
    assert set(modes) == {"ram", "raw_direct", "nvme", "accelerate_disk"}
    assert all(m["status"] == "ok" for m in modes.values()), [m.get("error") for m in modes.values()]
    for mode in ("nvme", "accelerate_disk"):
        assert [b["exact"] for b in modes[mode]["batches"]] == [True, True]
    assert all(b["page_cache_growth_mb"] is not None for b in modes["nvme"]["batches"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("accel-nvme-bench")] == []
