"""The README's main command, on small models: every mode runs, the offloaded outputs are exact, the JSON keeps its
schema, and the squeezed regime's ballast holds memory while the modes run and is gone after the bench, also when the
bench is killed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from accel_nvme import bench

BALLAST_BYTES = 1_500_000_000  # enough to see the squeeze work, small enough not to starve tests running alongside
SCHEMA = Path(__file__).resolve().parent / "bench_schema.json"


def _bench_command(tmp_path, *options):
    return [sys.executable, "-m", "accel_nvme.cli", "bench", "--offload-folder", str(tmp_path), *options]


def json_schema(value):
    """The nested keys of a JSON value, in order, with each leaf replaced by its type name (values vary by run)."""
    if isinstance(value, dict):
        return {key: json_schema(v) for key, v in value.items()}
    if isinstance(value, list):
        return [json_schema(v) for v in value]
    return "null" if value is None else type(value).__name__


def _assert_schema(report: dict, name: str) -> None:
    """``report`` has the key structure and value types pinned in tests/bench_schema.json under ``name``."""
    expected = json.loads(SCHEMA.read_text())[name]
    actual = json_schema(report)
    assert actual == expected
    assert json.dumps(actual) == json.dumps(expected), "same keys and types, but in another order"


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """Every mode and a resident share in the whole machine, on a tiny Linear model: (the CLI's result, its JSON)."""
    tmp_path = tmp_path_factory.mktemp("plain")
    out = tmp_path / "bench.json"
    cmd = _bench_command(
        tmp_path,
        "--no-squeeze",
        "--layers",
        "3",
        "--hidden",
        "256",
        "--batch",
        "4,16",
        "--forwards",
        "2",
        "--warm-forwards",
        "1",
        "--modes",
        ",".join(bench.MODES),
        "--resident-budget",
        "0,50",
        "--json",
        str(out),
        "--no-plot",
    )
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("accel-nvme-bench")] == []  # --no-plot: no PNG
    return result, json.loads(out.read_text())


def test_bench_runs_and_reports_exact_outputs(plain_run):
    result, report = plain_run
    assert "nvme" in result.stdout
    assert report["squeeze"] is None
    modes = {m["mode"]: m for m in report["modes"]}
    assert set(modes) == {*bench.MODES, "nvme_resident_50"}
    assert all(m["status"] == "ok" for m in modes.values()), [m.get("error") for m in modes.values()]
    for mode in ("nvme", "accelerate_disk", "diffusers_disk", "nvme_auto", "nvme_resident_50"):
        assert [b["exact"] for b in modes[mode]["batches"]] == [True, True], mode
    assert all(b["page_cache_growth_mb"] is not None for b in modes["nvme"]["batches"])


def test_json_schema_of_a_plain_run(plain_run):
    _assert_schema(plain_run[1], "plain")


def _ballast_pid(stderr_line: str) -> int | None:
    if "ballast (pid " not in stderr_line:
        return None
    return int(stderr_line.split("ballast (pid ")[1].split(")")[0])


def _gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def _squeezed_options(tmp_path, out):
    free = psutil.virtual_memory().available - BALLAST_BYTES
    return _bench_command(
        tmp_path,
        "--free-ram",
        str(free),
        "--size",
        "20MB",
        "--from-pretrained",
        "--batch",
        "4",
        "--forwards",
        "1",
        "--json",
        str(out),
    ), free


@pytest.fixture(scope="module")
def squeezed_run(tmp_path_factory):
    """Every mode and a resident share in a squeezed machine, on a tiny Llama: (the CLI's result, its JSON, free)."""
    tmp_path = tmp_path_factory.mktemp("squeezed")
    out = tmp_path / "bench.json"
    cmd, free = _squeezed_options(tmp_path, out)
    result = subprocess.run(
        [*cmd, "--resident-budget", "50"], capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    return result, json.loads(out.read_text()), free


def test_bench_writes_its_plot_by_default_and_says_where(squeezed_run):
    result = squeezed_run[0]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("plot: ")]
    png = Path(line.removeprefix("plot: "))  # in the folder it ran in
    assert png.name == "accel-nvme-bench.png" and png.parent.name.startswith("squeezed")
    assert png.read_bytes().startswith(b"\x89PNG")


def test_squeezed_bench_runs_every_mode_and_releases_the_ballast(squeezed_run):
    result, report, free = squeezed_run
    pid = next(p for p in map(_ballast_pid, result.stderr.splitlines()) if p)
    assert _gone(pid), f"the ballast (pid {pid}) outlived the bench"
    statuses = {m["mode"]: m["status"] for m in report["modes"]}
    assert set(statuses) == {*bench.MODES, "nvme_resident_50"}
    assert set(statuses.values()) == {"ok"}, [m.get("error") for m in report["modes"]]  # none killed, none failed
    squeeze = report["squeeze"]
    assert squeeze["free_ram_bytes"] == free
    # it holds what is above free (others running tests meanwhile may have taken it all)
    assert squeeze["held_at_start_bytes"] > 0 or squeeze["available_at_start_bytes"] < free + (512 << 20)
    assert set(squeeze["modes"]) == {*bench.MODES, "nvme_resident_50"} - {"ram"}  # ram runs before the squeeze
    for mode, held in squeeze["modes"].items():  # the ballast gives back what others took, while it holds some
        assert held["available_bytes"] < free + (512 << 20), (mode, held)
        assert held["held_bytes"] == 0 or abs(held["available_bytes"] - free) < 512 << 20, (mode, held)
    modes = {m["mode"]: m for m in report["modes"]}
    assert modes["ram"]["squeezed"] is False and modes["nvme_auto"]["squeezed"] is True
    for mode in ("accelerate_disk", "diffusers_disk", "nvme", "nvme_auto"):
        assert modes[mode]["batches"][0]["exact"] is True, mode
    assert report["nvme_auto"]["batches"]["4"]["warm_s"] > 0
    assert "squeezed: a ballast process held" in result.stdout


def test_json_schema_of_a_squeezed_run(squeezed_run):
    _assert_schema(squeezed_run[1], "squeezed")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["killed", "ctrl-c"])
def test_stopped_bench_takes_its_ballast_and_worker_with_it(tmp_path, sig):
    cmd, _ = _squeezed_options(tmp_path, tmp_path / "bench.json")
    process = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        pid = None
        for line in process.stderr:
            pid = pid or _ballast_pid(line)
            if pid and "running mode" in line:  # the ballast is up and a worker runs in the squeezed machine
                break
        assert pid is not None, "the bench never started its ballast"
        time.sleep(1.0)  # the worker starts right after the line
        workers = [p.pid for p in psutil.Process(process.pid).children() if p.pid != pid]
        os.kill(process.pid, sig)
        assert process.wait(timeout=60) == (130 if sig == signal.SIGINT else -signal.SIGKILL)
        assert _gone(pid), f"the ballast (pid {pid}) outlived the stopped bench"
        assert all(_gone(w) for w in workers), "a worker outlived the stopped bench"
        if sig == signal.SIGINT:  # Ctrl-C also cleans up the temporary folder
            assert [p.name for p in tmp_path.iterdir() if p.name.startswith("accel-nvme-bench")] == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize(
    ("free_ram", "message"), [("100TB", "is more than the"), ("100MB", "is too small to run a mode")]
)
def test_free_ram_refused_when_too_large_or_too_small(tmp_path, free_ram, message):
    result = subprocess.run(
        _bench_command(tmp_path, "--free-ram", free_ram), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert message in result.stderr and "--free-ram" in result.stderr
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_storage_dtype_streams_fewer_bytes_with_exact_outputs(tmp_path):
    """``--storage-dtype float8_e4m3fn``: the same Linear model stored in fp8 (computed in fp32) streams a quarter of
    fp32's bytes per forward, and every offloading mode gives the RAM model's outputs."""
    out = tmp_path / "bench.json"
    options = ["--no-squeeze", "--layers", "6", "--hidden", "256", "--batch", "4", "--forwards", "2"]
    options += ["--warm-forwards", "0", "--modes", "ram,nvme,accelerate_disk", "--storage-dtype", "float8_e4m3fn"]
    options += ["--no-plot"]
    result = subprocess.run(
        _bench_command(tmp_path, *options, "--json", str(out)), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert "Linear(256, 256) float8_e4m3fn (computed in fp32)" in result.stdout
    report = json.loads(out.read_text())
    assert report["config"]["model_bytes"] == 6 * (256 * 256 + 256)
    modes = {m["mode"]: m for m in report["modes"]}
    assert all(m["status"] == "ok" for m in modes.values()), [m.get("error") for m in modes.values()]
    assert modes["nvme"]["batches"][0]["exact"] and modes["accelerate_disk"]["batches"][0]["exact"]
    streamed = modes["nvme"]["batches"][0]["streamed_bytes"]
    # every group once per forward, the one read ahead across the wrap-around included: the fp8 bytes (a page per
    # group of padding), a quarter of fp32's
    assert all(report["config"]["model_bytes"] <= s <= report["config"]["model_bytes"] + 6 * 4096 for s in streamed)
