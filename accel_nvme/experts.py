"""Fused MoE experts read one expert at a time: a decode token reads only the experts it is routed to.

transformers 5 fuses a layer's experts into one module (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) whose
``forward(hidden_states, top_k_index, top_k_weights)`` runs only the experts in ``top_k_index``. Such a module gets a
group file of its own, each fused tensor starting on a 4096-byte boundary with a digest per expert, and an
``ExpertsHook`` instead of a place in the group stream: before the module runs, the hook reads the rows of the routed
experts (one O_DIRECT request per expert and tensor, all in flight at once) into a buffer of the module's full shape,
which its tensors view (on CUDA: a device copy of the routed rows, ``expert_transfer.py``). Rows of experts not routed
are never read (they hold zeros) and never used. An LRU cache (``NvmeConfig.expert_cache_bytes``) keeps the rows of
recently used experts; a forward routing more than ``FULL_READ_SHARE`` of the experts (a prefill) reads every row not
cached, in one sequential pass per tensor.

At batch 1 a decode token often runs the experts the previous token ran in the same layer. So when a module's hook
has its rows, it starts reading, for the next ``SPECULATE_AHEAD`` experts modules, the rows of the experts their
previous one-token forward routed to that are not cached: those reads overlap this module's compute and the next
attention. The next module's hook keeps the rows routing confirms and gives back the others, counted in
``expert_bytes_unused``.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from accelerate.hooks import ModelHook

from .expert_modules import expert_starts, is_expert_list, stream_expert_list
from .expert_rows import FULL_READ_SHARE, Check, Expert, ExpertCache, ExpertRows, attach_with_abort
from .expert_transfer import HostTensor, expert_placement
from .prefetch import Prefetcher
from .store import GroupPlan, Manifest, StoredWeights

if TYPE_CHECKING:
    from .planning import DispatchPlan

logger = logging.getLogger(__name__)

SPECULATE_AHEAD = 2  # experts modules whose previous token's experts are read ahead once a module has its rows


def is_fused_experts(module: torch.nn.Module) -> bool:
    """A fused experts module: ``forward`` takes ``top_k_index``, and it holds only parameters of its own whose first
    dimension is its ``num_experts``."""
    experts = getattr(module, "num_experts", None)
    if not isinstance(experts, int) or experts < 1:
        return False
    if "top_k_index" not in inspect.signature(type(module).forward).parameters:
        return False
    own = dict(module.named_parameters(recurse=False))
    everything = [*module.named_parameters(), *module.named_buffers()]
    return (
        bool(own) and len(everything) == len(own) and all(t.dim() >= 1 and t.shape[0] == experts for t in own.values())
    )


def is_experts(name: str, module: torch.nn.Module) -> bool:
    """A module read one expert at a time: fused experts, or a list of expert modules (``expert_modules.py``)."""
    return is_fused_experts(module) or is_expert_list(name, module)


def split_experts(entries: list[tuple[str, torch.nn.Module]]) -> tuple[list[tuple[str, torch.nn.Module]], set[str]]:
    """``entries`` with every experts module inside one (fused, or a list of experts) made an entry of its own, right
    after it; and the names of the experts entries."""
    split: list[tuple[str, torch.nn.Module]] = []
    experts: set[str] = set()
    for name, module in entries:
        split.append((name, module))
        if is_experts(name, module):
            experts.add(name)
            continue
        for inner, submodule in module.named_modules(prefix=name):
            if submodule is not module and is_experts(inner, submodule):
                split.append((inner, submodule))
                experts.add(inner)
    return split, experts


def mark_experts(entries: list[tuple[str, torch.nn.Module]], plans: list[GroupPlan], experts: set[str]) -> None:
    """Mark the plans of experts entries: fused tensors are stored page-aligned with a digest per expert; a list's
    experts each from a page boundary."""
    for (name, module), plan in zip(entries, plans, strict=True):
        if name not in experts:
            continue
        shared = sorted(member for member, canonical in plan.members.items() if member != canonical)
        if shared or set(plan.members) != set(plan.tensors):
            raise ValueError(
                f"experts {name!r}: {shared or sorted(set(plan.members) - set(plan.tensors))} are tied to "
                "tensors of other modules; per-expert streaming needs the experts' own tensors. Map this block to "
                "'cpu' or untie the weights"
            )
        if is_fused_experts(module):
            plan.experts = tuple(sorted(plan.tensors))
        else:
            plan.expert_starts = expert_starts(name, plan)


@dataclass(frozen=True)
class ExpertTensor:
    """One fused tensor of an experts group file: its attribute, where it sits in the data section, its rows."""

    attr: str
    start: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    digests: tuple[str, ...]

    @property
    def row_bytes(self) -> int:
        """Bytes of one expert's rows."""
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    def rows(self, expert: int) -> tuple[int, int]:
        """The byte range of ``expert``'s rows in the data section."""
        return self.start + expert * self.row_bytes, self.start + (expert + 1) * self.row_bytes


def fused_experts(tensors: tuple[ExpertTensor, ...]) -> list[Expert]:
    """Each expert of fused ``tensors``: its rows of each, checked against the row digests."""
    return [
        Expert(
            tuple(t.rows(e) for t in tensors),
            tuple(Check(*t.rows(e), t.digests[e], f"expert {e} of {t.attr!r}") for t in tensors),
        )
        for e in range(tensors[0].shape[0])
    ]


class ExpertsHook(ModelHook):
    """Before a fused experts module runs, reads the rows of the experts ``top_k_index`` routes to (those not cached)
    into its buffer and puts its tensors into the module (``expert_transfer.py``); after, puts meta tensors back."""

    def __init__(self, rows: ExpertRows, tensors: tuple[ExpertTensor, ...], prefix: str, weights: StoredWeights):
        self.rows = rows
        self.prefetcher = rows.prefetcher
        self.group = rows.group
        self.tensors = tensors
        self.weights_map = weights
        self.num_experts = tensors[0].shape[0]
        self.placement = expert_placement(
            [HostTensor(t.attr, t.start, t.dtype, t.shape) for t in tensors], self.prefetcher
        )
        self.execution_device = self.placement.device
        self.members = {t.attr: prefix + t.attr for t in tensors}  # local name -> stored name, as the block hook
        self._routing: inspect.Signature | None = None

    def __repr__(self) -> str:
        return f"ExpertsHook(group={self.group.name!r}, experts={self.num_experts})"

    def init_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        """Leave meta tensors in the module; the routing argument is found by ``forward``'s signature."""
        self.prefetcher.attach()
        self._routing = inspect.signature(type(module).forward)
        self.placement.leave_meta(module)
        return module

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        """Read the routed experts' rows (unless cached) and put the module's tensors in place."""
        index = self._routing.bind(module, *args, **kwargs).arguments["top_k_index"]
        routed = sorted({int(e) for e in index.reshape(-1).tolist() if 0 <= e < self.num_experts})
        wanted = list(range(self.num_experts)) if len(routed) > FULL_READ_SHARE * self.num_experts else routed
        self.rows.begin()
        self.rows.load(wanted, routed)
        self.rows.finish()
        self.rows.candidates = routed if index.dim() and index.numel() == index.shape[-1] else []  # one token
        self.rows.read_ahead()
        spans = [span for e in routed for span in self.rows.experts[e].spans]  # a prefill's others: read, not placed
        self.placement.put(self.rows.buffer.tensor, spans)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output):
        """Put the meta tensors back and keep the rows used in the cache (within its budget)."""
        self.put_back(module)
        self.rows.keep()
        return output

    def put_back(self, module: torch.nn.Module) -> None:
        """The module holds meta tensors again (a device copy of its rows is freed)."""
        self.placement.put_back()

    def abort(self, module: torch.nn.Module) -> None:
        """The forward raised: meta tensors back, and the rows it read that the cache does not hold are forgotten."""
        self.put_back(module)
        self.rows.abort()

    def detach_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        """Load the stored tensors back into RAM (as accelerate does on removal) and let the prefetcher close."""
        self.placement.load_back(self.weights_map)
        self.rows.close()
        self.prefetcher.detach()
        return module


def stream_experts(
    model: torch.nn.Module,
    plan: DispatchPlan,
    manifest: Manifest,
    prefetcher: Prefetcher,
    cache_bytes: int,
    verify_every_read: bool,
) -> None:
    """Hook each experts entry of ``plan`` (fused: an ``ExpertsHook``; a list: ``expert_modules.py``), all sharing one
    cache of ``cache_bytes``; each reads ahead for the next ``SPECULATE_AHEAD``."""
    cache, every_rows = ExpertCache(cache_bytes), []
    for (name, module), group in zip(plan.entries, plan.group_of_entry, strict=True):
        if name not in plan.experts:
            continue
        stored, prefix = manifest.groups[group], f"{name}."
        if not is_fused_experts(module):
            every_rows.append(
                stream_expert_list(model, name, module, stored, manifest, prefetcher, cache, verify_every_read)
            )
            continue
        tensors = tuple(
            ExpertTensor(e.name[len(prefix) :], e.start, e.dtype, e.shape, tuple(stored.row_digests[e.name]))
            for e in stored.entries
        )
        every_rows.append(ExpertRows(prefetcher, stored, fused_experts(tensors), cache, verify_every_read))
        attach_with_abort(module, ExpertsHook(every_rows[-1], tensors, prefix, StoredWeights(manifest, prefix)))
    count = len(every_rows)
    for i, rows in enumerate(
        every_rows
    ):  # in the order they run; the last one reads ahead for the next forward's first
        rows.ahead = [every_rows[(i + step) % count] for step in range(1, min(SPECULATE_AHEAD, count - 1) + 1)]
