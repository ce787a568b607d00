"""Options of the nvme tier, in one dataclass."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

DIRECT_IO_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class NvmeConfig:
    """How modules mapped to ``"nvme"`` are written and streamed back.

    ``offload_dir`` is where group files live; ``prefetch_depth`` groups are read ahead of the one in use;
    ``io_threads`` requests of ``io_request_bytes`` each are kept in flight; ``direct_io`` picks O_DIRECT
    ("on"), buffered reads that drop the page cache behind them ("off"), or O_DIRECT where the filesystem
    allows it ("auto"); consecutive device_map entries are merged into one group while it stays within ``group_bytes``
    (0: one group per entry); ``verify_on_read`` checks each group's SHA-256 after every read.
    """

    offload_dir: str | os.PathLike | None = None
    prefetch_depth: int = 2
    io_threads: int = 4
    io_request_bytes: int = 4 << 20
    direct_io: str = "auto"
    group_bytes: int = 0
    verify_on_read: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.prefetch_depth, int) or self.prefetch_depth < 1:
            raise ValueError(f"NvmeConfig.prefetch_depth must be an integer >= 1, got {self.prefetch_depth!r}")
        if not isinstance(self.io_threads, int) or self.io_threads < 1:
            raise ValueError(f"NvmeConfig.io_threads must be an integer >= 1, got {self.io_threads!r}")
        if not isinstance(self.io_request_bytes, int) or self.io_request_bytes < 4096 or self.io_request_bytes % 4096:
            raise ValueError(
                f"NvmeConfig.io_request_bytes must be a positive multiple of 4096, got {self.io_request_bytes!r}"
            )
        if self.direct_io not in DIRECT_IO_CHOICES:
            raise ValueError(f"NvmeConfig.direct_io must be one of {DIRECT_IO_CHOICES}, got {self.direct_io!r}")
        if not isinstance(self.group_bytes, int) or self.group_bytes < 0:
            raise ValueError(f"NvmeConfig.group_bytes must be an integer >= 0, got {self.group_bytes!r}")

    def with_offload_dir(self, offload_dir: str | os.PathLike | None) -> NvmeConfig:
        """A copy with ``offload_dir`` set when one is given."""
        return self if offload_dir is None else replace(self, offload_dir=offload_dir)
