"""Group files: safetensors files whose data section starts on a 4096-byte boundary.

The header is padded with spaces (which safetensors readers accept) so the whole data section can be read with one
aligned O_DIRECT read. Tensors are ordered by decreasing element size, so every tensor's offset is a multiple of its
element size and a zero-copy view of the read buffer is valid for each.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

ALIGNMENT = 4096
MAX_HEADER_BYTES = 100 << 20

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
    """The parsed header of a group file: where data starts and each tensor's byte range."""

    data_offset: int
    data_bytes: int
    entries: tuple[TensorEntry, ...]


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    """``n`` rounded up to a multiple of ``alignment``."""
    return -(-n // alignment) * alignment


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (made contiguous, on the CPU) without a copy when possible."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def storage_order(tensors: dict) -> list[str]:
    """Names in on-disk order: decreasing element size, so each offset is a multiple of its element size."""
    return sorted(tensors, key=lambda name: -tensors[name].dtype.itemsize)


def _header(tensors: dict[str, torch.Tensor], order: list[str]) -> tuple[bytes, list[TensorEntry]]:
    meta: dict[str, object] = {"__metadata__": {"format": "pt", "writer": "accel_nvme"}}
    entries = []
    offset = 0
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in DTYPE_TO_SAFETENSORS:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        nbytes = tensor.numel() * tensor.element_size()
        meta[name] = {
            "dtype": DTYPE_TO_SAFETENSORS[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        entries.append(TensorEntry(name, tensor.dtype, tuple(tensor.shape), offset, offset + nbytes))
        offset += nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    padded = align_up(8 + len(raw)) - 8
    return raw + b" " * (padded - len(raw)), entries


def write_group(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> tuple[GroupLayout, str]:
    """Write ``tensors`` as one aligned safetensors file, atomically (temporary name, fsync, rename).

    Returns the layout and the SHA-256 of the data section, which readers can check after an aligned read.
    """
    path = Path(path)
    order = storage_order(tensors)
    header, entries = _header(tensors, order)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for name in order:
                data = tensor_bytes(tensors[name])
                digest.update(data)
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    data_bytes = entries[-1].end if entries else 0
    return GroupLayout(8 + len(header), data_bytes, tuple(entries)), digest.hexdigest()


def read_layout(path: str | os.PathLike) -> GroupLayout:
    """Parse and check a group file's header; raise ``GroupFileError`` naming the file when it is not sound."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise GroupFileError(f"{path}: expected an 8-byte header length, found a {file_size}-byte file")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(MAX_HEADER_BYTES, file_size - 8):
                raise GroupFileError(f"{path}: header length {header_len} does not fit a {file_size}-byte file")
            raw = f.read(header_len)
    except FileNotFoundError as e:
        raise GroupFileError(f"{path}: group file is missing") from e
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GroupFileError(f"{path}: header is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise GroupFileError(f"{path}: header is a JSON {type(meta).__name__}, expected an object")
    meta.pop("__metadata__", None)
    entries = []
    for name, info in meta.items():
        try:
            dtype = SAFETENSORS_TO_DTYPE[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise GroupFileError(f"{path}: header entry {name!r} is malformed: {info!r}") from e
        if end - start != math.prod(shape) * dtype.itemsize or start % dtype.itemsize:
            raise GroupFileError(f"{path}: tensor {name!r} has byte range [{start}, {end}) that does not fit {info}")
        entries.append(TensorEntry(name, dtype, shape, start, end))
    entries.sort(key=lambda e: e.start)
    position = 0
    for entry in entries:
        if entry.start != position:
            raise GroupFileError(f"{path}: tensor {entry.name!r} starts at {entry.start}, expected {position}")
        position = entry.end
    data_offset = 8 + header_len
    if data_offset + position != file_size:
        raise GroupFileError(
            f"{path}: header describes {data_offset + position} bytes, the file has {file_size} (truncated?)"
        )
    return GroupLayout(data_offset, position, tuple(entries))
