"""Where a model with nvme modules computes. The libraries read a model's device from its first parameter, which is
on meta between forwards when it streams: that would make their inputs, caches and latents on meta."""

from __future__ import annotations

import functools

import torch

from ..hooks import NvmeAlignDevicesHook


def execution_device_of(module: torch.nn.Module) -> torch.device | None:
    """The device ``module``'s nvme modules compute on; None when none streams."""
    for submodule in module.modules():
        hook = getattr(submodule, "_hf_hook", None)
        if isinstance(hook, NvmeAlignDevicesHook):
            return torch.device(hook.execution_device)
    return None


def compute_device_first(prop: property) -> property:
    """A model's ``device`` property that gives the execution device where the first parameter is a streamed one."""

    @functools.wraps(prop.fget)
    def device(self) -> torch.device:
        found = prop.fget(self)
        if found.type != "meta":
            return found
        return execution_device_of(self) or found

    return property(device, doc=prop.__doc__)
