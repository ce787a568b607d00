"""Group planning: which modules get an nvme hook, which tensors each group file stores, and how a group is read back.

Pure functions of a model and its ``device_map`` (nothing is written, moved or hooked here), so the plan of any model
is tested without dispatching it. ``plan_dispatch`` is the whole plan; the functions it composes are public for tests.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .devicemap import NVME, device_of
from .experts import mark_experts, split_experts
from .format import ALIGNMENT, align_up
from .io import Segment
from .prefetch import Checksum, GroupSource, TensorView
from .store import CheckpointEntry, CheckpointTensor, GroupPlan, Manifest, checkpoint_tensor
from .tensorkinds import stored_form


@dataclass(frozen=True)
class DispatchPlan:
    """What a dispatch streams and keeps: the hooked modules (``entries``), what each stores, the groups they merge
    into, tensors kept resident on the execution device, and the resulting device_map in nvme terms."""

    entries: list[tuple[str, torch.nn.Module]]  # (name, module): one nvme hook each
    entry_plans: list[GroupPlan]  # what each entry's module stores, in entry order
    groups: list[GroupPlan]  # the group files: consecutive entries merged up to the group size
    group_of_entry: list[int]  # the index in ``groups`` of each entry
    kept: list[str]  # tensors of split entries (and tensor keys) that stay on the execution device
    placed: list[str]  # modules mapped as nvme for accelerate that store nothing of their own
    device_map: dict[str, Any]  # the map dispatched: entries and placed as "nvme", kept on the main device
    tensor_keys: list[str]  # keys of the given device_map that name a parameter or buffer, not a module
    experts: frozenset[str] = frozenset()  # entries that are MoE experts (fused, or lists), read one expert at a time


def plan_dispatch(
    model: torch.nn.Module,
    device_map: Mapping[str, Any],
    main_device: Any,
    index: Mapping[str, Mapping],
    mapped: Mapping[str, torch.Tensor],
    offload_buffers: bool,
    group_bytes: int,
    experts: bool = False,
) -> DispatchPlan:
    """The plan of ``model``'s ``"nvme"`` entries: expand them into blocks, plan each block's tensors, merge groups.

    With ``experts``, MoE experts modules inside the blocks become entries of their own (``experts.py``).
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    nvme = [name for name, device in device_map.items() if device == NVME]
    module_entries = [name for name in nvme if name in modules]
    entries, kept, placed = expand_entries(model, module_entries, no_split_classes(model), offload_buffers)
    entries, expert_entries = split_experts(entries) if experts else (entries, set())
    kept += [name for name in nvme if name not in modules]
    tensor_keys = [name for name in device_map if name not in modules]
    entry_plans = plan_groups(model, entries, placed, offload_buffers, main_device, index, mapped, device_map)
    mark_experts(entries, entry_plans, expert_entries)
    groups, group_of_entry = merge_groups(entry_plans, group_bytes)
    planned = {name: device for name, device in device_map.items() if device != NVME}
    planned.update(dict.fromkeys([*(name for name, _ in entries), *placed], NVME))
    planned.update(dict.fromkeys(kept, main_device))
    return DispatchPlan(
        entries, entry_plans, groups, group_of_entry, kept, placed, planned, tensor_keys, frozenset(expert_entries)
    )


def _is_called(module: torch.nn.Module) -> bool:
    return type(module).forward is not torch.nn.Module.forward


def no_split_classes(model: torch.nn.Module) -> frozenset[str] | None:
    """The classes a transformers/diffusers model says must not be split (None when it names none)."""
    try:
        classes = model._get_no_split_modules("auto")
    except (AttributeError, ValueError):
        classes = getattr(model, "_no_split_modules", None)
    return frozenset(classes) if classes else None


def expand_entries(
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
        if not any(True for _ in named_tensors(module, include_buffers=True)):
            return
        if id(module) in split and not split[id(module)]:
            placed.append(name)  # another name of a grouped module: its hook is the group's
            return
        if not any(True for _ in named_tensors(module, offload_buffers, persistent_only=True)):
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
            kept.extend(prefix + local for local, _ in named_tensors(module, include_buffers=True, recurse=False))
            for child_name, child in module._modules.items():  # named_children() hides a module's second name
                if child is not None:
                    visit(prefix + child_name, child, top=False)
            return
        if not _is_called(module):
            prefix = f"{name}." if name else ""
            kept.extend(prefix + local for local, _ in named_tensors(module, include_buffers=True))
            return
        groups.append((name, module))
        split.update((id(m), False) for m in module.modules())  # reached again under another name: same group

    half_model = _nbytes(model) / 2
    for entry in entries:
        visit(entry, model.get_submodule(entry), top=entry == "")
    return groups, kept, placed


def module_tensor(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str, torch.Tensor | None]:
    """The module owning tensor ``name``, its attribute name, and the tensor there now."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    return owner, attr, owner._parameters[attr] if attr in owner._parameters else owner._buffers.get(attr)


def _nbytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers of ``module``, each tensor counted once."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def plan_groups(
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
    for name, tensor in named_tensors(model, include_buffers=True):
        aliases.setdefault(id(tensor), []).append(name)
        if not name.startswith(prefixes):
            resident[id(tensor)] = name
    owners: dict[int, str] = {}
    plans = []
    entry_prefixes = [f"{name}." if name else "" for name, _ in groups]
    for name, module in groups:
        prefix = f"{name}." if name else ""
        inner = tuple(p for p in entry_prefixes if p != prefix and p.startswith(prefix))  # entries of their own
        plan = GroupPlan(name, {})
        persistent = dict(named_tensors(module, include_buffers=offload_buffers, persistent_only=True))
        for local, tensor in persistent.items():
            full = prefix + local
            if device_of(full, device_map) != NVME or full.startswith(inner):
                continue
            if id(tensor) in resident:
                owner = resident[id(tensor)]
                if str(main_device) != "cpu" and device_of(owner, device_map) == "cpu":
                    raise ValueError(
                        f"{full!r} (nvme) is tied to {owner!r}, which accelerate offloads to the CPU when the "
                        f"execution device is {main_device!r}; map both to the same tier"
                    )
                continue
            canonical = owners.setdefault(id(tensor), full)
            if canonical == full:
                source = tensor_source([full, *aliases[id(tensor)]], tensor, index, mapped)
                holder, _, _ = module_tensor(module, local)
                plan.tensors[full] = stored_form(full, tensor, source, main_device, holder)
            plan.members[full] = canonical
        plans.append(plan)
    return plans


def tensor_source(
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


def merge_groups(plans: list[GroupPlan], budget: int) -> tuple[list[GroupPlan], list[int]]:
    """Merge consecutive entries into one group while it stays within ``budget`` bytes (0: never merge)."""
    merged: list[GroupPlan] = []
    group_of_entry = []
    size = 0
    for plan in plans:
        nbytes = plan.nbytes
        if merged and budget and size + nbytes <= budget and not plan.per_expert and not merged[-1].per_expert:
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


def named_tensors(
    module: torch.nn.Module, include_buffers: bool, persistent_only: bool = False, recurse: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters, then (with ``include_buffers``) buffers, every name of a shared tensor included."""
    yield from module.named_parameters(remove_duplicate=False, recurse=recurse)
    if include_buffers:
        for name, buffer in module.named_buffers(remove_duplicate=False, recurse=recurse):
            owner, _, attr = name.rpartition(".")
            if not persistent_only or attr not in module.get_submodule(owner)._non_persistent_buffers_set:
                yield name, buffer


def read_sources(manifest: Manifest, verify: bool) -> list[GroupSource]:
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


def offload_index(manifest: Manifest) -> dict[str, dict[str, str]]:
    """accelerate's offload index into the group files: each stored tensor's file, name there and dtype."""
    index = {}
    for group in manifest.groups:
        for member, canonical in group.members.items():
            home, entry = manifest.locate(canonical)
            in_place = isinstance(entry, CheckpointEntry)  # a tensor streamed straight from its checkpoint
            index[member] = {
                "safetensors_file": str(entry.path if in_place else home.path),
                "weight_name": entry.key if in_place else canonical,
                "dtype": str(entry.dtype).removeprefix("torch."),
            }
    return index
