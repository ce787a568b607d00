"""tensorkinds: how a streamed tensor is stored in its group file and rebuilt after each read (no dispatch here)."""

import pytest
import torch
from safetensors.torch import save_file

from accel_nvme.format import TENSOR_ALIGNMENT
from accel_nvme.store import CheckpointTensor, checkpoint_tensor
from accel_nvme.tensorkinds import (
    UnstreamableTensorError,
    kind_of,
    pack,
    placeholder,
    rebuild,
    stored_form,
)


class Pair(torch.Tensor):
    """A minimal traceable wrapper subclass: two inner tensors, ``a`` and ``b``."""

    @staticmethod
    def __new__(cls, a, b):
        return torch.Tensor._make_wrapper_subclass(cls, a.shape, strides=a.stride(), dtype=a.dtype, device=a.device)

    def __init__(self, a, b):
        self.a, self.b = a, b

    def __tensor_flatten__(self):
        return ["a", "b"], None

    @staticmethod
    def __tensor_unflatten__(inner, ctx, size, stride):
        return Pair(inner["a"], inner["b"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.detach.default, torch.ops.aten._to_copy.default):
            (pair,) = args
            return Pair(func(pair.a, **(kwargs or {})), func(pair.b, **(kwargs or {})))
        raise NotImplementedError(func)


def test_plain_tensors_have_no_kind_and_are_stored_as_they_are():
    weight = torch.nn.Parameter(torch.randn(3, 4))
    assert kind_of("m.weight", weight) is None and kind_of("m.buf", torch.randn(2)) is None
    assert stored_form("m.weight", weight, weight, "cuda:0") is weight


def test_a_tensor_subclass_round_trips_through_its_blob_with_strides_and_views():
    a, b = torch.randn(4, 3).t(), torch.randn(4, 3).t()  # inner tensors transposed (not contiguous)
    tensor = Pair(a, b)
    kind = kind_of("m.weight", tensor)
    blob = pack(tensor, kind)
    assert blob.dtype == torch.uint8 and blob.numel() % TENSOR_ALIGNMENT == 0
    assert blob.numel() == 2 * TENSOR_ALIGNMENT  # 48 bytes each, each 64-byte aligned
    rebuilt = rebuild(placeholder(tensor, kind), blob)
    assert type(rebuilt) is Pair
    assert torch.equal(rebuilt.a, a) and torch.equal(rebuilt.b, b) and rebuilt.a.stride() == a.stride()
    assert rebuilt.a.untyped_storage().data_ptr() == blob.untyped_storage().data_ptr(), "a view, not a copy"


def test_the_placeholder_is_meta_with_the_outer_shape_and_dtype():
    tensor = torch.nn.Parameter(Pair(torch.randn(2, 3), torch.randn(2, 3)), requires_grad=False)
    meta = placeholder(tensor, kind_of("m.weight", tensor))
    assert isinstance(meta, torch.nn.Parameter) and meta.device.type == "meta"
    assert (meta.shape, meta.dtype, meta.requires_grad) == (tensor.shape, tensor.dtype, False)


def test_a_quantized_tensor_still_on_meta_is_refused():
    tensor = Pair(torch.randn(2, 3), torch.randn(2, 3)).to("meta")
    with pytest.raises(UnstreamableTensorError, match=r"module 'm': tensor 'weight' .*not in memory yet"):
        stored_form("m.weight", tensor, tensor, "cpu")


def test_a_subclass_without_tensor_flatten_is_refused():
    class Tagged(torch.Tensor):
        pass

    tensor = torch.randn(2).as_subclass(Tagged)
    with pytest.raises(UnstreamableTensorError, match=r"Tagged, .*without __tensor_flatten__.*'cpu'"):
        kind_of("blocks.0.scale", tensor)


def test_a_smaller_checkpoint_dtype_is_kept_for_a_gpu_and_converted_after_the_read(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    weights = {"bf16": torch.randn(4, 4).to(torch.bfloat16), "fp32": torch.randn(4), "fp8": torch.randn(4)}
    weights["fp8"] = weights["fp8"].to(torch.float8_e4m3fn)
    save_file(weights, path)
    as_float32 = {name: checkpoint_tensor(path, name, torch.float32) for name in weights}
    meta = torch.empty(4, 4, device="meta")
    for device in ("cuda:0", 0):
        stored = stored_form("m.w", meta, as_float32["bf16"], device)
        assert isinstance(stored, CheckpointTensor) and stored.dtype == torch.bfloat16
    assert stored.identity != as_float32["bf16"].identity, "another dtype is another folder"
    assert stored_form("m.f", meta, as_float32["fp8"], "cuda").dtype == torch.float8_e4m3fn
    assert stored_form("m.w", meta, as_float32["bf16"], "cpu") is as_float32["bf16"], "the CPU converts at write"
    assert stored_form("m.v", meta, as_float32["fp32"], "cuda") is as_float32["fp32"]
    as_float16 = checkpoint_tensor(path, "bf16", torch.float16)
    assert stored_form("m.w", meta, as_float16, "cuda") is as_float16, "bf16 -> fp16 rounds: converted at write"
    rebuilt = rebuild(meta, stored.load())
    assert rebuilt.dtype == torch.float32 and torch.equal(rebuilt, weights["bf16"].float())


def test_rebuild_converts_floating_dtypes_only():
    meta = torch.empty(3, dtype=torch.float16, device="meta")
    assert rebuild(meta, torch.ones(3)).dtype == torch.float16
    with pytest.raises(UnstreamableTensorError, match=r"stored as torch\.int64 but its module now expects"):
        rebuild(meta, torch.arange(3))
