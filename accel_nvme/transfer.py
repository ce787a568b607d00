"""Host to device: where a group's bytes land on the GPU, how they are copied there, and how compute waits for them.

Streamed groups (and groups resident in RAM) are copied into a ring of ``prefetch_depth + 1`` device buffers, one per
prefetcher slot, on a side stream. Before a buffer is refilled, the side stream waits on the "consumed" event the
compute stream recorded when the buffer's previous group was dropped, so device memory stays bounded whatever the CPU
runs ahead, and no copy overwrites bytes that queued kernels still read. The compute stream waits on each copy's event
before using the group. Every tensor starts at a multiple of ``DEVICE_ALIGNMENT`` in its device buffer (the file packs
them at 64 bytes), as in memory from the caching allocator, so kernels chosen by pointer alignment are the same as for
the model in memory. The time the compute stream runs dry waiting for a group (its read or its copy) is timed with
events.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .format import align_up

DEVICE_ALIGNMENT = 512  # the caching allocator's block alignment; cuBLASLt picks kernels by alignment up to 256


@dataclass(frozen=True)
class Run:
    """``nbytes`` copied from ``host_offset`` of a host buffer to ``device_offset`` of a device buffer."""

    host_offset: int
    device_offset: int
    nbytes: int


@dataclass(frozen=True)
class DeviceLayout:
    """Where a group's tensors go in a device buffer: ``offsets`` (in the order given), the copies, the bytes needed."""

    offsets: tuple[int, ...]
    runs: tuple[Run, ...]
    nbytes: int


def device_layout(extents: Sequence[tuple[int, int]], alignment: int = DEVICE_ALIGNMENT) -> DeviceLayout:
    """A layout for tensors at host ``(offset, nbytes)``: each at a multiple of ``alignment``, in host order, without
    overlap; neighbours whose shift is the same are copied as one run."""
    offsets = [0] * len(extents)
    runs: list[list[int]] = []  # [host_offset, device_offset, nbytes]
    end, shift = 0, None
    for i in sorted(range(len(extents)), key=lambda i: extents[i][0]):
        host, nbytes = extents[i]
        if shift is not None and (host + shift) % alignment == 0 and host + shift >= end:
            device = host + shift
        else:
            device = align_up(end, alignment)
        offsets[i] = device
        if nbytes:
            if runs and device - host == shift:
                runs[-1][2] = host + nbytes - runs[-1][0]
            else:
                runs.append([host, device, nbytes])
            shift = device - host
            end = device + nbytes
    total = max(alignment, align_up(end, alignment))
    return DeviceLayout(tuple(offsets), tuple(Run(*run) for run in runs), total)


def aligned_empty(nbytes: int, device: torch.device) -> torch.Tensor:
    """``nbytes`` uninitialised bytes on ``device`` starting at a multiple of ``DEVICE_ALIGNMENT`` (the caching
    allocator's blocks are; other allocators are not asked to be)."""
    data = torch.empty(nbytes + DEVICE_ALIGNMENT, dtype=torch.uint8, device=device)
    skip = -data.data_ptr() % DEVICE_ALIGNMENT
    return data[skip : skip + nbytes]


class CudaRuntime:
    """The CUDA calls of the transfer: events, the current stream, running on a stream (a fake stands in on the CPU)."""

    def event(self) -> torch.cuda.Event:
        """A new event that can time."""
        return torch.cuda.Event(enable_timing=True)

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        """A new (side) stream on ``device``."""
        return torch.cuda.Stream(device)

    def synchronize(self, device: torch.device) -> None:
        """Wait for all work queued on ``device``."""
        torch.cuda.synchronize(device)

    def current_stream(self, device: torch.device) -> torch.cuda.Stream:
        """The compute stream: the current stream of ``device``."""
        return torch.cuda.current_stream(device)

    @contextlib.contextmanager
    def using(self, device: torch.device, stream: torch.cuda.Stream | None) -> Iterator[None]:
        """Run the body on ``device`` and (when given) ``stream``."""
        with torch.cuda.device(device), torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            yield


class StallMeter:
    """GPU idle time of the compute stream waiting for groups: for each group, from an event recorded when the compute
    thread asked for it (the stream gets there once the work queued before is done) to one recorded after the wait on
    its copy (the stream gets there once the thread had the group ready and the copy is done). Zero when the GPU was
    behind and the copy done; the whole gap when it ran dry, whether on the read or on the copy. Pairs are read once
    both events completed."""

    def __init__(self) -> None:
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def add(self, asked: torch.cuda.Event, ready: torch.cuda.Event) -> None:
        """The compute stream was asked for a group at ``asked`` and could use it at ``ready``."""
        self._pending.append((asked, ready))

    def collect(self) -> float:
        """Seconds of stall in the pairs completed since the last call (later pairs are kept for the next)."""
        seconds, pending = 0.0, []
        for asked, ready in self._pending:
            if asked.query() and ready.query():
                seconds += max(0.0, asked.elapsed_time(ready)) / 1e3
            else:
                pending.append((asked, ready))
        self._pending = pending
        return seconds


class DeviceRing:
    """``count`` device buffers of ``nbytes`` each, owned by prefetcher slots in turn; ``pointers`` recognises them."""

    def __init__(self, count: int, nbytes: int, device: torch.device, runtime: CudaRuntime | None = None):
        self.device = device
        self.runtime = runtime or CudaRuntime()
        self.buffers = [aligned_empty(nbytes, device) for _ in range(count)]
        self._consumed: list[torch.cuda.Event | None] = [None] * count
        self.pointers = frozenset(b.untyped_storage().data_ptr() for b in self.buffers)

    @property
    def nbytes(self) -> int:
        """Device bytes the ring holds."""
        return sum(b.numel() for b in self.buffers)

    def free(self, owned: Iterable[int | None]) -> int | None:
        """A buffer (its index) that is none of ``owned`` (the buffers slots hold now), or None when all are."""
        taken = set(owned)
        return next((i for i in range(len(self.buffers)) if i not in taken), None)

    def consumed(self, entry: int) -> None:
        """Compute is done with buffer ``entry`` once the work queued on the compute stream up to now has run."""
        event = self.runtime.event()
        event.record(self.runtime.current_stream(self.device))
        self._consumed[entry] = event

    def wait_consumed(self, entry: int, stream: torch.cuda.Stream) -> None:
        """Make ``stream`` wait until compute consumed what buffer ``entry`` held before."""
        event = self._consumed[entry]
        if event is not None:
            stream.wait_event(event)

    def fill(
        self, entry: int, host: torch.Tensor, layout: DeviceLayout, stream: torch.cuda.Stream
    ) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Copy ``host`` (pinned) into buffer ``entry`` after its last consumer, per ``layout``, on ``stream``.

        Returns the buffer and the event recorded after the copy; ``host`` must not be written before it completed.
        """
        data = self.buffers[entry]
        with self.runtime.using(self.device, stream):
            self.wait_consumed(entry, stream)
            copy_runs(data, host, layout)
            copied = self.runtime.event()
            copied.record(stream)
        return data, copied

    def close(self) -> None:
        """Give the device memory back (the caller synchronized the streams that use it)."""
        self.buffers = []
        self._consumed = []


def copy_runs(data: torch.Tensor, host: torch.Tensor, layout: DeviceLayout) -> None:
    """Queue the copies of ``layout`` from ``host`` into ``data`` on the current stream."""
    for run in layout.runs:
        data[run.device_offset : run.device_offset + run.nbytes].copy_(
            host[run.host_offset : run.host_offset + run.nbytes], non_blocking=True
        )


def copy_whole(host: torch.Tensor, layout: DeviceLayout, device: torch.device, runtime: CudaRuntime) -> torch.Tensor:
    """A new device buffer holding ``host`` per ``layout``, copied before this returns (for groups kept on the GPU)."""
    with runtime.using(device, None):
        data = aligned_empty(layout.nbytes, device)
        copy_runs(data, host, layout)
        runtime.current_stream(device).synchronize()
    return data


def mark(device: torch.device, runtime: CudaRuntime) -> torch.cuda.Event:
    """An event recorded on the compute stream of ``device`` now."""
    event = runtime.event()
    event.record(runtime.current_stream(device))
    return event


def hand_to_compute(
    data: torch.Tensor,
    copied: torch.cuda.Event,
    device: torch.device,
    meter: StallMeter,
    runtime: CudaRuntime,
    asked: torch.cuda.Event,
) -> torch.Tensor:
    """``data`` for the current (compute) stream of ``device``: it waits for ``copied``; ``meter`` gets the time from
    ``asked`` (recorded when the group was asked for) to the end of that wait."""
    compute = runtime.current_stream(device)
    compute.wait_event(copied)
    meter.add(asked, mark(device, runtime))
    return data
