"""Staging buffers: the page-aligned host memory a group's bytes are read into, and the reused pool of them.

A prefetcher's pool holds ``prefetch_depth + 1`` buffers (fewer for fewer groups), each as large as its largest group,
pinned once for CUDA; a buffer is free when no slot owns it, which the pool derives each time from the owners it is
shown (so an interrupted start or drop never loses one). Each group resident in RAM has a buffer of its own besides.

Pinning registers the buffer with ``cudaHostRegister``, up to ``PINNED_SHARE`` of the machine's RAM in all; beyond
that, or when registration fails, the buffer stays pageable (copies are slower, never wrong) and a warning says so. A
buffer is unregistered by ``close`` or, for one dropped without it, by its finaliser. Pinned buffers are not inherited
by a forked child (``MADV_DONTFORK``): the child gets an empty placeholder mapping at the same address instead.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
import weakref
from collections.abc import Callable, Iterable

import psutil
import torch

from .format import ALIGNMENT

logger = logging.getLogger(__name__)

HOST_REGISTER_PORTABLE = 1
PINNED_SHARE = 0.5  # at most this share of the machine's RAM is pinned by staging buffers (all of them together)

_pinned_lock = threading.Lock()
_pinned_bytes = 0
_cap_warned = False  # the cap is said once per process; each failed registration is said every time
_PINNED: weakref.WeakSet[StagingBuffer] = weakref.WeakSet()


def _register(pointer: int, nbytes: int, device: torch.device) -> int:
    """``cudaHostRegister`` of ``nbytes`` at ``pointer`` (portable: for every CUDA context); 0 on success."""
    with torch.cuda.device(device):
        return int(torch.cuda.cudart().cudaHostRegister(pointer, nbytes, HOST_REGISTER_PORTABLE))


def _unregister(pointer: int) -> None:
    """``cudaHostUnregister`` of a pointer ``_register`` pinned."""
    torch.cuda.cudart().cudaHostUnregister(pointer)


def pinned_bytes() -> int:
    """Bytes staging buffers of this process hold pinned now."""
    return _pinned_bytes


def pinned_cap() -> int:
    """Most bytes staging buffers may pin together: ``PINNED_SHARE`` of the machine's RAM."""
    return int(psutil.virtual_memory().total * PINNED_SHARE)


def _claim(nbytes: int) -> bool:
    global _pinned_bytes
    with _pinned_lock:
        if _pinned_bytes + nbytes > pinned_cap():
            return False
        _pinned_bytes += nbytes
        return True


def _unclaim(nbytes: int) -> None:
    global _pinned_bytes
    with _pinned_lock:
        _pinned_bytes -= nbytes


def _unpin(pointer: int, nbytes: int, pid: int, state: dict[str, bool], unregister: Callable[[int], None]) -> None:
    """Unregister a pinned buffer once (by ``close`` or the finaliser); a forked child never calls CUDA."""
    if not state["pinned"]:
        return
    state["pinned"] = False
    _unclaim(nbytes)
    if os.getpid() == pid:
        unregister(pointer)


def _advise(region: mmap.mmap, name: str) -> None:
    """``madvise`` ``region`` with ``mmap.<name>`` where the platform has it; a refusal is logged, nothing else."""
    advice = getattr(mmap, name, None)
    if advice is None:
        return
    try:
        region.madvise(advice)
    except OSError as e:
        logger.debug("madvise(%s) refused for a staging buffer: %s", name, e)


class StagingBuffer:
    """A page-aligned host slab, registered once as pinned memory (for every CUDA context) when ``pin`` is a device.

    ``pinned`` says whether it is: a failed or over-cap registration leaves it pageable, with a warning.
    """

    def __init__(self, nbytes: int, pin: torch.device | None = None):
        self.nbytes = max(ALIGNMENT, nbytes)
        self._mmap = mmap.mmap(-1, self.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        _advise(self._mmap, "MADV_HUGEPAGE")  # before the first touch: O_DIRECT pins 2 MiB pages, fewer TLB misses
        self.view = memoryview(self._mmap)
        self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self._state = {"pinned": False}
        if pin is not None:
            self._pin(pin)

    @property
    def pinned(self) -> bool:
        """Whether the buffer is registered as pinned memory now."""
        return self._state["pinned"]

    def _pin(self, device: torch.device) -> None:
        if not _claim(self.nbytes):
            global _cap_warned
            logger.log(
                logging.DEBUG if _cap_warned else logging.WARNING,
                "staging buffer of %d bytes left pageable (and any more past the cap): pinning it would take staging "
                "buffers past %d bytes (%.0f%% of RAM); host-to-device copies from it are slower, results the same",
                self.nbytes,
                pinned_cap(),
                PINNED_SHARE * 100,
            )
            _cap_warned = True
            return
        pointer = self.tensor.data_ptr()
        try:
            result = _register(pointer, self.nbytes, device)
        except BaseException:
            _unclaim(self.nbytes)
            raise
        if result != 0:
            _unclaim(self.nbytes)
            logger.warning(
                "cudaHostRegister of a %d-byte staging buffer failed (error %s); it stays pageable: host-to-device "
                "copies from it are slower, results are the same",
                self.nbytes,
                result,
            )
            return
        self._state["pinned"] = True
        _advise(self._mmap, "MADV_DONTFORK")  # a forked child must not inherit (and copy) registered pages
        self._unpin = weakref.finalize(self, _unpin, pointer, self.nbytes, os.getpid(), self._state, _unregister)
        _PINNED.add(self)

    def close(self) -> None:
        """Unpin and unmap; a tensor view still held by someone keeps the memory alive until it is dropped."""
        if self.pinned:
            self._unpin()
        self.tensor = None
        self.view.release()
        try:
            self._mmap.close()
        except BufferError:
            logger.debug("staging buffer still viewed by a tensor; it is freed when that tensor is")

    def _after_fork_in_child(self) -> None:
        """In a forked child: the pages were not inherited (``MADV_DONTFORK``); map an empty placeholder there so the
        address stays ours until the mmap object unmaps it, and forget the registration (the parent's)."""
        if not self._state["pinned"] or self.tensor is None:
            return
        self._state["pinned"] = False
        _unclaim(self.nbytes)
        _map_placeholder(self.tensor.data_ptr(), self.nbytes)


def _map_placeholder(pointer: int, nbytes: int) -> None:
    """Map fresh anonymous pages (no memory until touched) at ``pointer``, replacing whatever is there."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    fixed = 0x10
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | fixed
    result = libc.mmap(pointer, nbytes, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    if result != pointer:
        logger.warning("no placeholder for a staging buffer in a forked child: errno %d", ctypes.get_errno())


def _after_fork_in_child() -> None:
    global _pinned_bytes
    for buffer in list(_PINNED):
        buffer._after_fork_in_child()
    _pinned_bytes = 0


os.register_at_fork(after_in_child=_after_fork_in_child)


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
