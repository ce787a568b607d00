"""pytest plugin for the peer tests (``scripts/peer_tests.sh``): the libraries' own offload tests on this machine.

Always: transformers' disk-offload tests are marked ``require_torch_accelerator`` only because they also fill a GPU;
on a CPU-only machine they are run with the CPU and disk budgets alone (GPU keys dropped from ``max_memory``).

With ``ACCEL_NVME_PEER_ROUTE=1``: every disk offload is routed to the nvme tier: ``"disk"`` values become ``"nvme"``
in ``dispatch_model``, ``load_checkpoint_in_model`` and ``load_checkpoint_and_dispatch`` maps, ``disk_offload``
becomes ``dispatch_model(model, {"": "nvme"})``, and ``from_pretrained`` gets ``offload_backend="nvme"``.
"""

from __future__ import annotations

import functools
import os

import accelerate
import accelerate.big_modeling
import accelerate.utils
import accelerate.utils.modeling
import torch
import transformers.modeling_utils
import transformers.testing_utils

import accel_nvme
from accel_nvme.integrations import DISPATCH_MODEL_BOUND_IN

ROUTE = os.environ.get("ACCEL_NVME_PEER_ROUTE") == "1"


def _to_nvme(device_map):
    if isinstance(device_map, dict) and "disk" in device_map.values():
        return {name: ("nvme" if device == "disk" else device) for name, device in device_map.items()}
    return device_map


def _routed_dispatch(model, device_map, *args, **kwargs):
    return accel_nvme.dispatch_model(model, _to_nvme(device_map), *args, **kwargs)


def _routed_disk_offload(model, offload_dir, execution_device=None, offload_buffers=False, preload_module_classes=None):
    if execution_device is None:
        execution_device = next(iter(model.parameters())).device
    return accel_nvme.dispatch_model(
        model,
        {"": "nvme"},
        main_device=execution_device,
        offload_dir=offload_dir,
        offload_buffers=offload_buffers,
        preload_module_classes=preload_module_classes,
    )


def _routing_device_map(function):
    @functools.wraps(function)
    def routed(model, checkpoint, device_map=None, *args, **kwargs):
        return function(model, checkpoint, _to_nvme(device_map), *args, **kwargs)

    return routed


def _wrap_from_pretrained(owner, route: bool) -> None:
    """Drop GPU budgets on a machine without one; with ``route``, ask for the nvme tier wherever a map is asked."""
    original = owner.from_pretrained.__func__

    @functools.wraps(original)
    def from_pretrained(cls, *args, **kwargs):
        if isinstance(kwargs.get("max_memory"), dict) and not torch.cuda.is_available():
            kwargs["max_memory"] = {k: v for k, v in kwargs["max_memory"].items() if not isinstance(k, int)}
        if route and kwargs.get("device_map") is not None:
            kwargs.setdefault("offload_backend", "nvme")
        return original(cls, *args, **kwargs)

    owner.from_pretrained = classmethod(from_pretrained)


def _install_routes():
    for name in DISPATCH_MODEL_BOUND_IN:
        module = __import__(name, fromlist=["dispatch_model"])
        module.dispatch_model = _routed_dispatch
    load_checkpoint_in_model = _routing_device_map(accelerate.utils.modeling.load_checkpoint_in_model)
    for module in (accelerate.utils, accelerate.utils.modeling, accelerate.big_modeling):
        module.load_checkpoint_in_model = load_checkpoint_in_model
    for module in (accelerate, accelerate.big_modeling):
        module.disk_offload = _routed_disk_offload
        module.load_checkpoint_and_dispatch = _routing_device_map(module.load_checkpoint_and_dispatch)


def pytest_configure(config):
    """Applied before any test module is imported, so the tests bind the routed functions."""
    transformers.testing_utils.require_torch_accelerator = lambda test_case: test_case
    _wrap_from_pretrained(transformers.modeling_utils.PreTrainedModel, ROUTE)
    if ROUTE:
        _install_routes()
    config.addinivalue_line("markers", "accelerate_tests: transformers' accelerate tests")


def pytest_report_header(config):
    """Say which tier the run routes disk offload to."""
    return f"accel_nvme peer run: disk offload {'routed to nvme' if ROUTE else 'left to accelerate (baseline)'}"
