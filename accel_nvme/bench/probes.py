"""Page cache and memory probes of a worker: what is cached, what one forward added, the peak RSS."""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from collections.abc import Iterable
from pathlib import Path

from accel_nvme.bench.ballast import PAGE, meminfo_bytes

logger = logging.getLogger(__name__)


def meminfo_cached_mb() -> float:
    """The ``Cached:`` line of /proc/meminfo, in MiB."""
    return meminfo_bytes("Cached") / (1 << 20)


def proc_status_mb(field: str) -> float | None:
    """A line of /proc/self/status (``VmRSS``, ``VmHWM``) in MiB, or None when absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0), so later peaks belong to the forwards."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        logger.debug("cannot reset the peak RSS: %s", e)
        return False
    return True


def _files(folders: Iterable[Path]) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*") if p.is_file()]


def _fadvise_dontneed(folders: Iterable[Path]) -> None:
    for path in _files(folders):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _drop_caches() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def drop_page_cache(folders: Iterable[Path]) -> dict[str, float | None]:
    """Evict the files under ``folders`` from the page cache, by fadvise and by drop_caches.

    Returns the MiB each method freed from ``Cached:``, or None where the method failed.
    """
    os.sync()
    methods = (("fadvise", lambda: _fadvise_dontneed(folders)), ("drop_caches", _drop_caches))
    return {name: _freed_mb(name, method) for name, method in methods}


def _freed_mb(name: str, method) -> float | None:
    before = meminfo_cached_mb()
    try:
        method()
    except OSError as e:
        logger.debug("%s failed: %s", name, e)
        return None
    return before - meminfo_cached_mb()


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    return libc


def _file_cached_bytes(libc: ctypes.CDLL, path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            pages = (ctypes.c_ubyte * (-(-size // PAGE)))()
            if libc.mincore(address, size, pages) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            return sum(page & 1 for page in pages) * PAGE
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)


def files_cached_bytes(folders: Iterable[Path]) -> int:
    """Bytes of the files under ``folders`` that sit in the page cache now (``mincore`` on a mapping of each file):
    unlike ``Cached:``, blind to what other processes read."""
    libc = _libc()
    return sum(_file_cached_bytes(libc, path) for path in _files(folders))


def folder_bytes(folder: Path) -> int:
    """Bytes allocated on disk under ``folder``; files that vanish while it is walked count as zero."""
    total = 0
    for path in folder.rglob("*"):
        try:
            total += path.stat().st_blocks * 512 if path.is_file() else 0
        except FileNotFoundError:
            continue
    return total
