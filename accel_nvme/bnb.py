"""bitsandbytes weights on the CPU, streamed as stored: ``Params4bit`` (nf4, fp4, nested statistics or not) of a
``Linear4bit`` and ``Int8Params`` (LLM.int8) of a ``Linear8bitLt``, each with the tensors of its state.

After each read the weight is rebuilt in its class with its attributes and a fresh state whose tensors view what was
read; the module's own references (``Linear4bit.quant_state``, ``Linear8bitLt.state.CB``/``SCB``) point at them while
it holds its group, and are cleared when it gives the group back. A 4-bit weight is streamed in the form it has at
dispatch: bitsandbytes repacks it and its state for AVX512-BF16 CPUs, in place, on the module's first inference
forward. One repacked before dispatch streams repacked; one that was not is repacked again after each read once bnb
has repacked it (exact, but the repack costs far more than the read: a warning says so).
"""

from __future__ import annotations

import copy
import logging
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from .tensorkinds import TensorKind, UnstreamableTensorError, composite_kind

logger = logging.getLogger(__name__)

_STATE = "quant_state"
_WARNED_REPACK: set[str] = set()  # module classes already warned about (once per process)
_WHAT_TO_DO = (
    "map this module to 'cpu' instead of 'nvme', or quantize it with a format the nvme tier streams as stored "
    "(docs/quantized.md)"
)


def _refuse(name: str, tensor: torch.Tensor, owner: torch.nn.Module | None, why: str) -> UnstreamableTensorError:
    module, _, attr = name.rpartition(".")
    held = f" of a {type(owner).__module__}.{type(owner).__qualname__}" if owner is not None else ""
    return UnstreamableTensorError(
        f"module {module!r}: tensor {attr!r} is a {type(tensor).__module__}.{type(tensor).__qualname__}{held}, which "
        f"the nvme tier cannot stream exactly ({why}); {_WHAT_TO_DO}"
    )


def bnb_kind(name: str, tensor: torch.Tensor, owner: torch.nn.Module | None) -> TensorKind:
    """How a bitsandbytes weight is stored; ``UnstreamableTensorError`` for a use of bitsandbytes not served."""
    import bitsandbytes as bnb

    if tensor.device.type not in ("cpu", "meta"):  # on meta: refused as not in memory yet when the groups are planned
        raise _refuse(name, tensor, owner, f"it is on {tensor.device}: only weights quantized on the CPU are served")
    if tensor.requires_grad:
        raise _refuse(name, tensor, owner, "it requires grad; streamed weights are frozen")
    if type(tensor) is bnb.nn.Params4bit and isinstance(owner, bnb.nn.Linear4bit):
        if not tensor.bnb_quantized or tensor.quant_state is None:
            raise _refuse(name, tensor, owner, "it is not quantized yet: call .to('cpu') on the module first")
        adapter = _Params4bit(tensor)
        return composite_kind(name, adapter.tensors(tensor), adapter)
    if type(tensor) is bnb.nn.Int8Params and isinstance(owner, bnb.nn.Linear8bitLt):
        if (
            tensor.dtype != torch.int8
            or owner.state.has_fp16_weights
            or (tensor.SCB is None and owner.state.SCB is None)
        ):
            raise _refuse(name, tensor, owner, "it is not quantized to int8 (has_fp16_weights=True keeps fp16 weights)")
        adapter = _Int8Params(owner)
        return composite_kind(name, adapter.tensors(tensor), adapter)
    raise _refuse(
        name, tensor, owner, "only Params4bit of a Linear4bit and Int8Params of a Linear8bitLt, on the CPU, are served"
    )


def _state_tensors(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a QuantState, nested state included, by dotted name."""
    tensors = {}
    for attr, value in vars(state).items():
        if isinstance(value, torch.Tensor):
            tensors[prefix + attr] = value
        elif type(value).__name__ == "QuantState":
            tensors |= _state_tensors(value, f"{prefix}{attr}.")
    return tensors


@dataclass(frozen=True)
class _Nested:
    """A nested QuantState (``state2``) without its tensors."""

    cls: type
    attributes: dict[str, Any]


def _without_tensors(state: Any) -> dict[str, Any]:
    """A QuantState's attributes, its tensors left out, nested states as attribute dicts of their own."""
    attributes = {}
    for attr, value in vars(state).items():
        if type(value).__name__ == "QuantState":
            attributes[attr] = _Nested(type(value), _without_tensors(value))
        elif not isinstance(value, torch.Tensor):
            attributes[attr] = value
    return attributes


def _fresh_state(cls: type, attributes: dict[str, Any], tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """A new QuantState: ``attributes`` (nested ones rebuilt too) and the tensors named under ``prefix``."""
    state = cls.__new__(cls)
    for attr, value in attributes.items():
        if isinstance(value, _Nested):
            value = _fresh_state(value.cls, value.attributes, tensors, f"{prefix}{attr}.")
        state.__dict__[attr] = value
    for name, tensor in tensors.items():
        if name.startswith(prefix) and "." not in name[len(prefix) :]:
            state.__dict__[name[len(prefix) :]] = tensor
    return state


def _owned(inner: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """With grad enabled, bnb's autograd functions keep the weight and its state (not as saved tensors, which
    ``backward.py`` would turn into handles): give them copies, not views of a staging buffer refilled later."""
    if not torch.is_grad_enabled():
        return inner
    return {name: tensor.clone() for name, tensor in inner.items()}


class _Params4bit:
    """A ``Params4bit`` and its QuantState: the weight's bytes and each tensor of the state, in the form at dispatch."""

    def __init__(self, param: torch.Tensor):
        self.attributes = {k: v for k, v in vars(param).items() if k != _STATE}
        self.state_cls = type(param.quant_state)
        self.state = _without_tensors(param.quant_state)
        self.stored_repacked = bool(getattr(param.quant_state, "packing_format_for_cpu", False))
        self.repack = False  # bnb repacked a rebuilt weight: from then on, each read is repacked as bnb does
        self._last: Any = None  # the state given to the module last

    def tensors(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"data": param.data, **_state_tensors(param.quant_state)}

    def rebuild(self, inner: dict[str, torch.Tensor]) -> torch.Tensor:
        import bitsandbytes as bnb
        from bitsandbytes.functional import _convert_weight_packed_for_cpu

        inner = _owned(inner)
        data = inner.pop("data")
        state = _fresh_state(self.state_cls, self.state, inner)
        if self.repack:
            data, state = _convert_weight_packed_for_cpu(data, state)
        param = torch.Tensor._make_subclass(bnb.nn.Params4bit, data, False)
        param.__dict__.update(self.attributes)
        param.quant_state = self._last = state
        return param

    def install(self, owner: torch.nn.Module, value: torch.Tensor | None) -> None:
        if value is not None:
            owner.quant_state = value.quant_state
            return
        owner.quant_state = None
        last, self._last = self._last, None
        if self.repack or self.stored_repacked or not getattr(last, "packing_format_for_cpu", False):
            return
        self.repack = True  # bnb repacked the state it was given: so it would have the weight in RAM from now on
        if type(owner).__name__ not in _WARNED_REPACK:
            _WARNED_REPACK.add(type(owner).__name__)
            logger.warning(
                "bitsandbytes repacked the 4-bit weights of a %s for the CPU on its first inference forward; they "
                "stream in the form they had at dispatch, so each forward now repacks them after the read (exact, but "
                "costlier than the read): run one inference forward in RAM (eval, torch.no_grad) before dispatching "
                "to stream the repacked form",
                type(owner).__name__,
            )


class _Int8Params:
    """An ``Int8Params``: its int8 rows (``CB``, the weight's bytes) and their scales (``SCB``), which a
    ``Linear8bitLt`` moves into its ``state`` on its first forward; rebuilt as bnb quantizes it, and moved into the
    module's ``state`` when the module takes it, as ``Linear8bitLt.init_8bit_state`` does."""

    def __init__(self, owner: torch.nn.Module):
        self.owner = weakref.ref(owner)

    def tensors(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        scales = param.SCB if param.SCB is not None else self.owner().state.SCB
        return {"data": param.data, "SCB": scales}

    def rebuild(self, inner: dict[str, torch.Tensor]) -> torch.Tensor:
        import bitsandbytes as bnb

        inner = _owned(inner)
        param = torch.Tensor._make_subclass(bnb.nn.Int8Params, inner["data"], False)
        param.CB, param.SCB, param.has_fp16_weights = inner["data"], inner["SCB"], False
        return param

    def install(self, owner: torch.nn.Module, value: torch.Tensor | None) -> None:
        # A state object per take: autograd keeps the one a forward ran with (for its backward), and a dispatch that
        # fails puts the module's own object back. bnb sets its other fields on each forward.
        state = copy.copy(owner.state)
        state.CB, state.SCB = (None, None) if value is None else (value.CB, value.SCB)
        owner.state = state
        if value is not None:
            value.CB = value.SCB = None
