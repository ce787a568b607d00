"""The ``device_map`` as accel_nvme reads it, and the one translation between ``"nvme"`` and accelerate's ``"disk"``.

accelerate, transformers and diffusers know no ``"nvme"`` value, but they already load ``"disk"`` entries lazily (a
weight stays in its checkpoint) and hook every offloaded module. So an ``"nvme"`` entry travels as ``"disk"`` through
their code and is ours again where we dispatch; this module is where it changes name, both ways:

1. ``from_pretrained``/``load_checkpoint_in_model`` (``integrations``): ``to_accelerate``, so the library loads the
   entries lazily and hands ``dispatch_model`` a ``"disk"`` map (and keeps ``"disk"`` in ``hf_device_map``, which
   transformers reads to skip compile and to save offloaded weights).
2. our ``dispatch_model`` inside such a load: ``from_accelerate``, so those entries are streamed.
3. our ``dispatch_model`` calling accelerate's: ``to_accelerate`` once more, so accelerate attaches its offload hooks
   (which ours then replace) and writes nothing, given an index into our group files.

The ``"disk"`` written for an nvme entry is a ``StreamedTier``: a string equal to ``"disk"`` for every library that
checks its disk tier, shown (and equal) as ``'nvme'``, so ``hf_device_map`` tells which modules stream.
``model.nvme_device_map`` keeps the nvme names. A map holding both a plain ``"disk"`` and ``"nvme"`` is refused:
``"disk"`` would be ambiguous on the way back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from . import placement

NVME = "nvme"
DISK = "disk"  # accelerate's name for the tier, the one its callers know


class StreamedTier(str):
    """``"disk"`` to accelerate, transformers and peft (compile skipped, offloaded weights saved through the hook, no
    ``.to()``), ``'nvme'`` to whoever reads the map: it compares equal to both and shows as ``'nvme'``."""

    def __new__(cls) -> StreamedTier:
        return super().__new__(cls, DISK)

    def __repr__(self) -> str:
        return repr(NVME)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and str.__str__(other) in (DISK, NVME)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = str.__hash__

    def __reduce__(self):
        return StreamedTier, ()


STREAMED = StreamedTier()


def to_accelerate(device_map: Mapping[str, Any]) -> dict[str, Any]:
    """The map accelerate and the libraries over it understand: ``"nvme"`` entries become ``"disk"`` (``STREAMED``)."""
    return {name: (STREAMED if device == NVME else device) for name, device in device_map.items()}


def from_accelerate(device_map: Mapping[str, Any]) -> dict[str, Any]:
    """Back from accelerate's terms, within an nvme load: ``"disk"`` entries are ``"nvme"`` ones."""
    return {name: (NVME if device == DISK else device) for name, device in device_map.items()}


def has_nvme(device_map: Any) -> bool:
    """Whether ``device_map`` is a dict sending some entry to ``"nvme"``."""
    return isinstance(device_map, dict) and any(device == NVME for device in device_map.values())


def refuse_mixed(device_map: Mapping[str, Any], owner: str) -> None:
    """Raise when ``device_map`` holds ``"disk"`` entries beside ``"nvme"`` ones; ``owner`` names the caller."""
    disk = [name for name, device in device_map.items() if device == DISK and not isinstance(device, StreamedTier)]
    if disk:
        raise ValueError(
            f"{owner}: device_map mixes 'disk' and 'nvme' entries ({disk[0]!r} is 'disk'); "
            "map the 'disk' ones to 'nvme' too"
        )


def check_values(device_map: Mapping[str, Any]) -> None:
    """Every value is ``"nvme"``, ``"disk"``, ``"cpu"``, a GPU index or a torch device; else a ValueError naming it."""
    for name, device in device_map.items():
        if not _is_device(device):
            raise ValueError(
                f"device_map[{name!r}] is {device!r}: expected 'nvme', 'cpu', a GPU index or a torch device"
            )


def check_keys(model: torch.nn.Module, device_map: Mapping[str, Any]) -> None:
    """Keys name modules or, as ``infer_auto_device_map`` emits for modules it splits, parameters and buffers; and
    together they cover ``model`` (accelerate's ``check_device_map``)."""
    names = {name for name, _ in model.named_modules(remove_duplicate=False)}
    names.update(name for name, _ in model.named_parameters(remove_duplicate=False))
    names.update(name for name, _ in model.named_buffers(remove_duplicate=False))
    unknown = [name for name in device_map if name not in names]
    if unknown:
        raise ValueError(
            f"device_map names {unknown[:3]} which are neither modules nor parameters/buffers of {type(model).__name__}"
        )
    _check_covered(model, device_map)


def _check_covered(model: torch.nn.Module, device_map: Mapping[str, Any]) -> None:
    """accelerate's ``check_device_map`` on the names of parameters and persistent buffers: it lists
    ``model.state_dict()``, whose save hooks can change a model (bitsandbytes unpacks repacked 4-bit weights)."""
    if "" in device_map:
        return
    prefixes = tuple(f"{name}." for name in device_map)
    persistent = {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules(remove_duplicate=False)
        for name, buffer in module._buffers.items()
        if buffer is not None and name not in module._non_persistent_buffers_set
    }
    tensors = [name for name, _ in model.named_parameters(remove_duplicate=False)] + sorted(persistent)
    uncovered = [name for name in tensors if name not in device_map and not name.startswith(prefixes)]
    if uncovered:
        raise ValueError(
            "The device_map provided does not give any device for the following parameters: " + ", ".join(uncovered)
        )


def _is_device(device: Any) -> bool:
    if device in (NVME, DISK) or isinstance(device, (int, torch.device)):
        return True
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        return False
    return True


def device_of(name: str, device_map: Mapping[str, Any]) -> Any:
    """The device_map value that covers tensor ``name`` (the longest matching entry); None when none does."""
    for entry in sorted(device_map, key=len, reverse=True):
        if entry == "" or name == entry or name.startswith(f"{entry}."):
            return device_map[entry]
    return None


def main_device(device_map: Mapping[str, Any], given: Any) -> Any:
    """The device the model executes on: ``given``, else the first GPU of the map, a pipeline's device, or the CPU."""
    if given is not None:
        return given
    resident = [device for device in device_map.values() if device not in ("cpu", DISK, NVME)]
    return resident[0] if resident else (placement.compute_device() or "cpu")


def execution_device(main: Any) -> torch.device:
    """``main`` as a full ``torch.device`` ("cuda" and 0 become ``cuda:<index>``)."""
    if isinstance(main, int):
        return torch.device("cuda", main)
    device = torch.device(main)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
