"""The parent of an MoE decode bench run (``accel-nvme bench --model moe``): the synthetic Qwen3-MoE checkpoint, one
worker process per mode (squeezed when asked, ``ram`` first in the whole machine), their tokens and logits compared
with the ``ram`` mode's, and the report (``run_moe``)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from accel_nvme.bench.ballast import Ballast, child_env
from accel_nvme.bench.config import fits_in_ram
from accel_nvme.bench.moe import MOE_MODES, DecodeConfig, write_moe_checkpoint
from accel_nvme.bench.moe_report import moe_report
from accel_nvme.bench.runner import _machine_info, wait_worker, worker_failure

logger = logging.getLogger(__name__)


def _run_mode(mode: str, config: DecodeConfig, root: Path, checkpoint: Path) -> dict:
    """One mode in a fresh interpreter (output in ``<mode>.log``): its JSON, or a failed entry saying why."""
    logger.info("running mode %s", mode)
    start, json_out, log_path = time.perf_counter(), root / f"{mode}.json", root / f"{mode}.log"
    command = [
        *(sys.executable, "-m", "accel_nvme.bench.moe", "--mode", mode, "--config", json.dumps(asdict(config))),
        *("--folder", str(root / ("nvme" if mode.startswith("nvme") else mode)), "--checkpoint", str(checkpoint)),
        *("--outputs", str(root / f"{mode}.outputs.pt"), "--json-out", str(json_out)),
        *("--parent-pid", str(os.getpid())),
    ]
    with open(log_path, "w") as log:  # Ctrl-C or the timeout: the worker goes before the folder does
        returncode = wait_worker(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_env()))
    if not mode.startswith("nvme"):
        shutil.rmtree(root / mode, ignore_errors=True)
    failure = worker_failure(mode, returncode, log_path.read_text(errors="replace"), json_out)
    if failure is not None:
        return {"mode": mode, "status": failure[0], "error": failure[1]}
    logger.info("mode %s done in %.1f s", mode, time.perf_counter() - start)
    return json.loads(json_out.read_text())


def _compare(entry: dict, root: Path) -> dict:
    """``entry`` with ``tokens_equal`` (every run's tokens ``torch.equal`` to the ``ram`` mode's) and ``exact`` (its
    logits too); None: no outputs to compare."""
    import torch

    mine, reference = root / f"{entry['mode']}.outputs.pt", root / "ram.outputs.pt"
    if entry["status"] != "ok" or not mine.exists() or not reference.exists():
        return entry | ({"tokens_equal": None, "exact": None} if entry["status"] == "ok" else {})
    ours, ref = torch.load(mine), torch.load(reference)
    pairs = list(zip(ours, ref, strict=True))
    tokens = all(torch.equal(a["tokens"], b["tokens"]) for a, b in pairs)
    return entry | {
        "tokens_equal": tokens,
        "exact": tokens and all(torch.equal(a["logits"], b["logits"]) for a, b in pairs),
    }


def _measure(mode: str, config: DecodeConfig, root: Path, checkpoint: Path, available: int) -> dict:
    if mode == "ram" and not fits_in_ram(config.shape.model_bytes, available):
        error = f"needs the {config.shape.model_bytes / 1e9:.2f} GB model in RAM, {available / 1e9:.1f} GB available"
        return {"mode": mode, "status": "does not fit", "error": error + " (2 GB kept to spare)"}
    return _run_mode(mode, config, root, checkpoint)


def _run_modes(modes: list[str], config: DecodeConfig, root: Path, checkpoint: Path, free_ram: int | None) -> tuple:
    """Each mode in turn: ``ram`` first in the whole machine, the others under a ``Ballast`` leaving ``free_ram``."""
    import psutil

    machine = psutil.virtual_memory().available
    results = [_measure(m, config, root, checkpoint, machine) for m in modes if m == "ram"]
    if free_ram is None:
        return results + [_measure(m, config, root, checkpoint, machine) for m in modes if m != "ram"], None
    ballast = Ballast(free_ram)
    squeeze = {"free_ram_bytes": free_ram, "held_at_start_bytes": ballast.held_bytes, "modes": {}}
    try:
        for mode in (m for m in modes if m != "ram"):
            held, available = ballast.adjust()
            squeeze["modes"][mode] = {"held_bytes": held, "available_bytes": available}
            results.append(_measure(mode, config, root, checkpoint, free_ram))
            ballast.check_alive(mode)
    finally:
        ballast.close()
    return results, squeeze


def run_moe(
    config: DecodeConfig,
    modes: Iterable[str] = MOE_MODES,
    offload_folder: str | os.PathLike | None = None,
    json_path: str | os.PathLike | None = None,
    free_ram: int | None = None,
) -> dict:
    """Write the synthetic Qwen3-MoE checkpoint, run each mode in its own process and return the report (JSON).

    Everything lives in a temporary folder inside ``offload_folder`` (default: the current directory), removed at the
    end. ``free_ram`` squeezes the machine as ``run`` does; ``json_path`` also writes the report there.
    """
    import psutil

    from accel_nvme.config import load_config

    machine_available = psutil.virtual_memory().available
    if free_ram is not None:
        Ballast.check(free_ram, machine_available)
    wanted = [m for m in MOE_MODES if m in set(modes)]
    root = Path(tempfile.mkdtemp(prefix="accel-nvme-bench-", dir=offload_folder or "."))
    try:
        machine = _machine_info(root, free_ram or machine_available, machine_available)
        checkpoint = root / "checkpoint"
        logger.info("writing a %.2f GB synthetic Qwen3-MoE checkpoint", config.shape.model_bytes / 1e9)
        write_moe_checkpoint(config.shape, checkpoint, config.seed)
        results, squeeze = _run_modes(wanted, config, root, checkpoint, free_ram)
        results = [_compare(r, root) for r in results]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = moe_report(machine, config, results, asdict(load_config()), squeeze)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=2))
    return report
