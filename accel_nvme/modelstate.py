"""What dispatch changes in a model's own tensors, and the snapshot that undoes all of it on failure.

Streamed tensors become meta tensors (their bytes live in the group files), CPU tensors viewing a mapped checkpoint
become owned ones, and tensors of split entries are loaded onto the execution device.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping

import torch
from accelerate.utils import set_module_tensor_to_device

from .planning import module_tensor, tensor_source
from .store import CheckpointTensor, GroupPlan
from .tensorkinds import installed, kind_of, placeholder

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def all_or_nothing(model: torch.nn.Module) -> Iterator[None]:
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


def leave_meta_tensors(model: torch.nn.Module, plans: list[GroupPlan]) -> None:
    """Replace every streamed tensor by a meta tensor; names tied to one tensor share one meta tensor."""
    metas: dict[str, torch.Tensor] = {}
    for plan in plans:
        for member, canonical in plan.members.items():
            owner, attr, tensor = module_tensor(model, member)
            kind = kind_of(member, tensor, owner)
            if canonical not in metas and kind is not None:  # accelerate's setter would rebuild it as a plain one
                metas[canonical] = placeholder(tensor, kind)
            if canonical not in metas:
                set_module_tensor_to_device(model, member, "meta")
                metas[canonical] = getattr(owner, attr)
            elif attr in owner._parameters:
                owner._parameters[attr] = metas[canonical]
            else:
                owner._buffers[attr] = metas[canonical]
            installed(owner, metas[canonical], metas[canonical])


def own_cpu_tensors(model: torch.nn.Module) -> None:
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


def keep_resident(
    model: torch.nn.Module,
    names: list[str],
    device: torch.device,
    index: Mapping[str, Mapping],
    mapped: Mapping[str, torch.Tensor],
) -> None:
    """Load tensors that stay resident onto ``device`` (from the checkpoint when they are still on meta)."""
    kept_bytes = 0
    for name in names:
        tensor = module_tensor(model, name)[2]
        if tensor is None:
            continue
        source = tensor_source([name], tensor, index, mapped)
        value = source.load() if isinstance(source, CheckpointTensor) else source.to(tensor.dtype)
        if not value.untyped_storage().resizable():
            value = value.clone()  # owned and allocator-aligned, not a view into a mapped checkpoint
        set_module_tensor_to_device(model, name, device, value=value)
        kept_bytes += value.numel() * value.element_size()
    if names:
        logger.info("%d tensors of split nvme entries stay on %s (%d bytes)", len(names), device, kept_bytes)
