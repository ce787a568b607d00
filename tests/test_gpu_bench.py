"""examples/gpu_bench.py: the dry run on the CPU, the refusal without CUDA, the report's GPU lines, a real GPU run."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "gpu_bench.py"
TIMEOUT = 600
NO_CUDA = "needs a CUDA device; run on a machine with an NVIDIA GPU"


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd, env=env
    )


def load_script():
    """examples/gpu_bench.py as a module (registered in sys.modules first, as its dataclasses need)."""
    if "gpu_bench" in sys.modules:
        return sys.modules["gpu_bench"]
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module
    spec.loader.exec_module(module)
    return module


def check_report(report: dict, stdout: str) -> dict:
    """The modes that ran are all exact and finite; the table and the target lines are printed. Returns those modes."""
    ran = {name: entry for name, entry in report["modes"].items() if entry["status"] == "ok"}
    assert {"no_offload", "nvme"} <= set(ran), report["modes"]
    if importlib.util.find_spec("diffusers") is not None:
        assert "diffusers_stream" in ran, report["modes"]["diffusers_stream"]
    for name, entry in ran.items():
        assert entry["exact"] is True, name
        assert entry["finite"] is True, name
        assert entry["step_s"] > 0 and len(entry["steps_s"]) == report["config"]["steps"], name
    nvme = ran["nvme"]
    assert nvme["warm_step_s"] > 0
    assert nvme["group_files"] == report["config"]["blocks"]
    assert nvme["stats_total"]["bytes_read"] >= nvme["files_bytes"] * 0.9
    assert nvme["raw_read"]["bytes"] >= nvme["files_bytes"]
    assert not report["failed"]
    for text in ("mode", "step s (median)", "vs no_offload", "vs diffusers_stream", "exact", "peak GPU GB"):
        assert text in stdout.splitlines()[2]
    for text in ("no_offload ", "nvme (cold) ", "nvme (warm) ", "target nvme (cold) / diffusers_stream <= 1.05"):
        assert text in stdout
    assert "target accel_nvme side-stream H2D >= 80% of plain pinned copy" in stdout
    assert "WARNING" not in stdout
    return ran


def test_dry_run_runs_every_mode_exactly_on_the_cpu(tmp_path):
    out = tmp_path / "report.json"
    result = run(["--dry-run", "--steps", "2", "--json", str(out)], tmp_path)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-4000:]}"
    report = json.loads(out.read_text())
    assert report["config"]["dry_run"] is True
    assert (report["config"]["blocks"], report["config"]["hidden"], report["config"]["tokens"]) == (2, 64, 16)
    check_report(report, result.stdout)
    assert report["transfer"]["status"] == "skipped"
    assert "[dry run on the CPU]" in result.stdout
    assert list(tmp_path.iterdir()) == [out]  # the temporary offload folder is gone


def test_dry_run_with_a_subset_of_modes_and_a_given_folder(tmp_path):
    folder = tmp_path / "offload"
    result = run(["--dry-run", "--steps", "1", "--modes", "nvme", "--offload-folder", str(folder)], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [line.split("  ")[0] for line in result.stdout.splitlines()]
    assert "nvme (cold)" in rows and "no_offload" not in rows
    assert folder.is_dir() and any(folder.iterdir())  # a folder the user names is kept


def test_without_cuda_it_exits_2_with_a_clear_message(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HIP_VISIBLE_DEVICES="")
    result = run(["--steps", "1"], tmp_path, env)
    assert result.returncode == 2
    assert NO_CUDA in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_unknown_mode_is_refused(tmp_path):
    result = run(["--dry-run", "--modes", "no_offload,ram"], tmp_path)
    assert result.returncode == 2
    assert "subset of no_offload,diffusers_stream,nvme" in result.stderr


def test_report_with_gpu_figures_formats_targets():
    bench = load_script()
    config = {"blocks": 24, "hidden": 3072, "tokens": 4096, "steps": 5, "block_bytes": 339_738_624}
    config.update(model_bytes=24 * 339_738_624, device="cuda:0", device_name="GPU", dry_run=False)
    common = {"status": "ok", "exact": True, "peak_gpu_bytes": 10**9, "host_rss_bytes": 2 * 10**9}
    report = {
        "config": config,
        "modes": {
            "no_offload": {**common, "step_s": 1.0},
            "diffusers_stream": {**common, "step_s": 2.0},
            "nvme": {
                **common,
                "step_s": 2.2,
                "warm_step_s": 2.0,
                "stats_total": {"gb_per_s": 5.0, "overlap": 0.9, "stall_seconds": 0.5},
                "bytes_read_per_step": 8e9,
                "stream_gb_per_s": 3.6,
                "raw_read": {"direct": True, "gb_per_s": 6.0, "bytes": 8e9},
            },
        },
        "transfer": {
            "status": "ok",
            "bytes": 339_738_624,
            "repeats": 10,
            "plain_pinned_gb_per_s": 50.0,
            "registered_mmap_gb_per_s": 49.0,
            "accel_nvme_side_stream_gb_per_s": 45.0,
            "ratio": 0.9,
        },
    }
    report["targets"] = bench.targets(report)
    assert report["targets"]["nvme_vs_diffusers_stream"]["pass"] is False  # 1.10 > 1.05
    assert report["targets"]["side_stream_vs_plain_pinned"]["pass"] is True
    text = bench.format_report(report)
    assert "target nvme (cold) / diffusers_stream <= 1.05: 1.100 -> FAIL" in text
    assert "of plain pinned copy: 90.0% -> PASS" in text
    assert "plain pinned 50.00 GB/s" in text and "accel_nvme side stream 45.00 GB/s" in text
    assert "nvme (warm)" in text and "1.00x" in text


def test_device_map_streams_every_block():
    bench = load_script()
    model = bench.FluxLikeTransformer(3, 64, device="meta")
    assert bench.nvme_device_map(model, 0) == {
        "time_embed": 0,
        "proj_in": 0,
        "norm_out": 0,
        "proj_out": 0,
        "blocks.0": "nvme",
        "blocks.1": "nvme",
        "blocks.2": "nvme",
    }
    assert bench.block_nbytes(bench.FluxLikeTransformer(1, 3072, device="meta")) == 2 * (18 * 3072**2 + 15 * 3072)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_small_gpu_run_is_exact_and_reports_rates(tmp_path):
    out = tmp_path / "gpu.json"
    args = ["--blocks", "4", "--hidden", "512", "--tokens", "256", "--steps", "2", "--json", str(out)]
    result = run(args, tmp_path)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-4000:]}"
    report = json.loads(out.read_text())
    ran = check_report(report, result.stdout)
    for name, entry in ran.items():
        assert entry["peak_gpu_bytes"] > 0, name
    transfer = report["transfer"]
    assert transfer["status"] == "ok"
    assert transfer["plain_pinned_gb_per_s"] > 0 and transfer["accel_nvme_side_stream_gb_per_s"] > 0
    assert transfer["registered_mmap_gb_per_s"] is not None
    assert report["targets"]["side_stream_vs_plain_pinned"]["pass"] in (True, False)
    assert report["targets"]["nvme_vs_diffusers_stream"]["value"] is not None
    assert "PASS" in result.stdout or "FAIL" in result.stdout
    assert list(tmp_path.iterdir()) == [out]
