"""diffusers pipelines: ``DiffusionPipeline.from_pretrained(..., offload_backend="nvme")`` and ``pipe.to(...)``.

The pipeline computes on one device: ``device_map`` names it ("cuda", "cuda:1", a GPU index, "cpu"), or, without
one, the current CUDA device when there is one, else the CPU. The large components (denoiser, text encoders;
``nvme_components=[...]`` chooses) are loaded with every module on the nvme tier and execute on that device; the
others (VAE, small encoders) are loaded by diffusers as usual and moved there. ``max_memory`` (diffusers' keys: a GPU
index, "cpu") or ``nvme_device_resident_budget`` / ``nvme_resident_budget`` is shared among the streamed components,
denoisers first, as groups kept resident instead of streamed (``placement.plan_pipeline``).

``pipe.device`` and ``pipe._execution_device`` give the device the streamed components compute on (diffusers would
read the first component's parameters: meta, for a streamed one), and diffusers' own offloading is refused.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import torch

from ..config import NvmeConfig
from ..hooks import NvmeAlignDevicesHook
from ..placement import (
    Component,
    Placement,
    budget_of,
    compute_on,
    plan_pipeline,
    resolve_device,
    streamed_by_default,
)
from .devices import execution_device_of
from .kwargs import pop_nvme_config
from .patching import patch

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_ITEMSIZE = {**_FLOAT_DTYPES, "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2}
_ITEMSIZE.update({"I32": 4, "U32": 4, "I64": 8, "U64": 8})


OFFLOAD_METHODS = ("enable_model_cpu_offload", "enable_sequential_cpu_offload", "enable_group_offload")


def patch_pipeline_loading(pipeline_utils: ModuleType) -> None:
    """Wrap ``DiffusionPipeline.from_pretrained`` (streamed components loaded on the nvme tier), ``to``, ``device``
    and ``_execution_device`` (the device the streamed components compute on), and diffusers' own offloading."""
    pipeline_class = pipeline_utils.DiffusionPipeline
    patch(pipeline_class, "from_pretrained", _from_pretrained_with_nvme)
    patch(pipeline_class, "to", _to_with_streamed_components)
    for name in ("device", "_execution_device"):
        patch(pipeline_class, name, _compute_device_first)
    for name in OFFLOAD_METHODS:
        patch(pipeline_class, name, _refused_with_streamed_components)


def _from_pretrained_with_nvme(original_method: classmethod) -> classmethod:
    """``DiffusionPipeline.from_pretrained``, which loads the streamed components on the nvme tier first."""
    original = original_method.__func__

    @functools.wraps(original)
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        owner = f"{cls.__name__}.from_pretrained"
        components = kwargs.pop("nvme_components", None)
        config = pop_nvme_config(kwargs, owner)
        if config is None:
            if components is not None:
                raise ValueError(f"{owner}: nvme_components needs offload_backend='nvme'")
            return original(cls, pretrained_model_name_or_path, **kwargs)
        folder = pretrained_model_name_or_path
        if not os.path.isdir(folder):
            folder = cls.download(pretrained_model_name_or_path)
        device = resolve_device(kwargs.pop("device_map", None), _cuda_devices(), _current_cuda(), owner)
        placements = _plan(folder, components, device, config, kwargs.pop("max_memory", None), kwargs)
        streamed = {p.name for p in placements if p.streamed}
        with compute_on(device):
            for p in placements:
                if p.streamed and p.name not in kwargs:
                    kwargs[p.name] = _load_streamed(folder, p, _component_config(config, p), kwargs)
        kwargs.pop("offload_folder", None)
        loaded = {name: kwargs[name] for name in streamed}
        pipe = original(_concrete_class(cls, folder, kwargs), pretrained_model_name_or_path, **kwargs)
        _check_streamed_kept(pipe, loaded)
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module) and name not in streamed:
                component.to(device)
        pipe.hf_device_map = str(device)  # as diffusers records device_map="cuda": a device, not a split
        return pipe

    return classmethod(from_pretrained)


def _check_streamed_kept(pipe: Any, loaded: dict[str, torch.nn.Module]) -> None:
    """Each component loaded on the nvme tier is the object the pipeline holds; diffusers may have loaded another."""
    for name, component in loaded.items():
        held = getattr(pipe, name, None)
        if held is not component:
            raise RuntimeError(
                f"{type(pipe).__name__}.from_pretrained: {name!r} was loaded to stream from nvme, but the pipeline "
                f"holds another {type(held).__name__} (diffusers loaded it again, whole, in RAM); pass "
                f"nvme_components=[...] without {name!r} to keep it in RAM knowingly"
            )


def _concrete_class(cls: type, folder, kwargs: dict[str, Any]) -> type:
    """The pipeline class ``model_index.json`` names, when ``cls`` is a base of it (the generic
    ``DiffusionPipeline``): diffusers looks optional components up on ``cls``, and on the base class it would load an
    optional component again in place of the streamed one passed in (Wan's ``transformer``)."""
    if kwargs.get("custom_pipeline") is not None:
        return cls
    with open(os.path.join(folder, "model_index.json")) as f:
        name = json.load(f).get("_class_name")
    found = getattr(importlib.import_module("diffusers"), name, None) if isinstance(name, str) else None
    return found if isinstance(found, type) and issubclass(found, cls) else cls


def _cuda_devices() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _current_cuda() -> int:
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def _plan(folder, chosen, device: torch.device, config: NvmeConfig, max_memory, kwargs) -> list[Placement]:
    """Which components stream, their sizes at the load dtype, and each one's share of the budgets."""
    index = _model_index(folder)
    streamed = {name for name, _ in _streamed_components(folder, index, chosen)}
    variant = kwargs.get("variant")
    components = [
        Component(name, _checkpoint_bytes(Path(folder, name), _dtype_of(name, kwargs), variant), name in streamed)
        for name in index
        if name in streamed or _has_weights(Path(folder, name))
    ]
    free_device = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    budgets = budget_of(
        max_memory,
        device,
        config.device_resident_budget,
        config.resident_budget,
        free_device,
        psutil.virtual_memory().available,
    )
    placements = plan_pipeline(components, device, budgets)
    for p in placements:
        if p.streamed:
            logger.info(
                "%s: %.3g GB streamed from nvme, computed on %s (resident: %s on the device, %s in RAM)",
                p.name,
                p.nbytes / 1e9,
                device,
                _gb(p.device_resident),
                _gb(p.host_resident),
            )
        else:
            logger.info("%s: %.3g GB placed on %s", p.name, p.nbytes / 1e9, device)
    return placements


def _gb(value: int | None) -> str:
    return "as configured" if value is None else f"{value / 1e9:.3g} GB"


def _component_config(config: NvmeConfig, placement: Placement) -> NvmeConfig:
    """The config with this component's share of the budgets (None: the config's own value stays)."""
    shares = {"device_resident_budget": placement.device_resident, "resident_budget": placement.host_resident}
    return replace(config, **{key: value for key, value in shares.items() if value is not None})


def _model_index(folder) -> dict[str, tuple[str, str]]:
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    return {
        name: tuple(spec)
        for name, spec in index.items()
        if not name.startswith("_") and isinstance(spec, list) and len(spec) == 2 and spec[0] is not None
    }


def _streamed_components(folder, available, chosen) -> list[tuple[str, tuple[str, str]]]:
    if chosen is None:
        return [(name, spec) for name, spec in available.items() if streamed_by_default(name)]
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise ValueError(
            f"{folder}: nvme_components {unknown} are not components of this pipeline ({sorted(available)})"
        )
    return [(name, available[name]) for name in chosen]


def _weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The safetensors files of a component: those of ``variant``, or those without a variant in their name."""
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if variant:
        return [f for f in files if f".{variant}." in f.name]
    return [f for f in files if "." not in f.name.removesuffix(".safetensors")]


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and (any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")))


def _checkpoint_bytes(folder: Path, dtype: torch.dtype | None, variant: str | None = None) -> int:
    """Bytes of a component's weights once loaded: floating tensors at ``dtype`` (when given), others as stored."""
    from safetensors import safe_open

    total = 0
    for path in _weight_files(folder, variant):
        with safe_open(path, "pt") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open is not iterable)
                tensor = f.get_slice(key)
                stored = tensor.get_dtype()
                itemsize = dtype.itemsize if dtype is not None and stored in _FLOAT_DTYPES else _ITEMSIZE.get(stored, 4)
                numel = 1
                for n in tensor.get_shape():
                    numel *= n
                total += numel * itemsize
    return total


def _dtype_of(name: str, kwargs: dict[str, Any]) -> torch.dtype | None:
    """The dtype a component is loaded at: ``torch_dtype``/``dtype``, or its entry in a per-component dict."""
    dtype = kwargs.get("torch_dtype", kwargs.get("dtype"))
    if isinstance(dtype, dict):
        return dtype.get(name, dtype.get("default"))
    return dtype


def _load_streamed(folder, placement: Placement, config: NvmeConfig, kwargs: dict[str, Any]):
    library, class_name = _model_index(folder)[placement.name]
    component_class = getattr(importlib.import_module(library), class_name)
    load_kwargs = {}
    dtype = _dtype_of(placement.name, kwargs)
    if dtype is not None:
        load_kwargs["dtype" if "dtype" in kwargs else "torch_dtype"] = dtype
    return component_class.from_pretrained(
        os.path.join(folder, placement.name),
        device_map={"": "nvme"},
        offload_folder=str(config.offload_dir),
        nvme_config=config,
        **load_kwargs,
    )


def streamed_components(pipe: Any) -> dict[str, torch.device]:
    """The components of ``pipe`` that stream from nvme, each with the device it computes on."""
    found = {}
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        hook = next(
            (m._hf_hook for m in component.modules() if isinstance(getattr(m, "_hf_hook", None), NvmeAlignDevicesHook)),
            None,
        )
        if hook is not None:
            found[name] = torch.device(hook.execution_device)
    return found


def _streamed_device(pipe: Any) -> torch.device | None:
    """The device the nvme components of ``pipe`` compute on (one for all: ``from_pretrained`` and ``to`` see to it)."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module) and hasattr(component, "nvme_device_map"):
            device = execution_device_of(component)
            if device is not None:
                return device
    return None


def _compute_device_first(prop: property) -> property:
    """``DiffusionPipeline.device`` / ``_execution_device``: where the streamed components compute, when there are
    some. diffusers reads the first component's parameters, and a streamed component's are on meta between forwards:
    latents and prompt embeddings would be made on meta."""

    @functools.wraps(prop.fget)
    def compute_device(self) -> torch.device:
        device = _streamed_device(self)
        return prop.fget(self) if device is None else device

    return property(compute_device, doc=prop.__doc__)


def _refused_with_streamed_components(method):
    """diffusers' own offloading (model, sequential, group) on a pipeline with nvme components: refused, with why."""

    @functools.wraps(method)
    def refuse_if_streamed(self, *args, **kwargs):
        streamed = streamed_components(self)
        if not streamed:
            return method(self, *args, **kwargs)
        names = ", ".join(f"{name} (on {where})" for name, where in streamed.items())
        raise ValueError(
            f"{type(self).__name__}.{method.__name__}(): {names} already stream from nvme (their weights stay on disk "
            "between forwards) and the other components sit on that device; diffusers' offloading would load the "
            "streamed ones whole into RAM. Keep the nvme tier, or load with nvme_components=[] (or without "
            f"offload_backend='nvme') to use {method.__name__} instead"
        )

    return refuse_if_streamed


def _to_arguments(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.device | None, torch.dtype | None]:
    dtype = kwargs.get("dtype")
    device = kwargs.get("device")
    for arg in args:
        if isinstance(arg, torch.dtype):
            dtype = arg
        elif arg is not None:
            device = arg
    return (None if device is None else torch.device(device)), dtype


def _resolved(device: torch.device, current: Callable[[], int] | None = None) -> torch.device:
    """``device`` with the index a bare ``"cuda"`` stands for: the current CUDA device (``current()``)."""
    if device.type != "cuda" or device.index is not None:
        return device
    if current is None:
        if not torch.cuda.is_available():
            return device
        current = torch.cuda.current_device
    return torch.device("cuda", current())


def _same_device(asked: torch.device, actual: torch.device) -> bool:
    """Whether ``asked`` (resolved: a bare ``"cuda"`` is the current device) is the device ``actual`` computes on."""
    if asked.type != actual.type:
        return False
    return asked.type != "cuda" or asked.index == actual.index


def _to_with_streamed_components(to):
    """``DiffusionPipeline.to``, which on a pipeline with nvme components moves only the others, or says why not."""

    @functools.wraps(to)
    def to_device(self, *args, **kwargs):
        streamed = streamed_components(self)
        if not streamed:
            return to(self, *args, **kwargs)
        device, dtype = _to_arguments(args, kwargs)
        names = ", ".join(f"{name} (on {where})" for name, where in streamed.items())
        if dtype is not None:
            raise ValueError(
                f"{type(self).__name__}.to({dtype}): {names} stream from nvme at the dtype they were loaded with; "
                "pass torch_dtype=... to from_pretrained instead"
            )
        if device is None:
            return self
        device = _resolved(device)
        wrong = [name for name, where in streamed.items() if not _same_device(device, where)]
        if wrong:
            raise ValueError(
                f"{type(self).__name__}.to({str(device)!r}): {names} stream from nvme and compute on the device "
                f"chosen when loading; pass device_map={str(device)!r} to DiffusionPipeline.from_pretrained instead"
            )
        for name, component in self.components.items():
            if isinstance(component, torch.nn.Module) and name not in streamed:
                component.to(device)
        return self

    return to_device
