"""Backward with bounded RAM: autograd keeps a handle to a streamed weight, not a copy of it.

Inside a hooked forward with grad enabled, a ``saved_tensors_hooks`` pair packs every saved tensor that views a group
our hooks hold as (group, member, geometry); backward's unpack acquires the group again from the prefetcher (whose
backward schedule reads groups in reverse order ahead) and returns the tensor: a copy of it out of the staging buffer,
or a view of the device copy, which may outlive its lease. Other saved tensors go to the hooks active before ours
(activation checkpointing, ``save_on_cpu``), or are kept as they are. A streamed weight that requires grad enters the
forward as a non-leaf whose gradient is dropped: autograd holds no reference to it, and it never gets a ``.grad``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .prefetch import Lease, Prefetcher

logger = logging.getLogger(__name__)

_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


@dataclasses.dataclass(frozen=True, slots=True)
class _Held:
    """A group held now by a hook, whose tensors autograd may save: what a saved view needs to be found again."""

    prefetcher: Prefetcher
    group: int
    tensors: dict[str, torch.Tensor]


_HELD: dict[int, _Held] = {}  # storage address → the group viewing it, while a hook holds it in a forward with grad


@dataclasses.dataclass(frozen=True, eq=False, slots=True)
class _Handle:
    """A saved view of a streamed tensor: ``member`` of ``group``, at ``offset`` elements from its start."""

    prefetcher: Prefetcher
    group: int
    member: str
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def load(self) -> torch.Tensor:
        """Acquire the group again and return a copy of the saved view: staging buffers and device ring slots are
        reused once the lease is released."""
        with self.prefetcher.forward_lock:
            lease = self.prefetcher.acquire(self.group, self, backward=True)
            try:
                member = lease.tensors[self.member]
                view = member.as_strided(self.size, self.stride, member.storage_offset() + self.offset)
                return view.clone()
            finally:
                lease.release()


@dataclasses.dataclass(frozen=True, slots=True)
class _Outer:
    """A saved tensor packed by the hooks that were active before ours."""

    packed: Any
    unpack: Callable[[Any], torch.Tensor]


def holding(prefetcher: Prefetcher, group: int, lease: Lease) -> None:
    """A hook took ``group`` in a forward with grad enabled: saved views of its tensors become handles."""
    tensors = lease.tensors
    if not tensors or group in prefetcher.resident_on_device():
        return  # kept on the device for good: autograd may keep views of it
    storage = next(iter(tensors.values())).untyped_storage().data_ptr()
    if lease.on_device or storage in lease.staging:
        _HELD[storage] = _Held(prefetcher, group, tensors)


def released(lease: Lease) -> None:
    """The hook puts the group back: its storage may hold another group from now on."""
    if lease.tensors:
        storage = next(iter(lease.tensors.values())).untyped_storage().data_ptr()
        held = _HELD.get(storage)
        if held is not None and held.tensors is lease.tensors:
            del _HELD[storage]


class _DropGrad(torch.autograd.Function):
    """Identity on ``tensor`` whose backward drops the gradient; the output requires grad through ``anchor`` alone."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None]:
        return None, None


_ANCHOR = torch.zeros((), requires_grad=True)  # never gets a gradient: ``_DropGrad`` passes none on


def frozen_requiring_grad(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with ``requires_grad`` (kernels look at it, as at the weight in RAM); its gradient is dropped.

    Autograd's graph holds no reference to ``tensor``: the only input it records is a scalar leaf of ours.
    """
    return _DropGrad.apply(tensor, _ANCHOR)


def _pack(outer: tuple[Callable, Callable] | None) -> Callable[[torch.Tensor], Any]:
    def pack(tensor: torch.Tensor) -> Any:
        handle = _handle(tensor) if _HELD else None
        if handle is not None:
            return handle
        if outer is not None:
            return _Outer(outer[0](tensor), outer[1])
        return tensor

    pack.accel_nvme = True
    return pack


def _handle(tensor: torch.Tensor) -> _Handle | torch.Tensor | None:
    """A handle for ``tensor`` if it views a held group; a copy if it does in a way a handle cannot describe."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.layout != torch.strided:
        return None
    held = _HELD.get(tensor.untyped_storage().data_ptr())
    if held is None:
        return None
    start = tensor.data_ptr()
    for name, member in held.tensors.items():
        begin = member.data_ptr()
        if begin <= start < begin + member.nbytes and member.dtype == tensor.dtype:
            offset = tensor.storage_offset() - member.storage_offset()
            return _Handle(held.prefetcher, held.group, name, offset, tuple(tensor.shape), tuple(tensor.stride()))
    logger.debug("a saved tensor views streamed weights but no member of them: autograd gets a copy")
    return tensor.clone()


def _unpack(saved: Any) -> torch.Tensor:
    if isinstance(saved, _Handle):
        return saved.load()
    if isinstance(saved, _Outer):
        return saved.unpack(saved.packed)
    return saved


@contextlib.contextmanager
def saving_handles() -> Iterator[None]:
    """Around a hooked forward: with grad enabled, saved views of streamed tensors become handles (once, outermost)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        yield
        return
    outer = _top_hooks(False) if _top_hooks is not None else None
    if outer is not None and getattr(outer[0], "accel_nvme", False):
        yield
        return
    with torch.autograd.graph.saved_tensors_hooks(_pack(outer), _unpack):
        yield
