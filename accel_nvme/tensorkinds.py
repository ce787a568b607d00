"""How a streamed tensor is stored in its group file, and rebuilt into the module's tensor after each read.

Plain tensors are stored as they are; for a CUDA execution device, a checkpoint tensor keeps the checkpoint's
(smaller) floating dtype and is converted to the module's dtype after the read, as transformers and diffusers
convert it when loading in RAM.
Quantized tensors are stored as they are quantized, in one ``uint8`` blob per tensor:

- tensor subclasses (torchao, optimum-quanto) through their inner tensors: ``__tensor_flatten__`` at write,
  ``__tensor_unflatten__`` at read;
- diffusers ``GGUFParameter``: its bytes, rebuilt with its class and attributes (``quant_type``);
- bitsandbytes ``Params4bit``/``Int8Params`` on the CPU: their bytes and their state's tensors, rebuilt by ``bnb.py``.

Anything else that is not a plain tensor (other bitsandbytes uses, unknown ``Parameter`` subclasses) is refused when
the dispatch is planned, before anything is written.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from .format import SAFETENSORS_TO_DTYPE, TENSOR_ALIGNMENT, align_up
from .store import CheckpointTensor, checkpoint_tensor

logger = logging.getLogger(__name__)

KIND_ATTR = "_accel_nvme_kind"
_STATEFUL_PARAMETERS = {("diffusers.quantizers.gguf.utils", "GGUFParameter")}
_WARNED_NARROWED: set[tuple[torch.dtype, torch.dtype]] = set()


class UnstreamableTensorError(TypeError):
    """A tensor the nvme tier cannot stream exactly; the message names it, its class and what to do."""


@dataclass(frozen=True)
class _Leaf:
    """A plain inner tensor: its bytes at ``offset`` in the blob, stored in memory order (``order`` permutes back)."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]  # of the tensor permuted into memory order
    order: tuple[int, ...]  # dims of the original, in memory order

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class _Wrapper:
    """A tensor subclass: its class, ``__tensor_flatten__`` context, outer size and stride, and inner tensors."""

    cls: type
    ctx: Any
    size: torch.Size
    stride: tuple[int, ...]
    inner: dict[str, _Leaf | _Wrapper]


@dataclass(frozen=True)
class _Composite:
    """Plain tensors and state that a library adapter (``bnb.py``) lays out and rebuilds: ``adapter.tensors(t)`` at
    write, ``adapter.rebuild(inner)`` at read, ``adapter.install(owner, value)`` when the module takes ``value`` (or
    gives it back: ``None``)."""

    adapter: Any
    inner: dict[str, _Leaf]


@dataclass(frozen=True)
class TensorKind:
    """How one quantized tensor sits in its ``uint8`` blob and how the module's tensor is rebuilt from it."""

    root: _Leaf | _Wrapper | _Composite
    nbytes: int
    parameter_cls: type | None = None  # a Parameter subclass with state, rebuilt with ``attributes``
    attributes: tuple[tuple[str, Any], ...] = ()

    def unpack(self, blob: torch.Tensor) -> torch.Tensor:
        """The module's tensor, its inner tensors viewing ``blob`` (no copy)."""
        value = _unpack(self.root, blob)
        if self.parameter_cls is None:
            return value
        param = torch.Tensor._make_subclass(self.parameter_cls, value, False)
        param.__dict__.update(self.attributes)
        return param


def _refuse(name: str, tensor: torch.Tensor, why: str) -> UnstreamableTensorError:
    module, _, attr = name.rpartition(".")
    return UnstreamableTensorError(
        f"module {module!r}: tensor {attr!r} is a {type(tensor).__module__}.{type(tensor).__qualname__}, which the "
        f"nvme tier cannot stream exactly ({why}); map this module to 'cpu' (or a GPU) instead of 'nvme', or use a "
        "format it streams as stored: torchao, optimum-quanto, GGUF, or a plain dtype (docs/quantized.md)"
    )


def kind_of(name: str, tensor: torch.Tensor, owner: torch.nn.Module | None = None) -> TensorKind | None:
    """None for a plain tensor; how a quantized one is stored; ``UnstreamableTensorError`` for anything else.

    ``owner`` is the module holding ``tensor`` (bitsandbytes keeps part of a weight's state there).
    """
    cls = type(tensor)
    if cls in (torch.Tensor, torch.nn.Parameter):
        return None
    if cls.__module__.startswith("bitsandbytes"):
        from .bnb import bnb_kind  # bnb.py builds its kinds with this module

        return bnb_kind(name, tensor, owner)
    if (cls.__module__, cls.__qualname__) in _STATEFUL_PARAMETERS:
        attributes = dict(vars(tensor))
        plain = torch.Tensor._make_subclass(torch.Tensor, tensor.detach(), False)
        root, nbytes = _describe(name, plain, 0)
        return TensorKind(root, nbytes, cls, tuple(attributes.items()))
    if isinstance(tensor, torch.nn.Parameter) and not hasattr(cls, "__tensor_flatten__"):
        raise _refuse(name, tensor, "a Parameter subclass whose attributes it does not know how to keep")
    if not hasattr(cls, "__tensor_flatten__"):
        raise _refuse(name, tensor, "a tensor subclass without __tensor_flatten__")
    root, nbytes = _describe(name, tensor, 0)
    return TensorKind(root, nbytes)


def _describe(name: str, tensor: torch.Tensor, offset: int) -> tuple[_Leaf | _Wrapper, int]:
    """The layout of ``tensor`` from ``offset`` in a blob, and the offset after it."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter):
        order = tuple(sorted(range(tensor.dim()), key=lambda d: (-tensor.stride(d), d)))
        permuted = tensor.permute(order)
        if not permuted.is_contiguous():
            raise _refuse(name, tensor, f"an inner tensor of strides {tensor.stride()} has gaps")
        offset = align_up(offset, TENSOR_ALIGNMENT)
        leaf = _Leaf(offset, tensor.dtype, tuple(permuted.shape), order)
        return leaf, offset + leaf.nbytes
    if not hasattr(type(tensor), "__tensor_flatten__"):
        raise _refuse(name, tensor, "an inner tensor subclass without __tensor_flatten__")
    names, ctx = tensor.__tensor_flatten__()
    inner = {}
    for inner_name in names:
        inner[inner_name], offset = _describe(name, getattr(tensor, inner_name), offset)
    return _Wrapper(type(tensor), ctx, tensor.size(), tensor.stride(), inner), offset


def composite_kind(name: str, tensors: dict[str, torch.Tensor], adapter: Any) -> TensorKind:
    """The kind of a tensor that ``adapter`` splits into the plain ``tensors`` (one blob) and rebuilds after a read."""
    inner, offset = {}, 0
    for inner_name, tensor in tensors.items():
        inner[inner_name], offset = _describe(name, torch.Tensor._make_subclass(torch.Tensor, tensor, False), offset)
    return TensorKind(_Composite(adapter, inner), offset)


def _leaves(node: _Leaf | _Wrapper | _Composite, tensor: torch.Tensor):
    if isinstance(node, _Leaf):
        yield node, tensor
        return
    if isinstance(node, _Composite):
        tensors = node.adapter.tensors(tensor)
        for inner_name, leaf in node.inner.items():
            yield leaf, tensors[inner_name]
        return
    for inner_name, child in node.inner.items():
        yield from _leaves(child, getattr(tensor, inner_name))


def pack(tensor: torch.Tensor, kind: TensorKind) -> torch.Tensor:
    """The ``uint8`` blob a group file stores for a quantized tensor: its inner tensors' bytes, 64-byte aligned."""
    if kind.parameter_cls is not None:
        tensor = torch.Tensor._make_subclass(torch.Tensor, tensor.detach(), False)
    blob = torch.zeros(align_up(kind.nbytes, TENSOR_ALIGNMENT), dtype=torch.uint8)
    with torch.no_grad():
        for leaf, inner in _leaves(kind.root, tensor):
            data = inner.detach().to("cpu").permute(leaf.order).contiguous().reshape(-1).view(torch.uint8)
            blob[leaf.offset : leaf.offset + leaf.nbytes] = data
    return blob


def _unpack(node: _Leaf | _Wrapper | _Composite, blob: torch.Tensor) -> torch.Tensor:
    if isinstance(node, _Leaf):
        flat = blob[node.offset : node.offset + node.nbytes].view(node.dtype)
        inverse = sorted(range(len(node.order)), key=node.order.__getitem__)
        return flat.view(node.shape).permute(inverse)
    if isinstance(node, _Composite):
        return node.adapter.rebuild({inner_name: _unpack(leaf, blob) for inner_name, leaf in node.inner.items()})
    inner = {inner_name: _unpack(child, blob) for inner_name, child in node.inner.items()}
    return node.cls.__tensor_unflatten__(inner, node.ctx, node.size, node.stride)


def stored_form(
    name: str,
    tensor: torch.Tensor,
    source: torch.Tensor | CheckpointTensor,
    main_device: Any,
    owner: torch.nn.Module | None = None,
) -> Any:
    """What a group file stores for module tensor ``tensor`` whose bytes come from ``source``.

    A quantized tensor: its blob. A checkpoint tensor whose dtype widens exactly to the module's: as stored, when the
    execution device is a GPU, where converting after each read costs next to nothing; on the CPU the conversion
    costs more than the read it saves (docs/quantized.md), so the group file holds the module's dtype.
    """
    kind = kind_of(name, tensor, owner)
    if kind is not None:
        if isinstance(source, CheckpointTensor) or tensor.device.type == "meta":
            raise _refuse(name, tensor, "its quantized bytes are not in memory yet")
        if isinstance(kind.root, _Composite) and torch.device(main_device).type != "cpu":
            raise _refuse(name, tensor, f"its CPU format streams for a CPU execution device only, not {main_device!r}")
        return pack(tensor, kind)
    if isinstance(source, CheckpointTensor) and _is_cuda(main_device):
        stored = SAFETENSORS_TO_DTYPE.get(source.identity[3])
        if _widens_exactly(stored, source.dtype):
            return checkpoint_tensor(source.path, source.key, stored)
    return source


def _is_cuda(device: Any) -> bool:
    return isinstance(device, int) or torch.device(device).type == "cuda"


def _widens_exactly(stored: torch.dtype | None, dtype: torch.dtype) -> bool:
    """Whether every value of ``stored`` converts to ``dtype`` exactly (fp16, bf16 and fp8 into fp32 or fp64)."""
    return (
        stored is not None
        and stored in (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)
        and dtype in (torch.float32, torch.float64)
    )


def placeholder(tensor: torch.Tensor, kind: TensorKind) -> torch.Tensor:
    """The meta tensor a module holds between forwards in place of a quantized tensor; it remembers ``kind``."""
    meta = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    if isinstance(tensor, torch.nn.Parameter):
        meta = torch.nn.Parameter(meta, requires_grad=tensor.requires_grad)
    setattr(meta, KIND_ATTR, kind)
    return meta


def installed(owner: torch.nn.Module, meta: torch.Tensor, value: torch.Tensor) -> None:
    """``owner`` now holds ``value`` in place of ``meta`` (or ``meta`` again): an adapter updates the module's own
    references to the tensor's state."""
    kind = getattr(meta, KIND_ATTR, None)
    if kind is not None and isinstance(kind.root, _Composite):
        kind.root.adapter.install(owner, None if value is meta else value)


def rebuild(meta: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """The module's tensor from what was read: a quantized one rebuilt, a plain one in the placeholder's dtype."""
    kind = getattr(meta, KIND_ATTR, None)
    if kind is not None:
        return kind.unpack(stored)
    if stored.dtype == meta.dtype:
        return stored
    if not (stored.dtype.is_floating_point and meta.dtype.is_floating_point):
        raise UnstreamableTensorError(
            f"a streamed tensor is stored as {stored.dtype} but its module now expects {meta.dtype}; only floating "
            "dtypes convert exactly: dispatch the model again after changing its dtype"
        )
    if stored.dtype.itemsize > meta.dtype.itemsize and (stored.dtype, meta.dtype) not in _WARNED_NARROWED:
        _WARNED_NARROWED.add((stored.dtype, meta.dtype))
        logger.warning(
            "streamed weights are stored as %s and converted to %s after each read (the module's dtype changed after "
            "dispatch other than by diffusers' layerwise casting, which rewrites the groups: e.g. model.half()): "
            "outputs are exact, but each forward reads %d× the bytes; call accel_nvme.recast(model) to stream %s",
            stored.dtype,
            meta.dtype,
            stored.dtype.itemsize // meta.dtype.itemsize,
            meta.dtype,
        )
    return stored.to(meta.dtype)
