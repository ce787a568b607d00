"""Where an experts module's tensors live while it runs: views of its host buffer, or copies on the GPU.

The hooks of ``experts.py`` (fused experts) and ``expert_modules.py`` (one module per expert) read the experts a
forward needs into a host buffer mirroring their group file's data section (``expert_rows.py``), then ask their
placement for the module's tensors, given the host byte ranges that forward needs (``Expert.spans``).

On a CPU execution device (``HostExperts``) the tensors view the host buffer (copied when grad is enabled: the bytes
are forgotten or read again later, and autograd keeps what it is handed).

On CUDA (``DeviceExperts``) each forward gets a device buffer of the module's tensors, each at a multiple of
``DEVICE_ALIGNMENT`` as from the caching allocator, zeroed on the compute stream; the byte ranges asked for (the routed
experts' rows, only those) are copied into it on the prefetcher's side stream, which waits for the zeroing first, and
the compute stream waits on the copy's event before the module runs. The buffer is allocated on the compute stream,
so after the forward it goes back to the caching allocator in stream order: a later allocation reusing it is ordered
after the kernels queued now, and a later copy into it waits for the zeroing queued after them. The host buffer is
pageable (pinning it would fault in every page never read); the host waits for the copy to have read it before the
module's forward ends (``release``), so its pages may be forgotten or read again at once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from accelerate.utils import set_module_tensor_to_device

from . import owned
from .tensorkinds import rebuild
from .transfer import DeviceLayout, Run, aligned_empty, copy_runs, device_layout, mark

if TYPE_CHECKING:
    from .prefetch import Prefetcher

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostTensor:
    """A tensor of an experts module: its name in the module, and where it sits in the host buffer."""

    name: str
    start: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def end(self) -> int:
        """Where its bytes end in the host buffer."""
        return self.start + math.prod(self.shape) * self.dtype.itemsize


def _view(data: torch.Tensor, offset: int, t: HostTensor) -> torch.Tensor:
    """Tensor ``t``, from byte ``offset`` of ``data``."""
    return data[offset : offset + t.end - t.start].view(t.dtype).view(t.shape)


def _owner(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    """The module holding tensor ``name`` of ``module``, and its attribute there."""
    path, _, attr = name.rpartition(".")
    return module.get_submodule(path), attr


class ExpertPlacement:
    """The tensors of an experts module: meta between forwards (recorded as ours: peft places adapters by them), put in
    place for a forward from what ``place`` gives, meta again after it, read back into RAM when its hook goes. The
    modules owning them are found once: a wrapper put around one later (peft's LoRA layers) keeps it as its base."""

    device: torch.device

    def __init__(self, tensors: Sequence[HostTensor]):
        self.tensors = tensors
        self._meta: dict[str, torch.nn.Parameter] = {}
        self._owners: dict[str, tuple[torch.nn.Module, str]] = {}

    def leave_meta(self, module: torch.nn.Module) -> None:
        """``module``'s tensors become meta tensors, recorded as streamed onto ``device``."""
        for t in self.tensors:
            owner, attr = self._owners[t.name] = _owner(module, t.name)
            param = owner._parameters[attr]
            meta = param if param.device.type == "meta" else torch.nn.Parameter(param.to("meta"), param.requires_grad)
            self._meta[t.name] = owner._parameters[attr] = meta
            owned.register(meta, self.device)

    def put(self, host: torch.Tensor, spans: Sequence[tuple[int, int]]) -> None:
        """The module's tensors from ``host``'s byte ranges ``spans`` (``place``), in the dtype and class of its meta
        tensors (files keep a narrower checkpoint dtype for CUDA: widened here)."""
        values = self.place(host, spans)
        grad = torch.is_grad_enabled()
        for name, meta in self._meta.items():
            owner, attr = self._owners[name]
            value = rebuild(meta, values[name])
            owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=grad and meta.requires_grad)

    def put_back(self) -> None:
        """The module holds its meta tensors again; what ``place`` made for the forward is released."""
        for name, meta in self._meta.items():
            owner, attr = self._owners[name]
            owner._parameters[attr] = meta
        self.release()

    def load_back(self, weights: Mapping[str, torch.Tensor]) -> None:
        """The module's tensors read into RAM from ``weights`` (as accelerate does when its hook is removed)."""
        for name, (owner, attr) in self._owners.items():
            set_module_tensor_to_device(owner, attr, "cpu", value=weights[name])

    def place(self, host: torch.Tensor, spans: Sequence[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """The module's tensors, by name, for a forward using ``host``'s byte ranges ``spans``."""
        raise NotImplementedError

    def release(self) -> None:
        """The module's forward is over."""


class HostExperts(ExpertPlacement):
    """CPU execution: the module's tensors view the host buffer (copies of it when grad is enabled)."""

    device = torch.device("cpu")
    bytes_copied = 0  # nothing is copied to a device

    def place(self, host: torch.Tensor, spans: Sequence[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """The module's tensors from ``host``, which holds (at least) the byte ranges ``spans`` the forward uses."""
        grad = torch.is_grad_enabled()
        views = {t.name: _view(host, t.start, t) for t in self.tensors}
        return {name: view.clone() if grad else view for name, view in views.items()}

    def release(self) -> None:
        """The module's forward is over (its tensors viewed the host buffer: nothing to free)."""


class DeviceExperts(ExpertPlacement):
    """CUDA execution: the byte ranges a forward uses copied on the side stream into a zeroed, aligned device buffer
    per forward, which compute waits for; every other byte is zero there."""

    def __init__(self, tensors: Sequence[HostTensor], prefetcher: Prefetcher):
        super().__init__(tensors)
        self.prefetcher = prefetcher
        self.device = prefetcher.device
        self.layout = device_layout([(t.start, t.end - t.start) for t in tensors])
        self.bytes_copied = 0  # since dispatch: the bytes copied to the device
        self._copied: torch.cuda.Event | None = None

    def copies(self, spans: Sequence[tuple[int, int]]) -> DeviceLayout:
        """The copies of the host byte ranges ``spans`` (each tensor's part of them) into the device buffer; ranges
        that follow each other in a tensor are one copy."""
        runs: list[Run] = []
        for t, offset in zip(self.tensors, self.layout.offsets, strict=True):
            own: list[Run] = []
            for start, end in sorted((max(start, t.start), min(end, t.end)) for start, end in spans):
                if start >= end:
                    continue
                if own and own[-1].host_offset + own[-1].nbytes == start:
                    own[-1] = Run(own[-1].host_offset, own[-1].device_offset, end - own[-1].host_offset)
                else:
                    own.append(Run(start, offset + start - t.start, end - start))
            runs += own
        return DeviceLayout(self.layout.offsets, tuple(runs), self.layout.nbytes)

    def place(self, host: torch.Tensor, spans: Sequence[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """The module's tensors on the device, ready for the compute stream: ``host``'s bytes ``spans``, zeros
        elsewhere."""
        runtime, device, side = self.prefetcher.runtime, self.device, self.prefetcher.side_stream
        layout = self.copies(spans)
        asked = mark(device, runtime)
        with runtime.using(device, None):  # on the compute stream: freed in its order after the forward
            data = aligned_empty(layout.nbytes, device)
            data.zero_()
            zeroed = mark(device, runtime)
        with runtime.using(device, side):
            side.wait_event(zeroed)
            copy_runs(data, host, layout)
            copied = runtime.event()
            copied.record(side)
        self._copied = copied
        self.bytes_copied += sum(run.nbytes for run in layout.runs)
        data = self.prefetcher.to_compute(data, copied, asked)
        return {t.name: _view(data, offset, t) for t, offset in zip(self.tensors, layout.offsets, strict=True)}

    def release(self) -> None:
        """The module's forward is over: wait for the copy to have read the host bytes (they may be forgotten or read
        again next); the device buffer is freed with the module's tensors."""
        copied, self._copied = self._copied, None
        if copied is not None:
            copied.synchronize()


def expert_placement(tensors: Sequence[HostTensor], prefetcher: Prefetcher) -> ExpertPlacement:
    """Where the tensors of an experts module live while it runs: on the prefetcher's device path (CUDA, or its fake in
    tests) a device copy, else views of the host buffer."""
    if prefetcher.runtime is not None:
        return DeviceExperts(tensors, prefetcher)
    return HostExperts(tensors)
