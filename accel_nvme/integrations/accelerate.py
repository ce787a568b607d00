"""accelerate: ``load_checkpoint_in_model`` and ``load_checkpoint_and_dispatch`` with ``"nvme"`` device_map values.

nvme entries load as accelerate's ``"disk"`` entries do (lazily: a weight is never read into RAM), except that nothing
is written: each offloaded weight is noted where it sits in its safetensors file, or kept memory-mapped from a
``.bin`` file (``torch.load(mmap=True, weights_only=True)``). The notes are left on the model for the
``dispatch_model`` that follows, which writes the group files from there, one group at a time.

accelerate before 1.16 gets two things wrong on ``"disk"`` entries, which nvme entries become here: it reads a
safetensors file whose weights all go to disk with ``device="disk"`` (safetensors raises "device disk is invalid"),
and it never loads the buffers of disk entries (``offload_buffers=False``): they keep their initial values, and the
outputs are silently wrong (BART's ``final_logits_bias``). Both are done here as accelerate 1.16 does them.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import os
import zipfile
from dataclasses import dataclass, field
from types import ModuleType

import accelerate
import accelerate.utils.modeling as accelerate_modeling
import torch
from accelerate.utils import find_tied_parameters, set_module_tensor_to_device
from packaging.version import Version

from ..config import load_config
from ..devicemap import has_nvme, refuse_mixed, to_accelerate
from ..loading import PENDING_ATTR, NvmeLoading
from .patching import patch

_original_load_checkpoint_in_model = accelerate_modeling.load_checkpoint_in_model
_signature = inspect.signature(_original_load_checkpoint_in_model)
_CURRENT: contextvars.ContextVar[_Load | None] = contextvars.ContextVar("accel_nvme_checkpoint_load", default=None)
# accelerate < 1.16 leaves the buffers of "disk" entries unloaded (1.16: "Buffers stay in memory unless
# `offload_buffers=True`, so they still need their value")
_LOADS_DISK_BUFFERS = Version(accelerate.__version__).release >= (1, 16)


@dataclass
class _Load:
    """The nvme ``load_checkpoint_in_model`` in progress: its loading, its folder, the checkpoint file being read."""

    loading: NvmeLoading
    folder: str
    file: str | None = None
    disk_buffers: frozenset[str] = frozenset()
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)


@functools.wraps(_original_load_checkpoint_in_model)
def load_checkpoint_in_model(*args, **kwargs):
    """accelerate's ``load_checkpoint_in_model``; entries mapped to ``"nvme"`` are noted for ``dispatch_model``."""
    bound = _signature.bind(*args, **kwargs)
    device_map = bound.arguments.get("device_map")
    if not has_nvme(device_map):
        return _original_load_checkpoint_in_model(*args, **kwargs)
    model = bound.arguments["model"]
    refuse_mixed(device_map, "load_checkpoint_in_model")
    config = load_config(offload_dir=bound.arguments.get("offload_folder"))
    if config.offload_dir is None:
        raise ValueError(
            f"load_checkpoint_in_model: device_map sends {type(model).__name__} modules to 'nvme' but no "
            "offload_folder was given: pass offload_folder=... or set ACCEL_NVME_OFFLOAD_FOLDER"
        )
    loading = model.__dict__.get(PENDING_ATTR) or NvmeLoading(config)
    bound.arguments["device_map"] = to_accelerate(device_map)
    bound.arguments["offload_folder"] = str(config.offload_dir)
    tied = find_tied_parameters(model)
    offload_buffers = bound.arguments.get("offload_buffers", False)
    buffers = frozenset() if _LOADS_DISK_BUFFERS or offload_buffers else _disk_buffers(model, device_map)
    current = _Load(loading, str(config.offload_dir), disk_buffers=buffers)
    token = _CURRENT.set(current)
    try:
        _original_load_checkpoint_in_model(*bound.args, **bound.kwargs)
    finally:
        _CURRENT.reset(token)
    _load_buffers(model, current.buffers, bound.arguments)
    _retie(model, tied, loading)
    model.__dict__[PENDING_ATTR] = loading


def _disk_buffers(model: torch.nn.Module, device_map: dict) -> frozenset[str]:
    """The buffers of ``model`` under the ``"nvme"`` entries of ``device_map``."""
    names = set()
    for name, _ in model.named_buffers():
        entry = name
        while entry and entry not in device_map:
            entry = entry.rpartition(".")[0]
        if device_map.get(entry) == "nvme":
            names.add(name)
    return frozenset(names)


def _load_buffers(model: torch.nn.Module, buffers: dict[str, torch.Tensor], arguments: dict) -> None:
    """Set the buffers accelerate < 1.16 left unloaded to their checkpoint values, with the dtype 1.16 gives them."""
    dtype, keep_in_fp32 = arguments.get("dtype"), arguments.get("keep_in_fp32_modules") or []
    for name, value in buffers.items():
        new_dtype = dtype if dtype is not None and torch.is_floating_point(value) else None
        if new_dtype == torch.float16 and any((k in name and k + "." in name) or k == name for k in keep_in_fp32):
            new_dtype = torch.float32
        set_module_tensor_to_device(model, name, "cpu", value=value, dtype=new_dtype)


def _retie(model: torch.nn.Module, tied: list[list[str]], loading: NvmeLoading) -> None:
    """Tie again what loading untied: accelerate re-ties only through a loaded (non-meta) member, and nvme
    members stay on meta; the member the checkpoint holds is kept."""
    for names in tied:
        noted = [name for name in names if name in loading.index or name in loading.mapped]
        if not noted or any(model.get_parameter(name).device.type != "meta" for name in names):
            continue  # nothing of ours, or accelerate tied them through a loaded member
        tensor = model.get_parameter(noted[0])
        for name in names:
            owner_name, _, attr = name.rpartition(".")
            model.get_submodule(owner_name)._parameters[attr] = tensor


def _load_state_dict(load_state_dict):
    @functools.wraps(load_state_dict)
    def load_and_remember(checkpoint_file, *args, **kwargs):
        current = _CURRENT.get()
        if current is None:
            return load_state_dict(checkpoint_file, *args, **kwargs)
        current.file = str(checkpoint_file)
        if not current.file.endswith(".safetensors") and zipfile.is_zipfile(checkpoint_file):
            state_dict = torch.load(checkpoint_file, map_location="cpu", weights_only=True, mmap=True)
        else:  # "disk" weights are read on the CPU (accelerate < 1.16 asks safetensors for device "disk")
            device_map = kwargs.get("device_map")
            if device_map is not None:
                kwargs["device_map"] = {k: "cpu" if v == "disk" else v for k, v in device_map.items()}
            state_dict = load_state_dict(checkpoint_file, *args, **kwargs)
        current.buffers.update({k: v for k, v in state_dict.items() if k in current.disk_buffers})
        return state_dict

    return load_and_remember


def _offload_weight(offload_weight):
    @functools.wraps(offload_weight)
    def note_or_offload_weight(weight, weight_name, offload_folder, index=None):
        current = _CURRENT.get()
        if current is None or os.fspath(offload_folder) != current.folder:
            return offload_weight(weight, weight_name, offload_folder, index=index)
        loading = current.loading
        if current.file is not None and current.file.endswith(".safetensors"):
            dtype = str(weight.dtype).removeprefix("torch.")
            loading.index[weight_name] = {"safetensors_file": current.file, "weight_name": weight_name, "dtype": dtype}
        else:
            loading.mapped[weight_name] = weight
        return {} if index is None else index

    return note_or_offload_weight


def _rebind(module: ModuleType) -> None:
    original = _original_load_checkpoint_in_model
    patch(module, "load_checkpoint_in_model", lambda _: load_checkpoint_in_model, only_if=original)


def _patch_modeling(module: ModuleType) -> None:
    _rebind(module)
    patch(module, "load_state_dict", _load_state_dict)
    patch(module, "offload_weight", _offload_weight)


PATCHES = {
    "accelerate.utils.modeling": _patch_modeling,
    "accelerate.utils": _rebind,
    "accelerate.big_modeling": _rebind,
    "accelerate": _rebind,
}
