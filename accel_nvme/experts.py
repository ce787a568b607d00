"""Fused MoE experts read one expert at a time: a decode token reads only the experts it is routed to.

transformers 5 fuses a layer's experts into one module (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) whose
``forward(hidden_states, top_k_index, top_k_weights)`` runs only the experts in ``top_k_index``. Such a module gets a
group file of its own, each fused tensor starting on a 4096-byte boundary with a digest per expert, and an
``ExpertsHook`` instead of a place in the group stream: before the module runs, the hook reads the rows of the routed
experts (one O_DIRECT request per expert and tensor, all in flight at once) into a buffer of the module's full shape,
which its tensors view. Rows of experts not routed are never read (they hold zeros) and never used. An LRU cache
(``NvmeConfig.expert_cache_bytes``) keeps the rows of recently used experts; a forward routing more than
``FULL_READ_SHARE`` of the experts (a prefill) reads every row not cached, in one sequential pass per tensor.

At batch 1 a decode token often runs the experts the previous token ran in the same layer. So when a module's hook
has its rows, it starts reading, for the next ``SPECULATE_AHEAD`` experts modules, the rows of the experts their
previous one-token forward routed to that are not cached: those reads overlap this module's compute and the next
attention. The next module's hook keeps the rows routing confirms and gives back the others, counted in
``expert_bytes_unused``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import mmap
import os
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from accelerate.utils import set_module_tensor_to_device

from .format import ALIGNMENT, GroupFileError, align_up, digest
from .io import Segment
from .prefetch import Prefetcher
from .store import GroupPlan, Manifest, StoredGroup, StoredWeights

if TYPE_CHECKING:
    from .planning import DispatchPlan

logger = logging.getLogger(__name__)

FULL_READ_SHARE = 0.5  # above this share of experts routed in one forward, every row is read in one pass
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


def split_experts(entries: list[tuple[str, torch.nn.Module]]) -> tuple[list[tuple[str, torch.nn.Module]], set[str]]:
    """``entries`` with every fused experts module inside one made an entry of its own, right after it; and the names
    of the experts entries."""
    split: list[tuple[str, torch.nn.Module]] = []
    experts: set[str] = set()
    for name, module in entries:
        split.append((name, module))
        if is_fused_experts(module):
            experts.add(name)
            continue
        for inner, submodule in module.named_modules(prefix=name):
            if submodule is not module and is_fused_experts(submodule):
                split.append((inner, submodule))
                experts.add(inner)
    return split, experts


def mark_experts(names: list[str], plans: list[GroupPlan], experts: set[str]) -> None:
    """Mark the plans of experts entries: their tensors are stored page-aligned, with a digest per expert."""
    for name, plan in zip(names, plans, strict=True):
        if name not in experts:
            continue
        shared = sorted(member for member, canonical in plan.members.items() if member != canonical)
        if shared or set(plan.members) != set(plan.tensors):
            raise ValueError(
                f"fused experts {name!r}: {shared or sorted(set(plan.members) - set(plan.tensors))} are tied to "
                "tensors of other modules; per-expert streaming needs the experts' own tensors. Map this block to "
                "'cpu' or untie the weights"
            )
        plan.experts = tuple(sorted(plan.tensors))


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


class ExpertBuffer:
    """Page-aligned anonymous memory mirroring an experts file's data section; pages never read hold zeros."""

    def __init__(self, nbytes: int):
        self.nbytes = max(ALIGNMENT, align_up(nbytes))
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)  # mostly never touched
        self._mmap = mmap.mmap(-1, self.nbytes, flags=flags)
        self.view = memoryview(self._mmap)
        self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8)

    def forget(self, start: int, end: int) -> None:
        """Give back the pages wholly inside ``[start, end)``: they read as zeros again, and take no RAM."""
        first, last = align_up(start), end - end % ALIGNMENT
        if last > first:
            self._mmap.madvise(mmap.MADV_DONTNEED, first, last - first)


class ExpertCache:
    """The experts whose rows stay in their buffers after a forward, least recently used first, within ``budget``."""

    def __init__(self, budget: int):
        self.budget = budget
        self.nbytes = 0
        self._lru: OrderedDict[tuple[ExpertsHook, int], int] = OrderedDict()

    def holds(self, hook: ExpertsHook, expert: int) -> bool:
        """Whether ``expert``'s rows of ``hook``'s module are in its buffer now."""
        return (hook, expert) in self._lru

    def keep(self, hook: ExpertsHook, experts: list[int]) -> None:
        """``experts`` of ``hook`` were used just now; then forget the least recently used beyond the budget."""
        for expert in experts:
            key = (hook, expert)
            if key in self._lru:
                self._lru.move_to_end(key)
            else:
                self._lru[key] = hook.expert_bytes
                self.nbytes += hook.expert_bytes
        while self.nbytes > self.budget:
            (owner, expert), nbytes = self._lru.popitem(last=False)
            owner.evicted(expert)
            self.nbytes -= nbytes

    def drop(self, hook: ExpertsHook) -> None:
        """Forget every expert of ``hook`` (its module is closed)."""
        for key in [key for key in self._lru if key[0] is hook]:
            self.nbytes -= self._lru.pop(key)


@dataclass
class Speculation:
    """Rows read ahead into a module's buffer: the experts, their reads in flight, and the bytes of each expert."""

    experts: list[int] = field(default_factory=list)
    futures: list[Future] = field(default_factory=list)
    nbytes: dict[int, int] = field(default_factory=dict)
    pid: int = field(default_factory=os.getpid)  # the process whose reader threads run the reads


class ExpertsHook(ModelHook):
    """Before a fused experts module runs, reads the rows of the experts ``top_k_index`` routes to (those not cached)
    into its buffer and puts views of it into the module; after, puts meta tensors back."""

    def __init__(
        self,
        prefetcher: Prefetcher,
        group: StoredGroup,
        prefix: str,
        cache: ExpertCache,
        weights: StoredWeights,
        verify_every_read: bool = False,
    ):
        self.prefetcher = prefetcher
        self.group = group
        self.cache = cache
        self.weights_map = weights
        self.tensors = tuple(
            ExpertTensor(
                entry.name[len(prefix) :], entry.start, entry.dtype, entry.shape, tuple(group.row_digests[entry.name])
            )
            for entry in group.entries
        )
        self.num_experts = self.tensors[0].shape[0]
        self.execution_device = torch.device("cpu")  # experts are read per expert for CPU execution only
        self.members = {t.attr: prefix + t.attr for t in self.tensors}  # local name -> stored name, as the block hook
        self.buffer = ExpertBuffer(group.data_bytes)
        self.expert_bytes = sum(self._span(t, 0)[1] - self._span(t, 0)[0] for t in self.tensors)
        self.verify_every_read = verify_every_read
        self._verified: set[tuple[str, int]] = set()
        self._meta: dict[str, torch.nn.Parameter] = {}
        self._routing: inspect.Signature | None = None
        self._used: list[int] = []
        self.last_read: list[int] = []  # the experts whose rows the last forward read
        self.ahead: list[ExpertsHook] = []  # the experts modules run next, whose reads this hook starts
        self._candidates: list[int] = []  # the experts the last one-token forward routed to
        self._kept: set[int] = set()  # experts the cache let go of, whose rows wait to be read again ahead
        self._speculation = Speculation()

    def __repr__(self) -> str:
        return f"ExpertsHook(group={self.group.name!r}, experts={self.num_experts})"

    def init_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        """Leave meta tensors in the module; the routing argument is found by ``forward``'s signature."""
        self.prefetcher.attach()
        self._routing = inspect.signature(type(module).forward)
        for t in self.tensors:
            param = module._parameters[t.attr]
            self._meta[t.attr] = (
                param if param.device.type == "meta" else torch.nn.Parameter(param.to("meta"), param.requires_grad)
            )
            module._parameters[t.attr] = self._meta[t.attr]
        return module

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        """Read the routed experts' rows (unless cached) and put the module's tensors in place."""
        index = self._routing.bind(module, *args, **kwargs).arguments["top_k_index"]
        routed = sorted({int(e) for e in index.reshape(-1).tolist() if 0 <= e < self.num_experts})
        wanted = range(self.num_experts) if len(routed) > FULL_READ_SHARE * self.num_experts else routed
        speculation = self._take_speculation()
        self._used = sorted({*wanted, *speculation.experts})  # forgotten on abort unless cached
        missing = [e for e in wanted if not self.cache.holds(self, e) and e not in speculation.nbytes]
        hits = sum(1 for e in routed if self.cache.holds(self, e))
        segments = self._segments(missing)
        _settle([*speculation.futures, *(self.prefetcher.reader.submit(segments, self.buffer) if segments else [])])
        chosen = set(wanted)
        confirmed = [e for e in speculation.experts if e in chosen]
        self._verify(missing + confirmed)
        unused = [e for e in speculation.experts if e not in chosen]
        kept, self._kept = self._kept, set()  # not read ahead after all (cached then), nor routed now: given back
        stale = [e for e in kept if e not in speculation.nbytes and e not in chosen and not self.cache.holds(self, e)]
        for expert in unused + stale:
            self.forget(expert)
        self._used, self.last_read = list(wanted), sorted(missing + confirmed)
        nbytes = sum(s.length for s in segments) + sum(speculation.nbytes.values())
        self.prefetcher.record_experts(nbytes, hits, len(routed) - hits, sum(speculation.nbytes[e] for e in unused))
        self._candidates = routed if index.dim() and index.numel() == index.shape[-1] else []  # one token
        for hook in self.ahead:
            hook.speculate()
        grad = torch.is_grad_enabled()
        for t in self.tensors:
            end = t.start + t.shape[0] * t.row_bytes
            value = self.buffer.tensor[t.start : end].view(t.dtype).view(t.shape)
            value = value.clone() if grad else value  # autograd may keep it past the rows' eviction
            module._parameters[t.attr] = torch.nn.Parameter(
                value, requires_grad=grad and self._meta[t.attr].requires_grad
            )
        return args, kwargs

    @property
    def reading_ahead(self) -> list[int]:
        """The experts whose rows are read ahead for this module's next forward."""
        return list(self._speculation.experts)

    def speculate(self) -> None:
        """Start reading the rows of the experts the last one-token forward routed to, those not cached (unless reads
        are in flight already); the next ``pre_forward`` keeps the ones routing confirms."""
        experts = [e for e in self._candidates if not self.cache.holds(self, e)]
        if self._speculation.experts or not experts:
            return
        segments = self._segments(experts)
        self._speculation = Speculation(
            experts,
            self.prefetcher.reader.submit(segments, self.buffer),
            {e: sum(end - start for start, end in (self._span(t, e) for t in self.tensors)) for e in experts},
        )

    def post_forward(self, module: torch.nn.Module, output):
        """Put the meta tensors back and keep the rows used in the cache (within its budget)."""
        self.put_back(module)
        self.cache.keep(self, self._used)
        return output

    def put_back(self, module: torch.nn.Module) -> None:
        """The module holds meta tensors again."""
        module._parameters.update(self._meta)

    def abort(self, module: torch.nn.Module) -> None:
        """The forward raised: meta tensors back, and the rows it read that the cache does not hold are forgotten."""
        self.put_back(module)
        self._used += [*self._drain(), *self._kept]
        self._kept = set()
        for expert in self._used:
            if not self.cache.holds(self, expert):
                self.forget(expert)

    def evicted(self, expert: int) -> None:
        """The cache let go of ``expert``: give back its RAM, unless the next read ahead reads its rows again into the
        same pages (given back then, if routing does not confirm it)."""
        if expert in self._candidates:
            self._kept.add(expert)
        else:
            self.forget(expert)

    def forget(self, expert: int) -> None:
        """Give back the RAM of ``expert``'s rows; they read as zeros until read again."""
        for t in self.tensors:
            self.buffer.forget(*t.rows(expert))

    def _span(self, t: ExpertTensor, expert: int) -> tuple[int, int]:
        start, end = t.rows(expert)
        return start - start % ALIGNMENT, min(align_up(end), self.buffer.nbytes)

    def _segments(self, experts: list[int]) -> list[Segment]:
        """The requests for the rows of sorted ``experts``: consecutive ones make one request per tensor."""
        group, segments = self.group, []
        for t in self.tensors:
            for first, last in _runs(experts):
                start, end = self._span(t, first)[0], self._span(t, last)[1]
                needed = min(end, group.data_bytes) - start
                segments.append(Segment(group.path, group.data_offset + start, end - start, start, needed))
        return segments

    def _take_speculation(self) -> Speculation:
        """The reads started ahead, handed over. In a forked child they never complete (the parent's threads run
        them): none then, and their rows are given back, to be read again."""
        speculation, self._speculation = self._speculation, Speculation()
        if speculation.pid == os.getpid():
            return speculation
        for expert in speculation.experts:
            self.forget(expert)
        return Speculation()

    def _drain(self) -> list[int]:
        """Wait for the reads started ahead, whatever their outcome; the experts they were for."""
        speculation = self._take_speculation()
        for error in filter(None, (future.exception() for future in speculation.futures)):
            logger.warning(
                "%s: a read ahead of experts %s failed (its rows are not used): %s", self, speculation.experts, error
            )
        return speculation.experts

    def _verify(self, experts: list[int]) -> None:
        for t in self.tensors:
            for e in experts:
                if (t.attr, e) in self._verified and not self.verify_every_read:
                    continue
                start, end = t.rows(e)
                if digest(self.buffer.view[start:end]) != t.digests[e]:
                    raise GroupFileError(
                        f"{self.group.path}: expert {e} of {t.attr!r} does not match its digest in the manifest; the "
                        "file is damaged or was replaced: run `accel-nvme verify` on the folder, then `accel-nvme "
                        "clean` it (or delete it) to have it rewritten"
                    )
                self._verified.add((t.attr, e))

    def detach_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        """Load the stored tensors back into RAM (as accelerate does on removal) and let the prefetcher close."""
        for t in self.tensors:
            set_module_tensor_to_device(module, t.attr, "cpu", value=self.weights_map[t.attr])
        self._drain()
        self._candidates, self._kept = [], set()
        self.cache.drop(self)
        self.buffer.forget(0, self.buffer.nbytes)
        self.prefetcher.detach()
        return module


def _settle(futures: list[Future]) -> None:
    """Wait for every read, then raise the first error (no read is left writing into a buffer)."""
    errors = [error for future in futures if (error := future.exception()) is not None]
    if errors:
        raise errors[0]


def _runs(experts: list[int]) -> list[tuple[int, int]]:
    """Sorted ``experts`` as runs of consecutive ones, ``(first, last)``."""
    runs: list[tuple[int, int]] = []
    for e in experts:
        if runs and runs[-1][1] == e - 1:
            runs[-1] = (runs[-1][0], e)
        else:
            runs.append((e, e))
    return runs


def attach_experts_hook(module: torch.nn.Module, hook: ExpertsHook) -> None:
    """``add_hook_to_module``; a forward that raises puts the module's meta tensors back (``ExpertsHook.abort``)."""
    add_hook_to_module(module, hook)
    forward = module.forward

    @functools.wraps(forward)
    def forward_or_put_back(*args, **kwargs):
        try:
            return forward(*args, **kwargs)
        except BaseException:
            hook.abort(module)
            raise

    module.forward = forward_or_put_back


def stream_experts(
    plan: DispatchPlan, manifest: Manifest, prefetcher: Prefetcher, cache_bytes: int, verify_every_read: bool
) -> None:
    """Attach an ``ExpertsHook`` to each experts entry of ``plan``, all sharing one cache of ``cache_bytes``."""
    cache, hooks = ExpertCache(cache_bytes), []
    for (name, module), group in zip(plan.entries, plan.group_of_entry, strict=True):
        if name in plan.experts:
            prefix = f"{name}."
            weights = StoredWeights(manifest, prefix)
            hooks.append(ExpertsHook(prefetcher, manifest.groups[group], prefix, cache, weights, verify_every_read))
            attach_experts_hook(module, hooks[-1])
    for i, hook in enumerate(hooks):  # in the order they run; the last one reads ahead for the next forward's first
        hook.ahead = [hooks[(i + step) % len(hooks)] for step in range(1, min(SPECULATE_AHEAD, len(hooks) - 1) + 1)]
