"""Group files: safetensors files whose data section starts on a 4096-byte boundary, every tensor 64-byte aligned.

The header is padded with spaces (which safetensors readers accept) so the whole data section can be read with one
aligned O_DIRECT read. safetensors allows no holes in the data section, so a tensor that would start off a 64-byte
boundary is preceded by a padding entry of its own: a 1-D ``U8`` tensor named ``__accel_nvme_pad_<n>__`` (zeros),
which ``safe_open`` users can recognise with ``is_padding``. Every tensor then starts 64-byte aligned in a
page-aligned read buffer, as torch's own allocator aligns it, so CPU kernels give the same bits as on the model in RAM.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import struct
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

ALIGNMENT = 4096
TENSOR_ALIGNMENT = 64
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
MAX_INDEX = (1 << 64) - 1
MAX_DIM = (1 << 63) - 1
PAD_PATTERN = re.compile(r"__accel_nvme_pad_\d+__")
DIGEST_NAME = "xxh3_128"

DTYPE_TO_SAFETENSORS = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
SAFETENSORS_TO_DTYPE = {code: dtype for dtype, code in DTYPE_TO_SAFETENSORS.items()}


class GroupFileError(ValueError):
    """A group file is missing, damaged, or not what its manifest says."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives inside a group file's data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class GroupLayout:
    """The parsed header of a group file: where data starts, each tensor's byte range, the header bytes' digest."""

    data_offset: int
    data_bytes: int
    entries: tuple[TensorEntry, ...]
    header_digest: str


@dataclass(frozen=True)
class WrittenGroup:
    """What ``write_group`` wrote: the layout, the digest of the data section and of each tensor's bytes (and of each
    row along the first dimension of the ``page_aligned`` tensors: fused experts, read one expert at a time)."""

    layout: GroupLayout
    data_digest: str
    tensor_digests: dict[str, str]
    row_digests: dict[str, list[str]] = field(default_factory=dict)


def new_digest() -> xxhash.xxh3_128:
    """An incremental hasher of the kind every digest in an offload folder uses (XXH3, 128 bits).

    Chosen by measurement: verifying adds ~4 % to the first forward here (BLAKE3 added ~9 %, SHA-256 runs at
    1.2 GB/s, slower than the drive). It guards against damage and mix-ups; ownership checks guard the folder.
    """
    return xxhash.xxh3_128()


def digest(data: bytes | memoryview) -> str:
    """Hex XXH3-128 digest of ``data`` (releases the GIL while hashing)."""
    return xxhash.xxh3_128(data).hexdigest()


def is_padding(name: str) -> bool:
    """True for the padding entries accel_nvme inserts so every tensor starts 64-byte aligned."""
    return PAD_PATTERN.fullmatch(name) is not None


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    """``n`` rounded up to a multiple of ``alignment``."""
    return -(-n // alignment) * alignment


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (made contiguous, on the CPU) without a copy when possible."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def storage_order(tensors: dict) -> list[str]:
    """Names in on-disk order: decreasing element size (then as given), which keeps padding small."""
    return sorted(tensors, key=lambda name: -tensors[name].dtype.itemsize)


def _header(
    tensors: dict[str, torch.Tensor], order: list[str], page_aligned: Collection[str] = ()
) -> tuple[bytes, list[tuple[str, int]]]:
    """The padded header and the on-disk sequence of ``(name, bytes)``, padding entries included."""
    meta: dict[str, object] = {"__metadata__": {"format": "pt", "writer": "accel_nvme"}}
    sequence = []
    offset = 0
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in DTYPE_TO_SAFETENSORS:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        if is_padding(name):
            raise ValueError(f"tensor {name!r} uses a name accel_nvme reserves for padding entries")
        gap = align_up(offset, ALIGNMENT if name in page_aligned else TENSOR_ALIGNMENT) - offset
        if gap:
            pad = f"__accel_nvme_pad_{len(sequence)}__"
            meta[pad] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
            sequence.append((pad, gap))
            offset += gap
        nbytes = tensor.numel() * tensor.element_size()
        meta[name] = {
            "dtype": DTYPE_TO_SAFETENSORS[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        sequence.append((name, nbytes))
        offset += nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    padded = align_up(8 + len(raw)) - 8
    return raw + b" " * (padded - len(raw)), sequence


def write_group(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    page_aligned: Collection[str] = (),
    rows: Collection[str] = (),
) -> WrittenGroup:
    """Write ``tensors`` as one aligned safetensors file, atomically (temporary name, fsync, rename), mode 0600.

    Returns the layout and the digests of the data section and of each tensor, which readers check. The tensors named
    in ``page_aligned`` start on a 4096-byte boundary; those in ``rows`` too, and their rows along the first dimension
    get digests as well.
    """
    path = Path(path)
    order = storage_order(tensors)
    header, sequence = _header(tensors, order, {*page_aligned, *rows})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    data_digest = new_digest()
    tensor_digests = {}
    row_digests = {}
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for name, nbytes in sequence:
                data = bytes(nbytes) if is_padding(name) else tensor_bytes(tensors[name])
                data_digest.update(data)
                if not is_padding(name):
                    tensor_digests[name] = digest(data)
                if name in rows:
                    step = nbytes // max(1, tensors[name].shape[0])
                    row_digests[name] = [digest(data[i : i + step]) for i in range(0, nbytes, step)] if step else []
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return WrittenGroup(read_layout(path), data_digest.hexdigest(), tensor_digests, row_digests)


def open_regular(path: str | os.PathLike, dir_fd: int | None = None, flags: int = 0) -> int:
    """Open a file read-only without following a symlink or blocking (a FIFO); refuse anything but a regular file.

    With ``dir_fd`` (a folder opened earlier), ``path``'s last component is opened relative to it (``openat``).
    """
    name = Path(path).name if dir_fd is not None else path
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | flags, dir_fd=dir_fd)
    except FileNotFoundError as e:
        raise GroupFileError(f"{path}: cannot open: the file is missing") from e
    except OSError as e:
        kind = "a symbolic link" if e.errno == errno.ELOOP else e.strerror
        raise GroupFileError(f"{path}: cannot be opened ({kind}); expected a regular file") from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise GroupFileError(f"{path}: expected a regular file, found {_file_kind(mode)}")
    os.set_blocking(fd, True)  # O_NONBLOCK only kept open() from waiting on a FIFO
    return fd


def _file_kind(mode: int) -> str:
    kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a device"}
    return next((name for test, name in kinds.items() if test(mode)), "a special file")


def _pairs(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def _constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes | str) -> object:
    """Strict JSON as safetensors (serde_json) reads it: no NaN/Infinity, no duplicate keys, no lone surrogates."""
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    value = json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant)
    _check_strings(value)
    return value


def _check_strings(value: object) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            item.encode("utf-8")
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"number {item} is out of range")
        elif isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            stack += item


def _index(value: object, limit: int = MAX_INDEX) -> int:
    """A JSON number safetensors reads as ``usize`` (a dimension: as torch's ``int64``): an integer in [0, limit]."""
    if type(value) is not int or not 0 <= value <= limit:
        raise ValueError(f"{value!r} is not an integer in [0, {limit}]")
    return value


def _entry(name: str, info: object) -> TensorEntry:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ValueError("expected exactly dtype, shape and data_offsets")
    if info["dtype"] not in SAFETENSORS_TO_DTYPE:
        raise ValueError(f"unknown dtype {info['dtype']!r}")
    dtype = SAFETENSORS_TO_DTYPE[info["dtype"]]
    if not isinstance(info["shape"], list) or not isinstance(info["data_offsets"], list):
        raise ValueError("shape and data_offsets must be lists")
    shape = tuple(_index(d, MAX_DIM) for d in info["shape"])
    if len(info["data_offsets"]) != 2:
        raise ValueError("data_offsets must hold two integers")
    start, end = (_index(o) for o in info["data_offsets"])
    nbytes = 1
    for factor in (*shape, dtype.itemsize):  # in order, as safetensors' checked multiplication
        nbytes *= factor
        if nbytes > MAX_INDEX:
            raise ValueError(f"shape {list(shape)} overflows")
    if end < start or end - start != nbytes:
        raise ValueError(f"byte range [{start}, {end}) does not hold a {info['dtype']} tensor of shape {list(shape)}")
    return TensorEntry(name, dtype, shape, start, end)


def _parse_header(path: Path, raw: bytes) -> list[TensorEntry]:
    if not raw.startswith(b"{"):
        raise GroupFileError(f"{path}: header does not start with '{{'")
    try:
        meta = parse_json(raw)
    except (UnicodeError, ValueError, RecursionError) as e:
        raise GroupFileError(f"{path}: header is not valid JSON ({str(e)[:200]})") from e
    if not isinstance(meta, dict):
        raise GroupFileError(f"{path}: header is a JSON {type(meta).__name__}, expected an object")
    metadata = meta.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise GroupFileError(f"{path}: __metadata__ must map strings to strings, found {str(metadata)[:200]}")
    entries = []
    for name, info in meta.items():
        try:
            entries.append(_entry(name, info))
        except ValueError as e:
            raise GroupFileError(f"{path}: header entry {name[:200]!r} is malformed ({e}): {str(info)[:200]}") from e
    return sorted(entries, key=lambda e: (e.start, e.end))


def read_layout(path: str | os.PathLike, dir_fd: int | None = None) -> GroupLayout:
    """Parse and check a group file's header (as strictly as safetensors); raise ``GroupFileError`` naming the file.

    ``path`` is opened without following a symlink and without blocking, by name relative to ``dir_fd`` when given.
    """
    path = Path(path)
    fd = open_regular(path, dir_fd)
    try:
        with open(fd, "rb", closefd=False) as f:
            file_size = os.fstat(fd).st_size
            head = f.read(8)
            if len(head) < 8:
                raise GroupFileError(f"{path}: expected an 8-byte header length, found a {file_size}-byte file")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(MAX_HEADER_BYTES, file_size - 8):
                raise GroupFileError(f"{path}: header length {header_len} does not fit a {file_size}-byte file")
            raw = f.read(header_len)
    except OSError as e:
        raise GroupFileError(f"{path}: reading the header failed ({e.strerror})") from e
    finally:
        os.close(fd)
    entries = _parse_header(path, raw)
    position = 0
    for entry in entries:
        if entry.start != position:
            raise GroupFileError(f"{path}: tensor {entry.name[:200]!r} starts at {entry.start}, expected {position}")
        if is_padding(entry.name) and (entry.dtype != torch.uint8 or len(entry.shape) != 1):
            raise GroupFileError(f"{path}: padding entry {entry.name!r} must be 1-D U8")
        if entry.start % entry.dtype.itemsize:
            raise GroupFileError(
                f"{path}: tensor {entry.name[:200]!r} starts at {entry.start}, not a multiple of "
                f"its element size {entry.dtype.itemsize}"
            )
        position = entry.end
    data_offset = 8 + header_len
    if data_offset + position != file_size:
        raise GroupFileError(
            f"{path}: header describes {data_offset + position} bytes, the file has {file_size} (truncated?)"
        )
    tensors = tuple(e for e in entries if not is_padding(e.name))
    return GroupLayout(data_offset, position, tensors, digest(head + raw))
