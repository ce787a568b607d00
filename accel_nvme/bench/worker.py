"""One mode in its own process (``python -m accel_nvme.bench --mode ...``): set it up, time cold then warm forwards
at each batch, save the outputs for the parent to compare and answer with the measurements as JSON."""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from accel_nvme.bench.ballast import die_with_parent
from accel_nvme.bench.config import BenchConfig
from accel_nvme.bench.models import make_input
from accel_nvme.bench.modes import Mode, parse_mode
from accel_nvme.bench.probes import (
    drop_page_cache,
    files_cached_bytes,
    meminfo_cached_mb,
    proc_status_mb,
    reset_peak_rss,
)
from accel_nvme.bench.results import OK, BatchResult, ModeResult, Residency

logger = logging.getLogger(__name__)

StreamTotals = Callable[[], tuple[int, float]]


@dataclass
class _Forwards:
    """What timed forwards gave, appended as they run: times (s), page-cache growth (MiB; system-wide, and of the
    mode's own files), major page faults, outputs, and for nvme modes the bytes streamed and the seconds stalled."""

    times: list[float] = field(default_factory=list)
    growth: list[float] = field(default_factory=list)
    file_growth: list[float] = field(default_factory=list)
    major_faults: list[int] = field(default_factory=list)
    outputs: list = field(default_factory=list)
    streamed: list[int] = field(default_factory=list)
    stalls: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class _Probe:
    """Where a worker looks while it times forwards: the mode's files, and nvme's running (bytes read, stalls)."""

    folders: list[Path]
    stream: StreamTotals | None


def _timed_forward(forward: Callable, x, probe: _Probe, done: _Forwards) -> None:
    files = files_cached_bytes(probe.folders)
    cached = meminfo_cached_mb()
    before = probe.stream() if probe.stream else None
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    t0 = time.perf_counter()
    done.outputs.append(forward(x))
    done.times.append(time.perf_counter() - t0)
    done.major_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults)
    done.growth.append(meminfo_cached_mb() - cached)
    done.file_growth.append((files_cached_bytes(probe.folders) - files) / (1 << 20))
    if probe.stream and before:
        after = probe.stream()
        done.streamed.append(after[0] - before[0])
        done.stalls.append(after[1] - before[1])


def _timed_forwards(forward: Callable, x, count: int, probe: _Probe, drop: Callable[[], None] | None) -> _Forwards:
    """``count`` forwards, each after ``drop()`` when given."""
    done = _Forwards()
    for _ in range(count):
        if drop is not None:
            drop()
        _timed_forward(forward, x, probe, done)
    return done


def _nvme_stream(forward: Callable) -> tuple[StreamTotals, Residency]:
    """For an nvme mode's forward: a function giving (bytes read, stall seconds) so far, and the model's residency."""
    import accel_nvme

    model = forward.args[0] if isinstance(forward, functools.partial) else forward
    hooks = (getattr(m, "_hf_hook", None) for m in model.modules())
    hook = next(h for h in hooks if isinstance(h, accel_nvme.NvmeAlignDevicesHook))
    before = accel_nvme.stats(model)
    residency = Residency(
        groups=before.groups,
        group_bytes=max(s.nbytes for s in hook.prefetcher.sources),
        resident_groups=len(before.resident),
        resident_bytes=before.resident_bytes,
    )

    def totals() -> tuple[int, float]:
        total = accel_nvme.stats(model).total
        return total.bytes_read, total.stall_seconds

    return totals, residency


def _measure_batch(forward: Callable, config: BenchConfig, batch: int, probe: _Probe, drop: Callable[[], None]):
    """A warm-up, cold then warm forwards at ``batch``: the batch's record and its first output (None: no output)."""
    import torch

    x = make_input(config, batch)
    forward(x)  # warm-up: the code paths of this batch size are paged in before drop_caches runs
    cold = _timed_forwards(forward, x, config.forwards, probe, drop)
    warm = _timed_forwards(forward, x, config.warm_forwards, probe, None)
    ys = [y for y in cold.outputs + warm.outputs if y is not None]
    stream = {"streamed_bytes": cold.streamed + warm.streamed, "stall_s": cold.stalls + warm.stalls}
    entry = BatchResult(
        batch=batch,
        times_s=cold.times,
        page_cache_growth_mb=cold.growth,
        warm_times_s=warm.times,
        warm_page_cache_growth_mb=warm.growth,
        file_cache_growth_mb=cold.file_growth,
        warm_file_cache_growth_mb=warm.file_growth,
        major_faults=cold.major_faults + warm.major_faults,  # pages read back from disk (thrashing)
        stable=all(torch.equal(ys[0], y) for y in ys),
        **(stream if probe.stream is not None else {}),
    )
    return entry, ys[0] if ys else None


def _drop_and_record(folders: list[Path], drops: list[dict[str, float | None]]) -> None:
    drops.append(drop_page_cache(folders))


def _summarize_drops(drops: list[dict[str, float | None]]) -> dict[str, dict[str, float] | None]:
    """For each drop method: None when it failed, else the MiB it freed (first drop, which follows the warm-up)."""
    return {
        method: None if any(d[method] is None for d in drops) else {"first_freed_mb": drops[0][method]}
        for method in drops[0]
    }


@dataclass(frozen=True)
class _Ready:
    """A mode set up: its forward, the seconds it took, the RSS after it and its peak, whether the peak was reset."""

    forward: Callable
    setup_s: float
    rss_after_setup_mb: float | None
    setup_peak_mb: float
    peak_reset: bool


def _set_up(mode: Mode, config: BenchConfig, folder: Path, checkpoint: Path | None) -> _Ready:
    start = time.perf_counter()
    forward = mode.setup(config)(config, folder, checkpoint)
    gc.collect()
    setup_s = time.perf_counter() - start
    return _Ready(forward, setup_s, proc_status_mb("VmRSS"), proc_status_mb("VmHWM") or 0.0, reset_peak_rss())


def run_worker(
    mode: Mode, config: BenchConfig, folder: Path, outputs_path: Path, checkpoint: Path | None
) -> ModeResult:
    """Set ``mode`` up in this process, time cold then warm forwards and save their outputs; returns measurements.

    Cold: the page cache is dropped (fadvise on the files read, then drop_caches) before each forward. Warm: the
    forwards that follow, without dropping.
    """
    import torch

    skip = mode.skip_reason()
    if skip is not None:
        return ModeResult(mode, "skipped", error=skip)
    folders = [folder] if checkpoint is None else [folder, checkpoint]
    drops: list[dict[str, float | None]] = []
    with torch.inference_mode():
        ready = _set_up(mode, config, folder, checkpoint)
        stream, residency = _nvme_stream(ready.forward) if mode.nvme else (None, None)
        probe, drop = _Probe(folders, stream), functools.partial(_drop_and_record, folders, drops)
        batches = config.batches[:1] if mode.raw else config.batches  # a read is the same at any batch
        measured = [_measure_batch(ready.forward, config, batch, probe, drop) for batch in batches]
    forward_peak = proc_status_mb("VmHWM") if ready.peak_reset else None
    outputs = {entry.batch: y for entry, y in measured if y is not None}
    if outputs:
        torch.save(outputs, outputs_path)
    return ModeResult(
        mode,
        OK,
        setup_s=ready.setup_s,
        rss_after_setup_mb=ready.rss_after_setup_mb,
        forward_peak_rss_mb=forward_peak,
        # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork and exec, so it starts at the bench's own RSS
        peak_rss_mb=max(ready.setup_peak_mb, forward_peak or proc_status_mb("VmHWM") or 0.0),
        page_cache_drop=_summarize_drops(drops),
        nvme_residency=residency,
        batches=tuple(entry for entry, _ in measured),
        model_bytes=config.model_bytes,
    )


def _mode_argument(name: str) -> Mode:
    try:
        return parse_mode(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def worker_arguments(argv: list[str] | None, description: str, mode: dict, checkpoint: dict) -> argparse.Namespace:
    """The arguments ``accel-nvme bench`` passes a worker (``mode`` and ``checkpoint``: their own options); the worker
    then dies with the bench, logs, and has its folder."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--mode", required=True, **mode)
    parser.add_argument("--config", required=True, help="the bench's config as JSON")
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, **checkpoint)
    parser.add_argument("--outputs", type=Path, required=True)
    parser.add_argument("--json-out", type=Path, required=True)
    parser.add_argument("--parent-pid", type=int, help="die with this process (the bench)")
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args.folder.mkdir(parents=True, exist_ok=True)
    return args


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m accel_nvme.bench`` (started by ``accel-nvme bench``, one process per mode)."""
    args = worker_arguments(
        argv,
        "One accel-nvme bench mode (started by `accel-nvme bench`).",
        {"type": _mode_argument, "help": "one of MODES, or nvme_resident_<percent>"},
        {"help": "the Llama checkpoint (from_pretrained runs)"},
    )
    config = BenchConfig.from_json(json.loads(args.config))
    result = run_worker(args.mode, config, args.folder, args.outputs, args.checkpoint)
    args.json_out.write_text(json.dumps(result.to_json()))
