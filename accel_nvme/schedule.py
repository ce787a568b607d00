"""The successor schedule: which group follows which, learned from the order groups are used in.

Pure bookkeeping (no locks, no threads, no I/O): the prefetcher asks it which groups to read ahead. Until a forward
shows otherwise a group is followed by the next one in device_map order, and the last by the first (wrap-around), so
the next forward (next token, next denoising step) starts warm; a decoder that runs alone after a first call with its
encoder is followed as it runs.
"""

from __future__ import annotations

from collections.abc import Container

NOTHING: frozenset[int] = frozenset()


class SuccessorSchedule:
    """For each of ``groups`` groups, the group last seen to follow it (initially the next one, wrapping around; for
    ``reverse``, the order of a backward pass, the previous one, and none after the first)."""

    def __init__(self, groups: int, reverse: bool = False):
        if reverse:
            self.successor = {i: max(i - 1, 0) for i in range(groups)}
        else:
            self.successor = {i: (i + 1) % groups for i in range(groups)}
        self._previous: int | None = None

    def learn(self, index: int, ending: SuccessorSchedule | None = None) -> None:
        """Group ``index`` is used now: it becomes the successor of the group used before it (unless the same).

        ``ending``: a schedule of another order (backward) whose run this ends; its next group follows no last one.
        """
        if ending is not None:
            ending._previous = None
        if self._previous is not None and self._previous != index:
            self.successor[self._previous] = index
        self._previous = index

    def upcoming(self, index: int, depth: int, skip: Container[int] = NOTHING) -> list[int]:
        """The next ``depth`` groups after ``index`` in learned order, leaving out ``skip`` (resident groups)."""
        upcoming = []
        group = index
        for _ in range(len(self.successor)):
            group = self.successor[group]
            if group == index or group in upcoming or len(upcoming) == depth:
                break
            if group not in skip:
                upcoming.append(group)
        return upcoming
