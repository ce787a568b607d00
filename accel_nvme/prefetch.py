"""The slot lifecycle: which group is read into which staging buffer, who holds it, and when a buffer is free again.

Groups are read ``depth`` ahead of the one in use, in the order the successor schedule (``schedule.py``) learned, into
the buffers of a pool (``staging.py``) by the reader (``io.py``). A released group keeps its buffer until another
group is acquired, so the modules of one group (or a module called twice) reuse it without a second read. On CUDA the
I/O thread that completes a read also queues the copy into the slot's device buffer (``transfer.py``), marks the group
ready, and waits for the copy before the staging buffer can be refilled; groups resident in RAM take slots too (their
copy needs no read). ``acquire`` hands out a ``Lease``: the group's tensors, until its ``release``.

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
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .format import GroupFileError, digest
from .io import FileReader, Segment
from .schedule import SuccessorSchedule
from .staging import BufferPool, StagingBuffer
from .stats import ForwardRecorder, ForwardStats
from .transfer import (
    CudaRuntime,
    DeviceLayout,
    DeviceRing,
    StallMeter,
    copy_whole,
    device_layout,
    hand_to_compute,
    mark,
)

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

    Checksums are verified on the group's first read, and on every read when ``verify_every_read``; ``after_read``
    (given the buffer and whether checksums are due) runs after every read, before any module sees the bytes.
    """

    name: str
    segments: tuple[Segment, ...]
    nbytes: int
    views: tuple[TensorView, ...]
    checksums: tuple[Checksum, ...] = ()
    verify_every_read: bool = False
    after_read: Callable[[StagingBuffer, bool], None] | None = None


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
    entry: int | None = None  # CUDA: the device buffer of the ring it is copied into
    layout: DeviceLayout | None = None
    from_ram: bool = False  # CUDA: a group resident in RAM, copied without a read


def _views(source: GroupSource, data: torch.Tensor, offsets: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
    """The member tensors of a group, as zero-copy views of the bytes ``data`` holds for it (at ``offsets`` if given,
    else at their offsets in the file)."""
    at = offsets or [v.offset for v in source.views]
    return {v.name: data[o : o + v.nbytes].view(v.dtype).view(v.shape) for v, o in zip(source.views, at, strict=True)}


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
    One condition guards the slots; the schedule, the pool and the stats recorder are called under it. ``runtime``:
    the CUDA calls of the device path (by default the real ones, for a CUDA device; tests give a fake on the CPU).
    """

    def __init__(
        self,
        sources: list[GroupSource],
        device: torch.device,
        reader: FileReader,
        depth: int = 2,
        resident: dict[int, str] | None = None,
        runtime: CudaRuntime | None = None,
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
        self._runtime = runtime or (CudaRuntime() if device.type == "cuda" else None)
        self._cuda = self._runtime is not None  # the device path: side stream, device ring (faked on the CPU in tests)
        self._pin = device if device.type == "cuda" else None
        self._side_stream = self._runtime.stream(device) if self._cuda else None
        largest = max((s.nbytes for s in sources), default=0)
        self.pool = BufferPool(min(self._max_slots, max(1, len(sources))), largest, self._pin)
        self._staging = frozenset() if self._cuda else self.pool.pointers  # what a lease's tensors may view
        self._lock = threading.RLock()  # entered with C-level ``with`` only: an interrupt cannot leave it held
        self._cond = threading.Condition(self._lock)
        self.forward_lock = threading.RLock()
        self._forked_from: int | None = None
        self._closed = False
        self._attached = 0
        self._resident: dict[int, _Slot] = {}
        self._kept: set[int] = set()  # groups served without a slot: resident on the CPU, or kept on the device
        self._layouts = [device_layout([(v.offset, v.nbytes) for v in s.views]) for s in sources] if self._cuda else []
        self._meter = StallMeter()
        self._ring: DeviceRing | None = None
        self._copying: dict[int, _Slot] = {}  # CUDA: slots whose staging buffer a queued copy still reads
        self._verified: set[int] = set()
        self._requests: queue.SimpleQueue[tuple[int, _Slot] | None] = queue.SimpleQueue()
        self._scheduler: threading.Thread | None = None
        self._start_scheduler()
        _LIVE.add(self)
        try:
            for index, where in (resident or {}).items():
                self._resident[index] = self._load_resident(index, on_device=where == "device")
            self._kept = {i for i, slot in self._resident.items() if not self._cuda or slot.device_data is not None}
            through = [i for i in range(len(sources)) if i not in self._kept]
            if self._cuda and through:
                ring_bytes = max(self._layouts[i].nbytes for i in through)
                self._ring = DeviceRing(min(self._max_slots, len(through)), ring_bytes, device, self._runtime)
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

    def device_buffer_bytes(self) -> int:
        """Device memory the ring of streamed groups holds (0 on the CPU, or when nothing goes through it)."""
        return 0 if self._ring is None else self._ring.nbytes

    def buffers_in_use(self) -> list[StagingBuffer]:
        """The staging buffers slots read into or hand out now; every one belongs to ``pool``."""
        with self._lock:
            return [slot.buffer for slot in self._slots.values() if slot.buffer is not None]

    def _load_resident(self, index: int, on_device: bool) -> _Slot:
        """Read a resident group once into its own buffer (and, for ``on_device``, keep only its device copy)."""
        source = self.sources[index]
        slot = _Slot(source, StagingBuffer(source.nbytes, self._pin))
        for future in self.reader.submit(list(source.segments), slot.buffer):
            future.result()
        self._verify(slot)
        if on_device:
            slot.device_data = copy_whole(slot.buffer.tensor, self._layouts[index], self.device, self._runtime)
            slot.buffer.close()
            slot.buffer = None
        slot.done.set()
        return slot

    def acquire(self, index: int, caller: Hashable | None = None, backward: bool = False) -> Lease:
        """The tensors of group ``index`` on the execution device, ready for the compute stream, leased to ``caller``.

        ``caller`` (the module's hook; several modules may share a group) holds the group until the lease's release.
        ``backward``: asked by a backward pass, which learns and reads ahead in an order of its own.
        """
        schedule, other = (self._backward_schedule, None) if backward else (self._schedule, self._backward_schedule)
        if self._forked_from is not None or self._closed:
            raise self._unusable(index)
        caller = index if caller is None else caller
        if index in self._kept:
            resident = self._resident[index]
            with self._lock:
                self._recorder.asked(caller)
                schedule.learn(index, ending=other)
                self._top_up(index, schedule)
            if resident.device_data is not None:
                tensors = _views(resident.source, resident.device_data, self._layouts[index].offsets)
            else:
                tensors = _views(resident.source, resident.buffer.tensor)
            return Lease(tensors, self._cuda, self._staging, self, index, caller)
        with self._lock:
            if self._cuda:
                self.stats.stall_seconds += self._meter.collect()
            self._recorder.asked(caller)
            schedule.learn(index, ending=other)
            slot = self._slots.get(index)
            if slot is None:
                slot = self._start_now(index)
            slot.holders.add(caller)
            self._top_up(index, schedule)
        asked = mark(self.device, self._runtime) if self._cuda else None  # GPU idle time runs from here
        try:
            if not slot.done.is_set():
                waited = time.perf_counter()
                with self._lock:  # not ``Event.wait``: interrupted, its own lock could stay held and stall the reader
                    self._cond.wait_for(slot.done.is_set)
                    if not self._cuda:  # on CUDA: the GPU's idle time, measured by the meter
                        self.stats.stall_seconds += time.perf_counter() - waited
            if slot.error is not None:
                raise slot.error
        except BaseException:
            with self._lock:
                slot.holders.discard(caller)
                if slot.error is not None and not slot.holders and self._slots.get(index) is slot:
                    self._drop(index)
            raise
        if not self._cuda:
            return Lease(_views(slot.source, slot.buffer.tensor), False, self._staging, self, index, caller)
        data = hand_to_compute(slot.device_data, slot.copied, self.device, self._meter, self._runtime, asked)
        return Lease(_views(slot.source, data, slot.layout.offsets), False, self._ring.pointers, self, index, caller)

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

    @property
    def runtime(self) -> CudaRuntime | None:
        """The CUDA calls of the device path (a fake in tests); None on the CPU path."""
        return self._runtime

    @property
    def side_stream(self) -> torch.cuda.Stream | None:
        """The stream host-to-device copies run on (device path only)."""
        return self._side_stream

    def to_compute(self, data: torch.Tensor, copied: torch.cuda.Event, asked: torch.cuda.Event) -> torch.Tensor:
        """``data``, copied on the side stream outside the group stream (``expert_transfer.py``), for the compute
        stream: it waits for ``copied``; the time from ``asked`` to then counts as GPU idle time."""
        with self._lock:
            return hand_to_compute(data, copied, self.device, self._meter, self._runtime, asked)

    def record_experts(self, nbytes: int, hits: int, misses: int, unused: int = 0) -> None:
        """Count expert rows read outside the group stream (``experts.py``) in the forward in progress."""
        with self._lock:
            self._recorder.experts(nbytes, hits, misses, unused)

    def forward_stats(self) -> list[ForwardStats]:
        """The last forwards (up to 64), oldest first; the one in progress, if any, last."""
        with self._lock:
            if self._cuda:
                self.stats.stall_seconds += self._meter.collect()
            return self._recorder.forwards()

    def _top_up(self, index: int, schedule: SuccessorSchedule) -> None:
        wanted = schedule.upcoming(index, self.depth, skip=self._kept)
        for other, slot in list(self._slots.items()):
            if other != index and not slot.holders and other not in wanted and slot.done.is_set():
                self._drop(other)
        for group in wanted:
            if group not in self._slots and len(self._slots) < self._max_slots:
                buffer = self._free_buffer(group)
                if buffer is None:
                    break
                self._start(group, buffer)

    def _free_buffer(self, index: int) -> StagingBuffer | None:
        """The buffer group ``index`` is read into: a staging buffer no slot owns (nor a copy still reads), or, on CUDA,
        the group's own buffer when it is resident in RAM."""
        if index in self._resident:
            return self._resident[index].buffer
        return self.pool.free(slot.buffer for slot in [*self._slots.values(), *self._copying.values()])

    def _start_now(self, index: int) -> _Slot:
        while True:
            buffer = self._free_buffer(index) if len(self._slots) < self._max_slots else None
            if buffer is not None:
                return self._start(index, buffer)
            idle = [i for i, s in self._slots.items() if not s.holders]
            if not idle:
                waiting = self._copying or not all(s.done.is_set() for s in self._slots.values())
                if len(self._slots) >= self._max_slots or not waiting:
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
        slot = _Slot(self.sources[index], buffer, from_ram=index in self._resident)
        if self._ring is not None:
            slot.entry = self._ring.free(s.entry for s in self._slots.values())
            slot.layout = self._layouts[index]
        self._requests.put((index, slot))
        self._slots[index] = slot
        if not slot.from_ram:
            self._recorder.read(slot.source.nbytes)
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
                futures = [] if slot.from_ram else self.reader.submit(list(slot.source.segments), slot.buffer)
            except BaseException as e:
                slot.error = e
                futures = []
            slot.pending = len(futures)
        this = weakref.ref(self)  # reads in flight do not keep a dropped model's prefetcher alive
        for future in futures:  # outside the lock: a read already done runs its callback (digest, copy) right here
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
            if last and slot.error is None and logger.isEnabledFor(logging.DEBUG):
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
                if not slot.from_ram:
                    self._verify(slot)
                if self._cuda:
                    self._copy_to_device(slot)
        except BaseException as e:
            slot.error = e
        finally:
            with self._lock:
                slot.done.set()
                self._cond.notify_all()
            if id(slot) in self._copying:
                self._give_back(slot)

    def _verify(self, slot: _Slot) -> None:
        source = slot.source
        due = id(source) not in self._verified or source.verify_every_read
        if source.after_read is not None:
            source.after_read(slot.buffer, due)
        if not due:
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
        """On an I/O thread: queue the copy of the slot's bytes into its device buffer (the group is ready for compute
        once queued: compute waits for the copy's event); the staging buffer stays owned until ``_give_back``."""
        if not slot.from_ram:  # a resident group's buffer is never refilled: nothing to give back
            with self._lock:
                self._copying[id(slot)] = slot
        slot.device_data, slot.copied = self._ring.fill(slot.entry, slot.buffer.tensor, slot.layout, self._side_stream)
        if slot.from_ram:
            slot.buffer = None  # the resident group keeps its buffer; this slot owns none of the pool's

    def _give_back(self, slot: _Slot) -> None:
        """On an I/O thread: wait for the copy to have read the staging buffer, then let it be refilled."""
        try:
            if slot.copied is not None:
                slot.copied.synchronize()
        finally:
            with self._lock:
                del self._copying[id(slot)]
                slot.buffer = None
                self._cond.notify_all()

    def _drop(self, index: int) -> None:
        slot = self._slots.pop(index)
        if slot.entry is not None:  # on the compute thread: its buffer is refilled after the work queued so far
            self._ring.consumed(slot.entry)
        slot.device_data = None
        if id(slot) not in self._copying:
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
        if self._cuda and self._forked_from is None:  # no copy may still read a buffer unmapped below
            self._runtime.synchronize(self.device)
        if self._ring is not None:
            self._ring.close()
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
