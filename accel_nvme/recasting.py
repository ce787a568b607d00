"""Streamed weights whose dtype was narrowed after dispatch (diffusers' layerwise casting): their groups rewritten so.

``enable_layerwise_casting`` on a model already dispatched casts the meta placeholders of its streamed weights to the
storage dtype (fp8), not the group files. ``recast`` writes a new offload folder whose groups hold each such weight
converted once to its placeholder's dtype (the ``.to`` the model in RAM applies: the same bits) and every other tensor
as it is, then streams from it. That folder is content-addressed like any other: its fingerprint covers the dtypes and
the identity of the files it was converted from, so a later load cast the same way reuses it; the folder of the uncast
weights stays for the loads that do not cast. Nothing changes until the new folder is complete.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
from safetensors import safe_open

from .format import GroupFileError, TensorEntry, digest, tensor_bytes
from .hooks import NvmeAlignDevicesHook
from .io import FileReader
from .prefetch import Prefetcher
from .sources import group_sources
from .store import (
    CLEAN_ADVICE,
    CheckpointEntry,
    CheckpointGroup,
    CheckpointTensor,
    GroupPlan,
    Manifest,
    StoredGroup,
    StoredWeights,
    StoreError,
    checkpoint_tensor,
    materialize,
)
from .tensorkinds import KIND_ATTR

logger = logging.getLogger(__name__)

_DISPATCHED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()  # models with nvme groups, for ``recast_containing``


def track(model: torch.nn.Module) -> None:
    """``model`` was dispatched with nvme groups: a casting applied to it (or to a part of it) recasts it."""
    _DISPATCHED.add(model)


def recast_containing(module: torch.nn.Module) -> int:
    """``recast`` every dispatched model that ``module`` is, contains, or is a part of; tensors rewritten."""
    related = [
        model
        for model in list(_DISPATCHED)
        if any(m is module for m in model.modules()) or any(m is model for m in module.modules())
    ]
    return sum(recast(model) for model in related)


def recast(model: torch.nn.Module) -> int:
    """Rewrite ``model``'s nvme groups so that every streamed weight whose dtype was narrowed after dispatch (diffusers'
    ``enable_layerwise_casting``, ``model.half()``) is stored in that dtype; returns how many tensors were rewritten."""
    if "nvme_device_map" not in vars(model):
        raise ValueError(f"{type(model).__name__} was not dispatched with nvme groups: pass the model dispatched")
    hooks: dict[int, list[NvmeAlignDevicesHook]] = {}
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        if isinstance(hook, NvmeAlignDevicesHook):
            hooks.setdefault(id(hook.prefetcher), []).append(hook)
    return sum(_recast(group_hooks) for group_hooks in hooks.values())


def _recast(hooks: list[NvmeAlignDevicesHook]) -> int:
    """Recast the groups of one prefetcher, whose hooks are ``hooks`` (all of them)."""
    prefetcher = hooks[0].prefetcher
    manifest: Manifest = hooks[0].weights_map.manifest
    casts = _narrowed(hooks, manifest)
    if not casts:
        return 0
    experts = next((group.name for group in manifest.groups if group.row_digests or group.expert_starts), None)
    if experts is not None:
        raise RuntimeError(
            f"{len(casts)} streamed weights were cast after dispatch (e.g. {next(iter(casts))!r} to "
            f"{next(iter(casts.values()))}), but their groups cannot be rewritten in a model with MoE experts read "
            f"one expert at a time ({experts!r}): load the model again and apply the casting before dispatching"
        )
    with prefetcher.forward_lock:
        if prefetcher.holders():
            raise RuntimeError("a streamed model's dtype cannot be changed while one of its forwards is running")
        plans = [_plan(group, casts) for group in manifest.groups]
        rewritten = materialize(manifest.folder.parent, plans, prefetcher.reader.io_threads)
        successor = _prefetcher_like(prefetcher, rewritten)
        for hook in hooks:
            successor.attach()
            hook.prefetcher = successor
            hook.weights_map = StoredWeights(rewritten, hook.weights_map.prefix)
        prefetcher.close()
    logger.info(
        "%d streamed tensors cast after dispatch (%s) now stream from %s",
        len(casts),
        ", ".join(sorted({str(dtype).removeprefix("torch.") for dtype in casts.values()})),
        rewritten.folder,
    )
    return len(casts)


def _narrowed(hooks: list[NvmeAlignDevicesHook], manifest: Manifest) -> dict[str, torch.dtype]:
    """Stored tensor name -> the narrower floating dtype its placeholder has now (tied names share one placeholder,
    ``modelstate.leave_meta_tensors``: one dtype)."""
    canonical = {member: name for group in manifest.groups for member, name in group.members.items()}
    casts = {}
    for hook in hooks:
        for streamed in hook._streamed:
            name, dtype = canonical[streamed.name], streamed.meta.dtype
            stored = manifest.locate(name)[1].dtype
            if getattr(streamed.meta, KIND_ATTR, None) is None and dtype != stored and _narrows(stored, dtype):
                casts[name] = dtype  # quantized tensors (a ``TensorKind``) keep their blob
    return casts


def _narrows(stored: torch.dtype, dtype: torch.dtype) -> bool:
    """Whether a weight stored as ``stored`` and computed as ``dtype`` is better stored as ``dtype``."""
    return stored.is_floating_point and dtype.is_floating_point and dtype.itemsize <= stored.itemsize


def _plan(group: StoredGroup | CheckpointGroup, casts: dict[str, torch.dtype]) -> GroupPlan:
    """The group as it is, each tensor in ``casts`` converted to its dtype when the new file is written."""
    if isinstance(group, CheckpointGroup):
        tensors = {e.name: _from_checkpoint(group, e, casts.get(e.name, e.dtype)) for e in group.entries}
    else:
        tensors = {e.name: _from_group_file(group, e, casts.get(e.name, e.dtype)) for e in group.entries}
    return GroupPlan(group.name, tensors, dict(group.members))


def _from_checkpoint(group: CheckpointGroup, entry: CheckpointEntry, dtype: torch.dtype) -> CheckpointTensor:
    tensor = checkpoint_tensor(entry.path, entry.key, dtype)
    if tuple(group.files[entry.path]) != tensor.identity[1]:
        raise StoreError(f"{entry.path}: the checkpoint changed since it was loaded; load the model again")
    return tensor


def _from_group_file(group: StoredGroup, entry: TensorEntry, dtype: torch.dtype) -> CheckpointTensor:
    tensor = checkpoint_tensor(group.path, entry.name, dtype)
    expected = group.tensor_digests[entry.name]
    return _GroupFileTensor(tensor.path, tensor.key, dtype, tensor.shape, (*tensor.identity, expected), expected)


@dataclass(frozen=True)
class _GroupFileTensor(CheckpointTensor):
    """A tensor of a group file, read when the new folder is written: checked against its digest, then converted."""

    digest: str

    def load(self) -> torch.Tensor:
        """The tensor in RAM, converted to ``dtype``; raises if its bytes do not match the manifest's digest."""
        with safe_open(self.path, framework="pt") as f:
            tensor = f.get_tensor(self.key).clone()
        if digest(tensor_bytes(tensor)) != self.digest:
            raise GroupFileError(f"{self.path}: tensor {self.key!r} does not match its digest; {CLEAN_ADVICE}")
        return tensor.to(self.dtype)


def _prefetcher_like(prefetcher: Prefetcher, manifest: Manifest) -> Prefetcher:
    """A prefetcher of ``manifest``'s groups with the settings (reader, depth, resident groups) of ``prefetcher``."""
    verify = any(source.verify_every_read for source in prefetcher.sources)
    old = prefetcher.reader
    sources = group_sources(manifest, verify)
    on_device = set(prefetcher.resident_on_device())
    resident = {index: "device" if index in on_device else "host" for index in prefetcher.resident}
    reader = FileReader(old.direct_io, old.io_threads, old.request_bytes)
    try:
        return Prefetcher(sources, prefetcher.device, reader, prefetcher.depth, resident)
    except BaseException:
        reader.close()
        raise
