"""``PreTrainedModel.from_pretrained(..., offload_backend="nvme")``: "disk" modules stream from nvme group files.

transformers keeps "disk" weights of a safetensors checkpoint where they are and hands ``dispatch_model`` an index
into the shards; the nvme tier reads them from there group by group, so RAM holds one group at a time. A streamed
model reports the device it computes on (``model.device``), and ``transformers.pipeline(...)`` accepts it.
"""

from __future__ import annotations

import functools
from types import ModuleType

from ..devicemap import StreamedTier
from .devices import compute_device_first
from .kwargs import wrap_from_pretrained
from .patching import patch


def patch_from_pretrained(modeling_utils: ModuleType) -> None:
    """Wrap ``PreTrainedModel.from_pretrained`` (every Auto and model class goes through it) once, and ``device``."""
    wrap_from_pretrained(modeling_utils.PreTrainedModel)
    patch(modeling_utils.ModuleUtilsMixin, "device", compute_device_first)


def patch_pipeline(pipelines_base: ModuleType) -> None:
    """Wrap ``Pipeline.__init__``, which takes the first ``hf_device_map`` value as the device."""
    patch(pipelines_base.Pipeline, "__init__", _on_compute_device)


def _on_compute_device(init):
    """``Pipeline.__init__`` for a model whose map starts with a streamed module: the pipeline's device is the one the
    model computes on (``torch.device("disk")`` would raise), and the model is not moved."""

    @functools.wraps(init)
    def init_on_compute_device(self, model, *args, **kwargs):
        device_map = getattr(model, "hf_device_map", None)
        first = next(iter(device_map.values()), None) if isinstance(device_map, dict) else None
        if not isinstance(first, StreamedTier) or kwargs.get("device") is not None:
            return init(self, model, *args, **kwargs)
        kwargs.pop("device", None)
        del model.hf_device_map  # Pipeline refuses a device beside a map; without one it moves only a model elsewhere
        try:
            return init(self, model, *args, device=model.device, **kwargs)
        finally:
            model.hf_device_map = device_map

    return init_on_compute_device


PATCHES = {"transformers.modeling_utils": patch_from_pretrained, "transformers.pipelines.base": patch_pipeline}
