"""Cold-forward benchmark of offloading modes on a synthetic model, each mode run in a fresh subprocess.

The parent (``run``) starts one worker per mode (``python -m accel_nvme.bench --mode ...``) so that peak RSS is
the mode's own, compares every worker's outputs with the all-in-RAM model and reports times, bandwidth, memory and
page-cache growth, plus the ratios the design measures against (raw read speed, accelerate and diffusers disk).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import mmap
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MODES = ("ram", "raw_direct", "raw_buffered", "accelerate_disk", "diffusers_disk", "nvme")
RAW_MODES = ("raw_direct", "raw_buffered")
PAGE = 4096
DIRECT_REQUEST_BYTES = 4 << 20
DIRECT_THREADS = 4
BUFFERED_REQUEST_BYTES = 16 << 20
DIFFUSERS_OFFLOAD_TYPE = "leaf_level"  # block_level puts the Linears of a bare Sequential into one group
WORKER_TIMEOUT_S = 1800
MB = 1 << 20


@dataclass(frozen=True)
class BenchConfig:
    """The synthetic model (``layers`` × Linear(hidden, hidden), fp32) and the forwards timed on it."""

    layers: int = 16
    hidden: int = 4096
    batches: tuple[int, ...] = (64, 512)
    forwards: int = 3
    seed: int = 0

    @property
    def model_bytes(self) -> int:
        """Bytes of all weights and biases."""
        return self.layers * (self.hidden * self.hidden + self.hidden) * 4


def hidden_for_size(size_bytes: int, layers: int) -> int:
    """The hidden size (a multiple of 128) that makes ``layers`` fp32 Linear layers weigh about ``size_bytes``."""
    return max(128, round((size_bytes / (4 * layers)) ** 0.5 / 128) * 128)


# ---------------------------------------------------------------- page cache and memory probes


def meminfo_cached_mb() -> float:
    """The ``Cached:`` line of /proc/meminfo, in MiB."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/meminfo has no 'Cached:' line")


def _proc_status_mb(field: str) -> float | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0), so later peaks belong to the forwards."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        logger.debug("cannot reset the peak RSS: %s", e)
        return False
    return True


def drop_page_cache(folder: Path) -> dict[str, float | None]:
    """Evict the files under ``folder`` from the page cache, by fadvise and by drop_caches.

    Returns the MiB each method freed from ``Cached:``, or None where the method failed.
    """
    os.sync()
    freed: dict[str, float | None] = {}
    before = meminfo_cached_mb()
    try:
        for path in (p for p in folder.rglob("*") if p.is_file()):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        freed["fadvise"] = before - meminfo_cached_mb()
    except OSError as e:
        logger.debug("posix_fadvise(DONTNEED) failed: %s", e)
        freed["fadvise"] = None
    before = meminfo_cached_mb()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        freed["drop_caches"] = before - meminfo_cached_mb()
    except OSError as e:
        logger.debug("writing /proc/sys/vm/drop_caches failed: %s", e)
        freed["drop_caches"] = None
    return freed


# ---------------------------------------------------------------- the model and the modes


def build_model(config: BenchConfig):
    """The synthetic Sequential of fp32 Linear layers, with weights fixed by ``config.seed``."""
    import torch

    torch.manual_seed(config.seed)
    return torch.nn.Sequential(*(torch.nn.Linear(config.hidden, config.hidden) for _ in range(config.layers)))


def make_input(config: BenchConfig, batch: int):
    """The input of a forward at ``batch``, fixed by ``config.seed``."""
    import torch

    generator = torch.Generator().manual_seed(config.seed + batch)
    return torch.randn(batch, config.hidden, generator=generator)


def _write_layer_files(config: BenchConfig, folder: Path) -> list[Path]:
    """Write each layer's weight and bias as one file, as the raw modes read them."""
    model = build_model(config)
    paths = []
    for i, layer in enumerate(model):
        path = folder / f"layer_{i:03d}.bin"
        with open(path, "wb") as f:
            f.write(layer.weight.numpy().tobytes())
            f.write(layer.bias.numpy().tobytes())
            os.fsync(f.fileno())
        paths.append(path)
    return paths


def _aligned_buffer(nbytes: int) -> mmap.mmap:
    return mmap.mmap(-1, -(-nbytes // PAGE) * PAGE)


def _submit_direct_reads(pool: ThreadPoolExecutor, fd: int, view: memoryview, size: int) -> list[Future]:
    length = -(-size // PAGE) * PAGE
    return [
        pool.submit(os.preadv, fd, [view[offset : min(offset + DIRECT_REQUEST_BYTES, length)]], offset)
        for offset in range(0, length, DIRECT_REQUEST_BYTES)
    ]


def _setup_raw_direct(config: BenchConfig, folder: Path) -> Callable:
    """Read every layer file with O_DIRECT: 4 threads of 4 MiB requests, two staging buffers taking turns."""
    paths = _write_layer_files(config, folder)
    sizes = [p.stat().st_size for p in paths]
    buffers = [memoryview(_aligned_buffer(max(sizes))) for _ in range(2)]
    pool = ThreadPoolExecutor(DIRECT_THREADS, thread_name_prefix="raw-direct")

    def read_all(_x) -> None:
        total, in_flight = 0, None
        fds = [os.open(p, os.O_RDONLY | os.O_DIRECT) for p in paths]
        try:
            for i, (fd, size) in enumerate(zip(fds, sizes, strict=True)):
                futures = _submit_direct_reads(pool, fd, buffers[i % 2], size)
                if in_flight is not None:
                    total += sum(f.result() for f in in_flight)
                in_flight = futures
            total += sum(f.result() for f in in_flight or [])
        finally:
            for fd in fds:
                os.close(fd)
        if total != sum(sizes):
            raise RuntimeError(f"O_DIRECT read {total} bytes, expected {sum(sizes)} from {folder}")

    return read_all


def _setup_raw_buffered(config: BenchConfig, folder: Path) -> Callable:
    """Read every layer file buffered and sequentially in 16 MiB requests, then drop it from the page cache."""
    paths = _write_layer_files(config, folder)
    sizes = [p.stat().st_size for p in paths]
    view = memoryview(_aligned_buffer(max(sizes)))

    def read_all(_x) -> None:
        for path, size in zip(paths, sizes, strict=True):
            fd = os.open(path, os.O_RDONLY)
            try:
                done = 0
                while done < size:
                    n = os.preadv(fd, [view[done : min(done + BUFFERED_REQUEST_BYTES, size)]], done)
                    if n == 0:
                        raise RuntimeError(f"{path}: read {done} bytes, expected {size}")
                    done += n
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    return read_all


def _setup_ram(config: BenchConfig, folder: Path) -> Callable:
    return build_model(config)


def _setup_accelerate_disk(config: BenchConfig, folder: Path) -> Callable:
    from accelerate import dispatch_model

    device_map = {str(i): "disk" for i in range(config.layers)}
    return dispatch_model(build_model(config), device_map=device_map, main_device="cpu", offload_dir=str(folder))


def _setup_diffusers_disk(config: BenchConfig, folder: Path) -> Callable:
    import torch
    from diffusers.hooks import apply_group_offloading

    model = build_model(config)
    cpu = torch.device("cpu")
    apply_group_offloading(
        model,
        onload_device=cpu,
        offload_device=cpu,
        offload_type=DIFFUSERS_OFFLOAD_TYPE,
        num_blocks_per_group=1,
        offload_to_disk_path=str(folder),
    )
    return model


def _setup_nvme(config: BenchConfig, folder: Path) -> Callable:
    import accel_nvme

    device_map = {str(i): "nvme" for i in range(config.layers)}
    return accel_nvme.dispatch_model(build_model(config), device_map, offload_dir=str(folder), main_device="cpu")


SETUPS: dict[str, Callable[[BenchConfig, Path], Callable]] = {
    "ram": _setup_ram,
    "raw_direct": _setup_raw_direct,
    "raw_buffered": _setup_raw_buffered,
    "accelerate_disk": _setup_accelerate_disk,
    "diffusers_disk": _setup_diffusers_disk,
    "nvme": _setup_nvme,
}


def _skip_reason(mode: str) -> str | None:
    if mode == "diffusers_disk":
        try:
            import diffusers.hooks  # noqa: F401
        except ImportError as e:
            return f"diffusers is not importable: {e}"
    return None


# ---------------------------------------------------------------- the worker


def run_worker(mode: str, config: BenchConfig, folder: Path, outputs_path: Path) -> dict:
    """Set ``mode`` up in this process, time cold forwards and save their outputs; returns the measurements."""
    import torch

    skip = _skip_reason(mode)
    if skip is not None:
        return {"mode": mode, "status": "skipped", "error": skip}
    start = time.perf_counter()
    with torch.inference_mode():
        forward = SETUPS[mode](config, folder)
        gc.collect()
        setup_s = time.perf_counter() - start
        rss_after_setup = _proc_status_mb("VmRSS")
        setup_peak = _proc_status_mb("VmHWM") or 0.0
        peak_reset = _reset_peak_rss()
        drops, batches, outputs = [], [], {}
        for batch in config.batches:
            x = make_input(config, batch)
            forward(x)  # warm-up: the code paths of this batch size are paged in before drop_caches runs
            times, growth, stable = [], [], True
            for _ in range(config.forwards):
                drops.append(drop_page_cache(folder))
                cached = meminfo_cached_mb()
                t0 = time.perf_counter()
                y = forward(x)
                times.append(time.perf_counter() - t0)
                growth.append(meminfo_cached_mb() - cached)
                if y is not None:
                    stable = stable and (batch not in outputs or torch.equal(outputs[batch], y))
                    outputs.setdefault(batch, y)
            batches.append({"batch": batch, "times_s": times, "page_cache_growth_mb": growth, "stable": stable})
    forward_peak = _proc_status_mb("VmHWM") if peak_reset else None
    if outputs:
        torch.save(outputs, outputs_path)
    return {
        "mode": mode,
        "status": "ok",
        "setup_s": setup_s,
        "rss_after_setup_mb": rss_after_setup,
        "forward_peak_rss_mb": forward_peak,
        # the reset above also lowers ru_maxrss, so the process peak takes the peak of the setup into account
        "peak_rss_mb": max(setup_peak, forward_peak or 0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "page_cache_drop": _summarize_drops(drops),
        "diffusers_offload_type": DIFFUSERS_OFFLOAD_TYPE if mode == "diffusers_disk" else None,
        "batches": batches,
    }


def _summarize_drops(drops: list[dict[str, float | None]]) -> dict[str, dict[str, float] | None]:
    """For each drop method: None when it failed, else the MiB it freed (first drop, which follows the warm-up)."""
    return {
        method: None if any(d[method] is None for d in drops) else {"first_freed_mb": drops[0][method]}
        for method in drops[0]
    }


def _worker_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One accel-nvme bench mode (started by `accel-nvme bench`).")
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--config", required=True, help="BenchConfig as JSON")
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--outputs", type=Path, required=True)
    parser.add_argument("--json-out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    fields = json.loads(args.config)
    config = BenchConfig(**{**fields, "batches": tuple(fields["batches"])})
    args.folder.mkdir(parents=True, exist_ok=True)
    result = run_worker(args.mode, config, args.folder, args.outputs)
    args.json_out.write_text(json.dumps(result))


# ---------------------------------------------------------------- the parent


def _machine_info(folder: Path) -> dict:
    import accelerate
    import psutil
    import torch

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    mounts = [p for p in psutil.disk_partitions(all=True) if folder.resolve().is_relative_to(p.mountpoint)]
    mount = max(mounts, key=lambda p: len(p.mountpoint), default=None)
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "ram_gb": psutil.virtual_memory().total / 1e9,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "accelerate": accelerate.__version__,
        "diffusers": diffusers_version,
        "folder": str(folder.resolve()),
        "filesystem": f"{mount.device} ({mount.fstype})" if mount else None,
    }


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _run_mode(mode: str, config: BenchConfig, root: Path) -> dict:
    """Run one mode in a fresh interpreter; a failing worker becomes a 'failed' result, never an exception."""
    json_out = root / f"{mode}.json"
    command = [
        sys.executable,
        "-m",
        "accel_nvme.bench",
        "--mode",
        mode,
        "--config",
        json.dumps(asdict(config)),
        "--folder",
        str(root / mode),
        "--outputs",
        str(root / f"{mode}.outputs.pt"),
        "--json-out",
        str(json_out),
    ]
    package_parent = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
    logger.info("running mode %s", mode)
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "status": "failed", "error": f"timed out after {WORKER_TIMEOUT_S} s"}
    logger.debug("worker %s stderr:\n%s", mode, done.stderr)
    shutil.rmtree(root / mode, ignore_errors=True)
    if done.returncode != 0 or not json_out.exists():
        error = f"exit status {done.returncode}: {_last_line(done.stderr)}"
        logger.warning("mode %s failed, %s", mode, error)
        return {"mode": mode, "status": "failed", "error": error}
    logger.info("mode %s done in %.1f s", mode, time.perf_counter() - start)
    return json.loads(json_out.read_text())


def _compare_outputs(result: dict, outputs: Path, reference: Path | None) -> None:
    """Add per-batch time statistics, GB/s and exactness (``torch.equal`` with the ram mode) to ``result``."""
    import torch

    mine = torch.load(outputs) if outputs.exists() else None
    ref = torch.load(reference) if reference is not None and reference.exists() else None
    for entry in result["batches"]:
        entry["min_s"] = min(entry["times_s"])
        entry["median_s"] = statistics.median(entry["times_s"])
        entry["gb_per_s"] = result["model_bytes"] / entry["min_s"] / 1e9
        batch = entry["batch"]
        if mine is None or ref is None or batch not in mine or batch not in ref:
            entry["exact"], entry["max_abs_diff"] = None, None
            continue
        entry["exact"] = bool(torch.equal(mine[batch], ref[batch])) and entry["stable"]
        entry["max_abs_diff"] = float((mine[batch] - ref[batch]).abs().max())


def _ratios(results: list[dict], batches: Iterable[int]) -> dict[str, dict[str, float | None]]:
    """nvme against the bound max(raw best, ram) and its speed-up over accelerate and diffusers, on min times."""

    def best(mode: str, batch: int) -> float | None:
        for r in results:
            if r["mode"] == mode and r["status"] == "ok":
                return next(e["min_s"] for e in r["batches"] if e["batch"] == batch)
        return None

    ratios: dict[str, dict[str, float | None]] = {
        "nvme_over_bound": {},
        "nvme_speedup_over_accelerate_disk": {},
        "nvme_speedup_over_diffusers_disk": {},
    }
    for batch in batches:
        nvme = best("nvme", batch)
        raw = [t for t in (best(m, batch) for m in RAW_MODES) if t is not None]
        candidates = [t for t in (min(raw, default=None), best("ram", batch)) if t is not None]
        bound = max(candidates, default=None)
        key = str(batch)
        ratios["nvme_over_bound"][key] = nvme / bound if nvme and bound else None
        for other in ("accelerate_disk", "diffusers_disk"):
            t = best(other, batch)
            ratios[f"nvme_speedup_over_{other}"][key] = t / nvme if nvme and t else None
    return ratios


def run(
    config: BenchConfig,
    modes: Iterable[str] = MODES,
    offload_folder: str | os.PathLike | None = None,
    json_path: str | os.PathLike | None = None,
) -> dict:
    """Run each mode in its own subprocess under a fresh temporary folder and gather the report.

    The folder is created inside ``offload_folder`` (default: the current directory) and removed at the end.
    """
    modes = [m for m in MODES if m in set(modes)]
    root = Path(tempfile.mkdtemp(prefix="accel-nvme-bench-", dir=offload_folder or "."))
    try:
        machine = _machine_info(root)
        results = []
        for mode in modes:
            result = _run_mode(mode, config, root)
            if result["status"] == "ok":
                result["model_bytes"] = config.model_bytes
                reference = root / "ram.outputs.pt" if "ram" in modes else None
                _compare_outputs(result, root / f"{mode}.outputs.pt", reference)
            results.append(result)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = {
        "machine": machine,
        "config": {**asdict(config), "model_bytes": config.model_bytes, "modes": modes},
        "modes": results,
        "ratios": _ratios(results, config.batches),
    }
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=2))
    return report


# ---------------------------------------------------------------- the printed report


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _exact_text(mode: str, entry: dict) -> str:
    if mode == "ram":
        return "ref"
    if mode in RAW_MODES or entry["exact"] is None:
        return "n/a"
    return "yes" if entry["exact"] else f"no (max |diff| {entry['max_abs_diff']:.3g})"


def format_report(report: dict) -> str:
    """The report as a text table followed by the nvme ratios."""
    config = report["config"]
    header = (
        "mode",
        "batch",
        "cold fwd s min/median",
        "GB/s",
        "RSS setup MB",
        "fwd peak RSS MB",
        "process peak RSS MB",
        "cache growth MB",
        "exact",
    )
    rows = []
    for r in report["modes"]:
        if r["status"] != "ok":
            rows.append((r["mode"], "-", r["status"], "", "", "", "", "", ""))
            continue
        for e in r["batches"]:
            rows.append(
                (
                    r["mode"],
                    str(e["batch"]),
                    f"{e['min_s']:.3f} / {e['median_s']:.3f}",
                    f"{e['gb_per_s']:.2f}",
                    _fmt(r["rss_after_setup_mb"], ".0f"),
                    _fmt(r["forward_peak_rss_mb"], ".0f"),
                    f"{r['peak_rss_mb']:.0f}",
                    f"{max(e['page_cache_growth_mb']):.0f}",
                    _exact_text(r["mode"], e),
                )
            )
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    load = report["machine"]["load_average_at_start"]
    lines = [
        f"load average at start: {load[0]:.2f} on {report['machine']['cpus']} CPUs (timings need a quiet machine)",
        f"model: {config['layers']} x Linear({config['hidden']}, {config['hidden']}) fp32 = "
        f"{config['model_bytes'] / 1e9:.2f} GB; {config['forwards']} cold forwards per batch, each after a warm-up",
        " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
        "-+-".join("-" * w for w in widths),
        *(" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows),
    ]
    lines.append(
        "RSS setup: after setup; fwd peak: peak from warm-ups to the end; process peak: the whole worker, building"
        " the model in RAM included; cache growth: largest rise of Cached: in /proc/meminfo over one forward"
    )
    lines += [f"{r['mode']} {r['status']}: {r['error']}" for r in report["modes"] if r["status"] != "ok"]
    drops = next((r["page_cache_drop"] for r in report["modes"] if r["status"] == "ok"), {})
    lines.append("page-cache drop: " + ", ".join(f"{m} {'ok' if v else 'failed'}" for m, v in drops.items()))
    lines.append("ratios on min times (nvme / max(min(raw_direct, raw_buffered), ram); speed-ups = other / nvme):")
    for name, per_batch in report["ratios"].items():
        values = ", ".join(f"batch {b}: {_fmt(v, '.2f')}" for b, v in per_batch.items())
        lines.append(f"  {name}: {values}")
    return "\n".join(lines)


if __name__ == "__main__":
    _worker_main()
