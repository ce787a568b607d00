"""The ``from_pretrained`` keyword arguments of the nvme tier, shared by the transformers and diffusers patches."""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any

from ..config import FIELDS, NvmeConfig, load_config
from ..devicemap import DISK, NVME, has_nvme, refuse_mixed, to_accelerate
from ..loading import NvmeLoading, disk_as_nvme
from .patching import patch

BACKENDS = (None, DISK, NVME)
OPTION_PREFIX = "nvme_"


def pop_nvme_config(kwargs: dict[str, Any], owner: str) -> NvmeConfig | None:
    """Pop ``offload_backend``, ``nvme_config`` and ``nvme_*`` options from ``kwargs``; the config when nvme is on.

    An ``nvme_config`` is taken as given (``nvme_*`` kwargs still win); without one, the environment and the config
    file apply over the defaults, as in ``load_config``.

    An explicit dict ``device_map`` with ``"nvme"`` values turns the tier on too; its values are rewritten to
    ``"disk"`` so the library loads those weights lazily, as it does for disk offload.
    """
    backend = kwargs.pop("offload_backend", None)
    base = kwargs.pop("nvme_config", None)
    options = {key[len(OPTION_PREFIX) :]: kwargs.pop(key) for key in list(kwargs) if key.startswith(OPTION_PREFIX)}
    if backend not in BACKENDS:
        raise ValueError(f"{owner}: offload_backend must be one of {BACKENDS}, got {backend!r}")
    if NVME in (kwargs.get("max_memory") or {}):
        raise ValueError(
            f"{owner}: max_memory has no 'nvme' budget: the nvme tier holds what does not fit the GPU/CPU budgets "
            "and costs disk space, not memory (its RAM use is (prefetch_depth + 1) staging buffers); drop the key"
        )
    device_map = kwargs.get("device_map")
    explicit = has_nvme(device_map)
    if backend != NVME and not explicit:
        if options or base is not None:
            raise ValueError(f"{owner}: nvme options {sorted(options) or ['nvme_config']} need offload_backend='nvme'")
        return None
    if explicit:
        refuse_mixed(device_map, owner)
        kwargs["device_map"] = to_accelerate(device_map)
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise TypeError(f"{owner}: unknown nvme options {[OPTION_PREFIX + k for k in unknown]}")
    if base is not None:
        config = replace(base.with_offload_dir(kwargs.get("offload_folder")), **options)
    else:
        config = load_config(offload_dir=kwargs.get("offload_folder"), **options)
    if config.offload_dir is None:
        raise ValueError(
            f"{owner}: offload_backend='nvme' needs a folder: pass offload_folder=..., set ACCEL_NVME_OFFLOAD_FOLDER, "
            "or run `accel-nvme config --offload-folder DIR`"
        )
    kwargs["offload_folder"] = str(config.offload_dir)
    return config


def wrap_from_pretrained(
    owner: type, scope: Callable[[dict[str, Any]], AbstractContextManager[Any]] = lambda kwargs: nullcontext()
) -> None:
    """Replace ``owner.from_pretrained`` (once) by one that takes the nvme kwargs and, when the tier is on, loads
    under ``disk_as_nvme`` and ``scope(kwargs)``, which may adjust the library's own kwargs."""

    def wrap(original_method: classmethod) -> classmethod:
        original = original_method.__func__

        @functools.wraps(original)
        def from_pretrained(cls, *args, **kwargs):
            config = pop_nvme_config(kwargs, f"{cls.__name__}.from_pretrained")
            if config is None:
                return original(cls, *args, **kwargs)
            with scope(kwargs), disk_as_nvme(NvmeLoading(config)):
                return original(cls, *args, **kwargs)

        return classmethod(from_pretrained)

    patch(owner, "from_pretrained", wrap)
