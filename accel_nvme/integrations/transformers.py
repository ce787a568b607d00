"""``PreTrainedModel.from_pretrained(..., offload_backend="nvme")``: "disk" modules stream from nvme group files.

transformers keeps "disk" weights of a safetensors checkpoint where they are and hands ``dispatch_model`` an index
into the shards; the nvme tier reads them from there group by group, so RAM holds one group at a time.
"""

from __future__ import annotations

import functools
from types import ModuleType

from ..dispatch import NvmeLoading, disk_as_nvme
from .kwargs import pop_nvme_config


def patch_from_pretrained(modeling_utils: ModuleType) -> None:
    """Wrap ``PreTrainedModel.from_pretrained`` (every Auto and model class goes through it) once."""
    pretrained = modeling_utils.PreTrainedModel
    original = pretrained.from_pretrained.__func__
    if getattr(original, "_accel_nvme", False):
        return

    @functools.wraps(original)
    def from_pretrained(cls, *args, **kwargs):
        config = pop_nvme_config(kwargs, f"{cls.__name__}.from_pretrained")
        if config is None:
            return original(cls, *args, **kwargs)
        with disk_as_nvme(NvmeLoading(config)):
            return original(cls, *args, **kwargs)

    from_pretrained._accel_nvme = True
    pretrained.from_pretrained = classmethod(from_pretrained)


PATCHES = {"transformers.modeling_utils": patch_from_pretrained}
