"""One way to patch a library: each (owner, attribute) is replaced at most once and recorded, so it can be undone."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_MISSING = object()
_APPLIED: list[tuple[Any, str, Any, Any]] = []  # (owner, attribute, original as stored on the owner, replacement)


def patch(owner: Any, attr: str, replace: Callable[[Any], Any], only_if: Any = _MISSING) -> None:
    """Set ``owner.attr`` to ``replace(original)`` once and record it; with ``only_if``, only when that is the original.

    ``original`` is the value stored on the owner itself (a ``classmethod`` for a class's ``from_pretrained``). A value
    that is already one of our replacements (bound by name from a patched module) is kept, and recorded with the
    original it stands for, so ``restore_all`` puts that back too.
    """
    current = vars(owner).get(attr, _MISSING)
    if current is _MISSING or any(o is owner and a == attr for o, a, _, _ in _APPLIED):
        return
    before = _original_of(current)
    if only_if is not _MISSING and before is not only_if:
        return
    replacement = replace(current) if before is current else current
    setattr(owner, attr, replacement)
    _APPLIED.append((owner, attr, before, replacement))


def _original_of(value: Any) -> Any:
    """What ``value`` replaced, when it is one of our replacements; else ``value`` itself."""
    return next((before for *_, before, replacement in _APPLIED if replacement is value), value)


def restore_all() -> None:
    """Put back every original, latest patch first, and forget them; a value changed since by others is kept."""
    while _APPLIED:
        owner, attr, before, replacement = _APPLIED.pop()
        if vars(owner).get(attr) is replacement:
            setattr(owner, attr, before)
        else:
            logger.warning("%s.%s was replaced by someone else since accel_nvme patched it; left as it is", owner, attr)
