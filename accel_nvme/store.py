"""The offload directory: one content-addressed folder per set of weights, with a manifest written last.

``<offload_dir>/accel-nvme-<fingerprint>/`` holds ``group-NNNNN.safetensors`` files and ``manifest.json``. The
fingerprint hashes every tensor's name, dtype, shape and bytes plus the grouping, so re-dispatching the same weights
finds and reuses the folder, and different weights or another model can never be served from it. A folder appears
under its final name only once complete (written under a temporary name, then renamed), and writers of the same
fingerprint serialise on a lock file, so nobody reads a half-written group.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import struct
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .format import (
    ALIGNMENT,
    DTYPE_TO_SAFETENSORS,
    GroupFileError,
    TensorEntry,
    read_layout,
    storage_order,
    tensor_bytes,
    write_group,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FOLDER_PREFIX = "accel-nvme-"


class StoreError(RuntimeError):
    """An offload folder cannot be used; the message names the folder and what to do."""


def progress_disabled() -> bool | None:
    """True when progress bars are silenced the Hugging Face way (``HF_HUB_DISABLE_PROGRESS_BARS=1``)."""
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    return None


@dataclass(frozen=True)
class CheckpointTensor:
    """A tensor still inside a safetensors checkpoint file: read only when its group is written.

    Its identity is the file's path, size, mtime and inode plus the tensor's header entry, so a checkpoint is
    recognised again without hashing its bytes, and a rewritten or replaced file never is.
    """

    path: str
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    identity: tuple

    def numel(self) -> int:
        """Number of elements, as ``torch.Tensor.numel``."""
        return math.prod(self.shape)

    def element_size(self) -> int:
        """Bytes per element, as ``torch.Tensor.element_size``."""
        return self.dtype.itemsize

    def load(self) -> torch.Tensor:
        """The tensor in RAM, converted to ``dtype``; raises if the file changed since it was indexed."""
        if _file_identity(self.path) != self.identity[1]:
            raise StoreError(f"{self.path} changed while its weights were being offloaded; load the model again")
        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(self.key).to(self.dtype)


def checkpoint_tensor(path: str | os.PathLike, key: str, dtype: torch.dtype) -> CheckpointTensor:
    """Index ``key`` of a safetensors file (its header is parsed once per file version)."""
    path = os.path.realpath(path)
    file_id = _file_identity(path)
    header = _safetensors_header(path, file_id)
    if key not in header:
        raise StoreError(f"{path}: has no tensor {key!r}")
    entry = header[key]
    identity = (path, file_id, key, entry["dtype"], tuple(entry["shape"]), tuple(entry["data_offsets"]), str(dtype))
    return CheckpointTensor(path, key, dtype, tuple(entry["shape"]), identity)


def _file_identity(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _safetensors_header(path: str, file_id: tuple) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


@dataclass
class GroupPlan:
    """What one group must hold: tensors it stores, and every member name mapped to its canonical tensor name."""

    name: str
    tensors: dict[str, torch.Tensor | CheckpointTensor]
    members: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors this group stores."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass(frozen=True)
class StoredGroup:
    """One group file as recorded in the manifest."""

    index: int
    name: str
    path: Path
    data_offset: int
    data_bytes: int
    sha256: str
    entries: tuple[TensorEntry, ...]
    members: dict[str, str]


@dataclass(frozen=True)
class Manifest:
    """A complete, validated offload folder: its groups and where each tensor lives."""

    folder: Path
    fingerprint: str
    groups: tuple[StoredGroup, ...]
    tensors: dict[str, tuple[StoredGroup, TensorEntry]]

    def locate(self, name: str) -> tuple[StoredGroup, TensorEntry]:
        """The group file and byte range of a canonical tensor name."""
        return self.tensors[name]


def _group_identity(plan: GroupPlan) -> str:
    """SHA-256 of a group's tensors: their bytes when in RAM, their checkpoint identity when still on disk."""
    digest = hashlib.sha256()
    for name in storage_order(plan.tensors):
        tensor = plan.tensors[name]
        if isinstance(tensor, CheckpointTensor):
            digest.update(repr(tensor.identity).encode())
        else:
            digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def fingerprint(plans: list[GroupPlan], identities: list[str]) -> str:
    """Hash of the format version, the grouping, every tensor's name/dtype/shape and every group's identity."""
    spec = {
        "version": FORMAT_VERSION,
        "groups": [
            {
                "name": plan.name,
                "tensors": [
                    [
                        n,
                        DTYPE_TO_SAFETENSORS.get(plan.tensors[n].dtype, str(plan.tensors[n].dtype)),
                        list(plan.tensors[n].shape),
                    ]
                    for n in storage_order(plan.tensors)
                ],
                "members": sorted(plan.members.items()),
                "identity": identity,
            }
            for plan, identity in zip(plans, identities, strict=True)
        ],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def materialize(offload_dir: str | os.PathLike, plans: list[GroupPlan], io_threads: int = 4) -> Manifest:
    """Return the manifest of a folder holding exactly these groups, reusing a valid one or writing it."""
    root = Path(offload_dir)
    if not root.parent.is_dir():
        raise StoreError(f"offload folder {root}: its parent {root.parent} does not exist")
    with ThreadPoolExecutor(max(1, io_threads)) as pool:
        identities = list(pool.map(_group_identity, plans))
    fp = fingerprint(plans, identities)
    folder = root / f"{FOLDER_PREFIX}{fp}"
    manifest = _reusable(folder, fp)
    if manifest is not None:
        return manifest
    try:
        root.mkdir(exist_ok=True)
        lock = _locked(root / f".{FOLDER_PREFIX}{fp}.lock")
        lock.__enter__()
    except OSError as e:
        raise StoreError(f"offload folder {root} is not writable ({e.strerror}); choose another offload folder") from e
    try:
        manifest = _reusable(folder, fp)
        if manifest is not None:
            return manifest
        if folder.exists():
            shutil.rmtree(folder)
        for stale in root.glob(f".{FOLDER_PREFIX}{fp}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        _write_folder(root, folder, fp, plans)
        return load_manifest(folder)
    finally:
        lock.__exit__(None, None, None)


def _reusable(folder: Path, fp: str) -> Manifest | None:
    """The folder's manifest when it is complete and holds these weights (folders appear whole, by rename)."""
    if not folder.exists():
        return None
    try:
        manifest = load_manifest(folder)
    except (StoreError, GroupFileError) as e:
        logger.warning("%s is not a valid offload folder (%s), rewriting it", folder, e)
        return None
    if manifest.fingerprint != fp:
        logger.warning("%s: manifest fingerprint %s does not match, rewriting", folder, manifest.fingerprint)
        return None
    logger.info("reusing offload folder %s", folder)
    return manifest


def _write_folder(root: Path, folder: Path, fp: str, plans: list[GroupPlan]) -> None:
    _check_free_space(root, plans)
    tmp = root / f".{FOLDER_PREFIX}{fp}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        groups = []
        for index, plan in enumerate(
            tqdm(plans, desc="Writing nvme groups", unit="group", leave=False, disable=progress_disabled())
        ):
            file_name = f"group-{index:05d}.safetensors"
            tensors = {n: t.load() if isinstance(t, CheckpointTensor) else t for n, t in plan.tensors.items()}
            layout, data_hash = write_group(tmp / file_name, tensors)
            del tensors
            groups.append(
                {
                    "name": plan.name,
                    "file": file_name,
                    "data_offset": layout.data_offset,
                    "data_bytes": layout.data_bytes,
                    "sha256": data_hash,
                    "members": plan.members,
                }
            )
        manifest = {"format": "accel_nvme", "version": FORMAT_VERSION, "fingerprint": fp, "groups": groups}
        with open(tmp / MANIFEST_NAME, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        os.rename(tmp, folder)
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise StoreError(
                f"{root}: the disk filled up while writing nvme groups ({_size(_needed_bytes(plans))} needed); "
                "nothing was left behind: free space or choose another offload folder"
            ) from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %d groups to %s", len(plans), folder)


def _needed_bytes(plans: list[GroupPlan]) -> int:
    """Disk space the group files of ``plans`` take: data, plus a header page per group, plus the manifest."""
    data = sum(plan.nbytes for plan in plans)
    return data + len(plans) * 2 * ALIGNMENT + (1 << 20)


def _check_free_space(root: Path, plans: list[GroupPlan]) -> None:
    st = os.statvfs(root)
    if st.f_blocks == 0:
        return  # ramfs and some FUSE mounts report no size: a full disk shows up as ENOSPC while writing
    free, needed = st.f_bavail * st.f_frsize, _needed_bytes(plans)
    if free < needed:
        raise StoreError(
            f"{root}: writing {len(plans)} nvme groups needs {_size(needed)}, only {_size(free)} are free; "
            "free space or choose another offload folder"
        )


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def load_manifest(folder: str | os.PathLike) -> Manifest:
    """Read and check a folder's manifest against the headers of its group files."""
    folder = Path(folder)
    try:
        with open(folder / MANIFEST_NAME) as f:
            raw = json.load(f)
    except FileNotFoundError as e:
        raise StoreError(f"{folder}: no {MANIFEST_NAME}; the folder is incomplete and is never trusted") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{folder / MANIFEST_NAME}: not valid JSON ({e})") from e
    if not isinstance(raw, dict) or raw.get("format") != "accel_nvme":
        raise StoreError(f"{folder / MANIFEST_NAME}: not an accel_nvme manifest")
    if raw.get("version") != FORMAT_VERSION:
        raise StoreError(
            f"{folder / MANIFEST_NAME}: format version {raw.get('version')!r}, this accel_nvme reads {FORMAT_VERSION}"
        )
    groups = []
    try:
        for index, g in enumerate(raw["groups"]):
            path = folder / g["file"]
            layout = read_layout(path)
            if layout.data_offset != g["data_offset"] or layout.data_bytes != g["data_bytes"]:
                raise GroupFileError(f"{path}: header does not match {folder / MANIFEST_NAME}")
            groups.append(
                StoredGroup(
                    index,
                    g["name"],
                    path,
                    layout.data_offset,
                    layout.data_bytes,
                    g["sha256"],
                    layout.entries,
                    dict(g["members"]),
                )
            )
        fp = raw["fingerprint"]
    except (KeyError, TypeError) as e:
        raise StoreError(f"{folder / MANIFEST_NAME}: malformed manifest ({e!r})") from e
    tensors = {e.name: (g, e) for g in groups for e in g.entries}
    for group in groups:
        for member, canonical in group.members.items():
            if canonical not in tensors:
                raise StoreError(f"{folder / MANIFEST_NAME}: {member!r} points at {canonical!r}, which no group holds")
    return Manifest(folder, fp, tuple(groups), tensors)


class StoredWeights(Mapping):
    """A read-only ``name -> tensor`` view of a folder, for accelerate's ``weights_map`` and ``save_pretrained``."""

    def __init__(self, manifest: Manifest, prefix: str = ""):
        self.manifest = manifest
        self.prefix = prefix
        self._members = {
            name[len(prefix) :]: canonical
            for group in manifest.groups
            for name, canonical in group.members.items()
            if name.startswith(prefix)
        }

    def __getitem__(self, key: str) -> torch.Tensor:
        group, entry = self.manifest.locate(self._members[key])
        with safe_open(group.path, framework="pt") as f:
            return f.get_tensor(entry.name).clone()  # a copy in RAM, not a view of a mapping of the file

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)
