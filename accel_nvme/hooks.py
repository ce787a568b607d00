"""The accelerate hook of one nvme group: it only connects accelerate's protocol to the prefetcher."""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping

import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from accelerate.utils import find_device, recursively_apply, send_to_device, set_module_tensor_to_device

from .prefetch import Prefetcher


def _compiler_disable(fn):
    """``torch.compiler.disable``, without importing ``torch._dynamo`` (tens of MB of RSS) where nothing compiles.

    Nothing can be compiling while ``torch._dynamo`` has never been imported, so until then ``fn`` runs as is.
    """
    disabled = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal disabled
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return wrapper


class NvmeAlignDevicesHook(AlignDevicesHook):
    """``AlignDevicesHook`` whose offloaded weights come from the prefetcher instead of ``weights_map``.

    ``pre_forward`` puts zero-copy views of the group's staging buffer (or of its device copy) into the module;
    ``post_forward`` puts meta tensors back and lets the prefetcher reuse the buffer. ``weights_map`` stays a
    working mapping of the stored tensors, which is what ``save_pretrained`` reads.
    """

    def __init__(
        self,
        prefetcher: Prefetcher,
        group: int,
        group_name: str,
        execution_device: torch.device,
        weights_map: Mapping,
        members: dict[str, str],
        io_same_device: bool = False,
        skip_keys: str | list[str] | None = None,
        tied_params_map: dict | None = None,
    ):
        super().__init__(
            execution_device=execution_device,
            offload=True,
            io_same_device=io_same_device,
            weights_map=weights_map,
            place_submodules=True,
            skip_keys=skip_keys,
            tied_params_map=tied_params_map,
        )
        self.prefetcher = prefetcher
        self.group = group
        self.group_name = group_name
        self.members = members
        self._slots: list[tuple[torch.nn.Module, str, bool, str, torch.Tensor]] = []
        self._held = False

    def __repr__(self) -> str:
        return f"NvmeAlignDevicesHook(group={self.group_name!r}, execution_device={self.execution_device})"

    def init_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        """Find where each streamed tensor sits in the module, and leave a meta tensor there."""
        self.prefetcher.attach()
        for local, full in self.members.items():
            owner_name, _, attr = local.rpartition(".")
            owner = module.get_submodule(owner_name)
            is_param = attr in owner._parameters
            tensor = owner._parameters[attr] if is_param else owner._buffers[attr]
            meta = tensor
            if tensor.device.type != "meta":
                meta = tensor.to("meta")
                if is_param:
                    meta = torch.nn.Parameter(meta, requires_grad=tensor.requires_grad)
                (owner._parameters if is_param else owner._buffers)[attr] = meta
            self._slots.append((owner, attr, is_param, full, meta))
        for name, tensor in module.named_buffers():
            if tensor.device.type != "meta" and self.execution_device is not None:
                set_module_tensor_to_device(module, name, self.execution_device)
        return module

    @_compiler_disable
    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        """Take the group's tensors from the prefetcher and place the inputs on the execution device."""
        if torch.is_grad_enabled():
            self._refuse_training()
        if self._held:
            self._put_back()
        tensors = self.prefetcher.acquire(self.group, id(self))
        self._held = True
        # Autograd may keep weights for a backward after the staging buffer was refilled: give it copies.
        copy = torch.is_grad_enabled() and not self.prefetcher.on_cuda
        for owner, attr, is_param, full, _ in self._slots:
            value = tensors[full].clone() if copy else tensors[full]
            if is_param:
                value = torch.nn.Parameter(value, requires_grad=False)
            (owner._parameters if is_param else owner._buffers)[attr] = value
        if self.io_same_device:
            self.input_device = find_device([args, kwargs])
        return send_to_device(args, self.execution_device), send_to_device(
            kwargs, self.execution_device, skip_keys=self.skip_keys
        )

    @_compiler_disable
    def post_forward(self, module: torch.nn.Module, output):
        """Put the meta tensors back and release the group's buffer (an output viewing it is copied out first)."""
        if not self.prefetcher.on_cuda and self._slots:
            staging = self.prefetcher.staging_pointers()
            output = recursively_apply(
                lambda t: t.clone() if t.untyped_storage().data_ptr() in staging else t,
                output,
                error_on_other_type=False,
            )
        self._put_back()
        if self.io_same_device and self.input_device is not None:
            output = send_to_device(output, self.input_device, skip_keys=self.skip_keys)
        return output

    def _refuse_training(self) -> None:
        trainable = [full for _, _, is_param, full, meta in self._slots if is_param and meta.requires_grad]
        if trainable:
            raise RuntimeError(
                f"nvme group {self.group_name!r} streams its weights for inference only, but this forward runs with "
                f"grad enabled and {trainable[0]!r} requires grad; run under torch.inference_mode() or "
                "torch.no_grad(), or call model.requires_grad_(False)"
            )

    def _put_back(self) -> None:
        for owner, attr, is_param, _, meta in self._slots:
            (owner._parameters if is_param else owner._buffers)[attr] = meta
        self._held = False
        self.prefetcher.release(self.group)

    def abort(self) -> None:
        """The module's forward raised: give the group back so the next forward starts clean."""
        if self._held:
            self._put_back()

    def detach_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        """Load the stored tensors back into RAM (as accelerate does on removal) and let the prefetcher close."""
        if self._held:
            self._put_back()
        for local in self.members:
            set_module_tensor_to_device(module, local, "cpu", value=self.weights_map[local])
        self.prefetcher.detach()
        return module


def attach_nvme_hook(module: torch.nn.Module, hook: NvmeAlignDevicesHook) -> None:
    """``add_hook_to_module``, plus a guard that releases the group when the module's forward raises."""
    add_hook_to_module(module, hook)
    forward = module.forward

    @functools.wraps(forward)
    def guarded_forward(*args, **kwargs):
        try:
            return forward(*args, **kwargs)
        except BaseException:
            hook.abort()
            raise

    module.forward = guarded_forward
