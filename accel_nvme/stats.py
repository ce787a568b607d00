"""What the stream did: totals and per-forward figures of one prefetcher, and ``accel_nvme.stats(model)``'s record.

A forward begins when a module asks for a group and ends when a module that already asked in it asks again; its
figures are differences of the running totals between those two moments.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .io import FileReader

HISTORY = 64


@dataclass
class ForwardStats:
    """What one forward (or all of them) asked of the stream.

    ``seconds``: wall time from the forward's first group to its last release; ``read_seconds``: time at least one
    read was in flight; ``stall_seconds``: time the compute waited for a group (CPU: the thread; CUDA: the GPU, from
    when the group was asked for to when its copy was done, timed with events, counted once they completed). MoE
    experts are read one expert at a time (``expert_rows.py``): ``expert_bytes_read`` (counted in ``bytes_read``
    too), and the routed experts found in the expert cache (``expert_cache_hits``) or read (``expert_cache_misses``);
    ``expert_bytes_unused``: rows read ahead for the experts the previous token used, that routing did not confirm
    (counted in ``expert_bytes_read`` too).
    """

    seconds: float = 0.0
    groups_read: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0
    stall_seconds: float = 0.0
    expert_bytes_read: int = 0
    expert_cache_hits: int = 0
    expert_cache_misses: int = 0
    expert_bytes_unused: int = 0

    @property
    def expert_cache_hit_rate(self) -> float:
        """Share of the routed experts that were already in the expert cache (0.0 when no expert was routed)."""
        routed = self.expert_cache_hits + self.expert_cache_misses
        return self.expert_cache_hits / routed if routed else 0.0

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


# figures kept as running totals, a forward's the difference (``seconds`` is timed, ``read_seconds`` the reader's)
_RUNNING = tuple(f.name for f in fields(ForwardStats) if f.name not in ("seconds", "read_seconds"))


class ForwardRecorder:
    """Running totals and a ring of the last ``HISTORY`` forwards; read time is ``reader.busy_seconds``.

    No lock of its own: its owner calls it under the lock that guards the stream's state.
    """

    def __init__(self, reader: FileReader):
        self.totals = ForwardStats()  # groups_read, bytes_read and stall_seconds; read_seconds is the reader's
        self.reader = reader
        self._history = [ForwardStats() for _ in range(HISTORY)]
        self._forwards = 0
        self._seen: set[Hashable] = set()  # the callers of the forward in progress
        self._start = ForwardStats()
        self._started_at = 0.0
        self._released_at = 0.0

    def asked(self, caller: Hashable) -> None:
        """``caller`` asks for a group: asking again means a new forward began, so close the previous one's record."""
        if caller in self._seen:
            self._since_start(self._history[self._forwards % HISTORY])
            self._forwards += 1
            self._seen.clear()
        if not self._seen:
            self._started_at = time.perf_counter()
            self._snapshot(self._start)
        self._seen.add(caller)

    def released(self) -> None:
        """A group was released: the forward in progress lasts at least until now."""
        self._released_at = time.perf_counter()

    def read(self, nbytes: int) -> None:
        """A group read of ``nbytes`` was queued: it counts in the forward that asked for it, even if it ends later."""
        self.totals.groups_read += 1
        self.totals.bytes_read += nbytes

    def experts(self, nbytes: int, hits: int, misses: int, unused: int = 0) -> None:
        """Expert bytes ``nbytes`` were read for an experts module whose routed experts were ``hits`` cached;
        ``unused`` of them were read ahead and not routed."""
        self.totals.expert_bytes_unused += unused
        self.totals.bytes_read += nbytes
        self.totals.expert_bytes_read += nbytes
        self.totals.expert_cache_hits += hits
        self.totals.expert_cache_misses += misses

    def forget_forward_in_progress(self) -> None:
        """A forked child: the callers of the parent's forward in progress never ask here."""
        self._seen.clear()

    def forwards(self) -> list[ForwardStats]:
        """The last forwards (up to ``HISTORY``), oldest first; the one in progress, if any, last."""
        keep = HISTORY - 1 if self._seen else HISTORY
        done = [self._history[i % HISTORY] for i in range(max(0, self._forwards - keep), self._forwards)]
        records = [ForwardStats(**vars(r)) for r in done]
        if self._seen:
            records.append(self._since_start(ForwardStats()))
        return records

    def _snapshot(self, record: ForwardStats) -> ForwardStats:
        """``record`` set to the running totals (``seconds`` left as it is)."""
        for name in _RUNNING:
            setattr(record, name, getattr(self.totals, name))
        record.read_seconds = self.reader.busy_seconds
        return record

    def _since_start(self, record: ForwardStats) -> ForwardStats:
        self._snapshot(record)
        for name in (*_RUNNING, "read_seconds"):
            setattr(record, name, getattr(record, name) - getattr(self._start, name))
        record.seconds = max(0.0, self._released_at - self._started_at)
        return record


@dataclass(frozen=True)
class NvmeStats:
    """``accel_nvme.stats(model)``: per-forward and total figures of a model's nvme stream, and its resident groups.

    ``bytes_read`` of a forward counts streamed bytes only: resident groups are read once, at dispatch. ``modules``:
    the modules on the nvme tier (those of ``resident`` groups are kept in memory, the others stream).
    """

    groups: int
    resident: list[str]
    resident_bytes: int
    forwards: list[ForwardStats]
    total: ForwardStats
    modules: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain data, GB/s and overlap included (for JSON and logging)."""

        def row(r: ForwardStats) -> dict[str, Any]:
            hit_rate = r.expert_cache_hit_rate
            return {**vars(r), "gb_per_s": r.gb_per_s, "overlap": r.overlap, "expert_cache_hit_rate": hit_rate}

        return {
            "groups": self.groups,
            "resident": self.resident,
            "resident_bytes": self.resident_bytes,
            "forwards": [row(r) for r in self.forwards],
            "total": row(self.total),
            "modules": self.modules,
        }
