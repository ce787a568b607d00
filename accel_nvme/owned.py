"""Which meta tensors of a hooked module are ours, and the check that no other one reaches a forward.

Between forwards a streamed tensor is a meta tensor, recorded here with the device its module computes on: a library
that places new tensors beside a weight (peft creates an adapter on its base weight's device) asks
``execution_device_of``. Any other meta tensor holds no values: a module about to compute with one is refused.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

_STREAMED: dict[int, tuple[weakref.ref, torch.device]] = {}  # id → (the meta tensor, its execution device)


def register(meta: torch.Tensor, execution_device: torch.device) -> None:
    """``meta`` stands for a streamed tensor whose module computes on ``execution_device``."""
    key = id(meta)
    _STREAMED[key] = (weakref.ref(meta, lambda _: _STREAMED.pop(key, None)), execution_device)


def execution_device_of(tensor: torch.Tensor) -> torch.device | None:
    """The execution device of the module streaming ``tensor`` (a meta tensor of ours); None for any other tensor."""
    entry = _STREAMED.get(id(tensor)) if tensor.is_meta else None
    return entry[1] if entry is not None and entry[0]() is tensor else None


def refuse_foreign_meta(module: torch.nn.Module, group_name: str, device: torch.device | None) -> None:
    """Raise if ``module`` (its streamed tensors in place) holds a meta tensor: nothing holds that tensor's values.

    Submodules with a hook of their own place their tensors themselves and are left to it.
    """
    stack = [module]
    while stack:
        submodule = stack.pop()
        for store in (submodule._parameters, submodule._buffers):
            for attr, tensor in store.items():
                if tensor is not None and tensor.is_meta:
                    _refuse(module, submodule, attr, group_name, device)
        children = [c for c in submodule._modules.values() if c is not None and "_hf_hook" not in vars(c)]
        stack.extend(reversed(children))  # the first one found is the first in the module's order


def _refuse(module: torch.nn.Module, owner: torch.nn.Module, attr: str, group_name: str, device: Any) -> None:
    path = next(name for name, m in module.named_modules() if m is owner)
    name = f"{path}.{attr}" if path else attr
    raise RuntimeError(
        f"{type(module).__name__} (nvme group {group_name!r}) is about to compute with {name!r}, a meta tensor that is "
        "not one of its streamed weights: it holds no values. It was added after dispatch on the meta device (peft "
        "puts a new adapter on its base weight's device, meta for a streamed weight, unless accel_nvme's peft "
        f"integration placed it): create or move it onto {device} after dispatch (or load it with its values), or map "
        "this module to 'cpu' or a GPU instead of 'nvme'"
    )
