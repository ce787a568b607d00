"""Staging buffers: the page-aligned host memory a group's bytes are read into, and the reused pool of them.

A prefetcher's pool holds ``prefetch_depth + 1`` buffers (fewer for fewer groups), each as large as its largest group,
pinned once for CUDA; a buffer is free when no slot owns it, which the pool derives each time from the owners it is
shown (so an interrupted start or drop never loses one). Each group resident in RAM has a buffer of its own besides.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Iterable

import torch

from .format import ALIGNMENT

logger = logging.getLogger(__name__)

HOST_REGISTER_PORTABLE = 1


def _prefer_huge_pages(region: mmap.mmap) -> None:
    """Ask for transparent huge pages (before the first touch): an O_DIRECT read pins 2 MiB pages instead of 4 KiB ones,
    and the compute that reads weights in place misses the TLB less. Where the kernel has none, nothing changes."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None:
        return
    try:
        region.madvise(advice)
    except OSError as e:
        logger.debug("no transparent huge pages for staging buffers: %s", e)


class StagingBuffer:
    """A page-aligned host slab, registered once as pinned memory (for every CUDA context) when ``pin`` is a device."""

    def __init__(self, nbytes: int, pin: torch.device | None = None):
        self.nbytes = max(ALIGNMENT, nbytes)
        self._mmap = mmap.mmap(-1, self.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        _prefer_huge_pages(self._mmap)
        self.view = memoryview(self._mmap)
        self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self.pinned = False
        if pin is not None:
            with torch.cuda.device(pin):
                result = torch.cuda.cudart().cudaHostRegister(
                    self.tensor.data_ptr(), self.nbytes, HOST_REGISTER_PORTABLE
                )
            if int(result) != 0:
                raise RuntimeError(f"cudaHostRegister of a {self.nbytes}-byte staging buffer failed ({result})")
            self.pinned = True

    def close(self) -> None:
        """Unpin and unmap; a tensor view still held by someone keeps the memory alive until it is dropped."""
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self.pinned = False
        self.tensor = None
        self.view.release()
        try:
            self._mmap.close()
        except BufferError:
            logger.debug("staging buffer still viewed by a tensor; it is freed when that tensor is")


class BufferPool:
    """``count`` reused staging buffers of ``nbytes`` each (pinned for ``pin``); ``pointers`` recognises their views."""

    def __init__(self, count: int, nbytes: int, pin: torch.device | None = None):
        self.buffers: list[StagingBuffer] = []
        try:
            for _ in range(count):
                self.buffers.append(StagingBuffer(nbytes, pin))
        except BaseException:
            self.close()
            raise
        self.pointers = frozenset(b.tensor.data_ptr() for b in self.buffers)

    def free(self, owned: Iterable[StagingBuffer | None]) -> StagingBuffer | None:
        """A buffer of the pool that is none of ``owned`` (the buffers slots hold now), or None when all are."""
        taken = {id(buffer) for buffer in owned}
        return next((b for b in self.buffers if id(b) not in taken), None)

    def close(self) -> None:
        """Unpin and unmap every buffer; the pool is empty afterwards."""
        for buffer in self.buffers:
            buffer.close()
        self.buffers = []
