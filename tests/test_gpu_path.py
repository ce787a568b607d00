"""The CUDA path's logic on the CPU: what the GPU check patches exists, pinning falls back and is undone (close,
finaliser, fork), the device ring's accounting and alignment, the GPU idle meter, cuda:1 placement, close after a
forward. Only the CUDA runtime calls are faked (registration, streams, events); files, reads and models are real."""

import gc
import importlib.util
import itertools
import logging
import os
import re
import sys
import threading
from pathlib import Path

import pytest
import torch
from fake_cuda import FakeRuntime, FakeStream
from helpers import tiny_lm

import accel_nvme
from accel_nvme import NvmeConfig, staging
from accel_nvme.integrations.pipelines import _resolved, _same_device
from accel_nvme.io import FileReader
from accel_nvme.prefetch import Prefetcher
from accel_nvme.transfer import DEVICE_ALIGNMENT, DeviceRing, StallMeter, copy_runs, device_layout

CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)
GPU_CHECK = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
LAYERS = {"embed": "nvme", "body.layers": "nvme", "body.final": "cpu", "head": "nvme"}
IDS = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))


def nvme_hooks(model):
    return [
        m._hf_hook for m in model.modules() if isinstance(getattr(m, "_hf_hook", None), accel_nvme.NvmeAlignDevicesHook)
    ]


def load_gpu_check():
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


# ---------------------------------------------------------------- what the GPU check patches


def test_every_name_the_gpu_check_patches_exists():
    check = load_gpu_check()
    for name in check.PATCHED:
        assert callable(check.resolve(name)), name
    with pytest.raises(AttributeError):
        check.resolve("accel_nvme.prefetch.Prefetcher._resident_views")  # the stale name of issue 20


def test_the_gpu_check_runs_every_test_file_that_holds_cuda_tests():
    check = load_gpu_check()
    root = GPU_CHECK.parent.parent
    marks = re.compile(r"pytest\.mark\.cuda\b")
    marked = {f"tests/{p.name}" for p in (root / "tests").glob("test_*.py") if marks.search(p.read_text())}
    assert marked == set(check.CUDA_TEST_FILES)


def test_the_gpu_check_patches_and_puts_back_what_it_slows():
    check = load_gpu_check()
    import accel_nvme.prefetch as prefetch

    class Owner:
        def _read(self):
            return "read"

    owner, undo = Owner(), []
    check.slow_reads(owner, 0.0, undo)
    assert owner._read.__wrapped__
    check.remove_wait_event(undo)
    assert owner._read() == "read" and prefetch.hand_to_compute is not check.resolve(
        "accel_nvme.transfer.hand_to_compute"
    )
    for put_back in reversed(undo):
        put_back()
    assert not hasattr(owner._read, "__wrapped__") and owner._read() == "read"
    assert prefetch.hand_to_compute is check.resolve("accel_nvme.transfer.hand_to_compute")
    with pytest.raises(AttributeError):
        check.slow_reads(object(), 0.0, [])


# ---------------------------------------------------------------- pinning: fallback, cap, finaliser, fork


@pytest.fixture
def fake_cudart(monkeypatch):
    """cudaHostRegister / cudaHostUnregister replaced by a record of the calls (0: success)."""
    calls = {"register": [], "unregister": [], "result": 0}

    def register(pointer, nbytes, device):
        calls["register"].append((pointer, nbytes))
        return calls["result"]

    monkeypatch.setattr(staging, "_register", register)
    monkeypatch.setattr(staging, "_unregister", lambda pointer: calls["unregister"].append(pointer))
    return calls


def test_a_failing_cuda_host_register_falls_back_to_pageable_with_a_warning(fake_cudart, caplog):
    fake_cudart["result"] = 712  # cudaErrorHostMemoryAlreadyRegistered
    before = staging.pinned_bytes()
    with caplog.at_level(logging.WARNING, logger="accel_nvme.staging"):
        buffer = staging.StagingBuffer(1 << 20, CUDA0)
    assert fake_cudart["register"] == [(buffer.tensor.data_ptr(), 1 << 20)]
    assert not buffer.pinned and staging.pinned_bytes() == before
    assert "cudaHostRegister of a 1048576-byte staging buffer failed (error 712)" in caplog.text
    buffer.view[:4] = b"abcd"  # still a working buffer
    buffer.close()
    assert fake_cudart["unregister"] == []


def test_pinned_bytes_are_capped(fake_cudart, monkeypatch, caplog):
    cap = staging.pinned_bytes() + (3 << 20)
    monkeypatch.setattr(staging, "pinned_cap", lambda: cap)
    monkeypatch.setattr(staging, "_cap_warned", False)
    with caplog.at_level(logging.WARNING, logger="accel_nvme.staging"):
        first = staging.StagingBuffer(2 << 20, CUDA0)
        second = staging.StagingBuffer(2 << 20, CUDA0)
    assert first.pinned and not second.pinned
    assert len(fake_cudart["register"]) == 1
    assert "left pageable" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="accel_nvme.staging"):
        staging.StagingBuffer(2 << 20, CUDA0).close()
    assert "left pageable" not in caplog.text, "the cap is said once, not once per resident group"
    first.close()
    third = staging.StagingBuffer(2 << 20, CUDA0)  # the bytes first gave back can be pinned again
    assert third.pinned
    for buffer in (second, third):
        buffer.close()


def test_close_unregisters_once(fake_cudart):
    before = staging.pinned_bytes()
    buffer = staging.StagingBuffer(1 << 20, CUDA0)
    pointer = buffer.tensor.data_ptr()
    assert buffer.pinned and staging.pinned_bytes() == before + (1 << 20)
    buffer.close()
    buffer.close()
    assert fake_cudart["unregister"] == [pointer]
    assert staging.pinned_bytes() == before


def test_a_buffer_dropped_without_close_is_unregistered_by_its_finaliser(fake_cudart):
    before = staging.pinned_bytes()
    buffer = staging.StagingBuffer(1 << 20, CUDA0)
    pointer = buffer.tensor.data_ptr()
    del buffer
    gc.collect()
    assert fake_cudart["unregister"] == [pointer]
    assert staging.pinned_bytes() == before


def test_a_forked_child_does_not_inherit_pinned_buffers_nor_unregister_them(fake_cudart):
    buffer = staging.StagingBuffer(1 << 20, CUDA0)
    buffer.view[:5] = b"hello"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            ok = not buffer.pinned and bytes(buffer.view[:5]) == b"\0" * 5  # a placeholder, not the parent's pages
            buffer.close()
            ok = ok and fake_cudart["unregister"] == []
            os.write(write, b"ok" if ok else b"no")
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 2) == b"ok"
    os.waitpid(pid, 0)
    assert buffer.pinned and bytes(buffer.view[:5]) == b"hello"
    buffer.close()
    assert len(fake_cudart["unregister"]) == 1


# ---------------------------------------------------------------- the device ring and its layout


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The group sources of a real dispatch (its group files, the tensors' offsets in them)."""
    model = accel_nvme.dispatch_model(
        tiny_lm(torch.bfloat16), LAYERS, offload_dir=tmp_path_factory.mktemp("offload"), config=NvmeConfig()
    )
    sources = nvme_hooks(model)[0].prefetcher.sources
    accel_nvme.close(model, load_back=False)
    return sources


def test_every_device_bound_tensor_is_aligned_and_copied_exactly(sources):
    assert any(v.offset % DEVICE_ALIGNMENT for s in sources for v in s.views), "the files pack tensors tighter"
    for source in sources:
        host = torch.randint(0, 256, (source.nbytes,), dtype=torch.uint8)
        layout = device_layout([(v.offset, v.nbytes) for v in source.views])
        spans = sorted((o, o + v.nbytes) for o, v in zip(layout.offsets, source.views, strict=True))
        assert all(o % DEVICE_ALIGNMENT == 0 for o in layout.offsets), source.name
        assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans)), "no overlap"
        assert layout.nbytes >= spans[-1][1] and layout.nbytes % DEVICE_ALIGNMENT == 0
        assert len(layout.runs) <= len(source.views)
        device = torch.zeros(layout.nbytes, dtype=torch.uint8)
        copy_runs(device, host, layout)
        for view, offset in zip(source.views, layout.offsets, strict=True):
            assert torch.equal(device[offset : offset + view.nbytes], host[view.offset : view.offset + view.nbytes])


def test_layout_merges_neighbours_that_keep_their_alignment():
    layout = device_layout([(0, 512), (512, 100), (640, 64), (4096, 10)])
    assert layout.offsets == (0, 512, 1024, 1536)  # 4096 + 384 is not aligned: packed after the previous one
    assert [(r.host_offset, r.device_offset, r.nbytes) for r in layout.runs] == [
        (0, 0, 612),
        (640, 1024, 64),
        (4096, 1536, 10),
    ]
    assert device_layout([]).nbytes == DEVICE_ALIGNMENT


def test_the_ring_refills_a_buffer_only_after_compute_consumed_it():
    runtime, side = FakeRuntime(), FakeStream()
    ring = DeviceRing(2, 4096, torch.device("cpu"), runtime)
    assert ring.nbytes == 2 * 4096 and len(ring.pointers) == 2
    assert ring.free([]) == 0 and ring.free([0]) == 1 and ring.free([1, 0]) is None
    layout = device_layout([(0, 100), (128, 50)])
    host = torch.arange(256, dtype=torch.uint8)
    data, copied = ring.fill(0, host, layout, side)
    assert side.log == [("record", copied)], "a buffer never used needs no wait"
    assert data.untyped_storage().data_ptr() in ring.pointers and data.data_ptr() % DEVICE_ALIGNMENT == 0
    assert torch.equal(data[512:562], host[128:178])
    ring.consumed(0)
    consumed = runtime.compute.log[-1][1]
    assert runtime.compute.log == [("record", consumed)]
    side.log.clear()
    _, copied = ring.fill(0, host, layout, side)
    assert side.log == [("wait", consumed), ("record", copied)], "the copy waits for compute, then records"
    side.log.clear()
    ring.fill(1, host, layout, side)
    assert side.log[0][0] == "record", "another buffer does not wait for this one"


def test_the_stall_meter_counts_gpu_idle_time_once_events_complete():
    runtime = FakeRuntime()
    meter, compute, side = StallMeter(), FakeStream(), FakeStream()
    for reached_at, copied_at in ((1.0, 1.5), (2.0, 1.9)):  # waited 0.5 s; the second copy was done first
        runtime.clock[0] = reached_at
        reached = runtime.event()
        reached.record(compute)
        runtime.clock[0] = copied_at
        copied = runtime.event()
        copied.record(side)
        meter.add(reached, copied)
    reached, late = runtime.event(), runtime.event()
    reached.record(compute)
    late.record(side)
    late.done = False  # the copy is still running: counted once it completed
    meter.add(reached, late)
    assert meter.collect() == pytest.approx(0.5)
    assert meter.collect() == 0.0
    late.done, late.at = True, late.at + 0.25
    assert meter.collect() == pytest.approx(0.25)


@pytest.mark.parametrize("sync_delay", [0.0, 0.02], ids=["prompt", "staging_back_late"])
def test_the_device_path_streams_resident_and_kept_groups_through_a_bounded_ring(sources, sync_delay):
    """The prefetcher's CUDA path with a fake runtime (device memory is CPU memory, copies are synchronous)."""
    runtime = FakeRuntime(sync_delay)
    resident = {1: "host", 3: "device"}
    device_path = Prefetcher(sources, torch.device("cpu"), FileReader(), depth=1, resident=resident, runtime=runtime)
    in_ram = Prefetcher(sources, torch.device("cpu"), FileReader(), depth=1)
    streamed = [i for i in range(len(sources)) if i != 3]
    layouts = [device_layout([(v.offset, v.nbytes) for v in sources[i].views]) for i in streamed]
    assert device_path.device_buffer_bytes() == 2 * max(layout.nbytes for layout in layouts)
    assert device_path.resident == [1, 3] and device_path.resident_on_device() == [3]
    ring: set[int] = set()
    try:
        for _ in range(3):
            for index in range(len(sources)):
                lease, expected = device_path.acquire(index), in_ram.acquire(index)
                assert lease.on_device == (index == 3)
                for name, tensor in lease.tensors.items():
                    assert torch.equal(tensor, expected.tensors[name]), (index, name)
                    assert tensor.data_ptr() % DEVICE_ALIGNMENT == 0, (index, name)
                    if index != 3:
                        assert tensor.untyped_storage().data_ptr() in lease.staging  # a ring buffer: the hooks copy out
                        ring.add(tensor.untyped_storage().data_ptr())
                lease.release()
                expected.release()
        assert len(ring) == 2, "depth 1: two device buffers, used in turn"
        (side,) = runtime.side
        waits = [event for kind, event in side.log if kind == "wait"]
        consumed = [event for kind, event in runtime.compute.log if kind == "record"]
        assert waits and set(map(id, waits)) <= set(map(id, consumed)), "refills wait on compute's consumed events"
        compute_waits = [event for kind, event in runtime.compute.log if kind == "wait"]
        copies = [event for kind, event in side.log if kind == "record"]
        assert len(compute_waits) >= 3 * len(streamed) and set(map(id, compute_waits)) <= set(map(id, copies))
        reads = 3 * (len(sources) - 2)  # groups 1 and 3 are never read again (RAM, device)
        assert reads <= device_path.stats.groups_read <= reads + 1  # + the one read ahead for a next forward
    finally:
        device_path.close()
        in_ram.close()
    assert runtime.synchronized == 1 and device_path.device_buffer_bytes() == 0


# ---------------------------------------------------------------- placement on cuda:1, close after a forward


def test_a_bare_cuda_is_the_current_device_not_any_gpu():
    assert _resolved(torch.device("cuda"), current=lambda: 0) == CUDA0
    assert _resolved(torch.device("cuda"), current=lambda: 1) == CUDA1
    assert _resolved(CUDA1, current=lambda: 0) == CUDA1
    assert not _same_device(_resolved(torch.device("cuda"), current=lambda: 0), CUDA1)  # issue 20 item 9
    assert _same_device(_resolved(torch.device("cuda"), current=lambda: 1), CUDA1)
    assert _same_device(torch.device("cpu"), torch.device("cpu")) and not _same_device(CUDA0, torch.device("cpu"))


def test_close_after_a_forward_loads_back_to_the_execution_device_and_runs(offload_dir):
    with torch.inference_mode():
        expected = tiny_lm()(IDS)
    model = accel_nvme.dispatch_model(tiny_lm(), LAYERS, offload_dir=offload_dir, config=NvmeConfig(prefetch_depth=1))
    hooks = nvme_hooks(model)
    prefetcher = hooks[0].prefetcher
    with torch.inference_mode():
        assert torch.equal(model(IDS), expected)
        accel_nvme.close(model)
        assert torch.equal(model(IDS), expected)
    assert all(p.device == hooks[0].execution_device for p in model.parameters())
    assert prefetcher.pool.buffers == [] and prefetcher.device_buffer_bytes() == 0


def test_close_without_load_back_after_a_forward_frees_the_buffers_and_refuses_forwards(offload_dir):
    model = accel_nvme.dispatch_model(tiny_lm(), LAYERS, offload_dir=offload_dir, config=NvmeConfig(prefetch_depth=1))
    with torch.inference_mode():
        model(IDS)
        accel_nvme.close(model, load_back=False)
        with pytest.raises(RuntimeError, match="the prefetcher was closed"):
            model(IDS)


def test_a_read_done_before_its_callback_is_added_is_verified_without_the_prefetcher_lock(sources, monkeypatch):
    import concurrent.futures

    import accel_nvme.prefetch as prefetch

    assert any(source.checksums for source in sources)
    submit = FileReader.submit

    def submit_and_wait(self, segments, buffer):
        futures = submit(self, segments, buffer)
        concurrent.futures.wait(futures)  # done before the prefetcher adds its callbacks: they run right there
        return futures

    blocked = []
    digest = prefetch.digest

    def digest_while_others_use_the_prefetcher(view):
        probe = threading.Thread(target=prefetcher.holders, daemon=True)  # it ends once the lock is free
        probe.start()
        probe.join(timeout=2)
        blocked.append(probe.is_alive())
        return digest(view)

    monkeypatch.setattr(FileReader, "submit", submit_and_wait)
    monkeypatch.setattr(prefetch, "digest", digest_while_others_use_the_prefetcher)
    prefetcher = Prefetcher(sources, torch.device("cpu"), FileReader(), depth=1)
    try:
        prefetcher.acquire(0).release()
    finally:
        prefetcher.close()
    assert blocked and not any(blocked), "the digest ran holding the lock that acquire and release need"


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "grad"])
def test_a_model_on_the_device_path_forwards_exactly_through_the_ring(offload_dir, grad):
    """The real hooks on ring leases (fake runtime): outputs equal in RAM's, in inference and with grad enabled (the
    hooks copy streamed weights out for autograd), three forwards, no view of a ring buffer kept."""
    reference = tiny_lm()
    with torch.inference_mode():
        expected = reference(IDS)
    model = accel_nvme.dispatch_model(tiny_lm(), LAYERS, offload_dir=offload_dir, config=NvmeConfig(prefetch_depth=1))
    hooks = nvme_hooks(model)
    cpu_path = hooks[0].prefetcher
    device_path = Prefetcher(
        cpu_path.sources, torch.device("cpu"), FileReader(), depth=1, resident={1: "host"}, runtime=FakeRuntime()
    )
    for hook in hooks:  # the same model, its groups now served by the device path
        hook.prefetcher = device_path
        device_path.attach()
    cpu_path.close()
    context = torch.enable_grad() if grad else torch.inference_mode()
    with context:
        outputs = [model(IDS) for _ in range(3)]
    ring = device_path.device_buffer_bytes()
    assert ring > 0
    assert all(torch.equal(output.detach(), expected) for output in outputs)
    if grad:  # autograd must have got copies: the ring buffers were refilled since (head is streamed, final is not)
        outputs[0].sum().backward()
        reference(IDS).sum().backward()
        assert torch.equal(model.body.final.weight.grad, reference.body.final.weight.grad)
    accel_nvme.close(model)
    assert device_path.device_buffer_bytes() == 0
