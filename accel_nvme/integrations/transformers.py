"""``PreTrainedModel.from_pretrained(..., offload_backend="nvme")``: "disk" modules stream from nvme group files.

transformers keeps "disk" weights of a safetensors checkpoint where they are and hands ``dispatch_model`` an index
into the shards; the nvme tier reads them from there group by group, so RAM holds one group at a time.
"""

from __future__ import annotations

from types import ModuleType

from .kwargs import wrap_from_pretrained


def patch_from_pretrained(modeling_utils: ModuleType) -> None:
    """Wrap ``PreTrainedModel.from_pretrained`` (every Auto and model class goes through it) once."""
    wrap_from_pretrained(modeling_utils.PreTrainedModel)


PATCHES = {"transformers.modeling_utils": patch_from_pretrained}
