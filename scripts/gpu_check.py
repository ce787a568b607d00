"""The prepared GPU check: the CUDA tests, an MoE check, the Flux-like bench, stream-ordering checks with negative
controls, and one PASS/FAIL table.

Run by ``scripts/gpu_check.sh`` on a machine with an NVIDIA GPU (it installs what that machine lacks first); with
``--dry-run`` every code path that does not need CUDA runs on the CPU at a tiny size (the CUDA tests skip, the CUDA-only
rows are "n/a"), which is how the tests check this script. Each step has its own time budget within the total, and its
own row: a step that fails, raises or runs out of time says so in its row, and the table prints whatever happened.

1. ``pytest -m cuda`` on the files holding the CUDA tests (``CUDA_TEST_FILES``);
2. MoE (``moe_check``): greedy generate of a tiny bf16 Qwen3-MoE streamed with its fused experts read per expert,
   ``torch.equal`` to the model in memory on the GPU; the expert bytes read and copied to the GPU per decode token,
   each at most k experts per layer (only the routed experts' rows go to the device);
3. ``examples/gpu_bench.py``'s ``run``: a Flux-like bf16 stack, every block streamed, against no offload (and
   diffusers' in-RAM stream when installed: information only). Targets: outputs ``torch.equal``; nvme step ≤ 1.10 ×
   max(raw read of the bytes it streams, no-offload step); GPU idle time per step (the compute stream waiting for
   copies, timed with events) ≤ its floor max(0, drive − compute) + 10 % of the step floor; peak VRAM ≤ no offload's
   less the streamed weights plus the device ring; staging-buffer copies ≥ 80 % of a plain pinned copy;
4. the ordering checks, on a stack with every other block resident in RAM, three forwards without synchronising:
   "slow copies" (a spin kernel before every copy on the side stream: compute must wait on each copy's event) and
   "slow compute" (a spin kernel before every block: the CPU runs ahead, and the device ring must not refill a buffer
   queued kernels still read). Both must stay ``torch.equal`` to no offload, the compute stream must have waited, and
   the slow-compute run must stay within the ring's VRAM. Then the negative controls: the same two runs with the wait
   on the copy's event removed, and with the ring's wait on the "consumed" event removed (it replaced
   ``record_stream``): each must come out wrong, which proves the ordering rows can fail.
   ``--negative-control wait_event|consumed`` removes one of them from the ordering rows themselves, to see them fail.

Exit status: 0 when no row FAILs, 1 when one does, 2 without CUDA (unless ``--dry-run``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import itertools
import json
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
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
IDLE_SHARE = 0.10  # GPU idle per step allowed beyond max(0, drive - compute): this share of the step floor
VRAM_SLACK = 0.25  # peak VRAM allowed beyond its bound: this share of one device-ring buffer
ORDERING_SIZE = {"blocks": 6, "hidden": 1024, "tokens": 1024}
DRY_ORDERING_SIZE = {"blocks": 3, "hidden": 64, "tokens": 16}
SPIN_CYCLES = 20_000_000  # about 10 ms of a spinning kernel at 2 GHz
COMPUTE_SPIN = 5  # the slow-compute run spins this many times longer per block, and reads without delay: the CPU
# must run well ahead of the GPU for a ring buffer to be refilled while queued kernels still read it
BUDGETS = {"tests": 150, "moe": 20, "bench": 180, "ordering": 90}  # seconds; gpu_check.sh's limit leaves a margin
# Tiny Qwen3-MoE of the MoE step: 4 layers of 16 experts, top 2, bf16; each expert's rows a multiple of 4096 bytes
MOE_CONFIG = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_experts=16,
    num_experts_per_tok=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MOE_NEW_TOKENS = 8
NEGATIVE_CONTROLS = ("wait_event", "consumed")
# The test files holding CUDA tests (a CPU test checks the list): collecting the whole folder would import what the GPU
# machine lacks (hypothesis, matplotlib, diffusers) and count its import errors as CUDA failures.
CUDA_TEST_FILES = (
    "tests/test_cuda.py",
    "tests/test_entrypoints.py",
    "tests/test_gpu_bench.py",
    "tests/test_quantized.py",
)
# What the ordering checks patch (the CPU tests check that each still exists): reads, copies, the compute's wait on a
# copy, the ring's wait on compute.
PATCHED = (
    "accel_nvme.io.FileReader._read",
    "accel_nvme.prefetch.Prefetcher._copy_to_device",
    "accel_nvme.prefetch.hand_to_compute",
    "accel_nvme.transfer.DeviceRing.wait_consumed",
)


@dataclass(frozen=True)
class Row:
    """One line of the table: what was checked, what was found, what is required, and the verdict."""

    check: str
    value: str
    target: str
    verdict: str  # PASS, FAIL, n/a (not measured here, with why) or info (no target)


def verdict(passed: bool | None) -> str:
    """PASS / FAIL, or n/a when nothing was measured."""
    return "n/a" if passed is None else ("PASS" if passed else "FAIL")


def resolve(dotted: str) -> Any:
    """The object a dotted name of ``PATCHED`` names (module, then attributes); AttributeError when it is gone."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            found = getattr(found, attribute)
        return found
    raise ImportError(dotted)


# ---------------------------------------------------------------- time budgets


class StepTimeout(BaseException):
    """A step ran past its budget, or the whole check was told to stop (SIGTERM from gpu_check.sh's timeout); a
    BaseException, so the bench's per-mode ``except Exception`` lets it by."""


@contextlib.contextmanager
def budget(seconds: int) -> Iterator[None]:
    """Raise ``StepTimeout`` in the body after ``seconds`` (SIGALRM; the main thread only)."""

    def expired(signum, frame):
        raise StepTimeout(f"over its budget of {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


_STOPPED: list[str] = []  # set by SIGTERM: the steps left are not started, the table prints at once


def _stop_on_sigterm() -> None:
    def stop(signum, frame):
        _STOPPED.append("the check's overall limit (SIGTERM)")
        raise StepTimeout("stopped by the check's overall limit (SIGTERM)")

    signal.signal(signal.SIGTERM, stop)


def guarded(report: dict[str, Any], key: str, seconds: int, step: Callable[[], dict[str, Any]]) -> None:
    """Run one step within its budget; its report, or ``{"error": ...}`` when it raised or ran out of time (or was
    not started: the check was told to stop)."""
    if _STOPPED:
        report[key] = {"error": f"not run: stopped by {_STOPPED[0]}"}
        return
    start = time.perf_counter()
    try:
        with budget(seconds):
            report[key] = step()
    except (Exception, StepTimeout) as e:
        traceback.print_exc()
        report[key] = {"error": f"{type(e).__name__}: {e}"}
    report.setdefault("seconds", {})[key] = round(time.perf_counter() - start, 1)


# ---------------------------------------------------------------- 1. the CUDA tests


def run_cuda_tests(timeout: int = BUDGETS["tests"]) -> dict[str, Any]:
    """``pytest -m cuda tests`` in a subprocess; the counts from its JUnit report, and the tail of its output."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-tests-") as folder:
        junit = Path(folder) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
        start = time.perf_counter()
        try:
            result = subprocess.run(
                [*command, *(str(ROOT / f) for f in CUDA_TEST_FILES)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            output = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            return {"error": f"pytest ran past its budget of {timeout} s", "output": output[-4000:]}
        seconds = time.perf_counter() - start
        if not junit.exists():
            return {"error": f"pytest wrote no report (exit {result.returncode})", "output": result.stderr[-4000:]}
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "returncode": result.returncode, "seconds": seconds, "output": result.stdout[-4000:]}


# ---------------------------------------------------------------- 2. MoE: only the routed experts go to the device


def moe_check(device: torch.device, folder: Path) -> dict[str, Any]:
    """Greedy generate of a tiny Qwen3-MoE, every module streamed (the fused experts read per expert), against the same
    model in memory on ``device``; the expert bytes read and copied to the device per decode token (no expert cache:
    every routed expert is read), and the bound k experts per layer puts on them."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from accel_nvme.experts import ExpertsHook

    config = Qwen3MoeConfig(**MOE_CONFIG)
    ids = torch.randint(3, config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return Qwen3MoeForCausalLM(config).to(torch.bfloat16).eval()

    def generate(model: torch.nn.Module) -> torch.Tensor:
        inputs = ids.to(device)
        with torch.inference_mode():
            out = model.generate(
                inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=MOE_NEW_TOKENS, do_sample=False
            )
        return out.cpu()

    expected = generate(build().to(device))
    gpu_bench.release_memory(device)
    main: int | str = device.index if device.type == "cuda" else "cpu"
    model = accel_nvme.dispatch_model(
        build(),
        {"": "nvme"},
        offload_dir=str(folder),
        main_device=main,
        config=accel_nvme.NvmeConfig(expert_cache_bytes=0),
    )
    try:
        hooks = [m._hf_hook for m in model.modules() if isinstance(getattr(m, "_hf_hook", None), ExpertsHook)]
        copied: list[int] = []
        model.register_forward_hook(lambda *_: copied.append(sum(h.placement.bytes_copied for h in hooks)))
        tokens = generate(model)
        forwards = accel_nvme.stats(model).forwards
    finally:
        accel_nvme.close(model, load_back=False)
    decode = forwards[1:]
    steps = [after - before for before, after in itertools.pairwise(copied)]
    rows = sum(t.row_bytes for t in hooks[0].tensors) if hooks else 0
    return {
        "exact": torch.equal(tokens, expected),
        "on_device": [str(h.execution_device) for h in hooks],
        "decode_tokens": len(decode),
        "expert_bytes_read_per_token": sum(f.expert_bytes_read - f.expert_bytes_unused for f in decode) / len(decode),
        "expert_bytes_unused_per_token": sum(f.expert_bytes_unused for f in decode) / len(decode),
        "expert_bytes_copied_per_token": sum(steps) / len(steps) if steps else 0,
        "routed_bound_per_token": len(hooks) * config.num_experts_per_tok * rows,
        "experts_bytes": len(hooks) * config.num_experts * rows,
    }


# ---------------------------------------------------------------- 4. stream ordering, and its negative controls


def _patch(owner: Any, name: str, make: Callable[[Any], Any], undo: list[Callable[[], None]]) -> None:
    """Replace ``owner.name`` by ``make(original)``; ``undo`` gets what puts it back."""
    original = getattr(owner, name)  # AttributeError names what was renamed
    setattr(owner, name, make(original))
    undo.append(functools.partial(setattr, owner, name, original))


def _spin(cycles: int) -> None:
    """A kernel that spins ``cycles`` on the current stream (nothing on the CPU)."""
    if cycles and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda._sleep(cycles)


def slow_reads(reader: Any, delay: float, undo: list[Callable[[], None]]) -> None:
    """Delay every read of ``reader`` by ``delay`` seconds (before the bytes land in the staging buffer)."""

    def make(read):
        @functools.wraps(read)
        def delayed(*args, **kwargs):
            time.sleep(delay)
            return read(*args, **kwargs)

        return delayed

    _patch(reader, "_read", make, undo)


def slow_copies(prefetcher: Any, cycles: int, undo: list[Callable[[], None]]) -> None:
    """Queue a spinning kernel on the side stream before each host-to-device copy, so copies finish late."""

    def make(copy):
        def delayed(slot):
            with torch.cuda.device(prefetcher.device), torch.cuda.stream(prefetcher._side_stream):
                _spin(cycles)
            return copy(slot)

        return delayed

    _patch(prefetcher, "_copy_to_device", make, undo)


def slow_compute(model: torch.nn.Module, cycles: int) -> list[Any]:
    """Queue a spinning kernel before each block's forward, so the CPU runs far ahead of the GPU."""
    return [block.register_forward_pre_hook(lambda module, args: _spin(cycles)) for block in model.blocks]


def remove_wait_event(undo: list[Callable[[], None]]) -> None:
    """Negative control: compute no longer waits on a copy's event before using the group."""
    import accel_nvme.prefetch as prefetch

    def make(hand):
        def no_wait(data, copied, device, meter, runtime, asked):
            return data

        return no_wait

    _patch(prefetch, "hand_to_compute", make, undo)


def remove_consumed_wait(prefetcher: Any, undo: list[Callable[[], None]]) -> None:
    """Negative control: the ring refills a device buffer without waiting for compute to be done with it."""
    ring = getattr(prefetcher, "_ring", None)
    if ring is None:  # the CPU has no ring: check the name the patch needs all the same
        resolve("accel_nvme.transfer.DeviceRing.wait_consumed")
        return
    _patch(ring, "wait_consumed", lambda wait: lambda entry, stream: None, undo)


def ordering_run(
    settings: gpu_bench.Settings,
    reference: torch.Tensor,
    phase: str,
    read_delay: float,
    spin_cycles: int,
    control: str | None = None,
) -> dict[str, Any]:
    """Three forwards of the stack, every other block resident in RAM, without synchronising between them, slowed as
    ``phase`` says, with ``control`` removed; are the outputs still exact? "copies": reads delayed by ``read_delay``
    and copies queued behind a spin; "compute": reads at full speed and every block's compute queued behind a long
    spin, so the CPU runs ahead."""
    read_delay = read_delay if phase == "copies" else 0.0
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
    resident = len(prefetcher.resident)
    undo: list[Callable[[], None]] = []
    handles = []
    inputs = gpu_bench.make_inputs(settings)
    outputs = []
    try:
        slow_reads(prefetcher.reader, read_delay, undo)
        slow_copies(prefetcher, spin_cycles if phase == "copies" and settings.cuda else 0, undo)
        if phase == "compute" and settings.cuda:
            handles = slow_compute(model, COMPUTE_SPIN * spin_cycles)
        if control == "wait_event":
            remove_wait_event(undo)
        elif control == "consumed":
            remove_consumed_wait(prefetcher, undo)
        gpu_bench.synchronize(settings.device)
        base = torch.cuda.memory_allocated(settings.device) if settings.cuda else None
        gpu_bench.reset_peak(settings.device)
        with torch.inference_mode():
            for _ in range(3):
                outputs.append(model(*inputs))  # no synchronize between forwards: the CPU may run ahead
        gpu_bench.synchronize(settings.device)
        peak = gpu_bench.peak_gpu_bytes(settings.device)
        outputs = [output.to("cpu") for output in outputs]
        total = accel_nvme.stats(model).total
        ring_bytes = prefetcher.device_buffer_bytes()
    finally:
        for handle in handles:
            handle.remove()
        for put_back in reversed(undo):
            put_back()
        accel_nvme.close(model, load_back=False)
    return {
        "phase": phase,
        "control_removed": control,
        "exact": all(torch.equal(output, reference) for output in outputs),
        "forwards": len(outputs),
        "read_delay_s": read_delay,
        "spin_cycles": (spin_cycles if phase == "copies" else COMPUTE_SPIN * spin_cycles) if settings.cuda else 0,
        "groups_read": total.groups_read,
        "host_resident_groups": resident,
        "stall_s": total.stall_seconds,
        "vram_extra_bytes": None if base is None else peak - base,
        "ring_bytes": ring_bytes,
    }


def ordering_check(
    settings: gpu_bench.Settings,
    read_delay: float,
    spin_cycles: int = SPIN_CYCLES,
    control: str | None = None,
    controls: bool = True,
) -> dict[str, Any]:
    """The two ordering runs (with ``control`` removed, if given), then, when ``controls``, each with its ordering
    removed (the negative controls); plus the reference's activation memory, the VRAM allowance beyond the ring."""
    inputs = gpu_bench.make_inputs(settings)
    reference_run = gpu_bench.mode_no_offload(replace(settings, steps=1), inputs)
    reference = reference_run["output"]
    probe = gpu_bench.build_model(replace(settings, device=torch.device("meta")))
    weights = sum(p.numel() * p.element_size() for p in probe.parameters())
    gpu_bench.release_memory(settings.device)
    result: dict[str, Any] = {
        "activation_bytes": None
        if reference_run["peak_gpu_bytes"] is None
        else reference_run["peak_gpu_bytes"] - weights
    }
    for phase in ("copies", "compute"):
        result[phase] = ordering_run(settings, reference, phase, read_delay, spin_cycles, control)
    if controls and control is None:
        for name, phase in (("wait_event", "copies"), ("consumed", "compute")):
            result[f"without_{name}"] = ordering_run(settings, reference, phase, read_delay, spin_cycles, name)
    return result


def _prefetcher(model: torch.nn.Module) -> Any:
    """The prefetcher the nvme hooks of ``model`` share."""
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        if isinstance(hook, accel_nvme.NvmeAlignDevicesHook):
            return hook.prefetcher
    raise ValueError("the model has no nvme hooks")


# ---------------------------------------------------------------- the table


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e9:.3f} GB"


def test_rows(report: dict[str, Any]) -> list[Row]:
    """The CUDA tests' row."""
    tests = report.get("cuda_tests")
    name = "CUDA tests (pytest -m cuda)"
    if tests is None:
        return [Row(name, "not run (--skip-tests)", "none fails", "n/a")]
    if "error" in tests:
        return [Row(name, tests["error"], "none fails", "FAIL")]
    value = f"{tests['passed']} passed, {tests['failures'] + tests['errors']} failed, {tests['skipped']} skipped"
    failed = tests["failures"] + tests["errors"] > 0 or tests["tests"] == 0
    if failed:
        return [Row(name, value, "none fails", "FAIL")]
    if not report["cuda"]:
        return [Row(name, value + " (no CUDA here)", "none fails", "n/a")]
    return [Row(name, value, "none fails", verdict(tests["passed"] > 0))]


def bench_rows(report: dict[str, Any]) -> list[Row]:
    """Exactness, drive-aware step time, GPU idle time, VRAM and copy rate rows of the bench."""
    bench = report.get("bench", {"error": "not run"})
    if "error" in bench:
        return [Row("bench (examples/gpu_bench.py)", bench["error"], "runs", "FAIL")]
    cuda = report["cuda"]
    no_gpu = "n/a"
    modes = bench["modes"]
    out = []
    exact = [entry.get("exact") for name, entry in modes.items() if name != "no_offload" and entry["status"] == "ok"]
    failed = [name for name, entry in modes.items() if entry["status"] == "error"]
    skipped = [f"{name} ({entry['reason']})" for name, entry in modes.items() if entry["status"] == "skipped"]
    value = f"modes ran: {', '.join(n for n, e in modes.items() if e['status'] == 'ok')}"
    value += f"; failed: {', '.join(failed)}" if failed else ""
    value += f"; skipped: {', '.join(skipped)}" if skipped else ""
    all_exact = False if failed or not exact or None in exact else all(exact)
    out.append(Row("outputs torch.equal to no offload", value, "all equal", verdict(all_exact)))
    nvme, base = modes.get("nvme", {}), modes.get("no_offload", {})
    if nvme.get("status") != "ok" or base.get("status") != "ok":
        return [*out, Row("nvme step / max(drive, compute)", "nvme or no_offload did not run", "", "FAIL")]
    compute = base["step_s"]
    drive = nvme["bytes_read_per_step"] / nvme["raw_read"]["gb_per_s"] / gpu_bench.GB
    floor = max(compute, drive)
    ratio = nvme["step_s"] / floor
    what = f"{_ratio(ratio)} (step {nvme['step_s']:.3f} s, drive {drive:.3f} s, compute {compute:.3f} s)"
    out.append(
        Row(
            "nvme step / max(drive, compute)",
            what,
            f"<= {STEP_TARGET:.2f}",
            verdict(ratio <= STEP_TARGET if cuda else None),
        )
    )
    forwards = 1 + 2 * bench["config"]["steps"]
    idle = nvme["stats_total"]["stall_seconds"] / forwards
    idle_limit = max(0.0, drive - compute) + IDLE_SHARE * floor
    out.append(
        Row(
            "GPU idle per step (waiting for weights)",
            f"{idle:.4f} s" + ("" if cuda else " (CPU: time the thread waited)"),
            f"<= {idle_limit:.4f} s",
            verdict(idle <= idle_limit) if cuda else no_gpu,
        )
    )
    if cuda:
        streamed = bench["config"]["blocks"] * bench["config"]["block_bytes"]
        bound = base["peak_gpu_bytes"] - streamed + nvme["ring_bytes"]
        limit = bound + VRAM_SLACK * nvme["ring_bytes"] / (bench["config"]["prefetch_depth"] + 1)
        peak = nvme["peak_gpu_bytes"]
        out.append(Row("peak VRAM nvme (bench)", _gb(peak), f"<= {_gb(limit)}", verdict(peak <= limit)))
    else:
        out.append(Row("peak VRAM nvme (bench)", "-", "no offload - streamed + ring", no_gpu))
    diffusers = modes.get("diffusers_stream", {})
    if diffusers.get("status") == "ok":
        out.append(
            Row(
                "info: nvme step / diffusers stream (pinned RAM)",
                _ratio(_div(nvme["step_s"], diffusers["step_s"])),
                "-",
                "info",
            )
        )
    transfer = bench["transfer"]
    rate = bench["targets"]["side_stream_vs_plain_pinned"]
    if transfer["status"] == "error":
        out.append(Row("H2D staging buffers / plain pinned", transfer["reason"], f">= {RATE_TARGET:.0%}", "FAIL"))
    else:
        rate_value = "-" if rate["value"] is None else f"{rate['value']:.1%}"
        if transfer.get("staging_pinned") is False:
            rate_value += " (the staging buffer could not be pinned: see the warning)"
        out.append(
            Row("H2D staging buffers / plain pinned", rate_value, f">= {RATE_TARGET:.0%}", verdict(rate["pass"]))
        )
    return out


def ordering_rows(report: dict[str, Any]) -> list[Row]:
    """The ordering runs, the VRAM of the CPU running ahead, and the negative controls."""
    ordering = report.get("ordering", {"error": "not run"})
    if "error" in ordering:
        return [Row("ordering: slow copies / slow compute", ordering["error"], "all equal", "FAIL")]
    cuda = report["cuda"]
    out = []
    for phase, what in (
        ("copies", "ordering: slow copies (wait on copy)"),
        ("compute", "ordering: slow compute (ring reuse)"),
    ):
        run = ordering[phase]
        value = f"{'equal' if run['exact'] else 'NOT EQUAL'}, {run['forwards']} forwards"
        value += f", reads +{run['read_delay_s'] * 1e3:.0f} ms, spin {run['spin_cycles']:.0e} cycles"
        value += f", compute waited {run['stall_s']:.3f} s"
        value += f", {run['groups_read']} reads, {run['host_resident_groups']} groups resident in RAM"
        if run["control_removed"]:
            value += f" [{run['control_removed']} removed]"
        both_paths = run["groups_read"] > 0 and run["host_resident_groups"] > 0
        waited = run["stall_s"] > 0 if phase == "copies" else True
        passed = run["exact"] and both_paths and waited
        out.append(Row(what, value, "equal, both paths, waited", verdict(passed)))
    run = ordering["compute"]
    if cuda and run["vram_extra_bytes"] is not None and ordering["activation_bytes"] is not None:
        limit = run["ring_bytes"] + ordering["activation_bytes"] + VRAM_SLACK * run["ring_bytes"]
        extra = run["vram_extra_bytes"]
        out.append(
            Row(
                "VRAM while the CPU runs ahead",
                _gb(extra),
                f"<= ring + activations = {_gb(limit)}",
                verdict(extra <= limit),
            )
        )
    else:
        out.append(Row("VRAM while the CPU runs ahead", "-", "ring + activations", "n/a"))
    for name in NEGATIVE_CONTROLS:
        control = ordering.get(f"without_{name}")
        label = f"negative control: without {name}"
        if control is None:
            out.append(
                Row(label, f"not run (--negative-control {ordering['copies']['control_removed']})", "NOT equal", "n/a")
            )
        elif not cuda:
            out.append(Row(label, "patched; nothing to reorder on the CPU", "NOT equal", "n/a"))
        else:
            caught = not control["exact"]
            value = "NOT equal: the check catches it" if caught else "still equal: the check cannot see this fault"
            out.append(Row(label, value, "NOT equal", verdict(caught)))
    return out


def moe_rows(report: dict[str, Any]) -> list[Row]:
    """The MoE step: exact tokens, and the expert bytes per decode token within k experts per layer."""
    moe = report.get("moe", {"error": "not run"})
    name = "MoE: generate torch.equal, routed experts only"
    if "error" in moe:
        return [Row(name, moe["error"], "equal, <= k experts per layer", "FAIL")]
    bound = moe["routed_bound_per_token"]
    copied = moe["expert_bytes_copied_per_token"]
    value = f"{'equal' if moe['exact'] else 'NOT EQUAL'}; per decode token: read"
    value += f" {moe['expert_bytes_read_per_token']:.0f} B (+{moe['expert_bytes_unused_per_token']:.0f} read ahead,"
    value += f" unused), copied to the device {copied:.0f} B"
    value += f" of {moe['experts_bytes']} B of experts"
    on_device = all(where.startswith("cuda") for where in moe["on_device"]) and bool(moe["on_device"])
    within = 0 < moe["expert_bytes_read_per_token"] <= bound and (0 < copied <= bound if report["cuda"] else True)
    passed = moe["exact"] and within and (on_device or not report["cuda"])
    return [Row(name, value, f"equal, read and copied <= {bound} B", verdict(passed))]


def rows(report: dict[str, Any]) -> list[Row]:
    """The PASS/FAIL table of a report."""
    return [*test_rows(report), *moe_rows(report), *bench_rows(report), *ordering_rows(report)]


def format_table(report: dict[str, Any]) -> str:
    """The card, the bench's own table, and the PASS/FAIL rows."""
    table = [("check", "value", "target", "verdict"), *((r.check, r.value, r.target, r.verdict) for r in rows(report))]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = [f"device: {report['device_name']} | {report['versions']}", ""]
    bench = report.get("bench", {})
    if "modes" in bench:
        lines += [gpu_bench.format_report(bench), ""]
    for i, row in enumerate(table):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * width for width in widths))
    failed = [r.check for r in rows(report) if r.verdict == "FAIL"]
    lines.append("")
    lines.append(f"step seconds: {report.get('seconds', {})} (budgets {BUDGETS})")
    lines.append(f"GPU CHECK: {'FAIL (' + '; '.join(failed) + ')' if failed else 'PASS'}")
    if report["negative_control"]:
        lines.append(
            f"(negative control: {report['negative_control']} removed; the ordering rows are expected to FAIL)"
        )
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
    p.add_argument("--read-delay", type=float, default=0.02, help="seconds added to every read (ordering checks)")
    p.add_argument(
        "--negative-control",
        choices=NEGATIVE_CONTROLS,
        default=None,
        help="remove the compute's wait on each copy (wait_event) or the ring's wait on compute (consumed) from the "
        "ordering checks: their rows must then FAIL",
    )
    p.add_argument("--skip-tests", action="store_true", help="do not run pytest -m cuda")
    p.add_argument("--offload-folder", type=Path, default=None, help="group files (default: a temporary folder here)")
    p.add_argument("--json", type=Path, default=None, help="also write the whole report here")
    return p


def _settings(args: argparse.Namespace, folder: Path, size: dict[str, int]) -> gpu_bench.Settings:
    device = torch.device("cpu") if args.dry_run else torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    modes = gpu_bench.MODES
    if importlib.util.find_spec("diffusers") is None:  # the GPU machine may have none: its ratio is information only
        modes = tuple(m for m in modes if m != "diffusers_stream")
    return gpu_bench.Settings(
        steps=args.steps,
        device=device,
        modes=modes,
        offload_folder=folder,
        dry_run=args.dry_run,
        prefetch_depth=args.prefetch_depth,
        **size,
    )


def check(args: argparse.Namespace, folder: Path, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every step within its budget; a step that raises or runs out of time is reported in its row, never hides the
    others. ``save`` gets the report after each step, so a run stopped early still leaves what it measured."""
    size = (
        gpu_bench.DRY_RUN_SIZE
        if args.dry_run
        else {"blocks": args.blocks, "hidden": args.hidden, "tokens": args.tokens}
    )
    settings = _settings(args, folder / "bench", size)
    report: dict[str, Any] = {
        "dry_run": args.dry_run,
        "cuda": settings.cuda,
        "negative_control": args.negative_control,
        "device_name": torch.cuda.get_device_name(settings.device) if settings.cuda else "cpu",
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}",
    }
    if not args.skip_tests:
        gpu_bench.progress("pytest -m cuda tests")
        guarded(report, "cuda_tests", BUDGETS["tests"] + 10, functools.partial(run_cuda_tests, BUDGETS["tests"]))
        save(report)
    gpu_bench.progress("MoE: a tiny Qwen3-MoE, routed experts only")
    (folder / "moe").mkdir(parents=True, exist_ok=True)
    guarded(report, "moe", BUDGETS["moe"], functools.partial(moe_check, settings.device, folder / "moe"))
    save(report)
    gpu_bench.release_memory(settings.device)
    gpu_bench.progress("bench")
    guarded(report, "bench", BUDGETS["bench"], functools.partial(gpu_bench.run, settings))
    save(report)
    gpu_bench.release_memory(settings.device)
    gpu_bench.progress("ordering checks: slow copies, slow compute, negative controls")
    ordering_size = DRY_ORDERING_SIZE if args.dry_run else ORDERING_SIZE
    ordering_settings = replace(settings, offload_folder=folder / "ordering", **ordering_size)
    ordering_settings.offload_folder.mkdir(parents=True, exist_ok=True)
    ordering = functools.partial(ordering_check, ordering_settings, args.read_delay, control=args.negative_control)
    guarded(report, "ordering", BUDGETS["ordering"], ordering)
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
    _stop_on_sigterm()
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
