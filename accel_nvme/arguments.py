"""A hooked module's arguments on its execution device, with what is already there passed as the same object.

accelerate's ``send_to_device`` rebuilds every list, tuple and dict, even when each tensor in it is already on the
device. A module that updates a list argument in place (Wan's VAE passes ``feat_cache``/``feat_idx`` lists to its
blocks) then loses the update once the blocks are hooked. Here a container is rebuilt only when something in it moved.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from accelerate.utils import send_to_device as accelerate_send_to_device
from accelerate.utils.operations import honor_type


def send_to_device(
    value: Any, device: torch.device | str | int, non_blocking: bool = False, skip_keys: str | list[str] | None = None
) -> Any:
    """accelerate's ``send_to_device``, except that a list, tuple or mapping whose items all stay the same objects is
    returned itself (a tensor already on ``device`` stays itself too, as ``Tensor.to`` gives)."""
    if hasattr(value, "to"):  # tensors and objects that move themselves, as accelerate checks first
        return accelerate_send_to_device(value, device, non_blocking=non_blocking)
    if isinstance(value, (tuple, list)):
        items = [send_to_device(item, device, non_blocking, skip_keys) for item in value]
        return value if _same(items, value) else honor_type(value, iter(items))
    if isinstance(value, Mapping):
        skip = [skip_keys] if isinstance(skip_keys, str) else (skip_keys or [])
        items = {
            key: item if key in skip else send_to_device(item, device, non_blocking, skip_keys)
            for key, item in value.items()
        }
        return value if _same(items.values(), value.values()) else type(value)(items)
    return value


def _same(new, old) -> bool:
    return all(a is b for a, b in zip(new, old, strict=True))
