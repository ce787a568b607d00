"""Reading byte ranges of group files into page-aligned staging buffers (``staging.py``).

O_DIRECT reads bypass the page cache, so streaming a model bigger than RAM does not evict everything else; where the
filesystem refuses O_DIRECT (tmpfs, some FUSE mounts) reads fall back to buffered I/O followed by
``posix_fadvise(DONTNEED)``, which keeps the page cache from growing. Requests run on a small thread pool
(``os.preadv`` releases the GIL) to keep several in flight.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .format import ALIGNMENT, GroupFileError, open_regular
from .staging import StagingBuffer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Segment:
    """Copy ``length`` bytes at ``file_offset`` of ``path`` to ``buffer_offset``; ``needed`` of them must exist."""

    path: Path
    file_offset: int
    length: int
    buffer_offset: int
    needed: int


class FileReader:
    """Reads segments of files into staging buffers on a thread pool, O_DIRECT when the filesystem allows it."""

    def __init__(self, direct_io: str = "auto", io_threads: int = 4, request_bytes: int = 4 << 20):
        self.direct_io = direct_io
        self.io_threads = io_threads
        self.request_bytes = request_bytes
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="accel-nvme-io")
        self._fds: dict[Path, tuple[int, bool]] = {}
        self._close_fds = weakref.finalize(self, _close_all, self._fds)
        self._lock = threading.Lock()
        self._closed = False
        self._active = 0
        self._busy_since = 0.0
        self._busy = 0.0

    @property
    def busy_seconds(self) -> float:
        """Wall time during which at least one read was in progress (the drive's share of the work)."""
        with self._lock:
            return self._busy + (time.perf_counter() - self._busy_since if self._active else 0.0)

    def opened(self) -> dict[Path, bool]:
        """The files opened so far, each with whether it is read with O_DIRECT (False: the buffered fallback)."""
        with self._lock:
            return {path: direct for path, (_, direct) in self._fds.items()}

    def _fd(self, path: Path) -> tuple[int, bool]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the reader was closed (its hooks were removed)")
            if path not in self._fds:
                self._fds[path] = self._open(path)
            return self._fds[path]

    def _open(self, path: Path) -> tuple[int, bool]:
        """Open without following a symlink or blocking on a FIFO; only a regular file is accepted."""
        if self.direct_io != "off":
            try:
                return open_regular(path, flags=os.O_DIRECT), True
            except GroupFileError as e:
                cause = e.__cause__
                if not isinstance(cause, OSError) or cause.errno != errno.EINVAL or self.direct_io == "on":
                    raise
                logger.info("%s: filesystem refuses O_DIRECT, using buffered reads + fadvise(DONTNEED)", path)
        return open_regular(path), False

    def submit(self, segments: list[Segment], buffer: StagingBuffer) -> list[Future]:
        """Queue the reads of ``segments`` into ``buffer``; each future raises naming the file on failure.

        O_DIRECT requests run in parallel (queue depth); a buffered segment is read front to back by one thread,
        which keeps the kernel's readahead sequential (parallel buffered requests measured slower).
        """
        futures = []
        for seg in segments:
            requests = [
                (
                    seg.file_offset + start,
                    min(self.request_bytes, seg.length - start),
                    seg.buffer_offset + start,
                    max(0, min(self.request_bytes, seg.needed - start)),
                )
                for start in range(0, seg.length, self.request_bytes)
            ]
            if self._is_direct(seg.path):
                futures += [self._pool.submit(self._read, seg.path, *request, buffer) for request in requests]
            else:
                futures.append(self._pool.submit(self._read_in_order, seg.path, requests, buffer))
        return futures

    def _is_direct(self, path: Path) -> bool:
        try:
            return self._fd(path)[1]
        except (OSError, GroupFileError):
            return True  # the read reports the error, naming the file

    def _read_in_order(self, path: Path, requests: list[tuple[int, int, int, int]], buffer: StagingBuffer) -> int:
        return sum(self._read(path, *request, buffer) for request in requests)

    def _read(self, path: Path, offset: int, length: int, at: int, needed: int, buffer: StagingBuffer) -> int:
        try:
            fd, direct = self._fd(path)
        except OSError as e:
            raise GroupFileError(f"{path}: cannot open for reading: {e}") from e
        with self._lock:
            if self._active == 0:
                self._busy_since = time.perf_counter()
            self._active += 1
        try:
            got = 0
            while got < length:  # a read may return short (signals, FUSE): go on until EOF or an unaligned end
                n = os.preadv(fd, [buffer.view[at + got : at + length]], offset + got)
                got += n
                if n == 0 or (direct and got % ALIGNMENT):
                    break
            if not direct:
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            raise GroupFileError(f"{path}: reading {length} bytes at offset {offset} failed: {e}") from e
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0:
                    self._busy += time.perf_counter() - self._busy_since
        if got < needed:
            raise GroupFileError(
                f"{path}: expected {needed} bytes at offset {offset}, read {got} (was the file truncated or replaced?)"
            )
        return got

    def close(self) -> None:
        """Finish queued reads, stop the threads and close every file descriptor."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._closed = True
            self._close_fds()


def _close_all(fds: dict[Path, tuple[int, bool]]) -> None:
    """Close the descriptors of a reader, also when it is garbage-collected without ``close()``."""
    for fd, _ in fds.values():
        os.close(fd)
    fds.clear()
