"""The offload directory: one content-addressed folder per set of weights, with a manifest written last.

``<offload_dir>/accel-nvme-<fingerprint>/`` holds ``group-NNNNN.safetensors`` files and ``manifest.json``. The
fingerprint hashes every tensor's name, dtype, shape and bytes plus the grouping, so re-dispatching the same weights
finds and reuses the folder. A folder appears under its final name only once complete (written in a private
``mkdtemp`` folder, then renamed), and writers of the same fingerprint serialise on a lock file, so nobody reads a
half-written group.

Trust: a folder is reused only when it is a real folder owned by this user and writable by nobody else, its manifest
matches its own digest and the groups asked for, and every group file's header matches the digest the manifest
records. Data sections are checked against their digests on their first read after a launch (``prefetch``).
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
import re
import shutil
import stat
import struct
import tempfile
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash
from safetensors import safe_open
from tqdm.auto import tqdm

from .format import (
    ALIGNMENT,
    DIGEST_NAME,
    DTYPE_TO_SAFETENSORS,
    SAFETENSORS_TO_DTYPE,
    GroupFileError,
    TensorEntry,
    digest,
    open_regular,
    parse_json,
    read_layout,
    storage_order,
    tensor_bytes,
    write_group,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
FOLDER_PREFIX = "accel-nvme-"
GROUP_FILE = re.compile(r"group-\d{5,}\.safetensors")
MAX_MANIFEST_BYTES = 1 << 30
DEFAULT_LOCK_TIMEOUT = 900.0
CLEAN_ADVICE = "run `accel-nvme clean` on it or delete it, and it is rewritten on the next load"


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

    Its identity is the file's path, device, inode, size, mtime and ctime plus the tensor's header entry, so a
    checkpoint is recognised again without hashing its bytes, and a file rewritten in place (even with its mtime
    restored: ctime cannot be set by users) never is.
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


def _file_identity(path: str) -> tuple[int, int, int, int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@functools.lru_cache(maxsize=64)
def _safetensors_header(path: str, file_id: tuple) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


@functools.lru_cache(maxsize=64)
def _data_start(path: str, file_id: tuple) -> int:
    """File offset of a safetensors file's data section."""
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


@dataclass
class GroupPlan:
    """What one group must hold: tensors it stores, and every member name mapped to its canonical tensor name.

    ``experts``: the fused expert tensors among them, stored page-aligned with a digest per expert (``experts.py``).
    ``expert_starts``: for a list of expert modules, the first tensor of each expert, stored from a page boundary with
    the expert's other tensors after it (``expert_modules.py``).
    """

    name: str
    tensors: dict[str, torch.Tensor | CheckpointTensor]
    members: dict[str, str] = field(default_factory=dict)
    experts: tuple[str, ...] = ()
    expert_starts: tuple[str, ...] = ()
    in_place: bool = False  # streamed from its checkpoint's byte ranges (``sources``), no group file written

    @property
    def per_expert(self) -> bool:
        """Whether its experts are read one expert at a time, outside the group stream."""
        return bool(self.experts or self.expert_starts)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors this group stores."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass(frozen=True)
class StoredGroup:
    """One group file as recorded in the manifest, with the digests its bytes are checked against."""

    index: int
    name: str
    path: Path
    data_offset: int
    data_bytes: int
    data_digest: str
    entries: tuple[TensorEntry, ...]
    members: dict[str, str]
    tensor_digests: dict[str, str]
    row_digests: dict[str, list[str]] = field(default_factory=dict)  # per expert, for fused expert tensors
    expert_starts: tuple[str, ...] = ()  # for a list of expert modules, each expert's first tensor


@dataclass(frozen=True)
class CheckpointEntry:
    """Where one tensor of a group streamed in place sits: ``key`` of checkpoint ``path``, bytes ``start:end``."""

    name: str
    key: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class CheckpointGroup:
    """A group read straight from checkpoint files (no group file), with the files' identities when planned."""

    index: int
    name: str
    entries: tuple[CheckpointEntry, ...]
    members: dict[str, str]
    files: dict[Path, tuple[int, ...]]
    row_digests: dict[str, list[str]] = field(default_factory=dict)  # always empty: experts are copied
    expert_starts: tuple[str, ...] = ()  # always empty: experts are copied


@dataclass(frozen=True)
class Manifest:
    """A complete, validated offload folder: its groups and where each tensor lives."""

    folder: Path
    fingerprint: str
    groups: tuple[StoredGroup | CheckpointGroup, ...]
    tensors: dict[str, tuple[StoredGroup | CheckpointGroup, TensorEntry | CheckpointEntry]]

    def locate(self, name: str) -> tuple[StoredGroup | CheckpointGroup, TensorEntry | CheckpointEntry]:
        """The group file and byte range of a canonical tensor name."""
        return self.tensors[name]


def resaved_by_transformers(tensor: CheckpointTensor, offload_dir: str | os.PathLike) -> bool:
    """Whether ``tensor`` is a weight transformers re-saved into the offload folder during this load
    (``offload_weight``: a weight converted at load, e.g. fused MoE experts). It rewrites that file at every load."""
    return Path(tensor.path) == Path(os.path.realpath(offload_dir)) / f"{tensor.key}.safetensors"


def _group_identity(plan: GroupPlan, offload_dir: str | os.PathLike) -> str:
    """SHA-256 of a group's tensors: their bytes when in RAM or re-saved by transformers at each load, their
    checkpoint identity when still on disk."""
    digest = hashlib.sha256()
    for name in storage_order(plan.tensors):
        tensor = plan.tensors[name]
        if isinstance(tensor, CheckpointTensor) and resaved_by_transformers(tensor, offload_dir):
            digest.update(repr(tensor.identity[2:]).encode())
            digest.update(_stored_bytes_digest(tensor).encode())
        elif isinstance(tensor, CheckpointTensor):
            digest.update(repr(tensor.identity).encode())
        else:
            digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def _stored_bytes_digest(tensor: CheckpointTensor, chunk: int = 64 << 20) -> str:
    """XXH3-128 of the bytes ``tensor`` holds in its safetensors file, read in chunks."""
    path, file_id, _, _, _, (begin, end), _ = tensor.identity
    hasher = xxhash.xxh3_128()
    with open(path, "rb") as f:
        start = _data_start(path, file_id)
        for offset in range(begin, end, chunk):
            hasher.update(os.pread(f.fileno(), min(chunk, end - offset), start + offset))
    if _file_identity(path) != file_id:
        raise StoreError(f"{path} changed while its weights were being offloaded; load the model again")
    return hasher.hexdigest()


def _plan_spec(plan: GroupPlan) -> list:
    return [
        [n, DTYPE_TO_SAFETENSORS.get(plan.tensors[n].dtype, str(plan.tensors[n].dtype)), list(plan.tensors[n].shape)]
        for n in storage_order(plan.tensors)
    ]


def fingerprint(plans: list[GroupPlan], identities: list[str]) -> str:
    """Hash of the format version, the grouping, every tensor's name/dtype/shape and every group's identity."""
    spec = {
        "version": FORMAT_VERSION,
        "groups": [
            {"name": plan.name, "tensors": _plan_spec(plan), "members": sorted(plan.members.items()), "identity": i}
            | ({"experts": list(plan.experts)} if plan.experts else {})
            | ({"source": "checkpoint"} if plan.in_place else {})
            for plan, i in zip(plans, identities, strict=True)
        ],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def check_private(path: Path, st: os.stat_result | None = None) -> None:
    """Refuse a path (by ``lstat``) that is a symlink, owned by another user, or writable by group or others."""
    st = st or os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise StoreError(f"{path} is a symbolic link, expected a folder written by accel_nvme: refusing to use it")
    if st.st_uid != os.geteuid():
        raise StoreError(
            f"{path} is owned by uid {st.st_uid}, not by you (uid {os.geteuid()}): refusing to reuse or delete it; "
            "someone else may have planted it. Choose an offload folder only you can write, or remove it"
        )
    if st.st_mode & 0o022:
        raise StoreError(
            f"{path} has mode {stat.filemode(st.st_mode)}, writable by others: refusing to reuse or delete it; "
            "remove it, or choose an offload folder only you can write"
        )


def _holder(fd: int, path: Path) -> str:
    """Which process holds the lock on ``fd``: from /proc/locks, else the pid the holder wrote in the file."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[5] == inode and fields[1] == "FLOCK":
                return f"pid {fields[4]}"
    with contextlib.suppress(OSError, ValueError):
        return f"pid {int(os.pread(fd, 32, 0))} (as it wrote in the lock file)"
    return "an unknown process"


def _acquire(fd: int, path: Path, timeout: float) -> None:
    """``flock`` with a deadline, saying at once what is waited for; raise ``StoreError`` once ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    holder = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if holder is None:
            holder = _holder(fd, path)
            logger.warning(
                "waiting for %s, held by %s (writing the same weights); giving up after %g s (lock_timeout)",
                path,
                holder,
                timeout,
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise StoreError(
                f"{path}: still held by {_holder(fd, path)} after {timeout:g} s (lock_timeout). If that process is "
                "stopped or hung, end it; if it is writing a large model, raise lock_timeout"
            )
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.25)


@contextlib.contextmanager
def _locked(path: Path, timeout: float) -> Iterator[None]:
    """Hold the lock file ``path`` (created 0600, never through a symlink) for the block."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as e:
        reason = "it is a symbolic link" if e.errno == errno.ELOOP else e.strerror
        raise StoreError(f"{path}: cannot open the lock file ({reason}); choose another offload folder") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"{path}: the lock path is not a regular file; remove it or choose another offload folder")
        check_private(path, st)
        _acquire(fd, path, timeout)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def materialize(
    offload_dir: str | os.PathLike,
    plans: list[GroupPlan],
    io_threads: int = 4,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> Manifest:
    """Return the manifest of a folder holding exactly these groups, reusing a valid one or writing it.

    Waits at most ``lock_timeout`` seconds for another process writing the same weights.
    """
    root = Path(offload_dir)
    if not root.parent.is_dir():
        raise StoreError(f"offload folder {root}: its parent {root.parent} does not exist")
    with ThreadPoolExecutor(max(1, io_threads)) as pool:
        identities = list(pool.map(functools.partial(_group_identity, offload_dir=root), plans))
    fp = fingerprint(plans, identities)
    folder = root / f"{FOLDER_PREFIX}{fp}"
    manifest = _reusable(folder, plans, fp)
    if manifest is not None:
        return manifest
    try:
        root.mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        raise StoreError(f"offload folder {root} is not writable ({e.strerror}); choose another offload folder") from e
    _check_root(root)
    with _locked(root / f".{FOLDER_PREFIX}{fp}.lock", lock_timeout):
        manifest = _reusable(folder, plans, fp)
        if manifest is not None:
            return manifest
        try:
            if os.path.lexists(folder):
                shutil.rmtree(folder)
            for stale in root.glob(f".{FOLDER_PREFIX}{fp}.tmp-*"):
                if _is_own_folder(stale):
                    shutil.rmtree(stale, ignore_errors=True)
        except OSError as e:
            raise StoreError(f"{folder}: removing the damaged folder failed ({e.strerror}); delete it by hand") from e
        _write_folder(root, folder, fp, plans)
        manifest = load_manifest(folder)
        _check_holds(manifest, plans, fp)
        return manifest


def _check_root(root: Path) -> None:
    """Refuse an offload folder where others may rename entries (world-writable, no sticky bit); warn for a group."""
    mode = root.stat().st_mode
    if mode & stat.S_ISVTX or not mode & 0o022:
        return
    if mode & 0o002:
        raise StoreError(
            f"offload folder {root} has mode {stat.filemode(mode)}: anyone can rename what accel_nvme writes there; "
            "set its sticky bit (chmod +t, as /tmp has) or use a sub-folder only you can write"
        )
    logger.warning("offload folder %s is group-writable without the sticky bit: members can swap folders in it", root)


def _is_own_folder(path: Path) -> bool:
    try:
        check_private(path)
    except (StoreError, OSError):
        return False
    return path.is_dir()


def _reusable(folder: Path, plans: list[GroupPlan], fp: str) -> Manifest | None:
    """The folder's manifest when it is sound and holds these groups; None (to rewrite it) when damaged.

    A folder that is not ours (a symlink, another owner, writable by others) raises ``StoreError``: never reused,
    never deleted.
    """
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StoreError(f"{folder}: cannot be examined ({e.strerror})") from e
    check_private(folder, st)
    try:
        manifest = load_manifest(folder)
        _check_holds(manifest, plans, fp)
    except (StoreError, ValueError, OSError) as e:
        logger.warning("%s is not a valid offload folder (%s), rewriting it", folder, e)
        return None
    logger.info("reusing offload folder %s", folder)
    return manifest


def _check_holds(manifest: Manifest, plans: list[GroupPlan], fp: str) -> None:
    """Raise ``StoreError`` unless the manifest describes exactly these groups, members and tensors."""
    where = manifest.folder / MANIFEST_NAME
    if manifest.fingerprint != fp:
        raise StoreError(f"{where}: fingerprint {manifest.fingerprint} does not match {fp}")
    if len(manifest.groups) != len(plans):
        raise StoreError(f"{where}: lists {len(manifest.groups)} groups, expected {len(plans)}")
    for group, plan in zip(manifest.groups, plans, strict=True):
        stored = sorted([e.name, DTYPE_TO_SAFETENSORS[e.dtype], list(e.shape)] for e in group.entries)
        in_place = isinstance(group, CheckpointGroup)
        if (
            group.name != plan.name
            or group.members != plan.members
            or stored != sorted(_plan_spec(plan))
            or sorted(group.row_digests) != sorted(plan.experts)
            or group.expert_starts != plan.expert_starts
        ):
            raise StoreError(f"{where}: group {group.index} does not hold group {plan.name!r} as planned")
        if in_place != plan.in_place:
            raise StoreError(f"{where}: group {plan.name!r} is {'not ' if plan.in_place else ''}streamed in place")


def _write_folder(root: Path, folder: Path, fp: str, plans: list[GroupPlan]) -> None:
    _check_free_space(root, plans)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_PREFIX}{fp}.tmp-", dir=root))
        groups = []
        for index, plan in enumerate(
            tqdm(plans, desc="Writing nvme groups", unit="group", leave=False, disable=progress_disabled())
        ):
            if plan.in_place:
                groups.append(_checkpoint_json(plan))
                continue
            file_name = f"group-{index:05d}.safetensors"
            tensors = {n: t.load() if isinstance(t, CheckpointTensor) else t for n, t in plan.tensors.items()}
            written = write_group(tmp / file_name, tensors, plan.expert_starts, plan.experts)
            del tensors
            groups.append(
                {
                    "name": plan.name,
                    "file": file_name,
                    "data_offset": written.layout.data_offset,
                    "data_bytes": written.layout.data_bytes,
                    "header_digest": written.layout.header_digest,
                    "data_digest": written.data_digest,
                    "tensors": written.tensor_digests,
                    "members": plan.members,
                }
                | ({"rows": written.row_digests} if plan.experts else {})
                | ({"expert_starts": list(plan.expert_starts)} if plan.expert_starts else {})
            )
        manifest = {"format": "accel_nvme", "version": FORMAT_VERSION, "digest_algorithm": DIGEST_NAME}
        manifest.update(fingerprint=fp, groups=groups)
        manifest["digest"] = manifest_digest(manifest)
        fd = os.open(tmp / MANIFEST_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with open(fd, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        os.rename(tmp, folder)
        _fsync_dir(root)
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise StoreError(
                f"{root}: the disk filled up while writing nvme groups ({_size(_needed_bytes(plans))} needed); "
                "nothing was left behind: free space or choose another offload folder"
            ) from e
        raise StoreError(
            f"{root}: writing nvme groups to {folder.name} failed ({e.strerror or e}); nothing was left behind"
        ) from e
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %d groups to %s", len(plans), folder)


def manifest_digest(manifest: dict) -> str:
    """Digest of every manifest field but ``digest`` itself, in canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return digest(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _needed_bytes(plans: list[GroupPlan]) -> int:
    """Disk space the group files of ``plans`` take: data and alignment padding, a header page per group, manifest."""
    data = sum(plan.nbytes + 64 * len(plan.tensors) for plan in plans if not plan.in_place)
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


def read_manifest_json(folder: Path, dir_fd: int | None = None) -> dict:
    """The manifest as checked JSON (its own digest included), never through a symlink; ``StoreError`` otherwise.

    With ``dir_fd`` (``folder`` opened earlier), the manifest is opened relative to it.
    """
    path = folder / MANIFEST_NAME
    try:
        fd = open_regular(path, dir_fd)
    except GroupFileError as e:
        if isinstance(e.__cause__, FileNotFoundError):
            raise StoreError(f"{folder}: no {MANIFEST_NAME}; the folder is incomplete and is never trusted") from e
        raise StoreError(str(e)) from e
    try:
        with open(fd, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise StoreError(f"{path}: reading failed ({e.strerror})") from e
    if len(raw) > MAX_MANIFEST_BYTES:
        raise StoreError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes, not a manifest accel_nvme wrote")
    try:
        manifest = parse_json(raw)
    except (UnicodeError, ValueError, RecursionError) as e:
        raise StoreError(f"{path}: not valid JSON ({str(e)[:200]})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != "accel_nvme":
        raise StoreError(f"{path}: not an accel_nvme manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise StoreError(
            f"{path}: format version {manifest.get('version')!r}, this accel_nvme reads {FORMAT_VERSION}; "
            f"{CLEAN_ADVICE}"
        )
    if manifest.get("digest_algorithm") != DIGEST_NAME:
        found = manifest.get("digest_algorithm")
        raise StoreError(f"{path}: digests are {found!r}, expected {DIGEST_NAME}; {CLEAN_ADVICE}")
    if manifest.get("digest") != manifest_digest(manifest):
        raise StoreError(f"{path}: its digest does not match its content (edited or damaged); {CLEAN_ADVICE}")
    return manifest


def _is_str_map(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


def _checkpoint_json(plan: GroupPlan) -> dict:
    """The manifest entry of a group streamed in place: each tensor's checkpoint file, key and absolute byte range."""
    tensors, files = {}, {}
    for name in storage_order(plan.tensors):
        path, file_id, key, code, shape, (begin, end), _ = plan.tensors[name].identity
        start = _data_start(path, file_id)
        tensors[name] = {
            "file": path,
            "key": key,
            "dtype": code,
            "shape": list(shape),
            "offsets": [start + begin, start + end],
        }
        files[path] = list(file_id)
    return {"name": plan.name, "source": "checkpoint", "tensors": tensors, "files": files, "members": plan.members}


def _checkpoint_group(folder: Path, index: int, g: dict) -> CheckpointGroup:
    """Parse a group streamed in place; its checkpoint files must be the ones planned (path, inode, size, times)."""
    where = f"{folder / MANIFEST_NAME}: group {index}"
    name, tensors, files = g.get("name"), g.get("tensors"), g.get("files")
    if not isinstance(name, str) or not _is_str_map(g.get("members")) or not isinstance(tensors, dict):
        raise StoreError(f"{where}: malformed checkpoint group (name, members or tensors)")
    if not isinstance(files, dict) or not all(isinstance(v, list) and len(v) == 5 for v in files.values()):
        raise StoreError(f"{where}: malformed checkpoint group (files)")
    for path, recorded in files.items():
        try:
            found = list(_file_identity(path))
        except OSError as e:
            raise StoreError(f"{where}: checkpoint {path} cannot be examined ({e.strerror})") from e
        if found != recorded:
            raise StoreError(
                f"{where}: checkpoint {path} changed since this folder was planned (device, inode, size, mtime, ctime "
                f"{recorded} -> {found}); load the model again: a new folder is planned for the new file"
            )
    entries = []
    for tensor_name, t in tensors.items():
        try:
            path, header = t["file"], _safetensors_header(t["file"], _file_identity(t["file"]))
            begin, end = (o - _data_start(path, _file_identity(path)) for o in t["offsets"])
            planned = header[t["key"]]
            if path not in files or [planned["dtype"], planned["shape"], planned["data_offsets"]] != [
                t["dtype"],
                t["shape"],
                [begin, end],
            ]:
                raise ValueError("the checkpoint header does not match")
            entry = CheckpointEntry(
                tensor_name, t["key"], Path(path), SAFETENSORS_TO_DTYPE[t["dtype"]], tuple(t["shape"]), *t["offsets"]
            )
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise StoreError(f"{where}: tensor {tensor_name[:100]!r} is not where the manifest says ({e})") from e
        entries.append(entry)
    return CheckpointGroup(index, name, tuple(entries), g["members"], {Path(p): tuple(v) for p, v in files.items()})


def read_checkpoint_tensor(entry: CheckpointEntry, identity: tuple[int, ...]) -> torch.Tensor:
    """A copy in RAM of a tensor streamed in place; raises if its checkpoint is not the file planned."""
    with safe_open(entry.path, framework="pt") as f:
        tensor = f.get_tensor(entry.key).clone()
    if _file_identity(str(entry.path)) != identity:
        raise GroupFileError(f"{entry.path}: the checkpoint changed since it was planned; load the model again")
    return tensor


def _stored_group(folder: Path, dir_fd: int, index: int, g: object, files: set[str]) -> StoredGroup | CheckpointGroup:
    where = f"{folder / MANIFEST_NAME}: group {index}"
    if not isinstance(g, dict):
        raise StoreError(f"{where} is a {type(g).__name__}, expected an object")
    if g.get("source") == "checkpoint":
        return _checkpoint_group(folder, index, g)
    name, file = g.get("name"), g.get("file")
    if not isinstance(name, str) or not isinstance(file, str) or not GROUP_FILE.fullmatch(file) or file in files:
        raise StoreError(f"{where}: file {str(file)[:100]!r} is not a group file name of this folder")
    files.add(file)
    if not _is_str_map(g.get("members")) or not _is_str_map(g.get("tensors")):
        raise StoreError(f"{where}: members and tensors must map names to names and digests")
    path = folder / file
    layout = read_layout(path, dir_fd)
    check_private(path, os.stat(file, dir_fd=dir_fd, follow_symlinks=False))
    recorded = (g.get("data_offset"), g.get("data_bytes"), g.get("header_digest"))
    if recorded != (layout.data_offset, layout.data_bytes, layout.header_digest):
        raise GroupFileError(
            f"{path}: header does not match {folder / MANIFEST_NAME} (the file was replaced or its header edited); "
            f"{CLEAN_ADVICE}"
        )
    if sorted(e.name for e in layout.entries) != sorted(g["tensors"]) or not isinstance(g.get("data_digest"), str):
        raise GroupFileError(f"{path}: tensors differ from those {folder / MANIFEST_NAME} lists; {CLEAN_ADVICE}")
    rows = g.get("rows", {})
    shapes = {e.name: e.shape for e in layout.entries}
    if not isinstance(rows, dict) or any(
        name not in shapes
        or not isinstance(d, list)
        or shapes[name][:1] != (len(d),)
        or not all(isinstance(x, str) for x in d)
        for name, d in rows.items()
    ):
        raise StoreError(f"{where}: rows must give one digest per expert of a stored tensor; {CLEAN_ADVICE}")
    starts = g.get("expert_starts", [])
    aligned = {e.name for e in layout.entries if e.start % ALIGNMENT == 0}
    if not isinstance(starts, list) or not all(isinstance(name, str) and name in aligned for name in starts):
        raise StoreError(f"{where}: expert_starts must name page-aligned tensors of the group file; {CLEAN_ADVICE}")
    return StoredGroup(
        index,
        name,
        path,
        layout.data_offset,
        layout.data_bytes,
        g["data_digest"],
        layout.entries,
        g["members"],
        g["tensors"],
        rows,
        tuple(starts),
    )


def load_manifest(folder: str | os.PathLike) -> Manifest:
    """Read and check a folder: private to this user, manifest digest, group file names, headers against digests."""
    folder = Path(folder)
    try:
        st = os.lstat(folder)
        check_private(folder, st)
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise StoreError(f"{folder}: cannot be opened as a folder ({e.strerror})") from e
    try:
        check_private(folder, os.fstat(dir_fd))  # the folder opened is the one checked
        raw = read_manifest_json(folder, dir_fd)
        if not isinstance(raw.get("groups"), list) or not isinstance(raw.get("fingerprint"), str):
            raise StoreError(f"{folder / MANIFEST_NAME}: malformed manifest (groups or fingerprint missing)")
        files: set[str] = set()
        groups = tuple(_stored_group(folder, dir_fd, index, g, files) for index, g in enumerate(raw["groups"]))
    finally:
        os.close(dir_fd)
    tensors = {e.name: (g, e) for g in groups for e in g.entries}
    for group in groups:
        for member, canonical in group.members.items():
            if canonical not in tensors:
                raise StoreError(f"{folder / MANIFEST_NAME}: {member!r} points at {canonical!r}, which no group holds")
    return Manifest(folder, raw["fingerprint"], groups, tensors)


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
        if isinstance(group, CheckpointGroup):
            return read_checkpoint_tensor(entry, group.files[entry.path])
        with safe_open(group.path, framework="pt") as f:
            tensor = f.get_tensor(entry.name).clone()  # a copy in RAM, not a view of a mapping of the file
        if digest(tensor_bytes(tensor)) != group.tensor_digests[entry.name]:
            raise GroupFileError(f"{group.path}: tensor {entry.name!r} does not match its digest; {CLEAN_ADVICE}")
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)
