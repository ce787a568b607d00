"""Host to device: the one place a group's bytes are copied to the GPU, and handed to the compute stream.

The copy runs on a side stream and records an event; the compute stream waits on that event, and the device memory
is marked used by the compute stream (``record_stream``) so the caching allocator does not reuse it before the
compute stream is done with it.
"""

from __future__ import annotations

import torch


def copy_to_device(
    host: torch.Tensor, device: torch.device, stream: torch.cuda.Stream
) -> tuple[torch.Tensor, torch.cuda.Event]:
    """Start copying the bytes of ``host`` (pinned) to ``device`` on ``stream``; the event is recorded after the copy.

    ``host`` must not be written before the event completed.
    """
    with torch.cuda.device(device), torch.cuda.stream(stream):
        data = torch.empty(host.numel(), dtype=torch.uint8, device=device)
        data.copy_(host, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(stream)
    return data, copied


def hand_to_compute(data: torch.Tensor, copied: torch.cuda.Event, device: torch.device) -> torch.Tensor:
    """``data`` for the current (compute) stream of ``device``: it waits for ``copied``, and holds the memory."""
    compute = torch.cuda.current_stream(device)
    compute.wait_event(copied)
    data.record_stream(compute)
    return data
