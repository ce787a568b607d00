import gc
import os
import threading

import pytest
import torch
from helpers import cached_bytes, open_fds

from accel_nvme.format import GroupFileError, align_up, write_group
from accel_nvme.io import FileReader, Segment
from accel_nvme.staging import StagingBuffer


def group_file(folder, n=300_000, seed=0):
    tensor = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    layout = write_group(folder / "g.safetensors", {"w": tensor}).layout
    return folder / "g.safetensors", layout, tensor


def read_all(reader, path, layout):
    buffer = StagingBuffer(align_up(layout.data_bytes))
    segment = Segment(path, layout.data_offset, align_up(layout.data_bytes), 0, layout.data_bytes)
    for future in reader.submit([segment], buffer):
        future.result()
    return buffer


@pytest.mark.parametrize("direct_io", ["auto", "on", "off"])
def test_reads_the_data_section_exactly(tmp_path, direct_io):
    path, layout, tensor = group_file(tmp_path)
    reader = FileReader(direct_io, io_threads=3, request_bytes=64 << 10)
    buffer = read_all(reader, path, layout)
    assert torch.equal(buffer.tensor[: layout.data_bytes].view(torch.float32), tensor)
    assert reader.opened() == {path: direct_io != "off"}  # this disk takes O_DIRECT
    reader.close()
    buffer.close()


def test_buffered_reads_leave_no_page_cache_behind(tmp_path):
    path, layout, _ = group_file(tmp_path, n=4_000_000)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    reader = FileReader("off")
    read_all(reader, path, layout).close()
    reader.close()
    resident = cached_bytes(path)
    os.close(fd)
    assert resident <= 2 * 4096 * 64, f"{resident} bytes of {path} still cached"


def test_filesystem_refusing_o_direct_falls_back(ramfs):
    path, layout, tensor = group_file(ramfs)
    with pytest.raises(OSError):
        os.open(path, os.O_RDONLY | os.O_DIRECT)
    reader = FileReader("auto")
    buffer = read_all(reader, path, layout)
    assert torch.equal(buffer.tensor[: layout.data_bytes].view(torch.float32), tensor)
    assert reader.opened() == {path: False}
    reader.close()
    strict = FileReader("on")
    with pytest.raises(GroupFileError, match=str(path)):
        read_all(strict, path, layout)
    strict.close()


def test_truncated_file_is_reported_with_its_name(tmp_path):
    path, layout, _ = group_file(tmp_path)
    os.truncate(path, layout.data_offset + layout.data_bytes // 2)
    reader = FileReader("auto", request_bytes=64 << 10)
    with pytest.raises(GroupFileError, match=f"{path}.*truncated"):
        read_all(reader, path, layout)
    reader.close()


def test_close_releases_threads_and_descriptors(tmp_path):
    path, layout, _ = group_file(tmp_path)
    gc.collect()  # readers of earlier tests close their files when collected: not during this count
    fds = open_fds()
    threads = set(threading.enumerate())
    reader = FileReader("auto", io_threads=4)
    read_all(reader, path, layout).close()
    assert open_fds() > fds
    reader.close()
    assert open_fds() == fds
    assert [t for t in threading.enumerate() if t not in threads] == []
