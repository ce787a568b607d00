"""MoE experts' bytes, one expert at a time: from a page-aligned group file into a host buffer mirroring its data
section, through an LRU cache every experts module shares, with reads ahead of the experts the previous token used.

An expert is some byte ranges of the data section (``Expert.spans``, read as whole pages) checked against digests
(``Expert.checks``): its rows of each fused tensor (``experts.py``), or its own module's tensors stored together
(``expert_modules.py``). Experts not asked for are never read: their pages hold zeros and take no RAM. A round is one
forward of the experts module: ``begin`` takes the reads started ahead, ``load`` makes experts present (all reads in
flight at once), ``finish`` gives back what was read ahead and not used, ``keep`` hands the used ones to the cache.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from accelerate.hooks import ModelHook, add_hook_to_module

from .format import ALIGNMENT, GroupFileError, align_up, digest
from .io import Segment
from .prefetch import Prefetcher
from .store import StoredGroup

logger = logging.getLogger(__name__)

FULL_READ_SHARE = 0.5  # above this share of a module's experts in one forward, every expert is read in one pass


@dataclass(frozen=True)
class Check:
    """Bytes ``start:end`` of the data section must have ``digest``; ``what`` names them in errors."""

    start: int
    end: int
    digest: str
    what: str


@dataclass(frozen=True)
class Expert:
    """One expert in a group file: the byte ranges read for it (same count for every expert) and their digests."""

    spans: tuple[tuple[int, int], ...]
    checks: tuple[Check, ...]


class ExpertBuffer:
    """Page-aligned anonymous memory mirroring an experts file's data section; pages never read hold zeros."""

    def __init__(self, nbytes: int):
        self.nbytes = max(ALIGNMENT, align_up(nbytes))
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)  # mostly never touched
        self._mmap = mmap.mmap(-1, self.nbytes, flags=flags)
        self.view = memoryview(self._mmap)
        self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8)

    def forget(self, start: int, end: int) -> None:
        """Give back the pages wholly inside ``[start, end)``: they read as zeros again, and take no RAM."""
        first, last = align_up(start), end - end % ALIGNMENT
        if last > first:
            self._mmap.madvise(mmap.MADV_DONTNEED, first, last - first)


class ExpertCache:
    """The experts whose rows stay in their buffers after a forward, least recently used first, within ``budget``."""

    def __init__(self, budget: int):
        self.budget = budget
        self.nbytes = 0
        self._lru: OrderedDict[tuple[ExpertRows, int], int] = OrderedDict()

    def holds(self, rows: ExpertRows, expert: int) -> bool:
        """Whether ``expert`` of ``rows`` is in its buffer now."""
        return (rows, expert) in self._lru

    def keep(self, rows: ExpertRows, experts: list[int]) -> None:
        """``experts`` of ``rows`` were used just now; then forget the least recently used beyond the budget."""
        for expert in experts:
            key = (rows, expert)
            if key in self._lru:
                self._lru.move_to_end(key)
            else:
                self._lru[key] = rows.expert_bytes
                self.nbytes += rows.expert_bytes
        while self.nbytes > self.budget:
            (owner, expert), nbytes = self._lru.popitem(last=False)
            owner.evicted(expert)
            self.nbytes -= nbytes

    def drop(self, rows: ExpertRows) -> None:
        """Forget every expert of ``rows`` (its module is closed)."""
        for key in [key for key in self._lru if key[0] is rows]:
            self.nbytes -= self._lru.pop(key)


@dataclass
class Speculation:
    """Experts read ahead into a buffer: the experts, their reads in flight, and the bytes of each expert."""

    experts: list[int] = field(default_factory=list)
    futures: list[Future] = field(default_factory=list)
    nbytes: dict[int, int] = field(default_factory=dict)
    pid: int = field(default_factory=os.getpid)  # the process whose reader threads run the reads


class ExpertRows:
    """The experts of one group file, read into a host buffer on demand, kept by the shared cache, read ahead."""

    def __init__(
        self,
        prefetcher: Prefetcher,
        group: StoredGroup,
        experts: list[Expert],
        cache: ExpertCache,
        verify_every_read: bool = False,
    ):
        self.prefetcher = prefetcher
        self.group = group
        self.experts = experts
        self.cache = cache
        self.verify_every_read = verify_every_read
        self.buffer = ExpertBuffer(group.data_bytes)
        self.expert_bytes = self._nbytes(0)
        self.ahead: list[ExpertRows] = []  # the experts modules run next, whose reads ``read_ahead`` starts
        self.candidates: list[int] = []  # the experts the last one-token round used: read ahead for the next
        self.last_read: list[int] = []  # the experts whose bytes the round in progress (or the last) read
        self._in_use: set[int] = set()  # loaded in the round in progress: forgotten on abort unless cached
        self._confirmed: set[int] = set()  # read ahead and loaded in this round
        self._pending = Speculation()  # the reads ahead this round took over
        self._kept: set[int] = set()  # experts the cache let go of, whose pages wait to be read again ahead
        self._verified: set[tuple[int, int]] = set()
        self._speculation = Speculation()

    def __repr__(self) -> str:
        return f"ExpertRows(group={self.group.name!r}, experts={len(self.experts)})"

    @property
    def reading_ahead(self) -> list[int]:
        """The experts whose bytes are read ahead for this module's next round."""
        return list(self._speculation.experts)

    @property
    def used(self) -> list[int]:
        """The experts the round in progress (or the last) loaded."""
        return sorted(self._in_use)

    def begin(self) -> None:
        """A round starts: take over the reads started ahead."""
        self._pending, self._confirmed, self._in_use, self.last_read = self._take_speculation(), set(), set(), []

    def load(self, wanted: list[int], routed: list[int]) -> None:
        """Make ``wanted`` present: those cached or loaded this round as they are, those read ahead once their reads
        end, the rest read now, all in flight at once; each checked against its digests. ``routed``: the experts
        counted as hits or misses."""
        pending = self._pending
        missing = self._absent(wanted)
        confirmed = [e for e in wanted if e in pending.nbytes and e not in self._confirmed]
        hits = sum(1 for e in routed if self.cache.holds(self, e))
        self._in_use.update(wanted)
        segments = self._segments(missing)
        waited, pending.futures = (pending.futures, []) if confirmed else ([], pending.futures)
        _settle([*waited, *(self.prefetcher.reader.submit(segments, self.buffer) if segments else [])])
        self._confirmed.update(confirmed)
        self._verify(missing + confirmed)
        self.last_read = sorted({*self.last_read, *missing, *confirmed})
        nbytes = sum(s.length for s in segments) + sum(pending.nbytes[e] for e in confirmed)
        self.prefetcher.record_experts(nbytes, hits, len(routed) - hits)

    def start(self, experts: list[int]) -> None:
        """Start reading ``experts`` now (those not cached, loaded or in flight), all at once; ``load`` then waits for
        them as for reads ahead, and ``finish`` counts those never loaded as unused."""
        new = self._absent(experts)
        if new:
            futures, nbytes = self._read(new)
            self._pending.futures += futures
            self._pending.experts += new
            self._pending.nbytes.update(nbytes)

    @property
    def pending(self) -> list[int]:
        """The experts whose reads the round in progress took over or started, not loaded yet."""
        return sorted(set(self._pending.nbytes) - self._confirmed)

    def finish(self) -> None:
        """The round's experts are known: the reads ahead it did not use are given back, counted as unused."""
        pending, self._pending = self._pending, Speculation()
        _wait(self, pending)
        unused = [e for e in pending.experts if e not in self._confirmed]
        kept, self._kept = self._kept, set()  # not read ahead after all (cached then), nor used now: given back
        stale = [e for e in kept if e not in pending.nbytes and e not in self._in_use and not self.cache.holds(self, e)]
        for expert in unused + stale:
            self.forget(expert)
        nbytes = sum(pending.nbytes[e] for e in unused)
        self.prefetcher.record_experts(nbytes, 0, 0, nbytes)

    def keep(self, experts: list[int] | None = None) -> None:
        """``experts`` (by default every one this round loaded) ran: the cache keeps them, within its budget."""
        self.cache.keep(self, self.used if experts is None else experts)

    def abort(self) -> None:
        """The round raised: what it read, and what was read ahead, is forgotten unless cached."""
        pending, self._pending = self._pending, Speculation()
        _wait(self, pending)
        experts = {*self._in_use, *pending.experts, *self._drain(), *self._kept}
        self._in_use, self._kept = set(), set()
        for expert in experts:
            if not self.cache.holds(self, expert):
                self.forget(expert)

    def read_ahead(self) -> None:
        """Start the reads ahead of the experts modules run next (once this one's own reads are in)."""
        for rows in self.ahead:
            rows.speculate()

    def speculate(self) -> None:
        """Start reading the experts of ``candidates`` not cached (unless reads ahead are in flight already); the next
        round keeps the ones it uses."""
        experts = [e for e in self.candidates if not self.cache.holds(self, e)]
        if self._speculation.experts or not experts:
            return
        self._speculation = Speculation(experts, *self._read(experts))

    def evicted(self, expert: int) -> None:
        """The cache let go of ``expert``: give back its RAM, unless the next read ahead reads it again into the same
        pages (given back then, if the round does not use it)."""
        if expert in self.candidates:
            self._kept.add(expert)
        else:
            self.forget(expert)

    def forget(self, expert: int) -> None:
        """Give back the RAM of ``expert``'s bytes; they read as zeros until read again."""
        for start, end in self.experts[expert].spans:
            self.buffer.forget(start, end)

    def close(self) -> None:
        """Wait for reads in flight and give back every page: the module is closed."""
        _wait(self, self._pending)
        self._pending = Speculation()
        self._drain()
        self.candidates, self._kept, self._in_use = [], set(), set()
        self.cache.drop(self)
        self.buffer.forget(0, self.buffer.nbytes)

    def _absent(self, experts: list[int]) -> list[int]:
        """Those of ``experts`` neither cached, nor loaded this round, nor being read for it."""
        return [
            e
            for e in experts
            if e not in self._in_use and not self.cache.holds(self, e) and e not in self._pending.nbytes
        ]

    def _read(self, experts: list[int]) -> tuple[list[Future], dict[int, int]]:
        """Start reading sorted ``experts``, all in flight at once: the reads, and the bytes of each expert."""
        futures = self.prefetcher.reader.submit(self._segments(experts), self.buffer)
        return futures, {e: self._nbytes(e) for e in experts}

    def _nbytes(self, expert: int) -> int:
        """Bytes read for ``expert``: its spans widened to the pages they touch."""
        return sum(end - start for start, end in self._spans(expert))

    def _spans(self, expert: int) -> list[tuple[int, int]]:
        """``expert``'s spans widened to the pages they touch."""
        return [
            (start - start % ALIGNMENT, min(align_up(end), self.buffer.nbytes))
            for start, end in self.experts[expert].spans
        ]

    def _segments(self, experts: list[int]) -> list[Segment]:
        """The requests for sorted ``experts``: consecutive ones make one request per span."""
        group, segments = self.group, []
        for span in range(len(self.experts[0].spans)):
            for first, last in _runs(experts):
                start, end = self._spans(first)[span][0], self._spans(last)[span][1]
                needed = min(end, group.data_bytes) - start
                segments.append(Segment(group.path, group.data_offset + start, end - start, start, needed))
        return segments

    def _take_speculation(self) -> Speculation:
        """The reads started ahead, handed over. In a forked child they never complete (the parent's threads run
        them): none then, and their pages are given back, to be read again."""
        speculation, self._speculation = self._speculation, Speculation()
        if speculation.pid == os.getpid():
            return speculation
        for expert in speculation.experts:
            self.forget(expert)
        return Speculation()

    def _drain(self) -> list[int]:
        """Wait for the reads started ahead, whatever their outcome; the experts they were for."""
        speculation = self._take_speculation()
        _wait(self, speculation)
        return speculation.experts

    def _verify(self, experts: list[int]) -> None:
        for e in experts:
            for i, check in enumerate(self.experts[e].checks):
                if (e, i) in self._verified and not self.verify_every_read:
                    continue
                if digest(self.buffer.view[check.start : check.end]) != check.digest:
                    raise GroupFileError(
                        f"{self.group.path}: {check.what} does not match its digest in the manifest; the file is "
                        "damaged or was replaced: run `accel-nvme verify` on the folder, then `accel-nvme clean` it "
                        "(or delete it) to have it rewritten"
                    )
                self._verified.add((e, i))


def attach_with_abort(module: torch.nn.Module, hook: ModelHook) -> None:
    """``add_hook_to_module``; a forward that raises calls ``hook.abort`` (meta tensors back, reads forgotten)."""
    add_hook_to_module(module, hook)
    forward = module.forward

    @functools.wraps(forward)
    def forward_or_abort(*args, **kwargs):
        try:
            return forward(*args, **kwargs)
        except BaseException:
            hook.abort(module)
            raise

    module.forward = forward_or_abort


def _settle(futures: list[Future]) -> None:
    """Wait for every read, then raise the first error (no read is left writing into a buffer)."""
    errors = [error for future in futures if (error := future.exception()) is not None]
    if errors:
        raise errors[0]


def _wait(rows: ExpertRows, speculation: Speculation) -> None:
    """Wait for the reads ahead still in flight, logging (not raising) their errors: their bytes are not used."""
    futures, speculation.futures = speculation.futures, []
    for error in filter(None, (future.exception() for future in futures)):
        logger.warning(
            "%s: a read ahead of experts %s failed (its bytes are not used): %s", rows, speculation.experts, error
        )


def _runs(experts: list[int]) -> list[tuple[int, int]]:
    """Sorted ``experts`` as runs of consecutive ones, ``(first, last)``."""
    runs: list[tuple[int, int]] = []
    for e in experts:
        if runs and runs[-1][1] == e - 1:
            runs[-1] = (runs[-1][0], e)
        else:
            runs.append((e, e))
    return runs
