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
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import accelerate.big_modeling
import torch
from accelerate.hooks import AlignDevicesHook, remove_hook_from_module, remove_hook_from_submodules
from accelerate.utils import check_device_map, set_module_tensor_to_device

from . import placement
from .config import NvmeConfig, load_config
from .format import ALIGNMENT, align_up
from .hooks import NvmeAlignDevicesHook, attach_nvme_hook
from .io import FileReader, Segment
from .prefetch import Checksum, GroupSource, Prefetcher, TensorView
from .residency import choose_resident
from .stats import ForwardStats, NvmeStats
from .store import CheckpointTensor, GroupPlan, Manifest, StoredWeights, checkpoint_tensor, materialize

logger = logging.getLogger(__name__)

NVME = "nvme"
PENDING_ATTR = "_accel_nvme_pending"  # an NvmeLoading left on a model by load_checkpoint_in_model, for dispatch
_accelerate_dispatch_model = accelerate.big_modeling.dispatch_model


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
    pending = model.__dict__.get(PENDING_ATTR)
    index = {**(pending.index if pending else {}), **(loading.index if loading else {}), **(offload_index or {})}
    mapped = {**(pending.mapped if pending else {}), **(loading.mapped if loading else {})}
    with _all_or_nothing(model):
        model.__dict__.pop(PENDING_ATTR, None)
        return _dispatch_nvme(model, device_map, main_device, config, index, mapped, accelerate_kwargs)


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
    offload_buffers, skip_keys = accelerate_kwargs["offload_buffers"], accelerate_kwargs["skip_keys"]
    modules = dict(model.named_modules(remove_duplicate=False))
    module_entries = [name for name, device in device_map.items() if device == NVME and name in modules]
    tensor_entries = [name for name, device in device_map.items() if device == NVME and name not in modules]
    entries, kept, placed = _expand_entries(model, module_entries, _no_split_classes(model), offload_buffers)
    kept += tensor_entries
    entry_plans = _plan_groups(model, entries, placed, offload_buffers, main_device, index, mapped, device_map)
    plans, group_of_entry = _merge_groups(entry_plans, config.group_bytes)
    manifest = materialize(config.offload_dir, plans, config.io_threads, config.lock_timeout)
    execution_device = _execution_device(main_device)
    sources = _sources(manifest, config.verify_on_read)
    reader = prefetcher = None
    try:
        reader = FileReader(config.direct_io, config.io_threads, config.io_request_bytes)
        resident = choose_resident(sources, config, execution_device)
        prefetcher = Prefetcher(sources, execution_device, reader, config.prefetch_depth, resident)
        _leave_meta_tensors(model, plans)
        _own_cpu_tensors(model)
        _keep_resident(model, kept, execution_device, index, mapped)
        # a tensor key sent elsewhere inside an nvme module: accelerate's hook on that module leaves it on meta
        own_keys = {name: _module_tensor(model, name) for name in device_map if name not in modules}
        accelerate_map = {name: device for name, device in device_map.items() if device != NVME}
        accelerate_map.update(dict.fromkeys([*(name for name, _ in entries), *placed], "disk"))
        accelerate_map.update(dict.fromkeys(kept, main_device))
        with _quiet_accelerate():
            model = _accelerate_dispatch_model(
                model,
                accelerate_map,
                main_device=main_device,
                offload_dir=str(manifest.folder),
                offload_index={**index, **_offload_index(manifest)},
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
        for owner, attr, tensor in own_keys.values():
            if tensor is not None and tensor.device.type != "meta":
                (owner._parameters if attr in owner._parameters else owner._buffers)[attr] = tensor
    except BaseException:
        if prefetcher is not None:
            prefetcher.close()  # stop the reader threads and unpin the staging buffers
        elif reader is not None:
            reader.close()
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


@contextlib.contextmanager
def _all_or_nothing(model: torch.nn.Module) -> Iterator[None]:
    """On any exception (KeyboardInterrupt included), put back every tensor, hook and attribute the block changed.

    Dispatch only replaces entries of modules' dicts (accelerate's ``set_module_tensor_to_device`` assigns new
    tensors, hooks wrap ``forward`` in the instance dict), so shallow copies of those dicts are a full snapshot. The
    thread's grad mode is put back too: a Ctrl-C inside torch's ``no_grad`` enter/exit code can leave it off.
    """
    grad_enabled = torch.is_grad_enabled()
    saved = [
        (
            module,
            dict(module.__dict__),
            dict(module._parameters),
            dict(module._buffers),
            dict(module._modules),
            set(module._non_persistent_buffers_set),
            {name: dict(p.__dict__) for name, p in module._parameters.items() if p is not None},
        )
        for module in model.modules()
    ]
    try:
        yield
    except BaseException:
        for module, attributes, parameters, buffers, children, non_persistent, parameter_attributes in saved:
            for live, kept in (
                (module._parameters, parameters),
                (module._buffers, buffers),
                (module._modules, children),
                (module._non_persistent_buffers_set, non_persistent),
            ):
                live.clear()
                live.update(kept)
            module.__dict__.clear()
            module.__dict__.update(attributes)
            for name, kept in parameter_attributes.items():
                parameters[name].__dict__.update(kept)
        torch.set_grad_enabled(grad_enabled)
        logger.debug("dispatch of %s failed; the model was restored as it was", type(model).__name__)
        raise


def _check_device_map(model: torch.nn.Module, device_map: Mapping[str, Any]) -> None:
    """Keys name modules or, as ``infer_auto_device_map`` emits for modules it splits, parameters and buffers."""
    names = {name for name, _ in model.named_modules(remove_duplicate=False)}
    names.update(name for name, _ in _named_tensors(model, include_buffers=True))
    unknown = [name for name in device_map if name not in names]
    if unknown:
        raise ValueError(
            f"device_map names {unknown[:3]} which are neither modules nor parameters/buffers of {type(model).__name__}"
        )
    with _quiet_accelerate():
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
    return resident[0] if resident else (placement.compute_device() or "cpu")  # a pipeline's device, if any


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
    model: torch.nn.Module, entries: list[str], no_split: frozenset[str] | None, offload_buffers: bool
) -> tuple[list[tuple[str, torch.nn.Module]], list[str], list[str]]:
    """Split nvme entries into groups of one block each: ``(groups, kept, placed)``.

    A module is split into its children when it is never called (ModuleList, ModuleDict), when it holds a block
    (a class of ``no_split``, the model's ``_no_split_modules``), or, for a model naming none, when it is the root
    entry ``""`` or holds more than half of the model (a wrapper around it). The tensors a split module holds
    directly (``logit_scale``, ``scale_shift_table``) are ``kept`` resident on the execution device: they are small,
    and every method reaching a submodule directly (``generate`` through ``get_encoder()``, ``get_text_features``)
    then meets a hooked block. Children holding only tensors that are never offloaded (non-persistent buffers), and
    further names of a grouped module, are ``placed``: mapped as nvme for accelerate, which places their buffers on
    the execution device.
    """
    groups: list[tuple[str, torch.nn.Module]] = []
    kept: list[str] = []
    placed: list[str] = []
    split: dict[int, bool] = {}  # modules seen, and whether they were split; a module may sit under several names

    def visit(name: str, module: torch.nn.Module, top: bool) -> None:
        if not any(True for _ in _named_tensors(module, include_buffers=True)):
            return
        if id(module) in split and not split[id(module)]:
            placed.append(name)  # another name of a grouped module: its hook is the group's
            return
        if not any(True for _ in _named_tensors(module, offload_buffers, persistent_only=True)):
            split[id(module)] = False
            placed.append(name)
            return
        blocks = no_split or frozenset()
        is_block = type(module).__name__ in blocks
        holds_block = not is_block and any(type(m).__name__ in blocks for m in module.modules())
        has_children = any(True for _ in module.children())
        large = no_split is None and _nbytes(module) > half_model
        split[id(module)] = id(module) in split or (
            has_children and (not _is_called(module) or (not is_block and (top or holds_block or large)))
        )
        if split[id(module)]:
            prefix = f"{name}." if name else ""
            kept.extend(prefix + local for local, _ in _named_tensors(module, include_buffers=True, recurse=False))
            for child_name, child in module._modules.items():  # named_children() hides a module's second name
                if child is not None:
                    visit(prefix + child_name, child, top=False)
            return
        if not _is_called(module):
            prefix = f"{name}." if name else ""
            kept.extend(prefix + local for local, _ in _named_tensors(module, include_buffers=True))
            return
        groups.append((name, module))
        split.update((id(m), False) for m in module.modules())  # reached again under another name: same group

    half_model = _nbytes(model) / 2
    for entry in entries:
        visit(entry, model.get_submodule(entry), top=entry == "")
    return groups, kept, placed


def _module_tensor(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str, torch.Tensor | None]:
    """The module owning tensor ``name``, its attribute name, and the tensor there now."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    return owner, attr, owner._parameters[attr] if attr in owner._parameters else owner._buffers.get(attr)


def _nbytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers of ``module``, each tensor counted once."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _keep_resident(
    model: torch.nn.Module,
    names: list[str],
    device: torch.device,
    index: Mapping[str, Mapping],
    mapped: Mapping[str, torch.Tensor],
) -> None:
    """Load tensors that stay resident onto ``device`` (from the checkpoint when they are still on meta)."""
    kept_bytes = 0
    for name in names:
        tensor = _module_tensor(model, name)[2]
        if tensor is None:
            continue
        source = _source([name], tensor, index, mapped)
        value = source.load() if isinstance(source, CheckpointTensor) else source.to(tensor.dtype)
        if not value.untyped_storage().resizable():
            value = value.clone()  # owned and allocator-aligned, not a view into a mapped checkpoint
        set_module_tensor_to_device(model, name, device, value=value)
        kept_bytes += value.numel() * value.element_size()
    if names:
        logger.info("%d tensors of split nvme entries stay on %s (%d bytes)", len(names), device, kept_bytes)


def _own_cpu_tensors(model: torch.nn.Module) -> None:
    """Copy CPU tensors that view memory the allocator does not own (a mapped checkpoint) into owned tensors.

    CPU kernels can give other bits at other alignments: a weight kept in RAM must sit where the libraries' own
    loading would put it. Tied tensors stay tied.
    """
    copies: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for attr, tensor in store.items():
                if tensor is None or tensor.device.type != "cpu" or tensor.untyped_storage().resizable():
                    continue
                if id(tensor) not in copies:
                    copy = tensor.detach().clone()
                    if isinstance(tensor, torch.nn.Parameter):
                        copy = torch.nn.Parameter(copy, requires_grad=tensor.requires_grad)
                    copies[id(tensor)] = copy
                store[attr] = copies[id(tensor)]


def _plan_groups(
    model: torch.nn.Module,
    groups: list[tuple[str, torch.nn.Module]],
    placed: list[str],
    offload_buffers: bool,
    main_device: Any,
    index: Mapping[str, Mapping],
    mapped: Mapping[str, torch.Tensor],
    device_map: Mapping[str, Any],
) -> list[GroupPlan]:
    """Which tensors each group stores; a tensor tied to another group is stored once, by the first.

    Tensors on the meta device are taken from ``index`` (accelerate's offload index: checkpoint shards) or
    ``mapped``. A tensor the device_map sends elsewhere by its own key stays out of the group. Tensors under
    ``placed`` modules (no offloaded tensors, or a grouped module's other name) are not resident ones.
    """
    prefixes = tuple(f"{name}." if name else "" for name in [*(name for name, _ in groups), *placed])
    resident = {}
    aliases: dict[int, list[str]] = {}  # a tied tensor may sit in the checkpoint under any of its names
    for name, tensor in _named_tensors(model, include_buffers=True):
        aliases.setdefault(id(tensor), []).append(name)
        if not name.startswith(prefixes):
            resident[id(tensor)] = name
    owners: dict[int, str] = {}
    plans = []
    for name, module in groups:
        prefix = f"{name}." if name else ""
        plan = GroupPlan(name, {})
        persistent = dict(_named_tensors(module, include_buffers=offload_buffers, persistent_only=True))
        for local, tensor in persistent.items():
            full = prefix + local
            if _device_of(full, device_map) != NVME:
                continue
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
                plan.tensors[full] = _source([full, *aliases[id(tensor)]], tensor, index, mapped)
            plan.members[full] = canonical
        plans.append(plan)
    return plans


def _source(
    names: list[str], tensor: torch.Tensor, index: Mapping[str, Mapping], mapped: Mapping[str, torch.Tensor]
) -> torch.Tensor | CheckpointTensor:
    """Where the bytes of ``tensor`` (known by ``names``, tied ones included) come from."""
    if tensor.device.type != "meta":
        return tensor
    for name in names:
        if name in mapped:
            return mapped[name]
        entry = index.get(name)
        if entry is not None and entry.get("safetensors_file") is not None:
            return checkpoint_tensor(entry["safetensors_file"], entry.get("weight_name", name), tensor.dtype)
    entry = index.get(names[0])
    found = "no entry" if entry is None else f"entry {dict(entry)}"
    raise ValueError(
        f"{names[0]!r} is on the meta device and the offload index has {found}: expected a safetensors file to "
        "read it from (was the checkpoint loaded with its tied weights untied?)"
    )


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


def _named_tensors(module: torch.nn.Module, include_buffers: bool, persistent_only: bool = False, recurse: bool = True):
    yield from module.named_parameters(remove_duplicate=False, recurse=recurse)
    if include_buffers:
        for name, buffer in module.named_buffers(remove_duplicate=False, recurse=recurse):
            owner, _, attr = name.rpartition(".")
            if not persistent_only or attr not in module.get_submodule(owner)._non_persistent_buffers_set:
                yield name, buffer


def _sources(manifest: Manifest, verify: bool) -> list[GroupSource]:
    """Read plans: each group's own data section, plus aligned ranges of tied tensors stored by other groups.

    Every range read is checked against its digest on the group's first read; with ``verify``, on every read.
    """
    sources = []
    for group in manifest.groups:
        own = align_up(group.data_bytes)
        segments = [Segment(group.path, group.data_offset, own, 0, group.data_bytes)]
        views = []
        checksums = [Checksum(group.path, 0, group.data_bytes, group.data_digest)]
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
            nbytes = entry.end - entry.start
            checksums.append(Checksum(home.path, cursor + start - aligned, nbytes, home.tensor_digests[canonical]))
            cursor += align_up(needed)
        sources.append(GroupSource(group.name, tuple(segments), cursor, tuple(views), tuple(checksums), verify))
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


def _nvme_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` that carry an nvme hook."""
    return [m for m in model.modules() if isinstance(getattr(m, "_hf_hook", None), NvmeAlignDevicesHook)]


def _prefetcher(model: torch.nn.Module) -> Prefetcher:
    """The prefetcher of ``model``'s nvme groups, or a ValueError naming the model."""
    modules = _nvme_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no modules on the nvme tier")
    return modules[0]._hf_hook.prefetcher


def group_files(model: torch.nn.Module) -> list[Path]:
    """The group files ``model``'s nvme modules stream from, in group order."""
    return [source.segments[0].path for source in _prefetcher(model).sources]


def close(model: torch.nn.Module, load_back: bool = True) -> None:
    """Stop streaming ``model``'s nvme modules: reader threads stop, files close, staging buffers are freed.

    With ``load_back`` (as accelerate's ``remove_hook_from_submodules`` does for our hooks) the nvme hooks are removed
    and their weights read back into RAM, so the model still runs; without it nothing is read and a later forward of an
    nvme module raises. Other hooks stay; a model without nvme modules is left as it is.
    """
    modules = _nvme_modules(model)
    if load_back:
        for module in modules:
            remove_hook_from_module(module)
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
    return NvmeStats(
        len(prefetcher.sources), [r.name for r in resident], sum(r.nbytes for r in resident), forwards, total
    )
