"""The accelerate hook of one nvme group: it only connects accelerate's protocol to the prefetcher.

Streamed weights act as frozen (no ``.grad``), as with accelerate's disk tier. Nothing that outlives a forward views a
staging buffer: outputs are copied out of it, autograd gets handles (``backward.py``), and a module keeping a view is
an error. Forwards of one model take turns (the prefetcher's ``forward_lock``), and an interrupted forward leaves
nothing in use.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import sys
import weakref
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from accelerate.utils import find_device, set_module_tensor_to_device

from . import backward, owned
from .arguments import send_to_device
from .prefetch import Lease, Prefetcher
from .tensorkinds import installed, rebuild

logger = logging.getLogger(__name__)

NOTHING: frozenset[int] = frozenset()
_WARNED_FROZEN: weakref.WeakSet[Prefetcher] = weakref.WeakSet()  # models already told their weights are frozen


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


@dataclasses.dataclass(frozen=True, slots=True)
class _StreamedTensor:
    """Where one streamed tensor sits in the module: ``owner.<attr>``, a parameter or a buffer, ``name`` in its group.

    Between forwards it holds ``meta``, which also keeps the tensor's ``requires_grad``.
    """

    owner: torch.nn.Module
    attr: str
    is_param: bool
    name: str
    meta: torch.Tensor

    def put(self, value: torch.Tensor) -> None:
        (self.owner._parameters if self.is_param else self.owner._buffers)[self.attr] = value
        installed(self.owner, self.meta, value)


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
        self._streamed: list[_StreamedTensor] = []
        self._lease: Lease | None = None  # the group's tensors while a forward uses them
        self._acquiring: object | None = None  # the caller between asking for the group and holding its lease
        self._guarded_submodules: list[tuple[torch.nn.Module, Any]] = []  # and the ``forward`` each had before
        self._staging = NOTHING  # the staging buffers the module's tensors view (none: device copies, or clones)

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
            self._streamed.append(_StreamedTensor(owner, attr, is_param, full, meta))
            owned.register(meta, self.execution_device)
        for name, tensor in module.named_buffers():
            if tensor.device.type != "meta" and self.execution_device is not None:
                set_module_tensor_to_device(module, name, self.execution_device)
        return module

    @_compiler_disable
    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        """Take the group's tensors from the prefetcher and place the inputs on the execution device."""
        self._take(self)
        owned.refuse_foreign_meta(module, self.group_name, self.execution_device)
        if self.io_same_device:
            self.input_device = find_device([args, kwargs])
        return send_to_device(args, self.execution_device), send_to_device(
            kwargs, self.execution_device, skip_keys=self.skip_keys
        )

    @_compiler_disable
    def post_forward(self, module: torch.nn.Module, output):
        """Put the meta tensors back and release the group's buffer (an output viewing it is copied out first)."""
        staging = self._staging if self._streamed else NOTHING
        if staging:
            output = _owned(output, staging)
        self._put_back()
        if staging:
            self._refuse_kept_views(module, staging)
        if self.io_same_device and self.input_device is not None:
            output = send_to_device(output, self.input_device, skip_keys=self.skip_keys)
        return output

    def _take(self, caller: object) -> None:
        """Acquire the group for ``caller`` (this hook, or a submodule called on its own) and install its tensors."""
        if self._lease is not None:
            self._put_back()
        grad = torch.is_grad_enabled()
        if grad:
            self._warn_frozen()
        self._acquiring = caller  # before acquiring: whatever happens next, ``abort`` gives the group back
        # Tensors made in inference mode would drop requires_grad (see below). The C-level guard, not the Python
        # ``torch.inference_mode``: an interrupt inside that one's ``__enter__`` leaves a guard that, collected
        # later, puts the thread back into inference mode.
        with torch._C._InferenceMode(False):
            self._lease = lease = self.prefetcher.acquire(self.group, caller)
            self._acquiring = None
            if grad:  # autograd keeps handles, not the tensors (backward.py)
                backward.holding(self.prefetcher, self.group, lease)
            # In every grad mode the weights keep the original ``requires_grad``, which torch's matmul looks at to
            # choose a kernel (bits equal to the model in RAM).
            tensors = lease.tensors
            for streamed in self._streamed:
                value = rebuild(streamed.meta, tensors[streamed.name])
                if grad and streamed.meta.requires_grad:
                    value = backward.frozen_requiring_grad(value)
                elif streamed.is_param and not isinstance(value, torch.nn.Parameter):
                    value = torch.nn.Parameter(value, requires_grad=streamed.meta.requires_grad)
                streamed.put(value)
        self._staging = lease.staging

    def _warn_frozen(self) -> None:
        """Once per model: a forward with grad enabled, and a streamed weight that asks for a gradient it cannot get."""
        if self.prefetcher in _WARNED_FROZEN:
            return
        trainable = next((t.name for t in self._streamed if t.is_param and t.meta.requires_grad), None)
        if trainable is not None:
            _WARNED_FROZEN.add(self.prefetcher)
            logger.warning(
                "%r and the other weights streamed from nvme act as frozen in forwards with grad enabled: they get no "
                ".grad (as with accelerate's disk offload); gradients of the inputs and of weights kept in memory "
                "are exact. Call model.requires_grad_(False) on streamed modules to silence this.",
                trainable,
            )

    def _refuse_kept_views(self, module: torch.nn.Module, staging: frozenset[int]) -> None:
        """A module attribute still viewing the staging buffer would later read another group's bytes: refuse it.

        Checks tensors held as plain attributes (or in a tuple/list of tensors) of the module and its submodules, but
        not of those under a submodule with a hook of its own (MoE experts): they check their own.
        """
        for submodule in _unhooked_modules(module):
            for attr, value in vars(submodule).items():
                if isinstance(value, torch.Tensor):
                    kept = _views_staging(value, staging)
                elif isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
                    kept = any(isinstance(v, torch.Tensor) and _views_staging(v, staging) for v in value)
                else:
                    continue
                if kept:
                    name = next(n for n, m in module.named_modules() if m is submodule)
                    raise RuntimeError(
                        f"{type(module).__name__} (nvme group {self.group_name!r}) keeps "
                        f"{f'{name}.{attr}' if name else attr!r}, a view of its streamed weights, after its forward: "
                        "the staging buffer is refilled with other weights, so keeping a reference to a streamed "
                        "weight across forwards is unsupported; compute it inside forward, or map this module to "
                        "'cpu' or a GPU instead of 'nvme'"
                    )

    def _put_back(self) -> None:
        for streamed in self._streamed:
            streamed.put(streamed.meta)
        if self._lease is not None:  # None after a nested call of the same module released the group
            backward.released(self._lease)
            self._lease.release()
            self._lease = None

    @property
    def holding(self) -> bool:
        """Whether the module holds its group's tensors now (inside its forward)."""
        return self._lease is not None

    def abort(self) -> None:
        """The module's forward raised (or was interrupted): give the group back so the next forward starts clean."""
        if self._lease is not None:
            self._put_back()
        elif self._acquiring is not None:  # interrupted inside ``acquire``, after it counted the caller as a holder
            self.prefetcher.release(self.group, self._acquiring)
        self._acquiring = None

    def detach_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        """Load the stored tensors back into RAM (as accelerate does on removal) and let the prefetcher close."""
        if self._lease is not None:
            self._put_back()
        for submodule, forward in self._guarded_submodules:
            if forward is None:
                del submodule.forward
            else:
                submodule.forward = forward
        self._guarded_submodules.clear()
        for local, streamed in zip(self.members, self._streamed, strict=True):
            value = rebuild(streamed.meta, self.weights_map[local])
            if type(value) in (torch.Tensor, torch.nn.Parameter):
                set_module_tensor_to_device(module, local, "cpu", value=value)
            else:  # a quantized tensor, rebuilt in its own class: accelerate's setter would rebuild it as a plain one
                wrap = streamed.is_param and not isinstance(value, torch.nn.Parameter)
                streamed.put(torch.nn.Parameter(value, requires_grad=False) if wrap else value)
        self.prefetcher.detach()
        return module


def _unhooked_modules(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` and its submodules, less those under a submodule carrying a hook of its own."""
    stack = [module]
    while stack:
        submodule = stack.pop()
        yield submodule
        stack.extend(c for c in submodule._modules.values() if c is not None and "_hf_hook" not in vars(c))


def _views_staging(tensor: torch.Tensor, staging: frozenset[int]) -> bool:
    return (
        tensor.device.type != "meta"  # host staging buffers, or the device buffers of the CUDA ring
        and tensor.layout == torch.strided
        and tensor.untyped_storage().data_ptr() in staging
    )


def _owned(value: Any, staging: frozenset[int]) -> Any:
    """``value`` with every tensor that views a staging buffer replaced by a copy, however it is nested.

    Walks tuples (named too), lists, mappings (dicts, ``ModelOutput``, diffusers ``BaseOutput``) and dataclasses; a
    container is copied only when something in it was, so untouched outputs keep their identity.
    """
    if isinstance(value, torch.Tensor):
        return value.clone() if _views_staging(value, staging) else value
    if isinstance(value, (tuple, list)):
        items = [_owned(item, staging) for item in value]
        if all(new is old for new, old in zip(items, value, strict=True)):
            return value
        if isinstance(value, list):
            copied = copy.copy(value)
            copied[:] = items
            return copied
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, Mapping):
        changed = {key: new for key, item in value.items() if (new := _owned(item, staging)) is not item}
        if not changed or not isinstance(value, MutableMapping):
            return value
        copied = copy.copy(value)
        for key, new in changed.items():
            copied[key] = new
        return copied
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changed = {
            f.name: new
            for f in dataclasses.fields(value)
            if (new := _owned(item := getattr(value, f.name), staging)) is not item
        }
        if not changed:
            return value
        copied = copy.copy(value)
        for name, new in changed.items():
            object.__setattr__(copied, name, new)
        return copied
    return value


def _recover(prefetcher: Prefetcher) -> None:
    """No module of this model is running: give back whatever an interrupted forward left in use."""
    for holder in prefetcher.recover():
        if isinstance(holder, (NvmeAlignDevicesHook, _SubmoduleCall)):
            holder.abort()


class _SubmoduleCall:
    """Holds a group for a module inside it that was called on its own (DiT's root calls
    ``transformer_blocks[0].norm1.emb``, as accelerate's per-leaf hooks allow)."""

    def __init__(self, hook: NvmeAlignDevicesHook):
        self.hook = hook

    def abort(self) -> None:
        self.hook.abort()


def _loading_group(forward: Any, module: torch.nn.Module, hook: NvmeAlignDevicesHook) -> Any:
    """A submodule's ``forward`` that loads its group (``module``'s) when called outside the group's forward."""
    caller = _SubmoduleCall(hook)

    @functools.wraps(forward)
    def load_group_and_forward(*args, **kwargs):
        if hook._lease is not None:
            return forward(*args, **kwargs)  # inside the group's forward: its tensors are in place
        hook._take(caller)
        owned.refuse_foreign_meta(module, hook.group_name, hook.execution_device)
        if hook.io_same_device:
            hook.input_device = find_device([args, kwargs])
        args = send_to_device(args, hook.execution_device)
        kwargs = send_to_device(kwargs, hook.execution_device, skip_keys=hook.skip_keys)
        return hook.post_forward(module, forward(*args, **kwargs))

    return load_group_and_forward


def _guarded(forward: Any, hook: NvmeAlignDevicesHook) -> Any:
    """``forward`` under the model's lock; one that raises gives the group back."""

    @functools.wraps(forward)
    def guarded_forward(*args, **kwargs):
        lock = hook.prefetcher.forward_lock
        outermost = not lock._is_owned()  # ground truth, unlike a counter an interrupt could leave wrong
        with lock:
            # One call, no ``try`` here: CPython's exception table misses the NOP of a ``try`` inside a ``with`` body,
            # so an exception raised there (by a trace function) would skip ``__exit__`` and leave the lock held.
            return _forward_or_abort(forward, hook, outermost, args, kwargs)

    return guarded_forward


def _forward_or_abort(forward: Any, hook: NvmeAlignDevicesHook, outermost: bool, args: tuple, kwargs: dict) -> Any:
    if outermost:
        _recover(hook.prefetcher)
    try:
        with backward.saving_handles():
            return forward(*args, **kwargs)
    except BaseException:
        hook.abort()
        raise


def attach_nvme_hook(module: torch.nn.Module, hook: NvmeAlignDevicesHook) -> None:
    """``add_hook_to_module``, plus a guard: forwards of one model take turns, and one that raises gives its group back.

    The model's lock is reentrant (nested hooked modules); the outermost hooked call of a thread first recovers what
    an interrupted forward may have left in use. Submodules owning streamed tensors load the group when called on
    their own (outside the group module's forward).
    """
    add_hook_to_module(module, hook)
    module.forward = _guarded(module.forward, hook)
    owners = {id(streamed.owner) for streamed in hook._streamed}
    for submodule in module.modules():
        if submodule is not module and id(submodule) in owners:
            hook._guarded_submodules.append((submodule, vars(submodule).get("forward")))
            submodule.forward = _guarded(_loading_group(submodule.forward, module, hook), hook)
