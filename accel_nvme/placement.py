"""Placement policy: which device a pipeline computes on, and how a memory budget is shared among its components.

Pure functions of what they are given (the free memory is a number passed in, never read here), so the policy is
tested on any machine; ``integrations/pipelines.py`` feeds them the real numbers. ``compute_on`` tells the
``dispatch_model`` of a load where modules mapped only to ``"nvme"`` execute.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from .config import parse_size

logger = logging.getLogger(__name__)

DENOISER_PREFIXES = ("transformer", "unet", "prior", "decoder")
STREAMED_PREFIXES = (*DENOISER_PREFIXES, "text_encoder")
HOST = "cpu"

_COMPUTE_DEVICE: contextvars.ContextVar[str | None] = contextvars.ContextVar("accel_nvme_compute_device", default=None)


@contextlib.contextmanager
def compute_on(device: torch.device | str) -> Iterator[str]:
    """Within this block, a model whose ``device_map`` names no GPU still executes on ``device``.

    Kept as a string ("cuda:1", "cpu"): accelerate compares its main device with "cpu" as a string.
    """
    token = _COMPUTE_DEVICE.set(str(device))
    try:
        yield str(device)
    finally:
        _COMPUTE_DEVICE.reset(token)


def compute_device() -> str | None:
    """The device set by the enclosing ``compute_on`` block, if any."""
    return _COMPUTE_DEVICE.get()


def streamed_by_default(component: str) -> bool:
    """Whether a pipeline component is streamed when ``nvme_components`` is not given (denoisers, text encoders)."""
    return component.startswith(STREAMED_PREFIXES)


def resolve_device(
    device_map: str | int | torch.device | None, cuda_devices: int, current_cuda: int = 0, owner: str = "pipeline"
) -> torch.device:
    """The one device a pipeline computes on, from its ``device_map``; without one, CUDA when there is a device.

    ``cuda_devices`` is how many CUDA devices are visible (``torch.cuda.device_count()``); "cuda" means the current
    one. A ``device_map`` that spreads components over devices ("balanced", a dict) is refused: streamed components
    need one execution device, and the GPU budget is ``max_memory``.
    """
    if device_map is None:
        device = torch.device("cuda", current_cuda) if cuda_devices else torch.device(HOST)
        logger.info(
            "%s: no device_map, computing on %s (%s)", owner, device, "CUDA found" if cuda_devices else "no CUDA"
        )
        return device
    expected = "'cuda', 'cuda:<index>', a GPU index or 'cpu'"
    if isinstance(device_map, (dict, list, tuple)) or device_map == "balanced":
        raise ValueError(
            f"{owner}: device_map={device_map!r} with offload_backend='nvme': expected one device ({expected}); "
            "streamed components compute on one device and max_memory={0: '20GiB'} sets how much of them stays there"
        )
    try:
        device = torch.device("cuda", device_map) if isinstance(device_map, int) else torch.device(device_map)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{owner}: device_map={device_map!r} is not a device: expected {expected}") from e
    if device.type == "cuda":
        index = current_cuda if device.index is None else device.index
        if index >= cuda_devices:
            found = f"{cuda_devices} CUDA device(s)" if cuda_devices else "no CUDA device"
            raise ValueError(f"{owner}: device_map={device_map!r} asks for cuda:{index}, but this machine has {found}")
        return torch.device("cuda", index)
    if device.type != HOST:
        raise ValueError(f"{owner}: device_map={device_map!r}: expected {expected}, got a {device.type} device")
    return device


@dataclass(frozen=True)
class Budgets:
    """Bytes of weights a pipeline may keep on its compute device and in host RAM (None: not limited here)."""

    device: int | None
    host: int | None


def budget_of(
    max_memory: Mapping[int | str, int | str] | None,
    device: torch.device,
    device_resident_budget: int | str,
    resident_budget: int | str,
    free_device: int,
    free_host: int,
) -> Budgets:
    """The device and host budgets, from ``max_memory`` (diffusers' keys: GPU index, "cpu") or else the config.

    "auto" stands for half of the free memory, as in ``NvmeConfig``. The free figures are given, not measured.
    ``max_memory`` entries for other devices than ``device`` do not apply to this pipeline.
    """
    max_memory = dict(max_memory or {})
    device_key = device.index if device.type == "cuda" else None
    device_value = max_memory.get(device_key, max_memory.get(str(device)))
    if device.type != "cuda":
        device_budget = None
    elif device_value is not None:
        device_budget = _bytes(device_value, free_device)
    else:
        device_budget = _bytes(device_resident_budget, free_device) if device_resident_budget else None
    host_value = max_memory.get(HOST)
    host_budget = _bytes(host_value if host_value is not None else resident_budget, free_host)
    return Budgets(device_budget, host_budget if host_value is not None or resident_budget else None)


def _bytes(value: int | str, free: int) -> int:
    return max(0, free // 2) if value == "auto" else parse_size(value)


@dataclass(frozen=True)
class Component:
    """A pipeline component with weights: its name, its size in bytes at the load dtype, and whether it streams."""

    name: str
    nbytes: int
    streamed: bool


@dataclass(frozen=True)
class Placement:
    """Where a component goes: placed whole on ``device``, or streamed from nvme and computed on ``device``.

    A streamed component may keep up to ``device_resident`` bytes of its groups on a CUDA device and ``host_resident``
    in RAM (loaded once, never streamed); None leaves the config's own budget in force.
    """

    name: str
    device: torch.device
    streamed: bool
    nbytes: int
    device_resident: int | None = None
    host_resident: int | None = None


def priority(component: Component) -> int:
    """Order in which streamed components get budget: denoisers (run every step) before text encoders (once)."""
    return 0 if component.name.startswith(DENOISER_PREFIXES) else 1


def plan_pipeline(components: Sequence[Component], device: torch.device, budgets: Budgets) -> list[Placement]:
    """Where each component goes, in the given order.

    Non-streamed components are placed whole on ``device`` and count against its budget (against the host budget
    when ``device`` is the CPU). What is left goes to the streamed components, denoisers first: each may use all that
    is left (its groups within it stay resident, the rest streams) and leaves the next what its weights did not take.
    The group files' alignment padding (at most a few KiB per group) is not counted.
    """
    on_host = device.type != "cuda"
    placed = sum(c.nbytes for c in components if not c.streamed)
    left_device = None if budgets.device is None else budgets.device - (0 if on_host else placed)
    left_host = None if budgets.host is None else budgets.host - (placed if on_host else 0)
    for budget, where in ((left_device, str(device)), (left_host, HOST)):
        if budget is not None and budget < 0:
            logger.warning(
                "the components placed whole (%s) take %.3g GB, more than the %s budget; none of the streamed "
                "ones stays resident there",
                ", ".join(c.name for c in components if not c.streamed),
                placed / 1e9,
                where,
            )
    shares: dict[str, tuple[int | None, int | None]] = {}
    for component in sorted((c for c in components if c.streamed), key=priority):
        rest = component.nbytes
        device_share = host_share = None
        if left_device is not None:
            device_share = max(0, left_device)
            rest -= min(device_share, rest)
            left_device -= component.nbytes - rest
        if left_host is not None:
            host_share = max(0, left_host) if rest else 0
            left_host -= min(host_share, rest)
        shares[component.name] = (device_share, host_share)
    return [Placement(c.name, device, c.streamed, c.nbytes, *shares.get(c.name, (None, None))) for c in components]


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a pipeline needs on its compute device and in host RAM, computed from sizes (not measured)."""

    device: int
    host: int


def estimate_memory(
    placements: Sequence[Placement], largest_group: Mapping[str, int], prefetch_depth: int
) -> MemoryEstimate:
    """Weights a placement keeps in memory: whole components, resident groups, and the streaming buffers.

    Each streamed component has ``prefetch_depth + 1`` pinned staging buffers of its largest group in RAM and, on
    CUDA, up to as many device copies in flight (none when all of it is resident on the device). Activations, the
    CUDA context and the allocator's cache come on top.
    """
    device_bytes = host_bytes = 0
    for p in placements:
        cuda = p.device.type == "cuda"
        if not p.streamed:
            if cuda:
                device_bytes += p.nbytes
            else:
                host_bytes += p.nbytes
            continue
        buffers = (prefetch_depth + 1) * largest_group.get(p.name, 0)
        on_device = min(p.device_resident or 0, p.nbytes) if cuda else 0
        host_bytes += buffers + min(p.host_resident or 0, p.nbytes - on_device)
        if cuda:
            device_bytes += on_device + (buffers if on_device < p.nbytes else 0)
    return MemoryEstimate(device_bytes, host_bytes)
