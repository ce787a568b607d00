"""How a worker sets each mode up: a function of (config, folder, checkpoint) giving the forward to time.

The raw modes read the weights' files without compute; the others build or load the model (the Linear model in RAM,
or the Llama checkpoint with from_pretrained) and offload it their way.
"""

from __future__ import annotations

import functools
import mmap
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from accel_nvme.bench.ballast import PAGE
from accel_nvme.bench.config import BenchConfig
from accel_nvme.bench.models import build_model, data_files, load_llama, logits

DIRECT_REQUEST_BYTES = 4 << 20
DIRECT_THREADS = 4
BUFFERED_REQUEST_BYTES = 16 << 20
DIFFUSERS_OFFLOAD_TYPE = "leaf_level"  # block_level puts the Linears of a bare Sequential into one group

Setup = Callable[[BenchConfig, Path, "Path | None"], Callable]


def _aligned_buffer(nbytes: int) -> memoryview:
    return memoryview(mmap.mmap(-1, -(-nbytes // PAGE) * PAGE))


def _submit_direct_reads(pool: ThreadPoolExecutor, fd: int, view: memoryview, size: int) -> list[Future]:
    length = -(-size // PAGE) * PAGE
    return [
        pool.submit(os.preadv, fd, [view[offset : min(offset + DIRECT_REQUEST_BYTES, length)]], offset)
        for offset in range(0, length, DIRECT_REQUEST_BYTES)
    ]


def _read_direct(pool: ThreadPoolExecutor, paths: list[Path], sizes: list[int], buffers: list[memoryview]) -> int:
    """Read the files in turn with O_DIRECT, the next one's requests submitted before the last one's are awaited."""
    total, in_flight = 0, None
    fds = [os.open(p, os.O_RDONLY | os.O_DIRECT) for p in paths]
    try:
        for i, (fd, size) in enumerate(zip(fds, sizes, strict=True)):
            futures = _submit_direct_reads(pool, fd, buffers[i % 2], size)
            if in_flight is not None:
                total += sum(f.result() for f in in_flight)
            in_flight = futures
        return total + sum(f.result() for f in in_flight or [])
    finally:
        for fd in fds:
            os.close(fd)


def setup_raw_direct(config: BenchConfig, folder: Path, checkpoint: Path | None) -> Callable:
    """Read every data file with O_DIRECT: 4 threads of 4 MiB requests, two staging buffers taking turns."""
    paths = data_files(config, folder, checkpoint)
    sizes = [p.stat().st_size for p in paths]
    buffers = [_aligned_buffer(max(sizes)) for _ in range(2)]
    pool = ThreadPoolExecutor(DIRECT_THREADS, thread_name_prefix="raw-direct")

    def read_all(_x) -> None:
        total = _read_direct(pool, paths, sizes, buffers)
        if total != sum(sizes):
            raise RuntimeError(f"O_DIRECT read {total} bytes, expected {sum(sizes)} from {paths[0].parent}")

    return read_all


def _read_buffered(path: Path, size: int, view: memoryview) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < size:
            n = os.preadv(fd, [view[done : min(done + BUFFERED_REQUEST_BYTES, size)]], done)
            if n == 0:
                raise RuntimeError(f"{path}: read {done} bytes, expected {size}")
            done += n
    finally:
        os.close(fd)


def setup_raw_buffered(config: BenchConfig, folder: Path, checkpoint: Path | None) -> Callable:
    """Read every data file buffered and sequentially in 16 MiB requests (the page cache keeps what it can)."""
    paths = data_files(config, folder, checkpoint)
    sizes = [p.stat().st_size for p in paths]
    view = _aligned_buffer(max(sizes))

    def read_all(_x) -> None:
        for path, size in zip(paths, sizes, strict=True):
            _read_buffered(path, size, view)

    return read_all


def setup_ram(config: BenchConfig, folder: Path, checkpoint: Path | None) -> Callable:
    """The Linear model all in RAM, no offload."""
    return build_model(config)


def setup_accelerate_disk(config: BenchConfig, folder: Path, checkpoint: Path | None) -> Callable:
    """accelerate's "disk" offload of the Linear model: every layer's tensors as ``.dat`` memmaps."""
    from accelerate import dispatch_model

    device_map = {str(i): "disk" for i in range(config.layers)}
    return dispatch_model(build_model(config), device_map=device_map, main_device="cpu", offload_dir=str(folder))


def _apply_diffusers_disk(model, folder: Path):
    import torch
    from diffusers.hooks import apply_group_offloading

    cpu = torch.device("cpu")
    apply_group_offloading(
        model,
        onload_device=cpu,
        offload_device=cpu,
        offload_type=DIFFUSERS_OFFLOAD_TYPE,
        num_blocks_per_group=1,
        offload_to_disk_path=str(folder),
    )
    return model


def setup_diffusers_disk(config: BenchConfig, folder: Path, checkpoint: Path | None) -> Callable:
    """diffusers' group offloading to disk of the Linear model, one leaf per group."""
    return _apply_diffusers_disk(build_model(config), folder)


def setup_nvme(
    config: BenchConfig, folder: Path, checkpoint: Path | None, resident_budget: int | str = 0, **settings: Any
) -> Callable:
    """accel_nvme's ``dispatch_model`` with every Linear layer on "nvme", ``resident_budget`` kept loaded."""
    import accel_nvme

    device_map = {str(i): "nvme" for i in range(config.layers)}
    settings = accel_nvme.config.load_config(resident_budget=resident_budget, **settings)
    return accel_nvme.dispatch_model(
        build_model(config), device_map, offload_dir=str(folder), main_device="cpu", config=settings
    )


def setup_llama_ram(config: BenchConfig, folder: Path, checkpoint: Path) -> Callable:
    """The model all in RAM: from_pretrained leaves tensors mapped from the checkpoint (read from disk on first use,
    evicted with the page cache, at offsets not aligned to 64 bytes), so they are copied into memory of their own."""
    import torch

    model = load_llama(checkpoint)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    return functools.partial(logits, model)


def setup_llama_accelerate_disk(config: BenchConfig, folder: Path, checkpoint: Path) -> Callable:
    """transformers' own disk offload: accelerate's hooks read each tensor from the checkpoint's shards."""
    model = load_llama(checkpoint, device_map="auto", max_memory={"cpu": "20KB"}, offload_folder=str(folder))
    return functools.partial(logits, model)


def setup_llama_diffusers_disk(config: BenchConfig, folder: Path, checkpoint: Path) -> Callable:
    """diffusers' group offloading to disk of the Llama, loaded whole into RAM first."""
    return functools.partial(logits, _apply_diffusers_disk(load_llama(checkpoint), folder))


def setup_llama_nvme(
    config: BenchConfig, folder: Path, checkpoint: Path, resident_budget: int | str = 0, **settings: Any
) -> Callable:
    """What a user runs: ``from_pretrained(..., offload_backend="nvme")`` streams the checkpoint's layers."""
    import accel_nvme  # noqa: F401  (teaches from_pretrained offload_backend="nvme")

    kwargs = {"offload_backend": "nvme", "offload_folder": str(folder), "nvme_resident_budget": resident_budget}
    kwargs |= {f"nvme_{name}": value for name, value in settings.items()}
    model = load_llama(checkpoint, device_map="auto", max_memory={"cpu": "20KB"}, **kwargs)
    return functools.partial(logits, model)
