"""diffusers: ``ModelMixin.from_pretrained`` and ``DiffusionPipeline.from_pretrained`` with ``offload_backend="nvme"``.

For a model, diffusers would write every "disk" weight as an accelerate ``.dat`` file before dispatching; under the
nvme tier those writes are replaced by a note of where the weight sits in its safetensors shard (or, for a ``.bin``
checkpoint, by the weight as ``torch.load(mmap=True)`` maps it), and the group files are written from there. A
pipeline loads its large components (denoiser, text encoders) that way and keeps the others (VAE, scheduler,
tokenizers) as usual; ``nvme_components=[...]`` chooses the streamed ones.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from ..loading import current_loading
from .devices import compute_device_first
from .kwargs import wrap_from_pretrained
from .patching import patch
from .pipelines import patch_pipeline_loading

_LOADED: contextvars.ContextVar[dict[int, Any] | None] = contextvars.ContextVar("accel_nvme_loaded", default=None)
_SHARD: contextvars.ContextVar[Any] = contextvars.ContextVar("accel_nvme_shard", default=None)
# _LOADED: id(state dict) -> the checkpoint file it was read from, for the one ModelMixin.from_pretrained in progress;
# _SHARD: the checkpoint file being loaded now


@contextlib.contextmanager
def _model_loading(kwargs: dict) -> Iterator[None]:
    """One ``ModelMixin.from_pretrained`` on the nvme tier: no ``.dat`` copies, and the files read are noted until the
    call returns or raises."""
    kwargs.setdefault("offload_state_dict", False)
    token = _LOADED.set({})
    try:
        yield
    finally:
        _LOADED.reset(token)


def patch_model_loading(modeling_utils: ModuleType) -> None:
    """Wrap ``ModelMixin.from_pretrained`` and the shard loader / index writer it calls, and ``device``."""
    wrap_from_pretrained(modeling_utils.ModelMixin, _model_loading)
    patch(modeling_utils.ModelMixin, "device", compute_device_first)
    patch(modeling_utils, "_load_shard_file", _remember_shard)
    patch(modeling_utils, "load_state_dict", _remember_state_dict)
    patch(modeling_utils, "save_offload_index", _keep_offload_index)


def _keep_offload_index(save_offload_index):
    """Under the nvme tier the offload index goes to the loading, not to an ``index.json`` file."""

    @functools.wraps(save_offload_index)
    def save_or_keep_offload_index(index, offload_folder):
        if current_loading() is None:
            return save_offload_index(index, offload_folder)
        current_loading().index.update(index)

    return save_or_keep_offload_index


def _remember_state_dict(load_state_dict):
    """A non-sharded checkpoint is read whole before loading: remember which file each such dict came from."""

    @functools.wraps(load_state_dict)
    def load_and_remember(checkpoint_file, *args, **kwargs):
        state_dict = load_state_dict(checkpoint_file, *args, **kwargs)
        loaded = _LOADED.get()
        if current_loading() is not None and loaded is not None and isinstance(checkpoint_file, (str, os.PathLike)):
            loaded[id(state_dict)] = checkpoint_file
        return state_dict

    return load_and_remember


def _remember_shard(load_shard_file):
    @functools.wraps(load_shard_file)
    def load_and_remember(shard_file, *args, **kwargs):
        named = isinstance(shard_file, (str, os.PathLike))
        path = shard_file if named else (_LOADED.get() or {}).get(id(shard_file))
        token = _SHARD.set(path)
        try:
            return load_shard_file(shard_file, *args, **kwargs)
        finally:
            _SHARD.reset(token)

    return load_and_remember


def patch_weight_offload(model_loading_utils: ModuleType) -> None:
    """Under the nvme tier, a "disk" weight read from a safetensors shard is noted, not written to a ``.dat`` file."""
    patch(model_loading_utils, "offload_weight", _note_weight)
    patch(model_loading_utils, "_load_shard_file", _remember_shard)


def _note_weight(offload_weight):
    @functools.wraps(offload_weight)
    def note_or_offload_weight(weight, weight_name, offload_folder, index=None):
        loading = current_loading()
        shard = _SHARD.get()
        if loading is None or shard is None or os.fspath(offload_folder) != str(loading.config.offload_dir):
            return offload_weight(weight, weight_name, offload_folder, index=index)  # e.g. offload_state_dict's
        index = {} if index is None else index
        if str(shard).endswith(".safetensors"):
            dtype = str(weight.dtype).removeprefix("torch.")
            index[weight_name] = {"safetensors_file": str(shard), "weight_name": weight_name, "dtype": dtype}
        else:
            loading.mapped[weight_name] = weight  # a .bin weight, memory-mapped by diffusers' torch.load(mmap=True)
        return index

    return note_or_offload_weight


PATCHES = {
    "diffusers.models.modeling_utils": patch_model_loading,
    "diffusers.models.model_loading_utils": patch_weight_offload,
    "diffusers.pipelines.pipeline_utils": patch_pipeline_loading,
}
