"""``dispatch_model`` with an ``"nvme"`` tier: validate → plan → materialize → stream → accelerate → swap hooks.

The seam: write the nvme groups, leave meta tensors in their modules, let accelerate dispatch the model with those
entries mapped to ``"disk"`` (given an ``offload_index`` into our files, so it writes nothing), then replace the hooks
accelerate put on each nvme module with one ``NvmeAlignDevicesHook`` per group. The steps live in modules of their
own: ``devicemap`` (values, keys, the nvme ↔ disk translation), ``loading`` (the load in progress), ``planning``,
``store.materialize``, ``modelstate`` and ``residency``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import accelerate.big_modeling
import torch
from accelerate.hooks import AlignDevicesHook, remove_hook_from_module, remove_hook_from_submodules
from accelerate.utils import set_module_tensor_to_device

from . import devicemap, recasting
from .config import NvmeConfig, load_config
from .devicemap import NVME
from .expert_modules import ExpertModuleHook, ExpertRoundHook
from .experts import ExpertsHook, stream_experts
from .hooks import NvmeAlignDevicesHook, attach_nvme_hook
from .io import FileReader
from .loading import PENDING_ATTR, current_loading, offloaded_weights
from .modelstate import all_or_nothing, keep_resident, leave_meta_tensors, own_cpu_tensors
from .planning import DispatchPlan, module_tensor, offload_index, plan_dispatch
from .prefetch import Prefetcher
from .residency import choose_resident
from .sources import group_sources, stream_in_place
from .stats import ForwardStats, NvmeStats
from .store import Manifest, StoredWeights, materialize

logger = logging.getLogger(__name__)

_accelerate_dispatch_model = accelerate.big_modeling.dispatch_model


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
    loading = current_loading()
    if loading is not None:
        device_map, config = devicemap.from_accelerate(device_map), config or loading.config
    devicemap.check_values(device_map)
    nvme_entries = [name for name, device in device_map.items() if device == NVME]
    if not nvme_entries:
        return _accelerate_dispatch_model(
            model, device_map, main_device, offload_dir=offload_dir, offload_index=offload_index, **accelerate_kwargs
        )
    config = (config or load_config()).with_offload_dir(offload_dir)
    _validate(model, device_map, nvme_entries, config)
    main_device = devicemap.main_device(device_map, main_device)
    index, mapped = offloaded_weights(model, offload_index)
    with all_or_nothing(model):
        model.__dict__.pop(PENDING_ATTR, None)
        return _dispatch_nvme(model, device_map, main_device, config, index, mapped, accelerate_kwargs)


def _validate(
    model: torch.nn.Module, device_map: Mapping[str, Any], nvme_entries: list[str], config: NvmeConfig
) -> None:
    """A folder for the nvme entries, keys that name ``model``'s modules or tensors, and no ``"disk"`` beside them."""
    if config.offload_dir is None:
        raise ValueError(
            f"device_map sends {len(nvme_entries)} module(s) to 'nvme' ({nvme_entries[0]!r}, ...) but no offload_dir "
            "was given: pass offload_dir=... or NvmeConfig(offload_dir=...)"
        )
    with _quiet_accelerate():
        devicemap.check_keys(model, device_map)
    devicemap.refuse_mixed(device_map, "dispatch_model")


def _dispatch_nvme(
    model: torch.nn.Module,
    device_map: Mapping[str, Any],
    main_device: Any,
    config: NvmeConfig,
    index: dict[str, dict],
    mapped: dict[str, torch.Tensor],
    accelerate_kwargs: dict[str, Any],
) -> torch.nn.Module:
    """Write (or reuse) the groups, attach one ``NvmeAlignDevicesHook`` per group; the model is changed in place."""
    offload_buffers = accelerate_kwargs["offload_buffers"]
    execution_device = devicemap.execution_device(main_device)
    per_expert = config.expert_streaming and execution_device.type in ("cpu", "cuda")  # else with their block
    plan = plan_dispatch(model, device_map, main_device, index, mapped, offload_buffers, config.group_bytes, per_expert)
    stream_in_place(plan.groups, config.offload_dir, config.copy)
    manifest = materialize(config.offload_dir, plan.groups, config.io_threads, config.lock_timeout)
    streamed = [i for i, group in enumerate(plan.groups) if not group.per_expert]  # experts groups are not streamed
    every_source = group_sources(manifest, config.verify_on_read)
    sources = [every_source[i] for i in streamed]
    reader = prefetcher = None
    try:
        reader = FileReader(config.direct_io, config.io_threads, config.io_request_bytes)
        resident = choose_resident(sources, config, execution_device)
        prefetcher = Prefetcher(sources, execution_device, reader, config.prefetch_depth, resident)
        leave_meta_tensors(model, plan.groups)
        own_cpu_tensors(model)
        keep_resident(model, plan.kept, execution_device, index, mapped)
        tensor_keys = [module_tensor(model, name) for name in plan.tensor_keys]
        model = _accelerate_dispatch(model, plan, main_device, manifest, index, accelerate_kwargs)
        _swap_hooks(plan, prefetcher, manifest, execution_device, accelerate_kwargs["skip_keys"], streamed)
        stream_experts(model, plan, manifest, prefetcher, config.expert_cache_bytes, config.verify_on_read)
        _put_back(tensor_keys)
    except BaseException:
        if prefetcher is not None:
            prefetcher.close()  # stop the reader threads and unpin the staging buffers
        elif reader is not None:
            reader.close()
        raise
    model.nvme_device_map = plan.device_map
    recasting.track(model)
    logger.info("%d nvme groups streaming from %s", len(plan.groups), manifest.folder)
    return model


def _accelerate_dispatch(
    model: torch.nn.Module,
    plan: DispatchPlan,
    main_device: Any,
    manifest: Manifest,
    index: dict[str, dict],
    accelerate_kwargs: dict[str, Any],
) -> torch.nn.Module:
    """accelerate's ``dispatch_model`` on the plan's map in its terms, reading nvme tensors from the group files."""
    with _quiet_accelerate():
        model = _accelerate_dispatch_model(
            model,
            devicemap.to_accelerate(plan.device_map),
            main_device=main_device,
            offload_dir=str(manifest.folder),
            offload_index={**index, **offload_index(manifest)},
            **accelerate_kwargs,
        )
    return model


def _put_back(tensor_keys: list[tuple[torch.nn.Module, str, torch.Tensor | None]]) -> None:
    """Tensor keys sent elsewhere inside an nvme module, put back once its hook is ours: accelerate's hook on that
    module left them on meta, and ours would move them to the execution device."""
    for owner, attr, tensor in tensor_keys:
        if tensor is not None and tensor.device.type != "meta":
            (owner._parameters if attr in owner._parameters else owner._buffers)[attr] = tensor


def _swap_hooks(
    plan: DispatchPlan,
    prefetcher: Prefetcher,
    manifest: Manifest,
    execution_device: torch.device,
    skip_keys: str | list[str] | None,
    streamed: list[int],
) -> None:
    """Replace the hooks accelerate put on each planned entry by one ``NvmeAlignDevicesHook`` on its group (experts
    entries get theirs from ``stream_experts``); ``streamed``: the manifest index of each group the prefetcher reads."""
    position = {group: i for i, group in enumerate(streamed)}
    for (name, module), entry_plan, group in zip(plan.entries, plan.entry_plans, plan.group_of_entry, strict=True):
        prefix = f"{name}." if name else ""
        _remove_accelerate_hooks(module)
        if name in plan.experts:
            continue
        hook = NvmeAlignDevicesHook(
            prefetcher,
            position[group],
            name,
            execution_device,
            StoredWeights(manifest, prefix),
            {member[len(prefix) :]: member for member in entry_plan.members},
            io_same_device=(name == ""),
            skip_keys=skip_keys,
        )
        attach_nvme_hook(module, hook)


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
def _quiet_accelerate() -> Iterator[None]:
    """Silence accelerate's notes on meta tensors and on device_map keys naming a tensor (both expected here)."""
    accelerate_logger = logging.getLogger("accelerate.big_modeling")
    drop = _DropMetaWarning()
    accelerate_logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The following device_map keys do not match any submodules")
            yield
    finally:
        accelerate_logger.removeFilter(drop)


_NVME_HOOKS = (NvmeAlignDevicesHook, ExpertsHook, ExpertModuleHook, ExpertRoundHook)


def _nvme_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` that carry an nvme hook."""
    return [m for m in model.modules() if isinstance(getattr(m, "_hf_hook", None), _NVME_HOOKS)]


def _prefetcher(model: torch.nn.Module) -> Prefetcher:
    """The prefetcher of ``model``'s nvme groups, or a ValueError naming the model."""
    modules = _nvme_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no modules on the nvme tier")
    return modules[0]._hf_hook.prefetcher


def _expert_files(modules: list[torch.nn.Module]) -> list[Path]:
    """The group files the MoE experts among ``modules`` are read from, one expert at a time."""
    hooks = [m._hf_hook for m in modules if isinstance(m._hf_hook, (ExpertsHook, ExpertModuleHook))]
    return list(dict.fromkeys(hook.group.path for hook in hooks))


def group_files(model: torch.nn.Module) -> list[Path]:
    """The group files ``model``'s nvme modules stream from, in group order; then those of its MoE experts."""
    return [*(source.segments[0].path for source in _prefetcher(model).sources), *_expert_files(_nvme_modules(model))]


def close(model: torch.nn.Module, load_back: bool = True) -> None:
    """Stop streaming ``model``'s nvme modules: reader threads stop, files close, staging buffers are freed.

    With ``load_back`` the nvme hooks are removed and their weights read back onto the device each module computes on
    (accelerate's ``remove_hook_from_submodules`` reads them into RAM), so the model still runs where it ran; without
    it nothing is read and a later forward of an nvme module raises. Other hooks stay; a model without nvme modules is
    left as it is.
    """
    modules = _nvme_modules(model)
    if load_back:
        for module in modules:
            hook = module._hf_hook
            remove_hook_from_module(module)
            if hook.execution_device is not None and torch.device(hook.execution_device).type != "cpu":
                for local in hook.members:
                    set_module_tensor_to_device(module, local, hook.execution_device)
        return
    for prefetcher in {id(m._hf_hook.prefetcher): m._hf_hook.prefetcher for m in modules}.values():
        prefetcher.close()


def stats(model: torch.nn.Module) -> NvmeStats:
    """Bytes read, read time, compute stalls, GB/s and overlap of ``model``'s nvme groups, per forward and in total."""
    prefetcher = _prefetcher(model)
    forwards = prefetcher.forward_stats()
    total = ForwardStats(**vars(prefetcher.stats))
    total.read_seconds = prefetcher.reader.busy_seconds
    total.seconds = sum(f.seconds for f in forwards)
    resident = [prefetcher.sources[i] for i in prefetcher.resident]
    hooked = [(name, m) for name, m in model.named_modules() if isinstance(getattr(m, "_hf_hook", None), _NVME_HOOKS)]
    groups = len(prefetcher.sources) + len(_expert_files([m for _, m in hooked]))
    modules = [name for name, _ in hooked]
    return NvmeStats(groups, [r.name for r in resident], sum(r.nbytes for r in resident), forwards, total, modules)
