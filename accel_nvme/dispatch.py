"""``dispatch_model`` with an ``"nvme"`` tier, and the patch that makes accelerate's own function accept it.

The seam: write the nvme groups, leave meta tensors in their modules, let accelerate dispatch the model with those
entries mapped to ``"disk"`` (given an ``offload_index`` into our files, so it writes nothing), then replace the hooks
accelerate put on each nvme module with one ``NvmeAlignDevicesHook`` per group.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import accelerate.big_modeling
import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_submodules
from accelerate.utils import check_device_map, set_module_tensor_to_device

from .config import NvmeConfig
from .format import ALIGNMENT, align_up
from .hooks import NvmeAlignDevicesHook
from .io import FileReader, Segment
from .prefetch import GroupSource, Prefetcher, TensorView
from .store import GroupPlan, Manifest, StoredWeights, materialize

logger = logging.getLogger(__name__)

NVME = "nvme"
_accelerate_dispatch_model = accelerate.big_modeling.dispatch_model


def dispatch_model(
    model: torch.nn.Module,
    device_map: Mapping[str, int | str | torch.device],
    main_device: int | str | torch.device | None = None,
    offload_dir: str | os.PathLike | None = None,
    config: NvmeConfig | None = None,
    **accelerate_kwargs: Any,
) -> torch.nn.Module:
    """accelerate's ``dispatch_model``, where modules mapped to ``"nvme"`` stream their weights from ``offload_dir``."""
    nvme_entries = [name for name, device in device_map.items() if device == NVME]
    if not nvme_entries:
        return _accelerate_dispatch_model(
            model, device_map, main_device=main_device, offload_dir=offload_dir, **accelerate_kwargs
        )
    config = (config or NvmeConfig()).with_offload_dir(offload_dir)
    if config.offload_dir is None:
        raise ValueError(
            f"device_map sends {len(nvme_entries)} module(s) to 'nvme' ({nvme_entries[0]!r}, ...) but no offload_dir "
            "was given: pass offload_dir=... or NvmeConfig(offload_dir=...)"
        )
    _check_device_map(model, device_map)
    main_device = _main_device(device_map, main_device)
    offload_buffers = accelerate_kwargs.get("offload_buffers", False)
    entries = _expand_entries(model, nvme_entries)
    entry_plans = _plan_groups(model, entries, offload_buffers, main_device)
    plans, group_of_entry = _merge_groups(entry_plans, config.group_bytes)
    manifest = materialize(config.offload_dir, plans, config.io_threads)
    execution_device = torch.device(main_device)
    reader = FileReader(config.direct_io, config.io_threads, config.io_request_bytes)
    prefetcher = Prefetcher(_sources(manifest, config.verify_on_read), execution_device, reader, config.prefetch_depth)

    for plan in plans:
        for member in plan.members:
            set_module_tensor_to_device(model, member, "meta")
    accelerate_map = {name: ("disk" if device == NVME else device) for name, device in device_map.items()}
    offload_index = dict(accelerate_kwargs.pop("offload_index", None) or {})
    offload_index.update(_offload_index(manifest))
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
            skip_keys=accelerate_kwargs.get("skip_keys"),
        )
        add_hook_to_module(module, hook)
    model.nvme_device_map = dict(device_map)
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


def _main_device(device_map: Mapping[str, Any], main_device: Any) -> Any:
    if main_device is not None:
        return main_device
    resident = [device for device in device_map.values() if device not in ("cpu", "disk", NVME)]
    return resident[0] if resident else "cpu"


def _is_called(module: torch.nn.Module) -> bool:
    return type(module).forward is not torch.nn.Module.forward


def _expand_entries(model: torch.nn.Module, entries: list[str]) -> list[tuple[str, torch.nn.Module]]:
    """One group per entry; containers that are never called (ModuleList, ModuleDict) become one per child."""
    groups = []
    for name in entries:
        module = model.get_submodule(name)
        if not any(True for _ in module.parameters()) and not any(True for _ in module.buffers()):
            continue
        if _is_called(module):
            groups.append((name, module))
            continue
        if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
            raise ValueError(
                f"nvme entry {name!r} is a {type(module).__name__}, which is never called and holds tensors of its "
                "own; map its parent module to 'nvme' instead"
            )
        prefix = f"{name}." if name else ""
        groups.extend(_expand_entries(model, [f"{prefix}{child}" for child, _ in module.named_children()]))
    return groups


def _plan_groups(
    model: torch.nn.Module, groups: list[tuple[str, torch.nn.Module]], offload_buffers: bool, main_device: Any
) -> list[GroupPlan]:
    """Which tensors each group stores; a tensor tied to another group is stored once, by the first."""
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
                if str(main_device) != "cpu" and tensor.device.type == "meta":
                    raise ValueError(
                        f"{full!r} (nvme) is tied to {resident[id(tensor)]!r}, which is offloaded to the CPU; map "
                        "both to the same tier"
                    )
                continue
            if tensor.device.type == "meta":
                raise ValueError(f"{full!r} is on the meta device: there are no weights to write to the nvme tier")
            canonical = owners.setdefault(id(tensor), full)
            if canonical == full:
                plan.tensors[full] = tensor
            plan.members[full] = canonical
        plans.append(plan)
    return plans


def _merge_groups(plans: list[GroupPlan], budget: int) -> tuple[list[GroupPlan], list[int]]:
    """Merge consecutive entries into one group while it stays within ``budget`` bytes (0: never merge)."""
    merged: list[GroupPlan] = []
    group_of_entry = []
    size = 0
    for plan in plans:
        nbytes = sum(t.numel() * t.element_size() for t in plan.tensors.values())
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
        sources.append(GroupSource(group.index, group.name, tuple(segments), cursor, tuple(views), checksum))
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


PATCH_TARGETS = {
    "accelerate": "dispatch_model",
    "accelerate.big_modeling": "dispatch_model",
    "transformers.integrations.accelerate": "dispatch_model",
    "diffusers.models.modeling_utils": "dispatch_model",
    "diffusers.pipelines.pipeline_loading_utils": "dispatch_model",
}


def _patch(module: Any) -> None:
    attribute = PATCH_TARGETS[module.__name__]
    if getattr(module, attribute, None) is _accelerate_dispatch_model:
        setattr(module, attribute, dispatch_model)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches ``dispatch_model`` in transformers and diffusers modules when they are first imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in PATCH_TARGETS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    """Make every name accelerate's ``dispatch_model`` is bound under accept ``"nvme"``; safe to call twice."""
    for name in PATCH_TARGETS:
        if name in sys.modules:
            _patch(sys.modules[name])
    if not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
