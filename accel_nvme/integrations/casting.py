"""diffusers' layerwise casting applied to a model already streamed: its groups are rewritten in the storage dtype.

``apply_layerwise_casting`` (which ``ModelMixin.enable_layerwise_casting`` calls) and ``apply_layerwise_casting_hook``
(one layer) cast the weights of the layers they select, streamed ones included (their placeholders); once the
outermost call returns, ``recast`` stores those weights in that dtype. That matters for exactness too: a layer that is
an nvme group of its own has diffusers' hook outside ours, which casts the placeholder back to the compute dtype before
each read, so only the rewritten files round its weights as the model in RAM does.
"""

from __future__ import annotations

import contextvars
import functools
from types import ModuleType

import torch

from ..recasting import recast_containing
from .patching import patch

_CASTING: contextvars.ContextVar[bool] = contextvars.ContextVar("accel_nvme_casting", default=False)


def _recast_after(apply):
    @functools.wraps(apply)
    def apply_and_recast(module: torch.nn.Module, *args, **kwargs) -> None:
        if _CASTING.get():  # a layer of an ``apply_layerwise_casting`` in progress: recast once, at its end
            return apply(module, *args, **kwargs)
        token = _CASTING.set(True)
        try:
            apply(module, *args, **kwargs)
        finally:
            _CASTING.reset(token)
        recast_containing(module)

    return apply_and_recast


def patch_layerwise_casting(module: ModuleType) -> None:
    """Wrap both functions where diffusers defines them and where it re-exports them."""
    patch(module, "apply_layerwise_casting", _recast_after)
    patch(module, "apply_layerwise_casting_hook", _recast_after)


PATCHES = {
    "diffusers.hooks.layerwise_casting": patch_layerwise_casting,
    "diffusers.hooks": patch_layerwise_casting,
}
