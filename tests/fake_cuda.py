"""The CUDA runtime calls of the device path, faked on the CPU: streams and events as records, copies synchronous.

Only these calls are faked (``accel_nvme.transfer.CudaRuntime``); files, reads, models and their outputs are real.
"""

import contextlib
import time


class FakeEvent:
    def __init__(self, clock, sync_delay=0.0):
        self.clock, self.at, self.done, self.sync_delay = clock, None, True, sync_delay

    def record(self, stream):
        self.at = self.clock[0]
        stream.log.append(("record", self))

    def query(self):
        return self.done

    def synchronize(self):
        time.sleep(self.sync_delay)

    def elapsed_time(self, other):
        return (other.at - self.at) * 1e3


class FakeStream:
    def __init__(self):
        self.log = []

    def wait_event(self, event):
        self.log.append(("wait", event))

    def synchronize(self):
        pass


class FakeRuntime:
    """Streams and events of the CUDA runtime, as records; ``clock[0]`` is the time events are recorded at."""

    def __init__(self, sync_delay=0.0):
        self.clock = [0.0]
        self.sync_delay = sync_delay  # how long waiting for a copy takes: staging buffers come back late
        self.compute = FakeStream()
        self.side: list[FakeStream] = []
        self.synchronized = 0

    def stream(self, device):
        self.side.append(FakeStream())
        return self.side[-1]

    def synchronize(self, device):
        self.synchronized += 1

    def event(self):
        return FakeEvent(self.clock, self.sync_delay)

    def current_stream(self, device):
        return self.compute

    def using(self, device, stream):
        return contextlib.nullcontext()
