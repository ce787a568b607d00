"""Which nvme groups stay loaded instead of streamed: the resident budget, with its ``"auto"`` rule.

``"auto"`` takes the memory free at dispatch (host: ``MemAvailable``; CUDA: ``cudaMemGetInfo``'s free bytes), less the
staging buffers the stream will allocate and a stated headroom, so as much of the model as possible stays loaded
without pushing the process into swap, the OOM killer, or re-reading its own code from disk (host: ``MemAvailable``
counts the process's own file-backed pages, its libraries, as reclaimable; the headroom keeps them).
"""

from __future__ import annotations

import logging

import psutil
import torch

from .config import NvmeConfig
from .prefetch import GroupSource

logger = logging.getLogger(__name__)

AUTO_HEADROOM_BYTES = 256 << 20  # activations, outputs and the interpreter's own growth after dispatch
AUTO_HEADROOM_SHARE = 0.05  # plus this share of the free memory, so other processes keep some room on big machines


def spread_resident(sizes: list[int], budget: int) -> set[int]:
    """Groups to keep resident within ``budget`` bytes, spread evenly along ``sizes`` (in order of use).

    Each group earns a share of the budget proportional to its size; a group is kept once the credit covers it, so
    a 50 % budget keeps every other group and the streamed ones are interleaved with compute, not bunched together.
    Budget left over (uneven sizes) goes to the remaining groups in order.
    """
    total = sum(sizes)
    if budget <= 0 or total == 0:
        return set()
    share = min(1.0, budget / total)
    kept, used, credit = set(), 0, 0.0
    for index, size in enumerate(sizes):
        credit += share * size
        if credit >= size - 1e-9 and used + size <= budget:
            kept.add(index)
            used += size
            credit -= size
    for index, size in enumerate(sizes):
        if index not in kept and used + size <= budget:
            kept.add(index)
            used += size
    return kept


def auto_headroom(free: int, own_files: int = 0) -> int:
    """Memory ``"auto"`` leaves free beyond the staging buffers: 256 MiB, 5 % of ``free`` and ``own_files`` (the
    process's resident file-backed pages, which ``free`` counts as reclaimable though the process runs from them)."""
    return AUTO_HEADROOM_BYTES + int(free * AUTO_HEADROOM_SHARE) + own_files


def resident_budget(budget: int | str, free: int, staging: int, own_files: int = 0) -> int:
    """A budget in bytes; ``"auto"`` is ``free`` less the staging buffers and ``auto_headroom(free, own_files)``."""
    return max(0, free - staging - auto_headroom(free, own_files)) if budget == "auto" else budget


def own_file_pages() -> int:
    """Bytes of this process's resident file-backed pages (``RssFile`` of /proc/self/status; 0 where absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssFile:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def choose_resident(sources: list[GroupSource], config: NvmeConfig, device: torch.device) -> dict[int, str]:
    """Which groups stay loaded: on the execution device first (CUDA), then in host RAM, spread evenly."""
    sizes = [s.nbytes for s in sources]
    staging = (config.prefetch_depth + 1) * max(sizes, default=0)
    resident: dict[int, str] = {}
    if device.type == "cuda" and config.device_resident_budget:
        budget = resident_budget(config.device_resident_budget, torch.cuda.mem_get_info(device)[0], staging)
        resident.update(dict.fromkeys(spread_resident(sizes, budget), "device"))
    if config.resident_budget:
        free, own_files = psutil.virtual_memory().available, own_file_pages()
        budget = resident_budget(config.resident_budget, free, staging, own_files)
        if config.resident_budget == "auto":
            logger.info(
                "resident_budget auto: %.2f GB available - %.2f GB staging - %.2f GB headroom = %.2f GB",
                free / 1e9,
                staging / 1e9,
                auto_headroom(free, own_files) / 1e9,
                budget / 1e9,
            )
        rest = [0 if i in resident else size for i, size in enumerate(sizes)]
        resident.update(dict.fromkeys((i for i in spread_resident(rest, budget) if i not in resident), "host"))
    if resident:
        kept = sum(sizes[i] for i in resident)
        logger.info(
            "%d of %d nvme groups resident (%.2f GB), the others streamed", len(resident), len(sizes), kept / 1e9
        )
    return resident
