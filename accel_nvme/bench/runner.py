"""The parent of a bench run: one worker process per mode (in a squeezed machine when asked), their outputs compared
with the ram mode's, and the report gathered (``run``)."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

from tqdm import tqdm

from accel_nvme.bench.analysis import Report
from accel_nvme.bench.ballast import Ballast, child_env
from accel_nvme.bench.config import BenchConfig, fits_in_ram, squeezed_max_hidden
from accel_nvme.bench.models import write_llama_checkpoint
from accel_nvme.bench.modes import MODES, Mode, selected_modes
from accel_nvme.bench.probes import folder_bytes
from accel_nvme.bench.results import ModeResult, Squeeze, SqueezePoint

logger = logging.getLogger(__name__)

WORKER_TIMEOUT_S = 1800
PROGRESS_INTERVAL_S = 0.5


def _machine_info(folder: Path, available_bytes: int, before_squeeze_bytes: int) -> dict:
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
        "available_ram_gb": available_bytes / 1e9,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "accelerate": accelerate.__version__,
        "diffusers": diffusers_version,
        "folder": str(folder.resolve()),
        "filesystem": f"{mount.device} ({mount.fstype})" if mount else None,
        "available_before_squeeze_gb": before_squeeze_bytes / 1e9,
    }


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


@contextmanager
def _files_progress(folder: Path, total: int, desc: str, enabled: bool) -> Iterator[Callable[[], None]]:
    """A bar of the bytes written under ``folder`` (a worker's offload files); yields the function that updates it."""
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None if enabled else True) as bar:

        def update() -> None:
            if not bar.disable:
                bar.update(min(total, folder_bytes(folder)) - bar.n)

        yield update


def wait_worker(process: subprocess.Popen, update: Callable[[], None] = lambda: None) -> int | None:
    """Wait for ``process``, updating the bar; None when it ran past the timeout (it is then killed)."""
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    try:
        while True:
            try:
                return process.wait(timeout=PROGRESS_INTERVAL_S)
            except subprocess.TimeoutExpired:
                update()
                if time.monotonic() > deadline:
                    process.kill()
                    process.wait()
                    return None
    except BaseException:  # Ctrl-C: the worker must be gone before the parent removes the folder
        process.kill()
        process.wait()
        raise


def _worker_command(mode: Mode, config: BenchConfig, root: Path, checkpoint: Path | None) -> list[str]:
    return [
        *(sys.executable, "-m", "accel_nvme.bench", "--mode", mode.name, "--config", json.dumps(asdict(config))),
        *("--folder", str(root / mode.folder_name), "--outputs", str(root / f"{mode.name}.outputs.pt")),
        *("--json-out", str(root / f"{mode.name}.json"), "--parent-pid", str(os.getpid())),
        *(["--checkpoint", str(checkpoint)] if checkpoint is not None else []),
    ]


def worker_failure(name: str, returncode: int | None, output: str, json_out: Path) -> tuple[str, str] | None:
    """``(status, error)`` of mode ``name``'s worker when it gave no answer (timed out, killed, failed), else None."""
    if returncode is None:
        return "failed", f"timed out after {WORKER_TIMEOUT_S} s"
    if returncode == -9:
        error = "killed by SIGKILL (the OOM killer, most likely: see dmesg)"
        logger.warning("mode %s %s", name, error)
        return "killed", error
    if returncode != 0 or not json_out.exists():
        error = f"exit status {returncode}: {_last_line(output)}"
        logger.warning("mode %s failed, %s", name, error)
        return "failed", error
    return None


def _outcome(mode: Mode, returncode: int | None, output: str, json_out: Path) -> ModeResult:
    """The worker's answer, or what became of it: a failing worker is a result, never an exception."""
    failure = worker_failure(mode.name, returncode, output, json_out)
    if failure is not None:
        return ModeResult(mode, failure[0], error=failure[1])
    return ModeResult.from_json(json.loads(json_out.read_text()))


def _run_mode(mode: Mode, config: BenchConfig, root: Path, checkpoint: Path | None) -> ModeResult:
    """Run one mode in a fresh interpreter, its output logged to ``<mode>.log`` under ``root``."""
    logger.info("running mode %s", mode.name)
    start = time.perf_counter()
    folder, log_path = root / mode.folder_name, root / f"{mode.name}.log"
    command = _worker_command(mode, config, root, checkpoint)
    with (
        open(log_path, "w") as log,
        _files_progress(folder, config.model_bytes, f"{mode.name}: files", mode.writes(config)) as update,
    ):
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_env())
        returncode = wait_worker(process, update)
    output = log_path.read_text(errors="replace")
    logger.debug("worker %s output:\n%s", mode.name, output)
    if not mode.nvme:  # nvme modes share their group files (reused, not rewritten)
        shutil.rmtree(folder, ignore_errors=True)
    result = _outcome(mode, returncode, output, root / f"{mode.name}.json")
    if result.ok:
        logger.info("mode %s done in %.1f s", mode.name, time.perf_counter() - start)
    return result


def does_not_fit(mode: Mode, config: BenchConfig, available: int) -> ModeResult | None:
    """A "does not fit" result when ``mode`` needs the model in RAM and ``available`` bytes cannot hold it."""
    if mode.needs_ram(config) and not fits_in_ram(config.model_bytes, available):
        error = (
            f"needs the {config.model_bytes / 1e9:.2f} GB model in RAM, {available / 1e9:.1f} GB available"
            " (2 GB kept to spare)"
        )
        return ModeResult(mode, "does not fit", error=error)
    return None


def _measure(mode: Mode, config: BenchConfig, root: Path, checkpoint: Path | None, available: int) -> ModeResult:
    return does_not_fit(mode, config, available) or _run_mode(mode, config, root, checkpoint)


def _run_squeezed(
    modes: list[Mode], config: BenchConfig, root: Path, checkpoint: Path | None, free_ram: int
) -> tuple[list[ModeResult], Squeeze]:
    """Every mode but ``ram`` under a ``Ballast`` that leaves ``free_ram`` bytes available, topped up before each."""
    ballast = Ballast(free_ram)
    at_start = (ballast.held_bytes, ballast.available_bytes)
    points, results = [], []
    try:
        for mode in modes:
            points.append(SqueezePoint(mode.name, *ballast.adjust()))
            results.append(replace(_measure(mode, config, root, checkpoint, free_ram), squeezed=True))
            ballast.check_alive(mode.name)
    finally:
        ballast.close()
    return results, Squeeze(free_ram, *at_start, tuple(points))


def _run_modes(
    modes: list[Mode], config: BenchConfig, root: Path, checkpoint: Path | None, free_ram: int | None, machine: int
) -> tuple[list[ModeResult], Squeeze | None]:
    """Each mode in turn; with ``free_ram``, ``ram`` first in the whole machine (``machine`` bytes available), as
    the reference, then the others squeezed."""
    if free_ram is None:
        return [_measure(mode, config, root, checkpoint, machine) for mode in modes], None
    reference = [
        replace(_measure(m, config, root, checkpoint, machine), squeezed=False) for m in modes if m.name == "ram"
    ]
    squeezed, squeeze = _run_squeezed([m for m in modes if m.name != "ram"], config, root, checkpoint, free_ram)
    return reference + squeezed, squeeze


def _compare_outputs(result: ModeResult, root: Path, with_reference: bool) -> ModeResult:
    """``result`` with each batch's exactness (``torch.equal`` with the ram mode, and stable) and largest difference."""
    import torch

    if not result.ok:
        return result
    outputs, reference = root / f"{result.mode.name}.outputs.pt", root / "ram.outputs.pt"
    mine = torch.load(outputs) if outputs.exists() else None
    ref = torch.load(reference) if with_reference and reference.exists() else None
    if mine is None or ref is None:
        return result
    batches = tuple(
        replace(
            e,
            exact=bool(torch.equal(mine[e.batch], ref[e.batch])) and e.stable,
            max_abs_diff=float((mine[e.batch] - ref[e.batch]).abs().max()),
        )
        if e.batch in mine and e.batch in ref
        else e
        for e in result.batches
    )
    return replace(result, batches=batches)


def _resolve_config(
    config: BenchConfig, available: int, warm_forwards: int | None, from_pretrained: bool | None, free_ram: int | None
) -> BenchConfig:
    """``config`` with the run's overrides, and from_pretrained switched on when the Linear model would not fit."""
    if from_pretrained is None:
        from_pretrained = config.from_pretrained or not fits_in_ram(config.linear_bytes, available)
        if from_pretrained and not config.from_pretrained:
            logger.info(
                "%.1f GB does not fit in %.1f GB of free RAM: using from_pretrained",
                config.linear_bytes / 1e9,
                available / 1e9,
            )
    return replace(
        config,
        from_pretrained=from_pretrained,
        warm_forwards=config.warm_forwards if warm_forwards is None else warm_forwards,
        max_hidden=config.max_hidden if free_ram is None else squeezed_max_hidden(free_ram, config.max_hidden),
    )


def _write_checkpoint(config: BenchConfig, root: Path) -> Path | None:
    if not config.from_pretrained:
        return None
    checkpoint = root / "checkpoint"
    checkpoint.mkdir()
    write_llama_checkpoint(config.llama_shape, checkpoint, config.seed, config.storage_dtype)
    return checkpoint


def run(
    config: BenchConfig,
    modes: Iterable[str] = MODES,
    offload_folder: str | os.PathLike | None = None,
    json_path: str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = None,
    warm_forwards: int | None = None,
    from_pretrained: bool | None = None,
    free_ram: int | None = None,
) -> dict:
    """Run each mode in its own subprocess under a fresh temporary folder and return the report (as JSON).

    The folder (worker files and, for ``from_pretrained``, the synthetic checkpoint) is created inside
    ``offload_folder`` (default: the current directory) and removed at the end, Ctrl-C included.
    ``warm_forwards`` overrides the config's; ``from_pretrained`` too, and when None it is switched on if the Linear
    model would not fit in the available RAM. ``free_ram`` squeezes the machine: a ``Ballast`` holds all but that
    many bytes while the modes run (the ``ram`` reference runs before it, when the model fits the whole machine).
    ``json_path`` and ``plot_path`` also write the report there.
    """
    import psutil

    from accel_nvme.bench.plot import plot_report
    from accel_nvme.config import load_config

    machine_available = psutil.virtual_memory().available
    if free_ram is not None:
        Ballast.check(free_ram, machine_available)
    available = machine_available if free_ram is None else free_ram
    config = _resolve_config(config, available, warm_forwards, from_pretrained, free_ram)
    selected = selected_modes(modes, config.resident_shares)
    root = Path(tempfile.mkdtemp(prefix="accel-nvme-bench-", dir=offload_folder or "."))
    try:
        machine = _machine_info(root, available, machine_available)
        checkpoint = _write_checkpoint(config, root)
        results, squeeze = _run_modes(selected, config, root, checkpoint, free_ram, machine_available)
        with_reference = any(m.name == "ram" for m in selected)
        results = [_compare_outputs(r, root, with_reference) for r in results]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = Report.of(machine, config, results, asdict(load_config()), squeeze).to_json()
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=2))
    if plot_path is not None:
        plot_report(report, plot_path)
    return report
