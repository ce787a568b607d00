"""``dispatch_model`` with an ``"nvme"`` tier, and the patch that makes accelerate's own function accept it.

The seam: write the nvme groups, leave meta tensors in their modules, let accelerate dispatch the model with those
entries mapped to ``"disk"`` (given an ``offload_index`` into our files, so it writes nothing), then replace the hooks
accelerate put on each nvme module with one ``NvmeAlignDevicesHook`` per group.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import accelerate.big_modeling
import torch
from accelerate.hooks import AlignDevicesHook, remove_hook_from_submodules
from accelerate.utils import check_device_map, set_module_tensor_to_device

from .config import NvmeConfig, load_config
from .format import ALIGNMENT, align_up
from .hooks import NvmeAlignDevicesHook, attach_nvme_hook
from .io import FileReader, Segment
from .prefetch import ForwardStats, GroupSource, Prefetcher, TensorView
from .residency import choose_resident
from .store import CheckpointTensor, GroupPlan, Manifest, StoredWeights, checkpoint_tensor, materialize

logger = logging.getLogger(__name__)

NVME = "nvme"
_accelerate_dispatch_model = accelerate.big_modeling.dispatch_model


@dataclass
class NvmeLoading:
    """What a ``from_pretrained(..., offload_backend="nvme")`` call tells the ``dispatch_model`` it ends with.

    Its nvme entries are split down to the model's ``_no_split_modules``, so a group is one block, not a whole
    encoder. ``index`` collects where offloaded weights sit in the checkpoint, for loaders that do not pass an
    ``offload_index``.
    """

    config: NvmeConfig
    index: dict[str, dict] = field(default_factory=dict)


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


def dispatch_model(
    model: torch.nn.Module,
    device_map: Mapping[str, int | str | torch.device],
    main_device: int | str | torch.device | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    offload_dir: str | os.PathLike | None = None,
    offload_index: dict[str, dict] | None = None,
    offload_buffers: bool = False,
    skip_keys: str | list[str] | None = None,
    preload_module_classes: list[str] | None = None,
    force_hooks: bool = False,
    config: NvmeConfig | None = None,
) -> torch.nn.Module:
    """accelerate's ``dispatch_model``, where modules mapped to ``"nvme"`` stream their weights from ``offload_dir``.

    Inside ``disk_as_nvme(...)`` (how ``from_pretrained(..., offload_backend="nvme")`` calls it), ``"disk"``
    entries are treated as ``"nvme"`` and the loading's config supplies the options. The other arguments are
    accelerate's, passed through (transformers inspects this signature for ``skip_keys`` and ``force_hooks``).
    """
    accelerate_kwargs = {
        "state_dict": state_dict,
        "offload_buffers": offload_buffers,
        "skip_keys": skip_keys,
        "preload_module_classes": preload_module_classes,
        "force_hooks": force_hooks,
    }
    loading = _LOADING.get()
    if loading is not None:
        device_map = {name: (NVME if device == "disk" else device) for name, device in device_map.items()}
        config = config or loading.config
    for name, device in device_map.items():
        if not _is_device(device):
            raise ValueError(
                f"device_map[{name!r}] is {device!r}: expected 'nvme', 'cpu', a GPU index or a torch device"
            )
    nvme_entries = [name for name, device in device_map.items() if device == NVME]
    if not nvme_entries:
        return _accelerate_dispatch_model(
            model, device_map, main_device, offload_dir=offload_dir, offload_index=offload_index, **accelerate_kwargs
        )
    config = (config or load_config()).with_offload_dir(offload_dir)
    if config.offload_dir is None:
        raise ValueError(
            f"device_map sends {len(nvme_entries)} module(s) to 'nvme' ({nvme_entries[0]!r}, ...) but no offload_dir "
            "was given: pass offload_dir=... or NvmeConfig(offload_dir=...)"
        )
    _check_device_map(model, device_map)
    main_device = _main_device(device_map, main_device)
    entries = _expand_entries(model, nvme_entries, _no_split_classes(model) if loading else None)
    index = dict(offload_index or (loading and loading.index) or {})
    entry_plans = _plan_groups(model, entries, offload_buffers, main_device, index, device_map)
    plans, group_of_entry = _merge_groups(entry_plans, config.group_bytes)
    manifest = materialize(config.offload_dir, plans, config.io_threads)
    execution_device = _execution_device(main_device)
    reader = FileReader(config.direct_io, config.io_threads, config.io_request_bytes)
    sources = _sources(manifest, config.verify_on_read)
    resident = choose_resident(sources, config, execution_device)
    prefetcher = Prefetcher(sources, execution_device, reader, config.prefetch_depth, resident)

    try:
        _leave_meta_tensors(model, plans)
        accelerate_map = {name: device for name, device in device_map.items() if device != NVME}
        accelerate_map.update(dict.fromkeys((name for name, _ in entries), "disk"))
        offload_index = {**index, **_offload_index(manifest)}
        with _without_meta_warning():
            model = _accelerate_dispatch_model(
                model,
                accelerate_map,
                main_device=main_device,
                offload_dir=str(manifest.folder),
                offload_index=offload_index,
                **accelerate_kwargs,
            )
        for (name, module), plan, group in zip(entries, entry_plans, group_of_entry, strict=True):
            prefix = f"{name}." if name else ""
            _remove_accelerate_hooks(module)
            hook = NvmeAlignDevicesHook(
                prefetcher,
                group,
                name,
                execution_device,
                StoredWeights(manifest, prefix),
                {member[len(prefix) :]: member for member in plan.members},
                io_same_device=(name == ""),
                skip_keys=skip_keys,
            )
            attach_nvme_hook(module, hook)
    except BaseException:
        prefetcher.close()  # stop the reader threads and unpin the staging buffers
        raise
    model.nvme_device_map = {name: (NVME if device == "disk" else device) for name, device in accelerate_map.items()}
    logger.info("%d nvme groups streaming from %s", len(plans), manifest.folder)
    return model


def _remove_accelerate_hooks(module: torch.nn.Module) -> None:
    """Remove the hooks accelerate attached, without its detach reloading tensors (ours are meta, or tied)."""
    for submodule in module.modules():
        hook = getattr(submodule, "_hf_hook", None)
        if isinstance(hook, AlignDevicesHook):
            hook.offload = False
    remove_hook_from_submodules(module)


class _DropMetaWarning(logging.Filter):
    """accelerate warns that offloaded parameters are on meta; for nvme entries that is the design, not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "are on the meta device" not in record.getMessage()


@contextlib.contextmanager
def _without_meta_warning() -> Iterator[None]:
    accelerate_logger = logging.getLogger("accelerate.big_modeling")
    drop = _DropMetaWarning()
    accelerate_logger.addFilter(drop)
    try:
        yield
    finally:
        accelerate_logger.removeFilter(drop)


def _check_device_map(model: torch.nn.Module, device_map: Mapping[str, Any]) -> None:
    modules = dict(model.named_modules())
    unknown = [name for name in device_map if name not in modules]
    if unknown:
        raise ValueError(f"device_map names {unknown[:3]} which are not modules of {type(model).__name__}")
    check_device_map(model, device_map)
    if "disk" in device_map.values():
        disk = [name for name, device in device_map.items() if device == "disk"]
        raise ValueError(
            f"device_map mixes 'disk' ({disk[0]!r}, ...) and 'nvme' entries; map the 'disk' ones to 'nvme' too"
        )


def _is_device(device: Any) -> bool:
    if device in (NVME, "disk") or isinstance(device, (int, torch.device)):
        return True
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        return False
    return True


def _leave_meta_tensors(model: torch.nn.Module, plans: list[GroupPlan]) -> None:
    """Replace every streamed tensor by a meta tensor; names tied to one tensor share one meta tensor."""
    metas: dict[str, torch.Tensor] = {}
    for plan in plans:
        for member, canonical in plan.members.items():
            owner_name, _, attr = member.rpartition(".")
            owner = model.get_submodule(owner_name)
            if canonical not in metas:
                set_module_tensor_to_device(model, member, "meta")
                metas[canonical] = getattr(owner, attr)
            elif attr in owner._parameters:
                owner._parameters[attr] = metas[canonical]
            else:
                owner._buffers[attr] = metas[canonical]


def _execution_device(main_device: Any) -> torch.device:
    """``main_device`` as a full ``torch.device`` ("cuda" and 0 become ``cuda:<index>``)."""
    if isinstance(main_device, int):
        return torch.device("cuda", main_device)
    device = torch.device(main_device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _device_of(name: str, device_map: Mapping[str, Any]) -> Any:
    """The device_map value that covers tensor ``name`` (the longest matching entry)."""
    for entry in sorted(device_map, key=len, reverse=True):
        if entry == "" or name == entry or name.startswith(f"{entry}."):
            return device_map[entry]
    return None


def _main_device(device_map: Mapping[str, Any], main_device: Any) -> Any:
    if main_device is not None:
        return main_device
    resident = [device for device in device_map.values() if device not in ("cpu", "disk", NVME)]
    return resident[0] if resident else "cpu"


def _is_called(module: torch.nn.Module) -> bool:
    return type(module).forward is not torch.nn.Module.forward


def _no_split_classes(model: torch.nn.Module) -> frozenset[str] | None:
    """The classes a transformers/diffusers model says must not be split (None when it names none)."""
    try:
        classes = model._get_no_split_modules("auto")
    except (AttributeError, ValueError):
        classes = getattr(model, "_no_split_modules", None)
    return frozenset(classes) if classes else None


def _expand_entries(
    model: torch.nn.Module, entries: list[str], no_split: frozenset[str] | None = None
) -> list[tuple[str, torch.nn.Module]]:
    """One group per entry; containers that are never called (ModuleList, ModuleDict) become one per child.

    With ``no_split`` (a model's ``_no_split_modules``), entries are split further into their children unless
    their class is listed or they hold tensors of their own, as accelerate's ``infer_auto_device_map`` may.
    """
    groups = []
    for name in entries:
        module = model.get_submodule(name)
        if not any(True for _ in module.parameters()) and not any(True for _ in module.buffers()):
            continue
        owns_tensors = any(True for _ in module.parameters(recurse=False)) or any(
            True for _ in module.buffers(recurse=False)
        )
        splittable = no_split is not None and type(module).__name__ not in no_split and not owns_tensors
        if _is_called(module) and not splittable:
            groups.append((name, module))
            continue
        if owns_tensors:
            raise ValueError(
                f"nvme entry {name!r} is a {type(module).__name__}, which is never called and holds tensors of its "
                "own; map its parent module to 'nvme' instead"
            )
        prefix = f"{name}." if name else ""
        groups.extend(_expand_entries(model, [f"{prefix}{child}" for child, _ in module.named_children()], no_split))
    return groups


def _plan_groups(
    model: torch.nn.Module,
    groups: list[tuple[str, torch.nn.Module]],
    offload_buffers: bool,
    main_device: Any,
    index: Mapping[str, Mapping],
    device_map: Mapping[str, Any],
) -> list[GroupPlan]:
    """Which tensors each group stores; a tensor tied to another group is stored once, by the first.

    Tensors on the meta device are taken from ``index`` (accelerate's offload index: checkpoint shards).
    """
    prefixes = tuple(f"{name}." if name else "" for name, _ in groups)
    resident = {
        id(tensor): name
        for name, tensor in _named_tensors(model, include_buffers=True)
        if not name.startswith(prefixes)
    }
    owners: dict[int, str] = {}
    plans = []
    for name, module in groups:
        prefix = f"{name}." if name else ""
        plan = GroupPlan(name, {})
        persistent = dict(_named_tensors(module, include_buffers=offload_buffers, persistent_only=True))
        for local, tensor in persistent.items():
            full = prefix + local
            if id(tensor) in resident:
                owner = resident[id(tensor)]
                if str(main_device) != "cpu" and _device_of(owner, device_map) == "cpu":
                    raise ValueError(
                        f"{full!r} (nvme) is tied to {owner!r}, which accelerate offloads to the CPU when the "
                        f"execution device is {main_device!r}; map both to the same tier"
                    )
                continue
            canonical = owners.setdefault(id(tensor), full)
            if canonical == full:
                plan.tensors[full] = _source(full, tensor, index)
            plan.members[full] = canonical
        plans.append(plan)
    return plans


def _source(name: str, tensor: torch.Tensor, index: Mapping[str, Mapping]) -> torch.Tensor | CheckpointTensor:
    if tensor.device.type != "meta":
        return tensor
    entry = index.get(name)
    if entry is None or entry.get("safetensors_file") is None:
        found = "no entry" if entry is None else f"entry {dict(entry)}"
        raise ValueError(
            f"{name!r} is on the meta device and the offload index has {found}: expected a safetensors file to "
            "read it from (checkpoints in .bin format are not supported on the nvme tier)"
        )
    return checkpoint_tensor(entry["safetensors_file"], entry.get("weight_name", name), tensor.dtype)


def _merge_groups(plans: list[GroupPlan], budget: int) -> tuple[list[GroupPlan], list[int]]:
    """Merge consecutive entries into one group while it stays within ``budget`` bytes (0: never merge)."""
    merged: list[GroupPlan] = []
    group_of_entry = []
    size = 0
    for plan in plans:
        nbytes = plan.nbytes
        if merged and budget and size + nbytes <= budget:
            last = merged[-1]
            merged[-1] = GroupPlan(
                f"{last.name}+{plan.name}", {**last.tensors, **plan.tensors}, {**last.members, **plan.members}
            )
            size += nbytes
        else:
            merged.append(plan)
            size = nbytes
        group_of_entry.append(len(merged) - 1)
    return merged, group_of_entry


def _named_tensors(module: torch.nn.Module, include_buffers: bool, persistent_only: bool = False):
    yield from module.named_parameters(remove_duplicate=False)
    if include_buffers:
        for name, buffer in module.named_buffers(remove_duplicate=False):
            owner, _, attr = name.rpartition(".")
            if not persistent_only or attr not in module.get_submodule(owner)._non_persistent_buffers_set:
                yield name, buffer


def _sources(manifest: Manifest, verify: bool) -> list[GroupSource]:
    """Read plans: each group's own data section, plus aligned ranges of tied tensors stored by other groups."""
    sources = []
    for group in manifest.groups:
        own = align_up(group.data_bytes)
        segments = [Segment(group.path, group.data_offset, own, 0, group.data_bytes)]
        views = []
        cursor = own
        for member, canonical in group.members.items():
            home, entry = manifest.locate(canonical)
            if home.index == group.index:
                views.append(TensorView(member, entry.start, entry.dtype, entry.shape))
                continue
            start = home.data_offset + entry.start
            aligned = start - start % ALIGNMENT
            needed = home.data_offset + entry.end - aligned
            segments.append(Segment(home.path, aligned, align_up(needed), cursor, needed))
            views.append(TensorView(member, cursor + start - aligned, entry.dtype, entry.shape))
            cursor += align_up(needed)
        checksum = (0, group.data_bytes, group.sha256) if verify else None
        sources.append(GroupSource(group.name, tuple(segments), cursor, tuple(views), checksum))
    return sources


def _offload_index(manifest: Manifest) -> dict[str, dict[str, str]]:
    index = {}
    for group in manifest.groups:
        for member, canonical in group.members.items():
            home, entry = manifest.locate(canonical)
            index[member] = {
                "safetensors_file": str(home.path),
                "weight_name": canonical,
                "dtype": str(entry.dtype).removeprefix("torch."),
            }
    return index


@dataclass(frozen=True)
class NvmeStats:
    """``accel_nvme.stats(model)``: per-forward and total figures of a model's nvme stream, and its resident groups.

    ``bytes_read`` of a forward counts streamed bytes only: resident groups are read once, at dispatch.
    """

    groups: int
    resident: list[str]
    resident_bytes: int
    forwards: list[ForwardStats]
    total: ForwardStats

    def as_dict(self) -> dict[str, Any]:
        """Plain data, GB/s and overlap included (for JSON and logging)."""

        def row(r: ForwardStats) -> dict[str, Any]:
            return {**vars(r), "gb_per_s": r.gb_per_s, "overlap": r.overlap}

        return {
            "groups": self.groups,
            "resident": self.resident,
            "resident_bytes": self.resident_bytes,
            "forwards": [row(r) for r in self.forwards],
            "total": row(self.total),
        }


def stats(model: torch.nn.Module) -> NvmeStats:
    """Bytes read, read time, compute stalls, GB/s and overlap of ``model``'s nvme groups, per forward and in total."""
    hook = next(
        (m._hf_hook for m in model.modules() if isinstance(getattr(m, "_hf_hook", None), NvmeAlignDevicesHook)), None
    )
    if hook is None:
        raise ValueError(f"{type(model).__name__} has no modules on the nvme tier")
    prefetcher = hook.prefetcher
    forwards = prefetcher.forward_stats()
    total = ForwardStats(**vars(prefetcher.stats))
    total.read_seconds = prefetcher.reader.busy_seconds
    total.seconds = sum(f.seconds for f in forwards)
    resident = [prefetcher.sources[i] for i in prefetcher.resident]
    return NvmeStats(
        len(prefetcher.sources), [r.name for r in resident], sum(r.nbytes for r in resident), forwards, total
    )
