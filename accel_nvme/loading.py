"""What a load with the nvme tier tells the ``dispatch_model`` it ends with, and where offloaded weights sit until then.

``from_pretrained(..., offload_backend="nvme")`` runs under ``disk_as_nvme``: the context variable says, to the
``dispatch_model`` transformers or diffusers call at the end, that ``"disk"`` entries are ours. accelerate's
``load_checkpoint_in_model`` has no such enclosing call: it leaves its ``NvmeLoading`` on the model (``PENDING_ATTR``)
for the ``dispatch_model`` that follows.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .config import NvmeConfig

PENDING_ATTR = "_accel_nvme_pending"  # an NvmeLoading left on a model by load_checkpoint_in_model, for dispatch


@dataclass
class NvmeLoading:
    """What a ``from_pretrained(..., offload_backend="nvme")`` call tells the ``dispatch_model`` it ends with.

    Within it, ``"disk"`` entries are streamed as ``"nvme"`` ones. ``index`` collects where offloaded weights sit in
    the checkpoint, for loaders that do not pass an ``offload_index``; ``mapped`` holds offloaded weights of ``.bin``
    checkpoints, memory-mapped by ``torch.load``.
    """

    config: NvmeConfig
    index: dict[str, dict] = field(default_factory=dict)
    mapped: dict[str, torch.Tensor] = field(default_factory=dict)


_LOADING: contextvars.ContextVar[NvmeLoading | None] = contextvars.ContextVar("accel_nvme_loading", default=None)


@contextlib.contextmanager
def disk_as_nvme(loading: NvmeLoading) -> Iterator[NvmeLoading]:
    """Within this block, ``dispatch_model`` streams ``"disk"`` entries from nvme group files."""
    token = _LOADING.set(loading)
    try:
        yield loading
    finally:
        _LOADING.reset(token)


def current_loading() -> NvmeLoading | None:
    """The ``NvmeLoading`` of the ``from_pretrained`` call in progress, if any."""
    return _LOADING.get()


def offloaded_weights(
    model: torch.nn.Module, offload_index: dict[str, dict] | None
) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Where ``model``'s offloaded weights sit: ``(index, mapped)`` from the pending load, the load in progress and
    ``offload_index`` (later ones win)."""
    pending, loading = model.__dict__.get(PENDING_ATTR), _LOADING.get()
    index = {**(pending.index if pending else {}), **(loading.index if loading else {}), **(offload_index or {})}
    mapped = {**(pending.mapped if pending else {}), **(loading.mapped if loading else {})}
    return index, mapped
