import json
import struct

import pytest
import torch
from safetensors import safe_open

from accel_nvme.format import (
    ALIGNMENT,
    TENSOR_ALIGNMENT,
    GroupFileError,
    digest,
    is_padding,
    read_layout,
    write_group,
)

ALL_DTYPES = [
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
]


def sample(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g, dtype=torch.int64).to(dtype)


def same_bits(a, b):
    return (
        a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        if a.dim()
        else torch.equal(a.reshape(1).view(torch.uint8), b.reshape(1).view(torch.uint8))
    )


def test_every_dtype_round_trips_through_safe_open(tmp_path):
    tensors = {f"layers.{i}.{str(d).split('.')[-1]}": sample(d, (3, 5 + i), i) for i, d in enumerate(ALL_DTYPES)}
    tensors["scalar"] = torch.tensor(1.5, dtype=torch.float16)
    tensors["empty"] = torch.zeros(0, 4)
    path = tmp_path / "g.safetensors"
    written = write_group(path, tensors)
    layout = written.layout
    assert layout.data_offset % ALIGNMENT == 0
    with safe_open(path, framework="pt") as f:
        keys = f.keys()
        assert {k for k in keys if not is_padding(k)} == set(tensors)
        for name, tensor in tensors.items():
            assert same_bits(f.get_tensor(name), tensor), name
    assert read_layout(path) == layout
    data = path.read_bytes()[layout.data_offset :]
    assert digest(data) == written.data_digest


def test_every_tensor_starts_64_byte_aligned(tmp_path):
    tensors = {
        "a": torch.ones(3, dtype=torch.uint8),
        "b": torch.ones(5, dtype=torch.float64),
        "c": torch.ones(7, dtype=torch.bfloat16),
        "d": torch.ones(1, dtype=torch.int32),
    }
    layout = write_group(tmp_path / "g.safetensors", tensors).layout
    for entry in layout.entries:
        assert entry.start % TENSOR_ALIGNMENT == 0


def test_failed_write_leaves_no_file(tmp_path):
    tensors = {"ok": torch.ones(4), "bad": torch.empty(4, device="meta")}
    with pytest.raises(NotImplementedError, match="meta"):
        write_group(tmp_path / "g.safetensors", tensors)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_dtype_is_named(tmp_path):
    with pytest.raises(TypeError, match=r"'z'.*complex"):
        write_group(tmp_path / "g.safetensors", {"z": torch.ones(2, dtype=torch.complex64)})
    assert list(tmp_path.iterdir()) == []


def _write(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize(
    "case, match",
    [
        ("truncated", "truncated"),
        ("not_json", "not valid JSON"),
        ("absurd_header", "does not fit"),
        ("overlap", "starts at"),
        ("out_of_range", "does not fit|truncated"),
        ("too_short", "8-byte header length"),
    ],
)
def test_lying_headers_are_refused_naming_the_file(tmp_path, case, match):
    path = tmp_path / f"{case}.safetensors"
    good = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
    }
    if case == "truncated":
        write_group(path, {"a": torch.ones(1000)})
        path.write_bytes(path.read_bytes()[:-10])
    elif case == "not_json":
        _write(path, b"{not json" + b" " * 10, b"\0" * 16)
    elif case == "absurd_header":
        path.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    elif case == "overlap":
        good["b"]["data_offsets"] = [4, 12]
        _write(path, json.dumps(good).encode(), b"\0" * 16)
    elif case == "out_of_range":
        good["b"]["data_offsets"] = [8, 16]
        _write(path, json.dumps(good).encode(), b"\0" * 8)
    else:
        path.write_bytes(b"\1\2")
    with pytest.raises(GroupFileError, match=match) as info:
        read_layout(path)
    assert str(path) in str(info.value)
