"""Per-expert modules read one expert at a time: a list of expert MLPs of which a forward calls only the routed ones.

Remote code (DeepSeek-V2/V3's, Kimi's) and transformers 4's MoE models hold a layer's experts as an ``nn.ModuleList``
of identical MLPs, and their MoE module calls only the experts a token is routed to. Such a list gets a group file of
its own, each expert's tensors stored together from a 4096-byte boundary (one O_DIRECT request per expert), and each
expert module an ``ExpertModuleHook``: when the module is called, its expert is read (unless cached, ``expert_rows.py``)
and its tensors view the buffer (on CUDA: a device copy of them, ``expert_transfer.py``). The module holding the list
gets an ``ExpertRoundHook``: its forward is a round, which takes the reads started ahead and at its end gives back
those the round did not use, and which, when every expert it ran saw one token, reads those experts ahead for the next
token. It watches the module's router too: once the router has named the experts, their reads start, all at once.
"""

from __future__ import annotations

import logging

import torch
from accelerate.hooks import ModelHook

from . import owned
from .expert_rows import FULL_READ_SHARE, Check, Expert, ExpertCache, ExpertRows, attach_with_abort
from .expert_transfer import HostTensor, expert_placement
from .format import ALIGNMENT, GroupFileError, TensorEntry, storage_order
from .prefetch import Prefetcher
from .store import GroupPlan, Manifest, StoredGroup, StoredWeights

logger = logging.getLogger(__name__)


def is_expert_list(name: str, module: torch.nn.Module) -> bool:
    """An ``nn.ModuleList`` named ``…experts`` of two or more called modules of one class with the same parameters
    (names, shapes, one dtype, plain tensors, none shared) and no buffers."""
    if not isinstance(module, torch.nn.ModuleList) or not name.lower().endswith("experts") or len(module) < 2:
        return False
    experts = list(module)
    if len({type(m) for m in experts}) != 1 or type(experts[0]).forward is torch.nn.Module.forward:
        return False
    specs = {tuple((local, tuple(p.shape)) for local, p in m.named_parameters()) for m in experts}
    params = [p for m in experts for p in m.parameters()]
    return (
        len(specs) == 1
        and bool(params)
        and len({id(p) for p in params}) == len(params)
        and len({p.dtype for p in params}) == 1
        and all(type(p) is torch.nn.Parameter for p in params)
        and not any(True for _ in module.buffers())
    )


def expert_starts(name: str, plan: GroupPlan) -> tuple[str, ...]:
    """The first stored tensor of each expert of list ``name``; each expert's tensors follow it, stored together."""
    order = storage_order(plan.tensors)
    experts = [int(tensor[len(name) + 1 :].partition(".")[0]) for tensor in order]
    if experts != sorted(experts):
        raise ValueError(f"experts of {name!r} would not be stored one after another; map this block to 'cpu'")
    return tuple(tensor for i, tensor in enumerate(order) if i == 0 or experts[i - 1] != experts[i])


def _rows(args: tuple, kwargs: dict) -> int:
    """Rows (tokens) of the first tensor among a forward's arguments; 0 without one."""
    hidden = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    return hidden.numel() // hidden.shape[-1] if hidden is not None and hidden.dim() and hidden.shape[-1] else 0


def routed_by(output: object, experts: int, top_k: int | None) -> list[int] | None:
    """The experts a router's ``output`` routes to: its expert indices (an integer tensor, DeepSeek's gate), or the
    ``top_k`` largest of its logits over ``experts`` (a linear gate, transformers 4's Mixtral); None if neither."""
    first = output[0] if isinstance(output, (tuple, list)) and output else output
    if not isinstance(first, torch.Tensor) or first.dim() == 0 or first.numel() == 0 or first.dtype == torch.bool:
        return None
    if not first.is_floating_point():
        values = first.reshape(-1)
        return sorted(set(values.tolist())) if values.min() >= 0 and values.max() < experts else None
    if first.shape[-1] != experts or not top_k or top_k > experts:
        return None
    return sorted(set(first.reshape(-1, experts).topk(top_k, dim=-1).indices.reshape(-1).tolist()))


class ExpertRoundHook(ModelHook):
    """On the module holding an expert list: its forward is one round of the list's experts (``ExpertRows``). Its
    other children are watched as routers: once one names the experts about to be called, their reads start, all in
    flight at once, instead of one at a time as the module calls them."""

    def __init__(self, rows: ExpertRows, experts: torch.nn.ModuleList):
        self.rows = rows
        self.experts = experts
        self.prefetcher = rows.prefetcher
        self.execution_device = None  # moves nothing: ``close`` has nothing to load back here
        self.members: dict[str, str] = {}
        self.one_token = True
        self._watches: list[torch.utils.hooks.RemovableHandle] = []

    def init_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        """Watch the module's other children (its router among them) with forward hooks of torch's."""
        top_k = getattr(module, "top_k", None) or getattr(module, "num_experts_per_tok", None)
        for child in module.children():
            if child is not self.experts:
                k = top_k or getattr(child, "top_k", None)
                self._watches.append(child.register_forward_hook(lambda _, __, out, k=k: self._routed(out, k)))
        return module

    def _routed(self, output: object, top_k: int | None) -> None:
        routed = routed_by(output, len(self.rows.experts), top_k)
        if routed is not None:
            self.rows.start(routed)

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        """A round starts: the reads ahead are taken over; with more tokens than ``FULL_READ_SHARE`` of the experts (a
        prefill), every expert is read at once, in one pass, rather than one request at a time as they are called."""
        self.rows.begin()
        self.one_token = True
        experts = len(self.rows.experts)
        if _rows(args, kwargs) > FULL_READ_SHARE * experts:
            self.rows.load(list(range(experts)), [])
        return args, kwargs

    def called(self, args: tuple, kwargs: dict) -> None:
        """An expert runs on ``args``: the round stays a one-token round while every expert sees one row."""
        self.one_token &= _rows(args, kwargs) == 1

    def post_forward(self, module: torch.nn.Module, output):
        """The round is over: unused reads ahead given back, what it loaded handed to the cache, and a one-token
        round's experts read ahead for the next."""
        self.rows.finish()
        self.rows.keep()
        self.rows.candidates = self.rows.used if self.one_token else []
        self.rows.read_ahead()
        return output

    def abort(self, module: torch.nn.Module) -> None:
        """The round raised: what it read, or was read ahead, is forgotten unless cached."""
        self.rows.abort()

    def detach_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        """Stop watching the router."""
        for watch in self._watches:
            watch.remove()
        self._watches = []
        return module


class ExpertModuleHook(ModelHook):
    """Before expert ``index`` of a list runs, reads its tensors (unless cached) and puts them in the module
    (``expert_transfer.py``); after, puts meta tensors back and hands the expert to the cache."""

    def __init__(
        self,
        rows: ExpertRows,
        index: int,
        entries: dict[str, TensorEntry],
        weights: StoredWeights,
        round_hook: ExpertRoundHook | None,
    ):
        self.rows = rows
        self.prefetcher = rows.prefetcher
        self.group = rows.group
        self.index = index
        self.entries = entries  # local name -> where it is stored
        self.members = {local: entry.name for local, entry in entries.items()}
        self.weights_map = weights
        self.round_hook = round_hook
        tensors = [HostTensor(local, entry.start, entry.dtype, entry.shape) for local, entry in entries.items()]
        self.placement = expert_placement(tensors, self.prefetcher)  # host views, or device copies on CUDA
        self.execution_device = self.placement.device

    def __repr__(self) -> str:
        return f"ExpertModuleHook(group={self.group.name!r}, expert={self.index})"

    def init_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        """Leave meta tensors in the module."""
        self.prefetcher.attach()
        self.placement.leave_meta(module)
        return module

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        """Read the expert (unless cached) and put its tensors in place."""
        if self.round_hook is not None:
            self.round_hook.called(args, kwargs)
        self.rows.load([self.index], [self.index])
        self.placement.put(self.rows.buffer.tensor, self.rows.experts[self.index].spans)
        owned.refuse_foreign_meta(module, self.group.name, self.execution_device)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output):
        """Put the meta tensors back and hand the expert to the cache (within its budget)."""
        self.put_back(module)
        self.rows.keep([self.index])
        return output

    def put_back(self, module: torch.nn.Module) -> None:
        """The module holds meta tensors again (a device copy of its expert is freed)."""
        self.placement.put_back()

    def abort(self, module: torch.nn.Module) -> None:
        """The forward raised: meta tensors back, and the expert forgotten unless cached."""
        self.put_back(module)
        if not self.rows.cache.holds(self.rows, self.index):
            self.rows.forget(self.index)

    def detach_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        """Load the stored tensors back into RAM (as accelerate does on removal) and let the prefetcher close."""
        self.placement.load_back(self.weights_map)
        self.rows.close()
        self.prefetcher.detach()
        return module


def stream_expert_list(
    model: torch.nn.Module,
    name: str,
    experts: torch.nn.ModuleList,
    group: StoredGroup,
    manifest: Manifest,
    prefetcher: Prefetcher,
    cache: ExpertCache,
    verify_every_read: bool,
) -> ExpertRows:
    """Attach an ``ExpertModuleHook`` to each expert of list ``name`` and an ``ExpertRoundHook`` to the module holding
    it (unless that module has a hook already: no reads ahead then); the list's ``ExpertRows``."""
    stored = {entry.name: entry for entry in group.entries}
    entries = [
        {local: stored[f"{name}.{i}.{local}"] for local, _ in m.named_parameters()} for i, m in enumerate(experts)
    ]
    layout = []
    for i, own in enumerate(entries):
        start, end = min(e.start for e in own.values()), max(e.end for e in own.values())
        if start % ALIGNMENT or (layout and start < layout[-1].spans[0][1]):
            raise GroupFileError(
                f"{group.path}: expert {i} of {name!r} is not stored on its own pages; delete the offload folder to "
                "have it rewritten"
            )
        checks = tuple(Check(e.start, e.end, group.tensor_digests[e.name], repr(e.name)) for e in own.values())
        layout.append(Expert(((start, end),), checks))
    rows = ExpertRows(prefetcher, group, layout, cache, verify_every_read)
    parent = model.get_submodule(name.rpartition(".")[0])
    round_hook = None
    if getattr(parent, "_hf_hook", None) is None:
        round_hook = ExpertRoundHook(rows, experts)
        attach_with_abort(parent, round_hook)
    else:
        logger.info("%s holds a hook already: the experts of %r are not read ahead", type(parent).__name__, name)
    for i, (expert, own) in enumerate(zip(experts, entries, strict=True)):
        weights = StoredWeights(manifest, f"{name}.{i}.")
        attach_with_abort(expert, ExpertModuleHook(rows, i, own, weights, round_hook))
    return rows
