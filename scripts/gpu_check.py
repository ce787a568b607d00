"""The prepared GPU check: the CUDA tests, the Flux-like bench, a stream-ordering check, one PASS/FAIL table.

Run by ``scripts/gpu_check.sh`` on a machine with an NVIDIA GPU (it installs what that machine lacks first); with
``--dry-run`` every step runs on the CPU at a tiny size (the CUDA tests skip, the CUDA-only figures are "n/a"), which
is how the tests check this script. What it does, in order:

1. ``pytest -m cuda tests``: the CUDA tests (placement on the GPU, side-stream copies, stream ordering, a small bench);
2. ``examples/gpu_bench.py``'s ``run``: a Flux-like bf16 stack (every block streamed through the side stream) against
   no offload and diffusers' ``enable_group_offload(..., use_stream=True)`` from pinned RAM, outputs compared with
   ``torch.equal``; the host-to-device rate of accel_nvme's staging buffers against a plain pinned copy;
3. the ordering check: the same stack, every other block resident in RAM and the others streamed, with every read
   delayed (``--read-delay``) and, on CUDA, every copy on the side stream and every block's compute queued behind a
   spin kernel (``torch.cuda._sleep``), so copies finish late and the CPU runs ahead of the GPU while buffers are
   reused: outputs must stay ``torch.equal`` to no offload, which fails if compute ever reads a group before its
   copy (event) is done or device memory is reused while queued kernels still read it (``record_stream``).

Exit status: 0 when no row FAILs, 1 when one does, 2 without CUDA (unless ``--dry-run``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import gpu_bench  # noqa: E402  (examples/gpu_bench.py: the model, the modes, the transfer rates)

import accel_nvme  # noqa: E402

STEP_TARGET = gpu_bench.STEP_TARGET
RATE_TARGET = gpu_bench.RATE_TARGET
ORDERING_SIZE = {"blocks": 6, "hidden": 1024, "tokens": 1024}
DRY_ORDERING_SIZE = {"blocks": 3, "hidden": 64, "tokens": 16}
SPIN_CYCLES = 20_000_000  # about 10 ms of a spinning kernel at 2 GHz, per block
TESTS_TIMEOUT = 300


@dataclass(frozen=True)
class Row:
    """One line of the table: what was checked, what was found, what is required, and the verdict."""

    check: str
    value: str
    target: str
    verdict: str  # PASS, FAIL, n/a (not measured here) or info (no target)


def verdict(passed: bool | None) -> str:
    """PASS / FAIL, or n/a when nothing was measured."""
    return "n/a" if passed is None else ("PASS" if passed else "FAIL")


# ---------------------------------------------------------------- 1. the CUDA tests


def run_cuda_tests(timeout: int = TESTS_TIMEOUT) -> dict[str, Any]:
    """``pytest -m cuda tests`` in a subprocess; the counts from its JUnit report, and the tail of its output."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-tests-") as folder:
        junit = Path(folder) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
        start = time.perf_counter()
        result = subprocess.run(
            [*command, str(ROOT / "tests")], cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )
        seconds = time.perf_counter() - start
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        if junit.exists():
            suite = ET.parse(junit).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            counts = {key: int(suite.get(key, 0)) for key in counts}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "returncode": result.returncode, "seconds": seconds, "output": result.stdout[-4000:]}


# ---------------------------------------------------------------- 3. stream ordering under slow reads and compute


def slow_reads(reader: Any, delay: float) -> None:
    """Delay every read of ``reader`` by ``delay`` seconds (before the bytes land in the staging buffer)."""
    read = reader._read

    @functools.wraps(read)
    def delayed(*args, **kwargs):
        time.sleep(delay)
        return read(*args, **kwargs)

    reader._read = delayed


def slow_compute(model: torch.nn.Module, cycles: int) -> list[Any]:
    """Queue a spinning kernel before each block's forward on CUDA, so the CPU runs far ahead of the GPU."""
    return [block.register_forward_pre_hook(lambda module, args: torch.cuda._sleep(cycles)) for block in model.blocks]


def slow_side_stream(prefetcher: Any, cycles: int) -> None:
    """Queue a spinning kernel on the side stream before each host-to-device copy, so copies finish late.

    Copies of host-resident groups are ordered for compute by their event alone (no CPU wait): reading one early
    would read uninitialised device memory.
    """
    for name in ("_resident_views", "_copy_to_device"):
        method = getattr(prefetcher, name)

        def delayed(slot, method=method):
            with torch.cuda.device(prefetcher.device), torch.cuda.stream(prefetcher._side_stream):
                torch.cuda._sleep(cycles)
            return method(slot)

        setattr(prefetcher, name, delayed)


def ordering_check(settings: gpu_bench.Settings, read_delay: float, spin_cycles: int = SPIN_CYCLES) -> dict[str, Any]:
    """Stream the stack with delayed reads (and, on CUDA, delayed copies and compute): are the outputs still exact?

    Every other block stays resident in RAM (copied to the device at each use), the others are streamed.
    """
    inputs = gpu_bench.make_inputs(settings)
    reference = gpu_bench.mode_no_offload(replace(settings, steps=1), inputs)["output"]
    gpu_bench.release_memory(settings.device)
    model = gpu_bench.build_model(settings).to("cpu")
    main: int | str = settings.device.index if settings.cuda else "cpu"
    model = accel_nvme.dispatch_model(
        model,
        gpu_bench.nvme_device_map(model, main),
        offload_dir=str(settings.offload_folder),
        main_device=main,
        config=accel_nvme.NvmeConfig(
            prefetch_depth=settings.prefetch_depth,
            resident_budget=settings.blocks // 2 * gpu_bench.block_nbytes(model) + settings.blocks * 4096,
        ),
    )
    prefetcher = _prefetcher(model)  # this check slows its reader and side stream on purpose: it needs the internals
    slow_reads(prefetcher.reader, read_delay)
    handles = []
    if settings.cuda:
        slow_side_stream(prefetcher, spin_cycles)
        handles = slow_compute(model, spin_cycles)
    resident = len(prefetcher.resident)
    outputs = []
    try:
        with torch.inference_mode():
            for _ in range(3):
                outputs.append(model(*inputs))  # no synchronize between forwards: the CPU may run ahead
        gpu_bench.synchronize(settings.device)
        outputs = [output.to("cpu") for output in outputs]
        total = accel_nvme.stats(model).total
    finally:
        for handle in handles:
            handle.remove()
        accel_nvme.close(model, load_back=False)
    return {
        "exact": all(torch.equal(output, reference) for output in outputs),
        "forwards": len(outputs),
        "read_delay_s": read_delay,
        "spin_cycles": spin_cycles if settings.cuda else 0,
        "groups_read": total.groups_read,
        "host_resident_groups": resident,
        "stall_s": total.stall_seconds,
        "cuda_launch_blocking": os.environ.get("CUDA_LAUNCH_BLOCKING", "0"),
    }


def _prefetcher(model: torch.nn.Module) -> Any:
    """The prefetcher the nvme hooks of ``model`` share."""
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        if isinstance(hook, accel_nvme.NvmeAlignDevicesHook):
            return hook.prefetcher
    raise ValueError("the model has no nvme hooks")


# ---------------------------------------------------------------- the table


def rows(report: dict[str, Any]) -> list[Row]:
    """The PASS/FAIL table of a report."""
    out = []
    tests = report.get("cuda_tests")
    if tests is not None:
        value = f"{tests['passed']} passed, {tests['failures'] + tests['errors']} failed, {tests['skipped']} skipped"
        ran = tests["passed"] > 0 if report["cuda"] else None
        failed = tests["failures"] + tests["errors"] > 0 or tests["tests"] == 0
        out.append(Row("CUDA tests (pytest -m cuda)", value, "none fails", verdict(False if failed else ran)))
    bench = report["bench"]
    modes = bench["modes"]
    exact = [entry.get("exact") for name, entry in modes.items() if name != "no_offload"]
    ran = [name for name, entry in modes.items() if entry["status"] == "ok"]
    all_exact = None if not exact or None in exact else all(exact)
    if len(ran) < len(modes):
        all_exact = False
    out.append(
        Row("outputs torch.equal to no offload", f"modes ran: {', '.join(ran)}", "all equal", verdict(all_exact))
    )
    step = bench["targets"]["nvme_vs_diffusers_stream"]
    step_pass = step["pass"] if report["cuda"] else None
    out.append(
        Row("nvme step / diffusers stream (RAM)", _ratio(step["value"]), f"<= {STEP_TARGET:.2f}", verdict(step_pass))
    )
    nvme = modes.get("nvme", {})
    base = modes.get("no_offload", {}).get("step_s")
    if nvme.get("status") == "ok":
        out.append(Row("nvme step / no offload", _ratio(_div(nvme["step_s"], base)), "-", "info"))
        raw = nvme["raw_read"]
        floor = nvme["bytes_read_per_step"] / raw["gb_per_s"] / gpu_bench.GB if raw["gb_per_s"] else None
        out.append(Row("nvme step / drive floor (raw read)", _ratio(_div(nvme["step_s"], floor)), "-", "info"))
        diffusers = modes.get("diffusers_stream", {})
        vram = _div(nvme.get("peak_gpu_bytes"), diffusers.get("peak_gpu_bytes"))
        out.append(Row("peak VRAM nvme / diffusers stream", _ratio(vram), "-", "info"))
    rate = bench["targets"]["side_stream_vs_plain_pinned"]
    rate_value = "-" if rate["value"] is None else f"{rate['value']:.1%}"
    out.append(Row("H2D staging buffers / plain pinned", rate_value, f">= {RATE_TARGET:.0%}", verdict(rate["pass"])))
    ordering = report["ordering"]
    if "error" in ordering:
        out.append(Row("slow reads + queued compute: equal", ordering["error"], "all equal", "FAIL"))
    else:
        what = f"{ordering['forwards']} forwards, reads +{ordering['read_delay_s'] * 1e3:.0f} ms"
        if ordering["spin_cycles"]:
            what += f", {ordering['spin_cycles']:.0e} spin cycles per block"
        what += f", {ordering['host_resident_groups']} groups resident in RAM"
        what += f", compute waited {ordering['stall_s']:.2f} s"
        # the delay must have made compute wait, and both paths (streamed, resident) must have run
        passed = ordering["exact"] and ordering["stall_s"] > 0 and ordering["host_resident_groups"] > 0
        passed = passed and ordering["groups_read"] > 0
        out.append(Row("slow reads + queued compute: equal", what, "all equal, waited", verdict(passed)))
    return out


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


def format_table(report: dict[str, Any]) -> str:
    """The card, the bench's own table, and the PASS/FAIL rows."""
    table = [("check", "value", "target", "verdict"), *((r.check, r.value, r.target, r.verdict) for r in rows(report))]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = [
        f"device: {report['device_name']} | {report['versions']}",
        "",
        gpu_bench.format_report(report["bench"]),
        "",
    ]
    for i, row in enumerate(table):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * width for width in widths))
    failed = [r.check for r in rows(report) if r.verdict == "FAIL"]
    lines.append("")
    lines.append(f"GPU CHECK: {'FAIL (' + '; '.join(failed) + ')' if failed else 'PASS'}")
    if report["dry_run"]:
        lines.append("(dry run on the CPU: the CUDA rows are n/a; the timings say nothing about a GPU)")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(description="The GPU check of accel_nvme: CUDA tests, bench, stream ordering.")
    p.add_argument("--dry-run", action="store_true", help="everything on the CPU at a tiny size")
    p.add_argument("--device", default="cuda:0", help="the CUDA device (default cuda:0)")
    p.add_argument("--blocks", type=int, default=16, help="bench blocks (default 16: 5.4 GB of bf16 weights)")
    p.add_argument("--hidden", type=int, default=3072, help="bench hidden size (default 3072, as Flux)")
    p.add_argument("--tokens", type=int, default=4096, help="bench tokens per step (default 4096: 1024x1024)")
    p.add_argument("--steps", type=int, default=3, help="timed bench steps per mode (default 3)")
    p.add_argument(
        "--prefetch-depth", type=int, default=1, help="nvme read-ahead (default 1: the VRAM of diffusers' stream)"
    )
    p.add_argument("--read-delay", type=float, default=0.02, help="seconds added to every read (ordering check)")
    p.add_argument("--skip-tests", action="store_true", help="do not run pytest -m cuda")
    p.add_argument("--offload-folder", type=Path, default=None, help="group files (default: a temporary folder here)")
    p.add_argument("--json", type=Path, default=None, help="also write the whole report here")
    return p


def _settings(args: argparse.Namespace, folder: Path, size: dict[str, int]) -> gpu_bench.Settings:
    device = torch.device("cpu") if args.dry_run else torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    return gpu_bench.Settings(
        steps=args.steps,
        device=device,
        modes=gpu_bench.MODES,
        offload_folder=folder,
        dry_run=args.dry_run,
        prefetch_depth=args.prefetch_depth,
        **size,
    )


def check(args: argparse.Namespace, folder: Path, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every step; a step that raises is reported in its row, never hides the others.

    ``save`` gets the report after each step, so a run stopped by its time limit still leaves what it measured.
    """
    size = (
        gpu_bench.DRY_RUN_SIZE
        if args.dry_run
        else {"blocks": args.blocks, "hidden": args.hidden, "tokens": args.tokens}
    )
    settings = _settings(args, folder / "bench", size)
    report: dict[str, Any] = {
        "dry_run": args.dry_run,
        "cuda": settings.cuda,
        "device_name": torch.cuda.get_device_name(settings.device) if settings.cuda else "cpu",
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}",
    }
    if not args.skip_tests:
        gpu_bench.progress("pytest -m cuda tests")
        report["cuda_tests"] = tests = run_cuda_tests()
        gpu_bench.progress(f"{tests['passed']} passed, {tests['failures'] + tests['errors']} failed")
        save(report)
    gpu_bench.progress("bench")
    report["bench"] = gpu_bench.run(settings)
    save(report)
    gpu_bench.release_memory(settings.device)
    gpu_bench.progress("ordering check: slow reads, queued compute")
    ordering_size = DRY_ORDERING_SIZE if args.dry_run else ORDERING_SIZE
    ordering_settings = replace(settings, offload_folder=folder / "ordering", **ordering_size)
    ordering_settings.offload_folder.mkdir(parents=True, exist_ok=True)
    try:
        report["ordering"] = ordering_check(ordering_settings, args.read_delay)
    except Exception as e:  # reported as a FAIL row
        report["ordering"] = {"error": f"{type(e).__name__}: {e}"}
    save(report)
    return report


def save_report(path: Path | None, report: dict[str, Any]) -> None:
    """Write the report as JSON (nothing without a path)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Run the check and print the table; 0 when nothing FAILs, 1 when something does, 2 without CUDA."""
    args = parser().parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA device (or --dry-run to run the same steps on the CPU)", file=sys.stderr)
        return 2
    temporary = args.offload_folder is None
    folder = Path(tempfile.mkdtemp(prefix=".gpu-check-", dir=Path.cwd())) if temporary else args.offload_folder
    (folder / "bench").mkdir(parents=True, exist_ok=True)
    try:
        report = check(args, folder, functools.partial(save_report, args.json))
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
    print(format_table(report))
    return 1 if any(r.verdict == "FAIL" for r in rows(report)) else 0


if __name__ == "__main__":
    sys.exit(main())
