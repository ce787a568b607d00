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


# ------------------------------------------------------------------- the header parser against safetensors itself

FUZZ_SEED = 20261203
ODD_VALUES = [-1, 0, 1, 3, 2**63, 2**64 - 1, 2**64, 1.0, 1.5, "1", None, True, [], {}, float("inf")]
ODD_DTYPES = ["F32", "F16", "U8", "I64", "BOOL", "f32", "F128", "", 3, None, "F8_E4M3", "C64"]
ODD_TEXT = [b"Infinity", b"NaN", b"-Infinity", b"1e400", b'"\\ud800"', b"\xff", b"[" * 200 + b"]" * 200, b"{}"]


def _safetensors_accepts(path) -> bool:
    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                f.get_tensor(key)
    except Exception:
        return False
    return True


def _mutate_json(rng, meta: dict) -> bytes:
    meta = json.loads(json.dumps(meta))
    names = [k for k in meta if k != "__metadata__"]
    name = rng.choice(names)
    kind = rng.randrange(10)
    if kind == 0:
        meta[name]["dtype"] = rng.choice(ODD_DTYPES)
    elif kind == 1 and meta[name]["shape"]:
        meta[name]["shape"][rng.randrange(len(meta[name]["shape"]))] = rng.choice(ODD_VALUES)
    elif kind == 2:
        meta[name]["shape"] = rng.choice([[], [0], [1, 1, 1], [2**32, 2**32], "x", None])
    elif kind == 3:
        meta[name]["data_offsets"][rng.randrange(2)] = rng.choice([*ODD_VALUES, rng.randrange(0, 5000)])
    elif kind == 4:
        meta[name]["data_offsets"] = rng.choice([[], [0], [0, 4, 8], "0,4", None])
    elif kind == 5:
        del meta[name][rng.choice(["dtype", "shape", "data_offsets"])]
    elif kind == 6:
        meta[name]["extra"] = 1
    elif kind == 7:
        meta["__metadata__"] = rng.choice([{"a": 1}, {"a": None}, "x", [], {"a": {"b": "c"}}, None])
    elif kind == 8:
        other = rng.choice(names)
        meta[name]["data_offsets"], meta[other]["data_offsets"] = (
            meta[other]["data_offsets"],
            meta[name]["data_offsets"],
        )
    else:
        meta[name] = rng.choice([None, 1, "x", [], {}])
    text = json.dumps(meta, separators=(",", ":"), allow_nan=True).encode()
    if rng.random() < 0.3:  # duplicate a key, or splice in a token JSON does not allow
        at = text.index(b"{", 1)
        text = text[:at] + rng.choice([b"", b"NaN,", b"Infinity"]) + text[at:]
        if rng.random() < 0.5:
            text = text[:1] + json.dumps(name).encode() + b":" + json.dumps(meta.get(name)).encode() + b"," + text[1:]
    return text


def _mutate_bytes(rng, raw: bytes, header_len: int) -> bytes:
    data = bytearray(raw)
    kind = rng.randrange(5)
    if kind == 0:
        for _ in range(rng.randint(1, 3)):
            data[8 + rng.randrange(header_len)] = rng.randrange(256)
    elif kind == 1:
        data[:8] = struct.pack("<Q", max(0, header_len + rng.randint(-40, 40)))
    elif kind == 2:
        data = data[: rng.randrange(len(data))] if rng.random() < 0.5 else data + bytes(rng.randint(1, 100))
    elif kind == 3:
        token = rng.choice(ODD_TEXT)
        at = 8 + rng.randrange(header_len)
        data[at : at + len(token)] = token
    else:
        data[8] = rng.choice(b' [\n"a')
    return bytes(data)


def test_the_header_parser_rejects_everything_safetensors_rejects(tmp_path):
    """≥3,000 seeded mutations of a real group file: what safe_open refuses, read_layout refuses with our error."""
    import random

    rng = random.Random(FUZZ_SEED)
    base_path = tmp_path / "base.safetensors"
    tensors = {
        "w": torch.randn(3, 5),
        "h": torch.ones(4, dtype=torch.float16),
        "i": torch.arange(3, dtype=torch.int64),
        "flags": torch.ones(2, dtype=torch.bool),
        "empty": torch.zeros(0, 2),
        "scalar": torch.tensor(2.0),
    }
    layout = write_group(base_path, tensors).layout
    raw = base_path.read_bytes()
    header_len = layout.data_offset - 8
    meta = json.loads(raw[8 : 8 + header_len])
    path = tmp_path / "mutant.safetensors"
    counts = {"both reject": 0, "both accept": 0, "only we reject": 0}
    for i in range(3600):
        if i % 3 == 0:
            data = _mutate_bytes(rng, raw, header_len)
        else:
            header = _mutate_json(rng, meta)
            if rng.random() < 0.7:
                header += b" " * max(0, header_len - len(header))
            data = struct.pack("<Q", len(header)) + header + raw[layout.data_offset :]
        path.write_bytes(data)
        theirs = _safetensors_accepts(path)
        try:
            read_layout(path)
            ours = True
        except GroupFileError as e:
            assert str(path) in str(e)
            ours = False
        assert ours <= theirs, f"mutation {i} accepted although safetensors refuses it: {data[:2000]!r}"
        counts["both accept" if ours else "both reject" if not theirs else "only we reject"] += 1
    assert counts["both reject"] > 1500 and counts["both accept"] > 30, counts
