"""peft on a streamed base: adapters get real memory where their module computes, and loading one keeps the streaming.

- peft creates an adapter on its base weight's device, meta for a streamed weight (its values lost): the adapter goes
  to the execution device of the module that streams the weight instead (each tuner's ``_replace_module`` and
  ``BaseTunerLayer._get_base_layer_device_and_dtype`` both place it).
- ``PeftModel.from_pretrained`` and ``PeftModel.load_adapter`` remove every accelerate hook and dispatch again with
  ``device_map="auto"`` when ``hf_device_map`` holds "cpu" or "disk": on a streamed model they run with the map
  hidden, so our hooks stay.
- transformers' ``load_adapter`` loads adapter weights by ``hf_device_map``: an nvme module's adapter goes to its
  execution device, not to accelerate's disk tier.
- Merging an adapter into streamed weights is refused: those weights live in the group files.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch

from .. import owned
from ..hooks import NvmeAlignDevicesHook
from .patching import patch


def _hooks(model: Any) -> list[NvmeAlignDevicesHook]:
    modules = model.modules() if isinstance(model, torch.nn.Module) else ()
    return [m._hf_hook for m in modules if isinstance(getattr(m, "_hf_hook", None), NvmeAlignDevicesHook)]


def _base_device_and_dtype(original):
    @functools.wraps(original)
    def base_layer_device_and_dtype(self, base_layer):
        device, dtype = original(self, base_layer)
        if device is not None and device.type == "meta":
            weight = next(
                (w for w in (getattr(base_layer, n, None) for n in ("weight", "qweight")) if w is not None), None
            )
            streamed_on = owned.execution_device_of(weight) if isinstance(weight, torch.Tensor) else None
            if streamed_on is not None:
                device = streamed_on
        return device, dtype

    return base_layer_device_and_dtype


def _moved(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(tensor, torch.nn.Parameter):
        return torch.nn.Parameter(tensor.detach().to(device), requires_grad=tensor.requires_grad)
    return tensor.to(device)


def _replace_module(original):
    @functools.wraps(original)
    def replace_module(self, parent, child_name, new_module, child):
        real = [
            (store, key, tensor)
            for module in new_module.modules()
            for store in (module._parameters, module._buffers)
            for key, tensor in store.items()
            if tensor is not None and not tensor.is_meta
        ]
        original(self, parent, child_name, new_module, child)
        device = next((d for p in child.parameters() if (d := owned.execution_device_of(p)) is not None), None)
        if device is None:
            return
        for store, key, tensor in real:  # moved to the base weight's device, meta; their values are still here
            if store[key] is not None and store[key].is_meta:
                store[key] = tensor if tensor.device == device else _moved(tensor, device)

    return replace_module


@contextlib.contextmanager
def _device_map_hidden(model: Any) -> Iterator[None]:
    """While peft loads an adapter into a streamed model: no ``hf_device_map``, so peft keeps the hooks as they are."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not _hooks(base) or "hf_device_map" not in vars(base):
        yield
        return
    device_map = vars(base).pop("hf_device_map")
    try:
        yield
    finally:
        base.hf_device_map = device_map


def _from_pretrained(original):
    function = original.__func__

    @functools.wraps(function)
    def from_pretrained(cls, model, *args, **kwargs):
        with _device_map_hidden(model):
            return function(cls, model, *args, **kwargs)

    return classmethod(from_pretrained)


def _peft_load_adapter(original):
    @functools.wraps(original)
    def load_adapter(self, *args, **kwargs):
        with _device_map_hidden(self):
            return original(self, *args, **kwargs)

    return load_adapter


def _transformers_load_adapter(original):
    @functools.wraps(original)
    def load_adapter(self, *args, **kwargs):
        hooks = _hooks(self)
        device_map = vars(self).get("hf_device_map")
        if not hooks or device_map is None:
            return original(self, *args, **kwargs)
        device = hooks[0].execution_device
        self.hf_device_map = {k: device if v in ("disk", "nvme") else v for k, v in device_map.items()}
        try:
            return original(self, *args, **kwargs)
        finally:
            self.hf_device_map = device_map

    return load_adapter


def _check_merge_allowed(original):
    @functools.wraps(original)
    def check_merge_allowed(self):
        hooks = _hooks(getattr(self, "model", None))
        if hooks:
            raise ValueError(
                f"cannot merge an adapter into {type(self.model).__name__}: {len(hooks)} of its modules stream their "
                f"weights from nvme ({hooks[0].group_name!r}, ...), whose bytes live in the group files. Run with the "
                "adapter unmerged, or load the base model in RAM, merge, save it, and stream the merged model"
            )
        return original(self)

    return check_merge_allowed


def patch_tuners_utils(tuners_utils: ModuleType) -> None:
    """New adapters of streamed layers go to the execution device; no merging into streamed weights."""
    patch(tuners_utils.BaseTunerLayer, "_get_base_layer_device_and_dtype", _base_device_and_dtype)
    patch(tuners_utils.BaseTuner, "_check_merge_allowed", _check_merge_allowed)


def patch_tuners(peft: ModuleType) -> None:
    """Every tuner's ``_replace_module`` (defined once all tuners are imported) keeps adapters off meta."""
    tuners, seen = [peft.tuners.tuners_utils.BaseTuner], set()
    while tuners:
        tuner = tuners.pop()
        if tuner not in seen:
            seen.add(tuner)
            tuners.extend(tuner.__subclasses__())
            patch(tuner, "_replace_module", _replace_module)


def patch_peft_model(peft_model: ModuleType) -> None:
    """Loading an adapter into a streamed model keeps its hooks."""
    patch(peft_model.PeftModel, "from_pretrained", _from_pretrained)
    patch(peft_model.PeftModel, "load_adapter", _peft_load_adapter)


def patch_transformers_peft(transformers_peft: ModuleType) -> None:
    """transformers' ``load_adapter`` puts the adapters of streamed modules on their execution device."""
    patch(transformers_peft.PeftAdapterMixin, "load_adapter", _transformers_load_adapter)


PATCHES = {
    "peft": patch_tuners,
    "peft.tuners.tuners_utils": patch_tuners_utils,
    "peft.peft_model": patch_peft_model,
    "transformers.integrations.peft": patch_transformers_peft,
}
