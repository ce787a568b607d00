"""examples/gpu_bench.py: the dry run on the CPU, the refusal without CUDA, the report's GPU lines, a real GPU run."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
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
    for text in (
        "no_offload ",
        "nvme (cold) ",
        "nvme (warm) ",
        "target nvme (cold) / max(drive floor, no_offload) <= 1.10",
    ):
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
    assert report["targets"]["nvme_vs_floor"]["pass"] is False  # 2.2 s against a floor of 8 GB / 6 GB/s = 1.33 s
    assert report["targets"]["nvme_vs_diffusers_stream"]["pass"] is None  # information only
    assert report["targets"]["side_stream_vs_plain_pinned"]["pass"] is True
    text = bench.format_report(report)
    assert "target nvme (cold) / max(drive floor, no_offload) <= 1.10: 1.650 -> FAIL" in text
    assert "info nvme (cold) / diffusers_stream (pinned RAM, no drive): 1.100" in text
    report["modes"]["nvme"]["raw_read"]["gb_per_s"] = 3.9  # the drive's floor: 2.05 s
    assert bench.targets(report)["nvme_vs_floor"]["pass"] is True
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


# ---------------------------------------------------------------- scripts/gpu_check.sh (issue 11)

CHECK_SH = SCRIPT.parent.parent / "scripts" / "gpu_check.sh"


def load_check():
    """scripts/gpu_check.py as a module."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", CHECK_SH.with_suffix(".py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


def test_gpu_check_dry_run_runs_every_step_on_the_cpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"))
    result = subprocess.run(
        ["bash", str(CHECK_SH), "--dry-run", "--steps", "1"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-4000:]}"
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["cuda"] is False
    tests = report["cuda_tests"]
    assert tests["tests"] >= 10 and tests["failures"] == tests["errors"] == 0  # collected, skipped without CUDA
    assert tests["skipped"] == tests["tests"]
    check_report(report["bench"], result.stdout.split("\n\n", 1)[1])
    ordering = report["ordering"]
    for phase in ("copies", "compute", "without_wait_event", "without_consumed"):
        run = ordering[phase]
        assert run["exact"] is True and run["forwards"] == 3, phase
        assert run["stall_s"] > 0 or "compute" in phase or "consumed" in phase, phase  # reads delayed: waited
        assert run["host_resident_groups"] == 1 and run["groups_read"] >= 2  # 3 blocks: 1 resident, 2 streamed
    verdicts = {line.split("  ")[0]: line.split()[-1] for line in result.stdout.splitlines() if "  " in line}
    assert verdicts["CUDA tests (pytest -m cuda)"] == "n/a"
    assert verdicts["outputs torch.equal to no offload"] == "PASS"
    assert verdicts["ordering: slow copies (wait on copy)"] == "PASS"
    assert verdicts["ordering: slow compute (ring reuse)"] == "PASS"
    for row in ("H2D staging buffers / plain pinned", "nvme step / max(drive, compute)", "peak VRAM nvme (bench)"):
        assert verdicts[row] == "n/a", row
    assert verdicts["negative control: without wait_event"] == "n/a"
    assert set(report["seconds"]) == {"cuda_tests", "moe", "bench", "ordering"}
    moe = report["moe"]  # the CPU path here: read per expert, nothing copied
    assert moe["exact"] is True and 0 < moe["expert_bytes_read_per_token"] <= moe["routed_bound_per_token"]
    assert verdicts["MoE: generate torch.equal, routed experts only"] == "PASS"
    assert "GPU CHECK: PASS" in result.stdout
    assert "gpu_check.sh: torch" in result.stdout  # the versions line, after the install step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # its temporary folders are gone


def test_gpu_check_without_cuda_exits_2_with_a_clear_message(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(["bash", str(CHECK_SH)], capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert result.returncode == 2
    assert "gpu_check.py needs a CUDA device (or --dry-run" in result.stderr


def gpu_report(step_s: float = 2.1, h2d_ratio: float = 0.93, exact: bool = True, failures: int = 0) -> dict:
    """A CUDA report: compute 1 s per step, 8 GB streamed per step at 4 GB/s (floor 2 s), ring of 2 x 0.5 GB."""
    common = {"status": "ok", "exact": exact, "peak_gpu_bytes": 10 * 10**9}
    bench = {
        "config": {"steps": 3, "blocks": 16, "block_bytes": 5 * 10**8, "prefetch_depth": 1},
        "modes": {
            "no_offload": {**common, "step_s": 1.0, "exact": None},
            "diffusers_stream": {**common, "step_s": 1.5},
            "nvme": {
                **common,
                "step_s": step_s,
                "peak_gpu_bytes": 3 * 10**9,  # bound: 10 - 8 + 1 GB
                "bytes_read_per_step": 8e9,
                "raw_read": {"gb_per_s": 4.0},
                "stats_total": {"stall_seconds": 7 * 1.1},  # 1.1 s per step; allowed: 2 - 1 + 0.2
                "ring_bytes": 10**9,
            },
        },
        "transfer": {"status": "ok"},
        "targets": {"side_stream_vs_plain_pinned": {"value": h2d_ratio, "pass": h2d_ratio >= 0.8}},
    }
    tests = {"tests": 16, "failures": failures, "errors": 0, "skipped": 1, "passed": 15 - failures}
    run = {"exact": True, "forwards": 3, "read_delay_s": 0.02, "spin_cycles": 2e7, "stall_s": 0.3}
    run.update(
        groups_read=9, host_resident_groups=3, control_removed=None, vram_extra_bytes=10**8, ring_bytes=8 * 10**7
    )
    ordering = {
        "activation_bytes": 5 * 10**7,
        "copies": dict(run, phase="copies"),
        "compute": dict(run, phase="compute"),
    }
    ordering["without_wait_event"] = dict(run, exact=False, control_removed="wait_event")
    ordering["without_consumed"] = dict(run, exact=False, control_removed="consumed")
    moe = {
        "exact": True,
        "on_device": ["cuda:0"] * 4,
        "decode_tokens": 7,
        "expert_bytes_read_per_token": 1572864.0,
        "expert_bytes_unused_per_token": 10000.0,
        "expert_bytes_copied_per_token": 1572864.0,
        "routed_bound_per_token": 1572864,
        "experts_bytes": 12582912,
    }
    return {
        "dry_run": False,
        "cuda": True,
        "negative_control": None,
        "cuda_tests": tests,
        "moe": moe,
        "bench": bench,
        "ordering": ordering,
    }


def failing(report: dict) -> list[str]:
    return [row.check for row in load_check().rows(report) if row.verdict == "FAIL"]


def test_gpu_check_passes_a_good_report_and_names_each_row():
    rows = {row.check: row for row in load_check().rows(gpu_report())}
    assert [name for name, row in rows.items() if row.verdict == "FAIL"] == []
    assert rows["nvme step / max(drive, compute)"].value.startswith("1.050x (step 2.100 s, drive 2.000 s")
    assert rows["info: nvme step / diffusers stream (pinned RAM)"].verdict == "info"
    assert rows["negative control: without wait_event"].verdict == "PASS"
    assert all(row.verdict in ("PASS", "info") for row in rows.values())


def _set(report: dict, path: str, value) -> dict:
    *keys, last = path.split(".")
    target = report
    for key in keys:
        target = target[key]
    target[last] = value
    return report


@pytest.mark.parametrize(
    "path, value, failed",
    [
        ("bench.modes.nvme.step_s", 2.3, ["nvme step / max(drive, compute)"]),
        ("bench.modes.nvme.stats_total", {"stall_seconds": 7 * 1.3}, ["GPU idle per step (waiting for weights)"]),
        ("bench.modes.nvme.peak_gpu_bytes", 3.2 * 10**9, ["peak VRAM nvme (bench)"]),
        ("bench.modes.nvme.exact", False, ["outputs torch.equal to no offload"]),
        ("bench.targets.side_stream_vs_plain_pinned.pass", False, ["H2D staging buffers / plain pinned"]),
        (
            "bench.transfer",
            {"status": "error", "reason": "cudaHostRegister failed"},
            ["H2D staging buffers / plain pinned"],
        ),
        ("cuda_tests.failures", 2, ["CUDA tests (pytest -m cuda)"]),
        ("cuda_tests", {"error": "pytest ran past its budget of 150 s"}, ["CUDA tests (pytest -m cuda)"]),
        ("moe.exact", False, ["MoE: generate torch.equal, routed experts only"]),
        ("moe.expert_bytes_copied_per_token", 1572865.0, ["MoE: generate torch.equal, routed experts only"]),
        ("moe.expert_bytes_copied_per_token", 0.0, ["MoE: generate torch.equal, routed experts only"]),
        ("moe.expert_bytes_read_per_token", 1572865.0, ["MoE: generate torch.equal, routed experts only"]),
        ("moe.on_device", ["cpu"] * 4, ["MoE: generate torch.equal, routed experts only"]),
        ("moe", {"error": "StepTimeout: over its budget of 20 s"}, ["MoE: generate torch.equal, routed experts only"]),
        ("ordering.copies.exact", False, ["ordering: slow copies (wait on copy)"]),
        ("ordering.copies.stall_s", 0.0, ["ordering: slow copies (wait on copy)"]),
        ("ordering.compute.host_resident_groups", 0, ["ordering: slow compute (ring reuse)"]),
        ("ordering.compute.vram_extra_bytes", 2 * 10**8, ["VRAM while the CPU runs ahead"]),
        ("ordering.without_wait_event.exact", True, ["negative control: without wait_event"]),
        ("ordering.without_consumed.exact", True, ["negative control: without consumed"]),
        ("bench", {"error": "StepTimeout: over its budget of 200 s"}, ["bench (examples/gpu_bench.py)"]),
        ("ordering", {"error": "StepTimeout: over its budget of 90 s"}, ["ordering: slow copies / slow compute"]),
    ],
)
def test_gpu_check_fails_exactly_the_row_whose_target_is_missed(path, value, failed):
    assert failing(_set(gpu_report(), path, value)) == failed


def test_gpu_check_table_prints_whatever_failed():
    report = _set(gpu_report(), "bench", {"error": "RuntimeError: CUDA out of memory"})
    report.update(device_name="GPU", versions="v", seconds={"bench": 3.0})
    text = load_check().format_table(report)
    line = next(line for line in text.splitlines() if line.startswith("bench (examples/gpu_bench.py)"))
    assert "RuntimeError: CUDA out of memory" in line and line.endswith("FAIL")
    assert "ordering: slow copies (wait on copy)" in text  # the other rows still print
    assert "GPU CHECK: FAIL (bench (examples/gpu_bench.py))" in text


def test_gpu_check_step_budget_stops_a_step_and_reports_it():
    check = load_check()
    report = {}
    check.guarded(report, "slow", 1, lambda: time.sleep(5))
    assert report["slow"] == {"error": "StepTimeout: over its budget of 1 s"}
    assert report["seconds"]["slow"] < 3


def test_gpu_check_after_sigterm_starts_no_more_steps(monkeypatch):
    check = load_check()
    monkeypatch.setattr(check, "_STOPPED", [])
    previous = signal.getsignal(signal.SIGTERM)
    check._stop_on_sigterm()
    try:
        report = {}
        check.guarded(report, "first", 5, lambda: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(5))
        check.guarded(report, "second", 5, lambda: {"ran": True})
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert report["first"] == {"error": "StepTimeout: stopped by the check's overall limit (SIGTERM)"}
    assert report["second"] == {"error": "not run: stopped by the check's overall limit (SIGTERM)"}


def test_gpu_check_budgets_fit_within_the_shell_limit():
    check = load_check()
    limit = int(re.search(r"GPU_CHECK_LIMIT_S:-(\d+)", CHECK_SH.read_text()).group(1))
    assert sum(check.BUDGETS.values()) + 10 + 30 <= limit  # pytest's grace, and start-up
    assert limit + 20 <= 600 - 60  # timeout -k 20, within one device command and a margin to rerun


def test_gpu_check_negative_control_dry_run_patches_and_says_so(tmp_path):
    out = tmp_path / "check.json"
    args = [str(CHECK_SH.with_suffix(".py")), "--dry-run", "--steps", "1", "--skip-tests"]
    result = subprocess.run(
        [sys.executable, *args, "--negative-control", "wait_event", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-4000:]}"
    report = json.loads(out.read_text())
    assert report["ordering"]["copies"]["control_removed"] == "wait_event"
    assert "without_wait_event" not in report["ordering"]  # the controls are the ordering rows themselves
    assert "(negative control: wait_event removed; the ordering rows are expected to FAIL)" in result.stdout


def test_gpu_check_says_when_the_staging_buffer_could_not_be_pinned():
    report = _set(gpu_report(h2d_ratio=0.4), "bench.transfer", {"status": "ok", "staging_pinned": False})
    rows = {row.check: row for row in load_check().rows(report)}
    row = rows["H2D staging buffers / plain pinned"]
    assert row.verdict == "FAIL" and "could not be pinned" in row.value
