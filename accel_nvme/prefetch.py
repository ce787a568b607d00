"""The slot lifecycle: which group is read into which staging buffer, who holds it, and when a buffer is free again.

Groups are read ``depth`` ahead of the one in use, in the order the successor schedule (``schedule.py``) learned, into
the buffers of a pool (``staging.py``) by the reader (``io.py``). A released group keeps its buffer until another
group is acquired, so the modules of one group (or a module called twice) reuse it without a second read. On CUDA the
I/O thread that completes a read also starts the host-to-device copy (``transfer.py``) and waits for it before the
buffer can be refilled. ``acquire`` hands out a ``Lease``: the group's tensors, until its ``release``.

State survives interruptions (Ctrl-C at any moment of a forward): a group's holders are a set, so releasing twice is
harmless; a buffer is free when no registered slot owns it, so none is ever lost; and ``recover`` clears what an
interrupted forward left marked in use. A forked child gets fresh locks and reader threads (``os.register_at_fork``).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
import weakref
from collections.abc import Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .format import GroupFileError, digest
from .io import FileReader, Segment
from .schedule import SuccessorSchedule
from .staging import BufferPool, StagingBuffer
from .stats import ForwardRecorder, ForwardStats
from .transfer import copy_to_device, hand_to_compute

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorView:
    """Where one member tensor sits in its group's staging buffer."""

    name: str
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes the tensor takes in the buffer."""
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Checksum:
    """``length`` bytes at ``offset`` of a group's buffer must have ``digest``; they come from ``path``."""

    path: Path
    offset: int
    length: int
    digest: str


@dataclass(frozen=True)
class GroupSource:
    """How to bring one group into a buffer: the segments to read, the views to take, the checksums to verify.

    Checksums are verified on the group's first read, and on every read when ``verify_every_read``.
    """

    name: str
    segments: tuple[Segment, ...]
    nbytes: int
    views: tuple[TensorView, ...]
    checksums: tuple[Checksum, ...] = ()
    verify_every_read: bool = False


@dataclass
class _Slot:
    source: GroupSource
    buffer: StagingBuffer | None
    done: threading.Event = field(default_factory=threading.Event)
    pending: int = 0
    error: BaseException | None = None
    device_data: torch.Tensor | None = None
    copied: torch.cuda.Event | None = None
    holders: set[Hashable] = field(default_factory=set)
    started: float = field(default_factory=time.perf_counter)


def _views(source: GroupSource, data: torch.Tensor) -> dict[str, torch.Tensor]:
    """The member tensors of a group, as zero-copy views of the bytes ``data`` holds for it."""
    return {v.name: data[v.offset : v.offset + v.nbytes].view(v.dtype).view(v.shape) for v in source.views}


class Lease:
    """The tensors of one group, held by one caller until ``release()`` (releasing again is harmless).

    ``on_device``: they are device copies, which may outlive the lease. Otherwise they view host memory, and
    ``staging`` holds the addresses of the reused staging buffers: a view of one must not outlive the lease.
    """

    __slots__ = ("_caller", "_index", "_prefetcher", "on_device", "staging", "tensors")

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        on_device: bool,
        staging: frozenset[int],
        prefetcher: Prefetcher,
        index: int,
        caller: Hashable,
    ):
        self.tensors = tensors
        self.on_device = on_device
        self.staging = staging
        self._prefetcher = prefetcher
        self._index = index
        self._caller = caller

    def release(self) -> None:
        """The holder is done with the tensors: the group's buffer may be refilled once no one else holds it."""
        prefetcher, self._prefetcher = self._prefetcher, None
        if prefetcher is not None:  # once only: a stale lease must not drop a later hold of the same caller
            prefetcher.release(self._index, self._caller)


class Prefetcher:
    """Reads groups ahead of use into ``depth + 1`` reused staging buffers and leases out their tensors: views of the
    buffers, or device copies on CUDA.

    One per dispatched model; ``forward_lock`` (reentrant) is the model's: its hooks hold it around each forward.
    One condition guards the slots; the schedule, the pool and the stats recorder are called under it.
    """

    def __init__(
        self,
        sources: list[GroupSource],
        device: torch.device,
        reader: FileReader,
        depth: int = 2,
        resident: dict[int, str] | None = None,
    ):
        self.sources = sources
        self.device = device
        self.depth = depth
        self.reader = reader
        self._recorder = ForwardRecorder(reader)
        self.stats = self._recorder.totals
        self._schedule = SuccessorSchedule(len(sources))
        self._backward_schedule = SuccessorSchedule(len(sources), reverse=True)  # backward re-acquires (backward.py)
        self._slots: dict[int, _Slot] = {}
        self._max_slots = depth + 1
        self._cuda = device.type == "cuda"
        self._side_stream = torch.cuda.Stream(device) if self._cuda else None
        largest = max((s.nbytes for s in sources), default=0)
        self.pool = BufferPool(min(self._max_slots, max(1, len(sources))), largest, device if self._cuda else None)
        self._staging = frozenset() if self._cuda else self.pool.pointers  # what a lease's tensors may view
        self._lock = threading.RLock()  # entered with C-level ``with`` only: an interrupt cannot leave it held
        self._cond = threading.Condition(self._lock)
        self.forward_lock = threading.RLock()
        self._forked_from: int | None = None
        self._closed = False
        self._attached = 0
        self._resident: dict[int, _Slot] = {}
        self._verified: set[int] = set()
        self._requests: queue.SimpleQueue[tuple[int, _Slot] | None] = queue.SimpleQueue()
        self._scheduler: threading.Thread | None = None
        self._start_scheduler()
        _LIVE.add(self)
        try:
            for index, where in (resident or {}).items():
                self._resident[index] = self._load_resident(sources[index], on_device=where == "device")
        except BaseException:
            self.close()
            raise

    def attach(self) -> None:
        """A hook starts using this prefetcher."""
        self._attached += 1

    def detach(self) -> None:
        """A hook stops using this prefetcher; the last one closes it."""
        self._attached -= 1
        if self._attached == 0:
            self.close()

    @property
    def resident(self) -> list[int]:
        """The groups loaded once and kept, never streamed."""
        return sorted(self._resident)

    def resident_on_device(self) -> list[int]:
        """The resident groups kept on the execution device only (their host copy freed)."""
        return sorted(i for i, slot in self._resident.items() if slot.device_data is not None)

    def buffers_in_use(self) -> list[StagingBuffer]:
        """The staging buffers slots read into or hand out now; every one belongs to ``pool``."""
        with self._lock:
            return [slot.buffer for slot in self._slots.values() if slot.buffer is not None]

    def _load_resident(self, source: GroupSource, on_device: bool) -> _Slot:
        """Read a resident group once into its own buffer (and, for ``on_device``, keep only its device copy)."""
        slot = _Slot(source, StagingBuffer(source.nbytes, self.device if self._cuda else None))
        for future in self.reader.submit(list(source.segments), slot.buffer):
            future.result()
        self._verify(slot)
        if on_device:
            with torch.cuda.device(self.device):
                slot.device_data = slot.buffer.tensor[: source.nbytes].to(self.device)
            slot.buffer.close()
            slot.buffer = None
        slot.done.set()
        return slot

    def _resident_data(self, slot: _Slot) -> torch.Tensor:
        """A resident group's bytes where its modules run: kept on the device, copied there now, or in RAM (CPU)."""
        if slot.device_data is not None:
            return slot.device_data
        if self._cuda:
            data, copied = copy_to_device(slot.buffer.tensor[: slot.source.nbytes], self.device, self._side_stream)
            return hand_to_compute(data, copied, self.device)
        return slot.buffer.tensor

    def acquire(self, index: int, caller: Hashable | None = None, backward: bool = False) -> Lease:
        """The tensors of group ``index`` on the execution device, ready for the compute stream, leased to ``caller``.

        ``caller`` (the module's hook; several modules may share a group) holds the group until the lease's release.
        ``backward``: asked by a backward pass, which learns and reads ahead in an order of its own.
        """
        schedule, other = (self._backward_schedule, None) if backward else (self._schedule, self._backward_schedule)
        if self._forked_from is not None or self._closed:
            raise self._unusable(index)
        caller = index if caller is None else caller
        resident = self._resident.get(index)
        if resident is not None:
            with self._lock:
                self._recorder.asked(caller)
                schedule.learn(index, ending=other)
                self._top_up(index, schedule)
            data = self._resident_data(resident)
            return Lease(_views(resident.source, data), self._cuda, self._staging, self, index, caller)
        with self._lock:
            self._recorder.asked(caller)
            schedule.learn(index, ending=other)
            slot = self._slots.get(index)
            if slot is None:
                slot = self._start_now(index)
            slot.holders.add(caller)
            self._top_up(index, schedule)
        try:
            if not slot.done.is_set():
                waited = time.perf_counter()
                with self._lock:  # not ``Event.wait``: interrupted, its own lock could stay held and stall the reader
                    self._cond.wait_for(slot.done.is_set)
                    self.stats.stall_seconds += time.perf_counter() - waited
            if slot.error is not None:
                raise slot.error
        except BaseException:
            with self._lock:
                slot.holders.discard(caller)
                if slot.error is not None and not slot.holders and self._slots.get(index) is slot:
                    self._drop(index)
            raise
        data = hand_to_compute(slot.device_data, slot.copied, self.device) if self._cuda else slot.buffer.tensor
        return Lease(_views(slot.source, data), self._cuda, self._staging, self, index, caller)

    def _unusable(self, index: int) -> RuntimeError:
        """Why group ``index`` cannot be acquired: set up before a fork with CUDA, or closed."""
        if self._forked_from is not None:
            return RuntimeError(
                f"this model's nvme groups stream to {self.device}, set up in process {self._forked_from}; CUDA cannot "
                f"be used in a forked child (pid {os.getpid()}): start workers with the 'spawn' method, or dispatch "
                "the model in the child"
            )
        return RuntimeError(
            f"group {self.sources[index].name}: the prefetcher was closed (accel_nvme.close or its hooks removed); "
            "dispatch the model again to stream it"
        )

    def release(self, index: int, caller: Hashable | None = None) -> None:
        """``caller`` is done with group ``index`` (again: harmless); its buffer is refilled once unused and needed."""
        with self._lock:
            slot = self._slots.get(index)
            if slot is not None:
                slot.holders.discard(index if caller is None else caller)
            self._recorder.released()

    def holders(self) -> list[Hashable]:
        """The callers that hold a streamed group now (none between forwards)."""
        with self._lock:
            return [holder for slot in self._slots.values() for holder in slot.holders]

    def recover(self) -> list[Hashable]:
        """Forget what an interrupted forward left in use; call only when none of the model's modules is running.

        Returns the callers that still held a group (their modules may still hold views of it).
        """
        with self._lock:
            leaked = []
            for slot in self._slots.values():
                leaked.extend(slot.holders)
                slot.holders.clear()
        if leaked:
            logger.info("%d nvme group holder(s) left by an interrupted forward were released", len(leaked))
        return leaked

    def forward_stats(self) -> list[ForwardStats]:
        """The last forwards (up to 64), oldest first; the one in progress, if any, last."""
        with self._lock:
            return self._recorder.forwards()

    def _top_up(self, index: int, schedule: SuccessorSchedule) -> None:
        wanted = schedule.upcoming(index, self.depth, skip=self._resident)
        for other, slot in list(self._slots.items()):
            if other != index and not slot.holders and other not in wanted and slot.done.is_set():
                self._drop(other)
        for group in wanted:
            if group not in self._slots and len(self._slots) < self._max_slots:
                buffer = self._free_buffer()
                if buffer is None:
                    break
                self._start(group, buffer)

    def _free_buffer(self) -> StagingBuffer | None:
        """A staging buffer no registered slot owns."""
        return self.pool.free(slot.buffer for slot in self._slots.values())

    def _start_now(self, index: int) -> _Slot:
        while True:
            buffer = self._free_buffer() if len(self._slots) < self._max_slots else None
            if buffer is not None:
                return self._start(index, buffer)
            idle = [i for i, s in self._slots.items() if not s.holders]
            if not idle:
                if len(self._slots) >= self._max_slots or all(s.done.is_set() for s in self._slots.values()):
                    raise RuntimeError(
                        f"{len(self._slots)} nvme groups are in use at once, more than prefetch_depth + 1 = "
                        f"{self._max_slots}; raise prefetch_depth"
                    )
                self._cond.wait()  # a device copy is handing its staging buffer back
                continue
            victim = min(idle, key=lambda i: not self._slots[i].done.is_set())
            slot = self._slots[victim]
            self._cond.wait_for(slot.done.is_set)
            if self._slots.get(victim) is slot and not slot.holders:
                self._drop(victim)

    def _start(self, index: int, buffer: StagingBuffer) -> _Slot:
        """Register a slot for ``index`` and ask the scheduler thread to queue its reads (called holding the lock).

        The reads are queued by another thread because ``ThreadPoolExecutor.submit`` is not interrupt-safe (a Ctrl-C
        inside it can leave the pool's semaphore locked for good); signals only interrupt the main thread. The request
        is put before the slot is registered, in one C-level step each: the scheduler, which waits for this lock,
        then finds the slot registered, or nothing to do.
        """
        if self._closed:
            raise RuntimeError("the prefetcher was closed (its hooks were removed)")
        slot = _Slot(self.sources[index], buffer)
        self._requests.put((index, slot))
        self._slots[index] = slot
        return slot

    def _start_scheduler(self) -> None:
        self._scheduler = threading.Thread(
            target=_schedule, args=(weakref.ref(self), self._requests), name="accel-nvme-schedule", daemon=True
        )
        self._scheduler.start()
        weakref.finalize(self, self._requests.put, None)  # a collected prefetcher stops its scheduler

    def _submit(self, index: int, slot: _Slot) -> None:
        """On the scheduler thread: queue the reads of a slot that is still registered."""
        with self._lock:
            if self._closed or self._slots.get(index) is not slot:
                return
            try:
                futures = self.reader.submit(list(slot.source.segments), slot.buffer)
            except BaseException as e:
                slot.error = e
                futures = []
            slot.pending = len(futures)
            this = weakref.ref(self)  # reads in flight do not keep a dropped model's prefetcher alive
            for future in futures:
                future.add_done_callback(lambda f, s=slot: _read_done(this, s, f))
        if not futures:
            self._finish(slot)

    def _on_read(self, slot: _Slot, future: Future) -> None:
        with self._lock:
            if future.cancelled():
                slot.error = slot.error or RuntimeError(f"read of nvme group {slot.source.name!r} was cancelled")
            elif future.exception() is not None:
                slot.error = slot.error or future.exception()
            slot.pending -= 1
            last = slot.pending == 0
            if last and slot.error is None:
                self._recorder.read(slot.source.nbytes)
                if logger.isEnabledFor(logging.DEBUG):
                    logger.debug(
                        "group %s: %d bytes read in %.4f s",
                        slot.source.name,
                        slot.source.nbytes,
                        time.perf_counter() - slot.started,
                    )
        if last:
            self._finish(slot)

    def _finish(self, slot: _Slot) -> None:
        try:
            if slot.error is None:
                self._verify(slot)
                if self._cuda:
                    self._copy_to_device(slot)
        except BaseException as e:
            slot.error = e
        finally:
            with self._lock:
                slot.done.set()
                self._cond.notify_all()

    def _verify(self, slot: _Slot) -> None:
        source = slot.source
        if id(source) in self._verified and not source.verify_every_read:
            return
        for check in source.checksums:
            if digest(slot.buffer.view[check.offset : check.offset + check.length]) != check.digest:
                raise GroupFileError(
                    f"{check.path}: {check.length} bytes read for group {source.name!r} do not match their digest in "
                    "the manifest; the file is damaged or was replaced: run `accel-nvme verify` on the folder, then "
                    "`accel-nvme clean` it (or delete it) to have it rewritten"
                )
        self._verified.add(id(source))

    def _copy_to_device(self, slot: _Slot) -> None:
        """On an I/O thread: copy the slot's bytes to the device and give its staging buffer back once they are."""
        host = slot.buffer.tensor[: slot.source.nbytes]
        slot.device_data, slot.copied = copy_to_device(host, self.device, self._side_stream)
        slot.copied.synchronize()  # the buffer may be refilled only after the copy has read it
        with self._lock:
            slot.buffer = None
            self._cond.notify_all()

    def _drop(self, index: int) -> None:
        slot = self._slots.pop(index)
        slot.device_data = None
        slot.buffer = None
        self._cond.notify_all()

    def close(self) -> None:
        """Wait for reads in flight, stop the reader's threads, close its files and free every staging buffer."""
        with self._lock:
            self._closed = True
            slots = [slot for slot in self._slots.values() if slot.pending or slot.done.is_set()]
            for slot in slots:
                self._cond.wait_for(slot.done.is_set)
            self._slots.clear()
        self._requests.put(None)
        if self._scheduler is not None and self._scheduler is not threading.current_thread():
            self._scheduler.join()
        self.reader.close()
        self.pool.close()
        for slot in self._resident.values():
            if slot.buffer is not None:
                slot.buffer.close()
        self._resident.clear()
        _LIVE.discard(self)

    def _after_fork_in_child(self) -> None:
        """This process is a fork: the parent's reader threads and lock holders do not exist here."""
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self.forward_lock = threading.RLock()
        self._slots.clear()  # reads in flight at the fork never complete here; the buffers hold a copy, no writer
        self._recorder.forget_forward_in_progress()
        if self._cuda:
            self._forked_from = os.getppid()
        elif not self._closed:
            self.reader = FileReader(self.reader.direct_io, self.reader.io_threads, self.reader.request_bytes)
            self._recorder.reader = self.reader
            self._requests = queue.SimpleQueue()
            self._start_scheduler()


_LIVE: weakref.WeakSet[Prefetcher] = weakref.WeakSet()


def _schedule(prefetcher: weakref.ref[Prefetcher], requests: queue.SimpleQueue) -> None:
    """The scheduler thread: queues the reads of each started slot; it holds nothing while it waits."""
    while _serve(prefetcher, requests.get()):
        pass


def _serve(prefetcher: weakref.ref[Prefetcher], request: tuple[int, _Slot] | None) -> bool:
    owner = prefetcher()
    if request is None or owner is None:
        return False
    owner._submit(*request)
    return True


def _read_done(prefetcher: weakref.ref[Prefetcher], slot: _Slot, future: Future) -> None:
    owner = prefetcher()
    if owner is not None:
        owner._on_read(slot, future)


def _after_fork_in_child() -> None:
    for prefetcher in list(_LIVE):
        prefetcher._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
