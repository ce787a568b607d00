"""The streaming pieces without a model: the successor schedule and the buffer pool alone, the stats recorder, and a
Prefetcher built directly on group files written by the project's own format code, read with real O_DIRECT."""

import pytest
import torch

from accel_nvme.format import GroupFileError, align_up, is_padding, write_group
from accel_nvme.io import FileReader, Segment
from accel_nvme.prefetch import Checksum, GroupSource, Prefetcher, TensorView
from accel_nvme.schedule import SuccessorSchedule
from accel_nvme.staging import BufferPool
from accel_nvme.stats import HISTORY, ForwardRecorder

CPU = torch.device("cpu")

# ------------------------------------------------------------------------------------------------ the schedule


def test_the_schedule_starts_in_order_and_wraps_around():
    schedule = SuccessorSchedule(4)
    assert schedule.upcoming(0, 2) == [1, 2]
    assert schedule.upcoming(3, 2) == [0, 1], "after the last group come the first ones (the next forward)"
    assert schedule.upcoming(1, 10) == [2, 3, 0], "never more than the other groups, never the group itself"


def test_the_schedule_learns_a_non_sequential_order():
    schedule = SuccessorSchedule(5)
    for index in (0, 3, 1, 4, 2):
        schedule.learn(index)
    assert schedule.upcoming(0, 4) == [3, 1, 4, 2]
    assert schedule.upcoming(2, 2) == [3, 1], "the device_map successor until the wrap-around is seen"
    schedule.learn(0)  # the next forward begins
    assert schedule.upcoming(2, 2) == [0, 3]
    schedule.learn(0)  # the same group again (a module called twice) is no edge
    assert schedule.upcoming(0, 1) == [3]


def test_the_schedule_follows_a_decoder_that_runs_alone_after_its_encoder():
    schedule = SuccessorSchedule(6)
    for index in (0, 1, 2, 3, 4, 5, 3, 4, 5):  # a first call through the encoder (0-2), then decoder steps (3-5)
        schedule.learn(index)
    assert schedule.upcoming(5, 2) == [3, 4]


def test_the_schedule_skips_resident_groups():
    schedule = SuccessorSchedule(5)
    assert schedule.upcoming(0, 2, skip={1, 2}) == [3, 4]
    assert schedule.upcoming(4, 3, skip={0}) == [1, 2, 3]


# ---------------------------------------------------------------------------------------------------- the pool


def test_the_pool_hands_out_each_buffer_that_no_slot_owns():
    pool = BufferPool(3, 10_000)
    first, second, third = pool.buffers
    assert all(b.nbytes >= 10_000 for b in pool.buffers)
    assert pool.pointers == {b.tensor.data_ptr() for b in pool.buffers}
    assert all(pointer % 4096 == 0 for pointer in pool.pointers), "O_DIRECT needs page-aligned buffers"
    assert pool.free([]) is first
    assert pool.free([first, None]) is second
    assert pool.free([second, first]) is third
    assert pool.free([third, first, second]) is None
    pool.close()
    assert pool.buffers == []
    assert all(b.tensor is None and b._mmap.closed for b in (first, second, third))


def test_a_pool_buffer_holds_at_least_one_page():
    pool = BufferPool(1, 0)
    assert pool.buffers[0].nbytes == 4096
    pool.close()


def smaps_of(address):
    """The /proc/self/smaps fields of the mapping that holds ``address``."""
    fields, inside = {}, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside:
                fields[head.rstrip(":")] = line.split()[1]
    return fields


def test_staging_buffers_ask_for_transparent_huge_pages():
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        mode = f.read()
    pool = BufferPool(1, 8 << 20)
    fields = smaps_of(pool.buffers[0].tensor.data_ptr())
    expected = "0" if "[never]" in mode else "1"  # "madvise" mode: eligible only because the buffer asked
    assert fields["THPeligible"] == expected, f"THP mode {mode.strip()!r}, smaps {fields}"
    pool.close()


# ----------------------------------------------------------------------------------------------- the recorder


def test_the_recorder_splits_forwards_where_a_caller_asks_again():
    reader = FileReader("off", io_threads=1)
    recorder = ForwardRecorder(reader)
    recorder.asked("a")
    recorder.read(100)
    recorder.asked("b")
    recorder.read(50)
    recorder.released()
    recorder.asked("a")  # a new forward
    recorder.read(7)
    first, current = recorder.forwards()
    assert (first.groups_read, first.bytes_read) == (2, 150)
    assert (current.groups_read, current.bytes_read) == (1, 7), "the forward in progress comes last"
    assert recorder.totals.bytes_read == 157
    for _ in range(HISTORY + 5):
        recorder.asked("a")
    assert len(recorder.forwards()) == HISTORY
    reader.close()


# ---------------------------------------------------------------------------------- a Prefetcher on real files


def group_sources(folder, sizes, verify=False):
    """Group files written by ``format.write_group``, and the sources reading each one's aligned data section."""
    sources, contents = [], []
    for index, size in enumerate(sizes):
        generator = torch.Generator().manual_seed(index)
        tensors = {f"g{index}.weight": torch.randn(size, generator=generator), f"g{index}.bias": torch.randn(3)}
        path = folder / f"group-{index}.safetensors"
        written = write_group(path, tensors)
        layout = written.layout
        own = align_up(layout.data_bytes)
        views = [TensorView(e.name, e.start, e.dtype, e.shape) for e in layout.entries if not is_padding(e.name)]
        checks = (Checksum(path, 0, layout.data_bytes, written.data_digest),)
        segment = Segment(path, layout.data_offset, own, 0, layout.data_bytes)
        sources.append(GroupSource(f"g{index}", (segment,), own, tuple(views), checks, verify))
        contents.append(tensors)
    return sources, contents


@pytest.fixture
def groups(tmp_path):
    return group_sources(tmp_path, [5000, 3000, 7000, 2000, 4000])


def prefetcher_on(sources, depth=1, resident=None):
    return Prefetcher(sources, CPU, FileReader("on", io_threads=2, request_bytes=8192), depth, resident)


def assert_exact(lease, expected):
    assert lease.tensors.keys() == expected.keys()
    assert all(torch.equal(lease.tensors[name], tensor) for name, tensor in expected.items())


def test_a_lease_holds_the_group_until_it_is_released(groups):
    sources, contents = groups
    prefetcher = prefetcher_on(sources)
    lease = prefetcher.acquire(2, "caller")
    assert_exact(lease, contents[2])
    assert not lease.on_device
    assert lease.staging == prefetcher.pool.pointers
    assert all(t.untyped_storage().data_ptr() in lease.staging for t in lease.tensors.values()), "zero-copy views"
    assert prefetcher.holders() == ["caller"]
    assert any(buffer.tensor.data_ptr() in lease.staging for buffer in prefetcher.buffers_in_use())
    lease.release()
    lease.release()  # again: harmless
    assert prefetcher.holders() == []
    prefetcher.close()
    assert prefetcher.pool.buffers == []


def test_a_released_lease_cannot_drop_a_later_hold_of_the_same_caller(groups):
    sources, _ = groups
    prefetcher = prefetcher_on(sources)
    stale = prefetcher.acquire(1, "caller")
    stale.release()
    current = prefetcher.acquire(1, "caller")
    stale.release()
    assert prefetcher.holders() == ["caller"], "a stale lease released the current hold"
    current.release()
    assert prefetcher.holders() == []
    prefetcher.close()


def test_several_callers_share_a_group_and_release_it_in_any_order(groups):
    sources, contents = groups
    prefetcher = prefetcher_on(sources)
    first, second = prefetcher.acquire(0, "a"), prefetcher.acquire(0, "b")
    assert sorted(prefetcher.holders()) == ["a", "b"]
    first.release()
    assert prefetcher.holders() == ["b"]
    assert_exact(second, contents[0])
    second.release()
    assert prefetcher.holders() == []
    prefetcher.close()


def test_groups_read_in_a_learned_non_sequential_order_are_read_once_per_forward(groups):
    sources, contents = groups
    order = [0, 3, 1, 4, 2]
    prefetcher = prefetcher_on(sources, depth=2)
    for _ in range(12):  # one forward to learn the order, then ten in steady state, then one to close the tenth
        for index in order:
            lease = prefetcher.acquire(index)
            assert_exact(lease, contents[index])  # every buffer refilled many times: never another group's bytes
            lease.release()
    forwards = prefetcher.forward_stats()
    steady = forwards[1:11]
    reads = sum(f.groups_read for f in steady)
    assert len(order) * 10 - 2 <= reads <= len(order) * 10 + 2, f"{reads} reads in 10 forwards of {len(order)} groups"
    assert sum(f.bytes_read for f in steady) <= 10 * sum(s.nbytes for s in sources) + 2 * max(s.nbytes for s in sources)
    prefetcher.close()


def test_resident_groups_are_read_once_and_never_streamed(groups):
    sources, contents = groups
    prefetcher = prefetcher_on(sources, resident={1: "host", 3: "host"})
    assert prefetcher.resident == [1, 3]
    assert prefetcher.resident_on_device() == [], "host-resident groups keep their host copy"
    for _ in range(4):
        for index in range(len(sources)):
            lease = prefetcher.acquire(index)
            assert_exact(lease, contents[index])
            if index in (1, 3):
                pointers = {t.untyped_storage().data_ptr() for t in lease.tensors.values()}
                assert not pointers & prefetcher.pool.pointers, "a resident group has a buffer of its own"
                assert prefetcher.holders() == [], "a resident group is never marked in use"
            lease.release()
    streamed = sum(sources[i].nbytes for i in (0, 2, 4))
    assert prefetcher.stats.bytes_read <= 4 * streamed + sources[0].nbytes, "resident groups were streamed"
    prefetcher.close()


def test_a_damaged_group_file_is_an_error_naming_it_every_time_it_is_asked_for(tmp_path):
    sources, contents = group_sources(tmp_path, [5000, 3000, 7000])
    damaged = sources[1].segments[0]
    with open(damaged.path, "r+b") as f:
        f.seek(damaged.file_offset + 100)
        byte = f.read(1)
        f.seek(damaged.file_offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    prefetcher = prefetcher_on(sources)
    assert_exact(prefetcher.acquire(0), contents[0])
    prefetcher.release(0)
    for _ in range(2):  # no stale or damaged bytes served on a second ask either
        with pytest.raises(GroupFileError, match=f"{damaged.path}: .* do not match their digest"):
            prefetcher.acquire(1)
        assert prefetcher.holders() == []
    lease = prefetcher.acquire(2)
    assert_exact(lease, contents[2])
    lease.release()
    prefetcher.close()


def test_a_truncated_group_file_is_an_error_naming_it(tmp_path):
    sources, _ = group_sources(tmp_path, [5000, 3000])
    truncated = sources[1].segments[0]
    with open(truncated.path, "r+b") as f:
        f.truncate(truncated.file_offset + 4096)
    prefetcher = prefetcher_on(sources)
    with pytest.raises(GroupFileError, match=f"{truncated.path}: expected .* truncated"):
        prefetcher.acquire(1)
    assert prefetcher.holders() == []
    prefetcher.close()


def test_holding_more_groups_than_the_buffers_is_a_clear_error(groups):
    sources, _ = groups
    prefetcher = prefetcher_on(sources, depth=1)
    held = [prefetcher.acquire(0, "a"), prefetcher.acquire(1, "b")]
    with pytest.raises(RuntimeError, match=r"more than prefetch_depth \+ 1 = 2; raise prefetch_depth"):
        prefetcher.acquire(2, "c")
    assert sorted(prefetcher.recover()) == ["a", "b"], "recover names who still held a group"
    assert prefetcher.holders() == []
    assert held[0].tensors  # the leases outlive recover; their release is now harmless
    held[0].release()
    prefetcher.close()


def test_a_closed_prefetcher_refuses_to_lease_naming_the_group(groups):
    sources, _ = groups
    prefetcher = prefetcher_on(sources)
    prefetcher.close()
    with pytest.raises(RuntimeError, match="group g3: the prefetcher was closed"):
        prefetcher.acquire(3)
