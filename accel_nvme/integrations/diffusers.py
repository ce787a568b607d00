"""diffusers: ``ModelMixin.from_pretrained`` and ``DiffusionPipeline.from_pretrained`` with ``offload_backend="nvme"``.

For a model, diffusers would write every "disk" weight as an accelerate ``.dat`` file before dispatching; under the
nvme tier those writes are replaced by a note of where the weight sits in its safetensors shard (or, for a ``.bin``
checkpoint, by the weight as ``torch.load(mmap=True)`` maps it), and the group files are written from there. A
pipeline loads its large components (denoiser, text encoders) that way and keeps the others (VAE, scheduler,
tokenizers) as usual; ``nvme_components=[...]`` chooses the streamed ones.
"""

from __future__ import annotations

import functools
import os
import threading
from types import ModuleType

from ..dispatch import current_loading
from .kwargs import wrap_from_pretrained
from .pipelines import patch_pipeline_loading

_shard = threading.local()


def patch_model_loading(modeling_utils: ModuleType) -> None:
    """Wrap ``ModelMixin.from_pretrained`` and the shard loader / index writer it calls."""

    def prepare(kwargs: dict) -> None:
        kwargs.setdefault("offload_state_dict", False)
        _shard.loaded = {}

    wrap_from_pretrained(modeling_utils.ModelMixin, prepare)
    modeling_utils._load_shard_file = _remember_shard(modeling_utils._load_shard_file)
    modeling_utils.load_state_dict = _remember_state_dict(modeling_utils.load_state_dict)
    save_offload_index = modeling_utils.save_offload_index

    def save_or_keep_offload_index(index, offload_folder):
        if current_loading() is None:
            return save_offload_index(index, offload_folder)
        current_loading().index.update(index)

    modeling_utils.save_offload_index = save_or_keep_offload_index


def _remember_state_dict(load_state_dict):
    """A non-sharded checkpoint is read whole before loading: remember which file each such dict came from."""
    if getattr(load_state_dict, "_accel_nvme", False):
        return load_state_dict

    @functools.wraps(load_state_dict)
    def load_and_remember(checkpoint_file, *args, **kwargs):
        state_dict = load_state_dict(checkpoint_file, *args, **kwargs)
        if current_loading() is not None and isinstance(checkpoint_file, (str, os.PathLike)):
            _shard.loaded[id(state_dict)] = checkpoint_file
        return state_dict

    load_and_remember._accel_nvme = True
    return load_and_remember


def _remember_shard(load_shard_file):
    if getattr(load_shard_file, "_accel_nvme", False):
        return load_shard_file

    @functools.wraps(load_shard_file)
    def load_and_remember(shard_file, *args, **kwargs):
        if isinstance(shard_file, (str, os.PathLike)):
            _shard.path = shard_file
        else:
            _shard.path = getattr(_shard, "loaded", {}).get(id(shard_file))
        try:
            return load_shard_file(shard_file, *args, **kwargs)
        finally:
            _shard.path = None

    load_and_remember._accel_nvme = True
    return load_and_remember


def patch_weight_offload(model_loading_utils: ModuleType) -> None:
    """Under the nvme tier, a "disk" weight read from a safetensors shard is noted, not written to a ``.dat`` file."""
    offload_weight = model_loading_utils.offload_weight
    if getattr(offload_weight, "_accel_nvme", False):
        return

    @functools.wraps(offload_weight)
    def note_or_offload_weight(weight, weight_name, offload_folder, index=None):
        loading = current_loading()
        shard = getattr(_shard, "path", None)
        if loading is None or shard is None or os.fspath(offload_folder) != str(loading.config.offload_dir):
            return offload_weight(weight, weight_name, offload_folder, index=index)  # e.g. offload_state_dict's
        index = {} if index is None else index
        if str(shard).endswith(".safetensors"):
            dtype = str(weight.dtype).removeprefix("torch.")
            index[weight_name] = {"safetensors_file": str(shard), "weight_name": weight_name, "dtype": dtype}
        else:
            loading.mapped[weight_name] = weight  # a .bin weight, memory-mapped by diffusers' torch.load(mmap=True)
        return index

    note_or_offload_weight._accel_nvme = True
    model_loading_utils.offload_weight = note_or_offload_weight
    model_loading_utils._load_shard_file = _remember_shard(model_loading_utils._load_shard_file)


PATCHES = {
    "diffusers.models.modeling_utils": patch_model_loading,
    "diffusers.models.model_loading_utils": patch_weight_offload,
    "diffusers.pipelines.pipeline_utils": patch_pipeline_loading,
}
