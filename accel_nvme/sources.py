"""Where a group's bytes come from: its group file, or straight from the safetensors checkpoint (``copy``).

A group streamed in place has no group file: its reads are the checkpoint's byte ranges, one O_DIRECT read per run
of tensors that are contiguous in one shard (rounded out to 4096), several where a block spans shards. The offload
folder then holds only the manifest and the digests of the ranges read (``digests.json``, recorded on their first read
and checked on the first read of every later launch). A checkpoint does not keep tensors 64-byte aligned, and CPU
kernels can give other bits at another alignment: after each read, every tensor off a 64-byte boundary is moved
(``memmove``, that tensor only, highest first) to the next aligned place of the buffer, before any module sees it.
The checkpoint files' identity (device, inode, size, mtime, ctime) is checked after every read: a file rewritten
underneath raises, never serves new or mixed bytes.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from .format import ALIGNMENT, DTYPE_TO_SAFETENSORS, TENSOR_ALIGNMENT, GroupFileError, align_up, digest, open_regular
from .io import Segment
from .planning import read_sources
from .prefetch import GroupSource, TensorView
from .staging import StagingBuffer
from .store import (
    CheckpointGroup,
    CheckpointTensor,
    GroupPlan,
    Manifest,
    check_private,
    manifest_digest,
    resaved_by_transformers,
)

logger = logging.getLogger(__name__)

DIGESTS_NAME = "digests.json"


def stream_in_place(plans: list[GroupPlan], offload_dir: str | os.PathLike, copy: bool | str) -> bool:
    """Mark every group to be read from its checkpoint, or none; returns whether they are.

    In place needs every tensor to sit in a safetensors checkpoint in the dtype the module computes with; then
    ``copy=False`` streams in place, ``True`` writes group files, ``"auto"`` streams in place when the checkpoint and
    ``offload_dir`` are on the same filesystem (a checkpoint on another drive may be slower than the offload folder).
    """
    reason = None if plans else "no groups"
    files: set[str] = set()
    for plan in plans:
        if reason is None and plan.per_expert:
            reason = f"{plan.name!r} holds MoE experts, read one expert at a time from a page-aligned group file"
        for name, tensor in plan.tensors.items():
            if reason is None and not isinstance(tensor, CheckpointTensor):
                reason = f"{name!r} is not read from a safetensors checkpoint (weights in RAM, or a .bin file)"
            elif reason is None and resaved_by_transformers(tensor, offload_dir):
                reason = f"{name!r} was converted at load and re-saved by transformers into {tensor.path}"
            elif reason is None and tensor.identity[3] != DTYPE_TO_SAFETENSORS.get(tensor.dtype):
                reason = f"{name!r} is stored as {tensor.identity[3]} and computed as {tensor.dtype}"
            elif reason is None:
                files.add(tensor.path)
    if reason is None and copy == "auto":
        folder = _existing(Path(offload_dir))
        other = sorted(f for f in files if os.stat(f).st_dev != os.stat(folder).st_dev)
        if other:
            reason = f"{other[0]} is on another filesystem than {folder} (copy='auto')"
    if reason is None and copy is True:
        reason = "copy=True"
    in_place = reason is None
    for plan in plans:
        plan.in_place = in_place
    if in_place:
        logger.info("%d nvme groups stream straight from %d checkpoint file(s)", len(plans), len(files))
    elif plans:
        logger.info("nvme groups are copied into group files: %s", reason)
    return in_place


def _existing(path: Path) -> Path:
    """``path``, or its nearest existing parent (the offload folder may be created later)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def group_sources(manifest: Manifest, verify: bool) -> list[GroupSource]:
    """Read plans of every group: its group file's data section, or its checkpoint's byte ranges."""
    if not any(isinstance(group, CheckpointGroup) for group in manifest.groups):
        return read_sources(manifest, verify)
    digests = RangeDigests(manifest.folder, manifest.fingerprint)
    return [checkpoint_source(manifest, group, verify, digests) for group in manifest.groups]


@dataclass(frozen=True)
class Move:
    """After a read, ``nbytes`` at ``source`` of the buffer are moved to ``target`` (64-byte aligned)."""

    source: int
    target: int
    nbytes: int


@dataclass(frozen=True)
class ReadRange:
    """Bytes ``start:end`` of checkpoint ``path``, landing at ``at`` in the buffer; digested as one range."""

    path: Path
    start: int
    end: int
    at: int

    @property
    def key(self) -> str:
        """The name its digest is recorded under."""
        return f"{self.start}:{self.end}:{self.path}"


def checkpoint_source(manifest: Manifest, group: CheckpointGroup, verify: bool, digests: RangeDigests) -> GroupSource:
    """A group's reads from its checkpoint: runs of tensors contiguous in one file, then moves to 64-byte alignment."""
    entries = {canonical: manifest.locate(canonical)[1] for canonical in group.members.values()}
    order = sorted(entries.values(), key=lambda e: (str(e.path), e.start))
    runs: list[list] = []
    for entry in order:
        if runs and runs[-1][-1].path == entry.path and entry.start <= align_up(runs[-1][-1].end):
            runs[-1].append(entry)
        else:
            runs.append([entry])
    segments, ranges, moves, placed = [], [], [], {}
    cursor = 0
    for run in runs:
        first = run[0].start - run[0].start % ALIGNMENT
        end = max(e.end for e in run)
        length = align_up(end - first)
        segments.append(Segment(run[0].path, first, length, cursor, end - first))
        ranges.append(ReadRange(run[0].path, run[0].start, end, cursor + run[0].start - first))
        floor = cursor
        for entry in run:
            source = cursor + entry.start - first
            target = align_up(max(source, floor), TENSOR_ALIGNMENT)
            if target != source:
                moves.append(Move(source, target, entry.end - entry.start))
            placed[entry.name] = (target, entry)
            floor = max(floor, target + entry.end - entry.start)
        cursor = align_up(max(cursor + length, floor))
    views = tuple(
        TensorView(member, placed[canonical][0], placed[canonical][1].dtype, placed[canonical][1].shape)
        for member, canonical in group.members.items()
    )
    check = CheckpointCheck(group.name, dict(group.files), tuple(ranges), tuple(moves), digests)
    return GroupSource(group.name, tuple(segments), cursor, views, (), verify, check)


@dataclass(frozen=True)
class CheckpointCheck:
    """Run after each read of a group streamed in place: files unchanged, range digests, then the aligning moves."""

    group: str
    files: dict[Path, tuple[int, ...]]
    ranges: tuple[ReadRange, ...]
    moves: tuple[Move, ...]
    digests: RangeDigests

    def __call__(self, buffer: StagingBuffer, first: bool) -> None:
        """Check what was read into ``buffer`` (digests on a ``first`` read), then align its tensors in place."""
        for path, planned in self.files.items():
            st = os.stat(path)
            found = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if found != planned:
                raise GroupFileError(
                    f"{path}: the checkpoint changed while group {self.group!r} streamed from it (device, inode, size, "
                    f"mtime, ctime {planned} -> {found}); its bytes are not served: load the model again"
                )
        if first:
            for read in self.ranges:
                self.digests.check(read, digest(buffer.view[read.at : read.at + read.end - read.start]), self.group)
        base = buffer.tensor.data_ptr()
        for move in reversed(self.moves):  # highest first: a tensor only moves up, over bytes already moved away
            ctypes.memmove(base + move.target, base + move.source, move.nbytes)


class RangeDigests:
    """The digests of the checkpoint ranges a folder reads, recorded on their first read (``digests.json``)."""

    def __init__(self, folder: Path, fingerprint: str):
        self.path = folder / DIGESTS_NAME
        self.fingerprint = fingerprint
        self._lock = threading.Lock()
        self._digests = self._load()

    def _load(self) -> dict[str, str]:
        try:
            fd = open_regular(self.path)
        except GroupFileError:
            return {}
        with open(fd, "rb") as f:
            check_private(self.path, os.fstat(f.fileno()))
            try:
                raw = json.loads(f.read())
            except ValueError:
                raw = None
        if (
            not isinstance(raw, dict)
            or raw.get("fingerprint") != self.fingerprint
            or raw.get("digest") != (manifest_digest(raw))
        ):
            logger.warning("%s is damaged or not this folder's; the digests are recorded again", self.path)
            return {}
        return dict(raw.get("ranges", {}))

    def recorded(self, read: ReadRange) -> str | None:
        """The digest recorded for ``read`` on its first read, if any."""
        with self._lock:
            return self._digests.get(read.key)

    def check(self, read: ReadRange, found: str, group: str) -> None:
        """Compare with the digest recorded for ``read``, or record it (first read ever)."""
        with self._lock:
            recorded = self._digests.get(read.key)
            if recorded is None:
                self._digests[read.key] = found
                self._save()
                return
        if recorded != found:
            raise GroupFileError(
                f"{read.path}: bytes {read.start}:{read.end} read for group {group!r} do not match the digest recorded "
                f"on their first read in {self.path}; the checkpoint changed: `accel-nvme clean` the offload folder "
                "and load the model again"
            )

    def _save(self) -> None:
        body = {"fingerprint": self.fingerprint, "ranges": self._digests}
        body["digest"] = manifest_digest(body)
        tmp = self.path.with_name(f".{DIGESTS_NAME}.tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with open(fd, "w") as f:
            json.dump(body, f)
        os.replace(tmp, self.path)
