"""The schedule: which groups are read ahead, into which staging buffer, and when a buffer is free again.

Groups are read ``depth`` ahead of the one in use, following the order in which groups were last seen to succeed
each other (the device_map order until the first forward shows otherwise), wrapping around from the last group to the
first, so the next forward (next token, next denoising step) starts warm; a decoder that runs alone after a first
call with its encoder is followed as it runs. A released
group keeps its buffer until another group is acquired, so the modules of one group (or a module called twice) reuse
it without a second read. On CUDA the
I/O thread that completes a read also issues the host-to-device copy on a side stream and records an event; the
compute stream waits on that event, and the device memory is released with ``record_stream`` so the caching
allocator does not reuse it before the compute stream is done with it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .format import GroupFileError, digest
from .io import FileReader, Segment, StagingBuffer

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
class ForwardStats:
    """What one forward (or all of them) asked of the stream.

    ``seconds``: wall time from the forward's first group to its last release; ``read_seconds``: time at least one
    read was in flight; ``stall_seconds``: time the compute thread waited for a group.
    """

    seconds: float = 0.0
    groups_read: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0
    stall_seconds: float = 0.0

    @property
    def gb_per_s(self) -> float:
        """Achieved read rate, in 10^9 bytes per second of reading."""
        return self.bytes_read / self.read_seconds / 1e9 if self.read_seconds else 0.0

    @property
    def overlap(self) -> float:
        """Share of the reading hidden behind compute (1.0: the compute thread never waited)."""
        if not self.read_seconds:
            return 1.0
        return min(1.0, max(0.0, 1.0 - self.stall_seconds / self.read_seconds))


HISTORY = 64


@dataclass
class _Slot:
    source: GroupSource
    buffer: StagingBuffer | None
    done: threading.Event = field(default_factory=threading.Event)
    pending: int = 0
    error: BaseException | None = None
    device_data: torch.Tensor | None = None
    copied: torch.cuda.Event | None = None
    users: int = 0
    started: float = field(default_factory=time.perf_counter)


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


def _views(source: GroupSource, data: torch.Tensor) -> dict[str, torch.Tensor]:
    """The member tensors of a group, as zero-copy views of the bytes ``data`` holds for it."""
    return {v.name: data[v.offset : v.offset + v.nbytes].view(v.dtype).view(v.shape) for v in source.views}


class Prefetcher:
    """Reads groups ahead of use into ``depth + 1`` reused staging buffers and hands out tensor views of them."""

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
        self.stats = ForwardStats()
        self._history = [ForwardStats() for _ in range(HISTORY)]
        self._forwards = 0
        self._seen: set[int] = set()  # the callers of the forward in progress
        self._forward_start = ForwardStats()
        self._started_at = 0.0
        self._released_at = 0.0
        self.successor = {i: (i + 1) % len(sources) for i in range(len(sources))}
        self._previous: int | None = None
        self._slots: dict[int, _Slot] = {}
        self._max_slots = depth + 1
        self._cuda = device.type == "cuda"
        self._side_stream = torch.cuda.Stream(device) if self._cuda else None
        largest = max((s.nbytes for s in sources), default=0)
        pin = device if self._cuda else None
        self._buffers = [StagingBuffer(largest, pin) for _ in range(min(self._max_slots, max(1, len(sources))))]
        self._free = list(self._buffers)
        self._pointers = frozenset(b.tensor.data_ptr() for b in self._buffers)
        self._cond = threading.Condition()
        self._closed = False
        self._attached = 0
        self._resident: dict[int, _Slot] = {}
        self._verified: set[int] = set()
        try:
            for index, where in (resident or {}).items():
                self._resident[index] = self._load_resident(sources[index], on_device=where == "device")
        except BaseException:
            self.close()
            raise

    @property
    def on_cuda(self) -> bool:
        """Whether groups are copied to a CUDA device (else modules use the staging buffers in place)."""
        return self._cuda

    def staging_pointers(self) -> frozenset[int]:
        """Addresses of the staging buffers, to recognise tensors that view them."""
        return self._pointers

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

    def _resident_views(self, slot: _Slot) -> dict[str, torch.Tensor]:
        if slot.device_data is not None:
            data = slot.device_data
        elif self._cuda:
            compute = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(self._side_stream):
                data = torch.empty(slot.source.nbytes, dtype=torch.uint8, device=self.device)
                data.copy_(slot.buffer.tensor[: slot.source.nbytes], non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self._side_stream)
            compute.wait_event(copied)
            data.record_stream(compute)
        else:
            data = slot.buffer.tensor
        return _views(slot.source, data)

    def acquire(self, index: int, caller: int | None = None) -> dict[str, torch.Tensor]:
        """The tensors of group ``index`` on the execution device, ready for the compute stream.

        ``caller`` identifies the module asking (several modules may share a group), for counting forwards.
        """
        caller = index if caller is None else caller
        resident = self._resident.get(index)
        if resident is not None:
            with self._cond:
                self._count_forward(caller)
                self._learn(index)
                self._top_up(index)
            return self._resident_views(resident)
        with self._cond:
            self._count_forward(caller)
            self._learn(index)
            slot = self._slots.get(index)
            if slot is None:
                slot = self._start_now(index)
            slot.users += 1
            self._top_up(index)
        try:
            if not slot.done.is_set():
                waited = time.perf_counter()
                slot.done.wait()
                self.stats.stall_seconds += time.perf_counter() - waited
            if slot.error is not None:
                raise slot.error
        except BaseException:
            with self._cond:
                slot.users -= 1
                if slot.error is not None and slot.users == 0 and self._slots.get(index) is slot:
                    self._drop(index)
            raise
        if self._cuda:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(slot.copied)
            slot.device_data.record_stream(compute)
            data = slot.device_data
        else:
            data = slot.buffer.tensor
        return _views(slot.source, data)

    def release(self, index: int) -> None:
        """A module is done with group ``index``; its buffer is refilled once another group is acquired."""
        with self._cond:
            slot = self._slots.get(index)
            if slot is not None:
                slot.users -= 1
            self._released_at = time.perf_counter()

    def forward_stats(self) -> list[ForwardStats]:
        """The last forwards (up to 64), oldest first; the one in progress, if any, last."""
        with self._cond:
            keep = HISTORY - 1 if self._seen else HISTORY
            done = [self._history[i % HISTORY] for i in range(max(0, self._forwards - keep), self._forwards)]
            records = [ForwardStats(**vars(r)) for r in done]
            if self._seen:
                records.append(self._since_start(ForwardStats()))
            return records

    def _count_forward(self, caller: int) -> None:
        """A module asking again means a new forward began: close the record of the previous one."""
        if caller in self._seen:
            self._since_start(self._history[self._forwards % HISTORY])
            self._forwards += 1
            self._seen.clear()
        if not self._seen:
            self._started_at = time.perf_counter()
            self._snapshot(self._forward_start)
        self._seen.add(caller)

    def _snapshot(self, record: ForwardStats) -> ForwardStats:
        record.groups_read = self.stats.groups_read
        record.bytes_read = self.stats.bytes_read
        record.read_seconds = self.reader.busy_seconds
        record.stall_seconds = self.stats.stall_seconds
        return record

    def _since_start(self, record: ForwardStats) -> ForwardStats:
        self._snapshot(record)
        start = self._forward_start
        record.seconds = max(0.0, self._released_at - self._started_at)
        record.groups_read -= start.groups_read
        record.bytes_read -= start.bytes_read
        record.read_seconds -= start.read_seconds
        record.stall_seconds -= start.stall_seconds
        return record

    def _learn(self, index: int) -> None:
        if self._previous is not None and self._previous != index:
            self.successor[self._previous] = index
        self._previous = index

    def _upcoming(self, index: int) -> list[int]:
        """The next ``depth`` streamed groups after ``index`` (resident ones need no read)."""
        upcoming = []
        group = index
        for _ in range(len(self.sources)):
            group = self.successor[group]
            if group == index or group in upcoming or len(upcoming) == self.depth:
                break
            if group not in self._resident:
                upcoming.append(group)
        return upcoming

    def _top_up(self, index: int) -> None:
        wanted = self._upcoming(index)
        for other, slot in list(self._slots.items()):
            if other != index and slot.users == 0 and other not in wanted and slot.done.is_set():
                self._drop(other)
        for group in wanted:
            if group not in self._slots and self._free and len(self._slots) < self._max_slots:
                self._start(group)

    def _start_now(self, index: int) -> _Slot:
        while not self._free or len(self._slots) >= self._max_slots:
            idle = [i for i, s in self._slots.items() if s.users == 0]
            if not idle and len(self._slots) >= self._max_slots:
                raise RuntimeError(
                    f"{len(self._slots)} nvme groups are in use at once, more than prefetch_depth + 1 = "
                    f"{self._max_slots}; raise prefetch_depth"
                )
            if idle:
                victim = min(idle, key=lambda i: not self._slots[i].done.is_set())
                slot = self._slots[victim]
                self._cond.wait_for(slot.done.is_set)
                if self._slots.get(victim) is slot and slot.users == 0:
                    self._drop(victim)
            elif not self._free:
                self._cond.wait()
        return self._start(index)

    def _start(self, index: int) -> _Slot:
        if self._closed:
            raise RuntimeError("the prefetcher was closed (its hooks were removed)")
        source = self.sources[index]
        slot = _Slot(source, self._free.pop())
        self._slots[index] = slot
        try:
            futures = self.reader.submit(list(source.segments), slot.buffer)
        except BaseException:
            self._drop(index)
            raise
        slot.pending = len(futures)
        if not futures:
            self._finish(slot)
        for future in futures:
            future.add_done_callback(lambda f, s=slot: self._on_read(s, f))
        return slot

    def _on_read(self, slot: _Slot, future: Future) -> None:
        with self._cond:
            if future.cancelled():
                slot.error = slot.error or RuntimeError(f"read of nvme group {slot.source.name!r} was cancelled")
            elif future.exception() is not None:
                slot.error = slot.error or future.exception()
            slot.pending -= 1
            last = slot.pending == 0
            if last and slot.error is None:
                self.stats.groups_read += 1
                self.stats.bytes_read += slot.source.nbytes
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
            with self._cond:
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
        with torch.cuda.device(self.device), torch.cuda.stream(self._side_stream):
            slot.device_data = torch.empty(slot.source.nbytes, dtype=torch.uint8, device=self.device)
            slot.device_data.copy_(slot.buffer.tensor[: slot.source.nbytes], non_blocking=True)
            slot.copied = torch.cuda.Event()
            slot.copied.record(self._side_stream)
        slot.copied.synchronize()
        with self._cond:
            self._free.append(slot.buffer)
            slot.buffer = None
            self._cond.notify_all()

    def _drop(self, index: int) -> None:
        slot = self._slots.pop(index)
        slot.device_data = None
        if slot.buffer is not None:
            self._free.append(slot.buffer)
            slot.buffer = None
        self._cond.notify_all()

    def close(self) -> None:
        """Wait for reads in flight, stop the reader's threads, close its files and free every staging buffer."""
        with self._cond:
            self._closed = True
            slots = list(self._slots.values())
        for slot in slots:
            slot.done.wait()
        with self._cond:
            self._slots.clear()
            self._free.clear()
        self.reader.close()
        for buffer in self._buffers + [r.buffer for r in self._resident.values() if r.buffer is not None]:
            buffer.close()
        self._buffers = []
        self._resident.clear()
