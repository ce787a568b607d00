"""diffusers: ``from_single_file(..., offload_backend="nvme")`` for a safetensors or GGUF single file.

diffusers' ``from_single_file`` reads the whole file into memory, loads the model onto the CPU and dispatches it with
``{"": "cpu"}`` whatever ``device_map`` it was given. Under the nvme tier the wrapper lets it load so, then places the
model with the given map (``"auto"`` and its ``max_memory`` as diffusers' ``from_pretrained`` resolves them, the
entries that do not fit going to ``"nvme"``) and dispatches it: GGUF weights are streamed as stored.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

from .. import dispatch
from ..devicemap import from_accelerate
from .kwargs import pop_nvme_config
from .patching import patch

logger = logging.getLogger(__name__)


def patch_single_file(single_file_model: ModuleType) -> None:
    """Wrap ``FromOriginalModelMixin.from_single_file``."""
    patch(single_file_model.FromOriginalModelMixin, "from_single_file", _wrap)


def _wrap(original_method: classmethod) -> classmethod:
    original = original_method.__func__

    @functools.wraps(original)
    def from_single_file(cls, *args, **kwargs):
        config = pop_nvme_config(kwargs, f"{cls.__name__}.from_single_file")
        if config is None:
            return original(cls, *args, **kwargs)
        device_map = kwargs.pop("device_map", None) or "auto"
        max_memory = kwargs.pop("max_memory", None)
        kwargs.pop("offload_folder", None)
        model = original(cls, *args, **kwargs)
        if isinstance(device_map, str):
            from diffusers.models.model_loading_utils import _determine_device_map

            device_map = _determine_device_map(
                model,
                device_map,
                max_memory,
                kwargs.get("dtype") or kwargs.get("torch_dtype"),
                hf_quantizer=getattr(model, "hf_quantizer", None),
            )
        device_map = from_accelerate(device_map)
        logger.info("%s.from_single_file: dispatching with %s", cls.__name__, device_map)
        return dispatch.dispatch_model(model, device_map, offload_dir=config.offload_dir, config=config)

    return classmethod(from_single_file)


PATCHES = {"diffusers.loaders.single_file_model": patch_single_file}
