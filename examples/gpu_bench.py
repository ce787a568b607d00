"""GPU figures for the nvme tier: a Flux-like step streamed from the drive against diffusers' in-RAM group offloading.

What it measures, on one CUDA device, with the same bf16 weights (built from a fixed seed) in every mode:

- ``no_offload``: the whole model on the GPU, the reference output and step time;
- ``diffusers_stream``: ``diffusers.hooks.apply_group_offloading(..., offload_type="block_level",
  num_blocks_per_group=1, use_stream=True, record_stream=True)``: every block kept in pinned RAM and copied on a side
  stream one block ahead (the in-RAM anchor the nvme tier is held to);
- ``nvme``: ``accel_nvme.dispatch_model`` with every block mapped to ``"nvme"`` (``--prefetch-depth``, 2; 1 holds
  as many blocks on the GPU as ``diffusers_stream``: the one in use and the next): "cold" steps
  drop the page cache of the group files first (``posix_fadvise(DONTNEED)``; O_DIRECT reads bypass it anyway),
  "warm" steps do not;
- the host-to-device rate of one block's bytes: a plain pinned tensor (``pin_memory=True``), an mmap buffer registered
  with ``cudaHostRegister`` and the way accel_nvme copies (its ``StagingBuffer``, a side stream, an event per copy);
- a raw O_DIRECT read of the group files (4 threads, 4 MiB requests), the drive's floor.

Each step is one forward of the whole stack (``--tokens`` image+text tokens, batch 1), timed with the device
synchronized before and after; the table shows the median of ``--steps`` steps after one warm-up. Every output is
compared with ``torch.equal`` to ``no_offload``'s: streaming must not change a bit. Targets: nvme cold step at most
1.10 × the larger of its floors (the raw read of the bytes it streams per step, the ``no_offload`` step), accel_nvme's
side-stream copies at least 80 % of the plain pinned copy rate. ``diffusers_stream`` copies from pinned RAM, not from a
drive: the ratio to it is information, not a target.

Run it on a machine with an NVIDIA GPU (defaults: 24 blocks of hidden size 3072, 18 × 3072² ≈ 170 M parameters
≈ 340 MB each, 8.2 GB in all; the GPU needs room for the whole model for ``no_offload``, the host ~2 × the model for
``diffusers_stream``, the offload folder's drive 8.2 GB free)::

    python examples/gpu_bench.py --json gpu.json
    python examples/gpu_bench.py --offload-folder /mnt/nvme/bench --modes diffusers_stream,nvme --steps 10

``--offload-folder`` should be on the drive to measure (default: a temporary folder in the current directory,
removed at the end). Host RSS is the process's ``VmRSS`` at the end of each mode; for RSS free of what earlier modes
left behind, run one mode per process with ``--modes``. Without CUDA the script exits with status 2;
``--dry-run`` runs every mode on the CPU at a tiny size (2 blocks, hidden 64, 16 tokens) to check the code paths.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import gc
import json
import math
import mmap
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import accel_nvme
from accel_nvme.staging import HOST_REGISTER_PORTABLE, StagingBuffer

MODES = ("no_offload", "diffusers_stream", "nvme")
NO_CUDA_MESSAGE = (
    "gpu_bench.py needs a CUDA device; run on a machine with an NVIDIA GPU "
    "(or pass --dry-run to check the code paths on the CPU)"
)
DTYPE = torch.bfloat16
SEED = 0
TIMESTEP = 500.0
TIMESTEP_DIM = 256
LATENT_CHANNELS = 64
HEAD_DIM = 128
DRY_RUN_SIZE = {"blocks": 2, "hidden": 64, "tokens": 16}
PAGE = 4096
READ_THREADS = 4
READ_REQUEST_BYTES = 4 << 20
COPY_REPEATS = 10
STEP_TARGET = 1.10  # nvme step / max(drive floor, no_offload step)
RATE_TARGET = 0.80
GB = 1e9


# ---------------------------------------------------------------- the model


class FluxLikeBlock(nn.Module):
    """A single-stream Flux-like block: adaLN modulation from the timestep, attention, a GELU(tanh) MLP, gated adds."""

    def __init__(self, hidden: int, heads: int, device: torch.device | str | None = None, dtype: torch.dtype = DTYPE):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.heads = heads
        self.modulation = nn.Linear(hidden, 6 * hidden, **kw)
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6, **kw)
        self.qkv = nn.Linear(hidden, 3 * hidden, **kw)
        self.out = nn.Linear(hidden, hidden, **kw)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6, **kw)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, 4 * hidden, **kw), nn.GELU(approximate="tanh"), nn.Linear(4 * hidden, hidden, **kw)
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """``x`` (batch, tokens, hidden) after attention and MLP, both modulated and gated by ``temb``."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(temb)).unsqueeze(1).chunk(6, dim=-1)
        batch, tokens, hidden = x.shape
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).view(batch, tokens, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attention = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, hidden)
        x = x + gate1 * self.out(attention)
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.mlp(h)


class TimestepEmbedding(nn.Module):
    """An MLP from sinusoidal timestep features to the modulation input (a module, not a Sequential, as in diffusers).

    diffusers' block-level group offloading treats every top-level ``nn.Sequential`` as a list of blocks.
    """

    def __init__(self, hidden: int, device: torch.device | str | None = None, dtype: torch.dtype = DTYPE):
        super().__init__()
        self.linear_1 = nn.Linear(TIMESTEP_DIM, hidden, device=device, dtype=dtype)
        self.linear_2 = nn.Linear(hidden, hidden, device=device, dtype=dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The timestep embedding of ``features`` (batch, 256)."""
        return self.linear_2(F.silu(self.linear_1(features)))


class FluxLikeTransformer(nn.Module):
    """Timestep embedding, input projection, ``blocks`` Flux-like blocks (a ModuleList), output norm and projection."""

    def __init__(self, blocks: int, hidden: int, device: torch.device | str | None = None, dtype: torch.dtype = DTYPE):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        heads = max(1, hidden // HEAD_DIM)
        if hidden % heads:
            raise ValueError(f"--hidden {hidden} is not a multiple of the {heads} heads of {HEAD_DIM} it implies")
        self.time_embed = TimestepEmbedding(hidden, **kw)
        self.proj_in = nn.Linear(LATENT_CHANNELS, hidden, **kw)
        self.blocks = nn.ModuleList(FluxLikeBlock(hidden, heads, **kw) for _ in range(blocks))
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6, **kw)
        self.proj_out = nn.Linear(hidden, LATENT_CHANNELS, **kw)

    def forward(self, latents: torch.Tensor, timestep_features: torch.Tensor) -> torch.Tensor:
        """The prediction for ``latents`` (batch, tokens, 64) at the timestep ``timestep_features`` (batch, 256)."""
        temb = self.time_embed(timestep_features)
        x = self.proj_in(latents)
        for block in self.blocks:
            x = block(x, temb)
        return self.proj_out(self.norm_out(x))


@dataclass(frozen=True)
class Settings:
    """What one run measures, after the command line was read."""

    blocks: int
    hidden: int
    tokens: int
    steps: int
    device: torch.device
    modes: tuple[str, ...]
    offload_folder: Path
    dry_run: bool
    prefetch_depth: int = 2

    @property
    def cuda(self) -> bool:
        """Whether the run uses a CUDA device (False in a dry run)."""
        return self.device.type == "cuda"


def build_model(settings: Settings) -> FluxLikeTransformer:
    """The model from the fixed seed, built on the run's device (fast, and the same bytes in every mode)."""
    torch.manual_seed(SEED)
    return FluxLikeTransformer(settings.blocks, settings.hidden, device=settings.device).eval()


def timestep_features(timestep: float, dim: int = TIMESTEP_DIM) -> torch.Tensor:
    """Sinusoidal features of ``timestep``, shape (1, dim), as Flux's time projection makes them."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = timestep * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)])[None]


def make_inputs(settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's inputs (latent tokens, timestep features), from a fixed seed, on the run's device."""
    generator = torch.Generator().manual_seed(SEED + 1)
    latents = torch.randn(1, settings.tokens, LATENT_CHANNELS, generator=generator).to(DTYPE)
    return latents.to(settings.device), timestep_features(TIMESTEP).to(DTYPE).to(settings.device)


def block_nbytes(model: FluxLikeTransformer) -> int:
    """Bytes of one block's weights."""
    return sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())


# ---------------------------------------------------------------- timing, memory, files


def synchronize(device: torch.device) -> None:
    """Wait for all work queued on ``device`` (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    """Collect garbage and hand cached device and pinned host memory back, so the next mode starts clean."""
    gc.collect()
    if device.type != "cuda":
        return
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    accelerator = getattr(torch, "accelerator", None)
    empty_host = getattr(accelerator, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if empty_host is not None:
        empty_host()


def reset_peak(device: torch.device) -> None:
    """Start a new peak of device memory (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gpu_bytes(device: torch.device) -> int | None:
    """Most device memory allocated by tensors since the last ``reset_peak``."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def host_rss_bytes() -> int | None:
    """This process's resident set (``VmRSS``), or None where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def drop_page_cache(paths: list[Path]) -> None:
    """Evict ``paths`` from the page cache (``posix_fadvise(DONTNEED)``, no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@dataclass
class StepRun:
    """Wall times of a warm-up step and the timed steps, and the outputs kept for the exactness check."""

    warmup_s: float = 0.0
    steps_s: list[float] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def median_s(self) -> float | None:
        """Median of the timed steps."""
        return statistics.median(self.steps_s) if self.steps_s else None


def timed_step(model: nn.Module, inputs: tuple[torch.Tensor, ...], device: torch.device) -> tuple[float, torch.Tensor]:
    """One forward, timed from a synchronized device to a synchronized device; the output copied to the CPU after."""
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        output = model(*inputs)
    synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, output.to("cpu")


def run_steps(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    device: torch.device,
    steps: int,
    before_step: Callable[[], None] | None = None,
    warmup: bool = True,
) -> StepRun:
    """An optional warm-up step then ``steps`` timed ones (``before_step`` runs untimed before each timed one).

    Keeps the warm-up's and the last step's outputs.
    """
    run = StepRun()
    if warmup:
        run.warmup_s, output = timed_step(model, inputs, device)
        run.outputs.append(output)
    for _ in range(steps):
        if before_step is not None:
            before_step()
        seconds, output = timed_step(model, inputs, device)
        run.steps_s.append(seconds)
    if steps:
        run.outputs.append(output)
    return run


def exact(outputs: list[torch.Tensor], reference: torch.Tensor | None) -> bool | None:
    """Whether every output is ``torch.equal`` to the reference (None without one)."""
    if reference is None:
        return None
    return all(torch.equal(output, reference) for output in outputs)


def progress(message: str) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    print(f"[gpu_bench] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the modes


def mode_no_offload(settings: Settings, inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """The whole model on the device: the reference output and step time."""
    model = build_model(settings)
    synchronize(settings.device)
    reset_peak(settings.device)
    run = run_steps(model, inputs, settings.device, settings.steps)
    result = _mode_result(run, settings.device)
    result["output"] = run.outputs[0]
    result["outputs"] = run.outputs
    del model
    return result


def mode_diffusers_stream(settings: Settings, inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """diffusers' block-level group offloading from pinned RAM with a side stream (no stream in a dry run)."""
    try:
        from diffusers.hooks import apply_group_offloading
    except ImportError as e:
        return {"status": "skipped", "reason": f"diffusers is not importable: {e}"}
    model = build_model(settings).to("cpu")
    release_memory(settings.device)
    use_stream = settings.cuda  # diffusers refuses streams for a CPU onload device
    apply_group_offloading(
        model,
        onload_device=settings.device,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=use_stream,
        record_stream=use_stream,
        low_cpu_mem_usage=False,
    )
    reset_peak(settings.device)
    run = run_steps(model, inputs, settings.device, settings.steps)
    result = _mode_result(run, settings.device)
    result.update(use_stream=use_stream, record_stream=use_stream, outputs=run.outputs)
    del model
    return result


def nvme_device_map(model: FluxLikeTransformer, main: int | str) -> dict[str, int | str]:
    """Every block on ``"nvme"``, the rest of the model on ``main``."""
    device_map: dict[str, int | str] = {name: main for name, _ in model.named_children() if name != "blocks"}
    device_map.update({f"blocks.{i}": "nvme" for i in range(len(model.blocks))})
    return device_map


def mode_nvme(settings: Settings, inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """Every block streamed from group files; cold (page cache dropped) then warm steps, and a raw read of the files."""
    model = build_model(settings).to("cpu")
    release_memory(settings.device)
    main: int | str = settings.device.index if settings.cuda else "cpu"
    start = time.perf_counter()
    model = accel_nvme.dispatch_model(
        model,
        nvme_device_map(model, main),
        offload_dir=str(settings.offload_folder),
        main_device=main,
        config=accel_nvme.NvmeConfig(prefetch_depth=settings.prefetch_depth),
    )
    write_s = time.perf_counter() - start
    files = accel_nvme.group_files(model)
    release_memory(settings.device)
    reset_peak(settings.device)
    try:
        cold = run_steps(model, inputs, settings.device, settings.steps, before_step=lambda: drop_page_cache(files))
        warm = run_steps(model, inputs, settings.device, settings.steps, warmup=False)
        result = _mode_result(cold, settings.device)
        total = accel_nvme.stats(model).as_dict()["total"]
        forwards = 1 + 2 * settings.steps
        bytes_per_step = total["bytes_read"] / forwards
        result.update(
            warm_step_s=warm.median_s,
            warm_steps_s=warm.steps_s,
            write_s=write_s,
            group_files=len(files),
            files_bytes=sum(path.stat().st_size for path in files),
            stats_total=total,
            bytes_read_per_step=bytes_per_step,
            stream_gb_per_s=bytes_per_step / cold.median_s / GB if cold.median_s else None,
            outputs=cold.outputs + warm.outputs[-1:],
        )
        result["ring_bytes"] = _prefetcher(model).device_buffer_bytes()
        progress("raw O_DIRECT read of the group files")
        result["raw_read"] = raw_read_rate(files)
    finally:
        accel_nvme.close(model, load_back=False)  # unregisters and frees the staging buffers
    del model
    return result


def _prefetcher(model: nn.Module) -> Any:
    """The prefetcher the nvme hooks of ``model`` share."""
    return next(
        m._hf_hook.prefetcher
        for m in model.modules()
        if isinstance(getattr(m, "_hf_hook", None), accel_nvme.NvmeAlignDevicesHook)
    )


def _mode_result(run: StepRun, device: torch.device) -> dict[str, Any]:
    return {
        "status": "ok",
        "step_s": run.median_s,
        "steps_s": run.steps_s,
        "warmup_s": run.warmup_s,
        "peak_gpu_bytes": peak_gpu_bytes(device),
        "host_rss_bytes": host_rss_bytes(),
    }


# ---------------------------------------------------------------- transfer rates


def raw_read_rate(paths: list[Path]) -> dict[str, Any]:
    """Read every file whole with O_DIRECT (buffered + fadvise where refused): 4 threads of 4 MiB requests."""
    drop_page_cache(paths)
    sizes = [path.stat().st_size for path in paths]
    length = -(-max(sizes) // PAGE) * PAGE
    buffer = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = memoryview(buffer)
    direct = True
    fds = []
    try:
        for path in paths:
            try:
                fds.append(os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC))
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                direct = False
                fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        requests = [
            (fd, offset, min(READ_REQUEST_BYTES, -(-size // PAGE) * PAGE - offset))
            for fd, size in zip(fds, sizes, strict=True)
            for offset in range(0, size, READ_REQUEST_BYTES)
        ]
        start = time.perf_counter()
        with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="gpu-bench-read") as pool:
            got = sum(pool.map(lambda r: os.preadv(r[0], [view[r[1] : r[1] + r[2]]], r[1]), requests))
        seconds = time.perf_counter() - start
    finally:
        for fd in fds:
            os.close(fd)
        view.release()
        buffer.close()
    if not direct:
        drop_page_cache(paths)
    if got < sum(sizes):
        raise RuntimeError(f"read {got} bytes of the group files, expected {sum(sizes)} ({paths[0].parent})")
    return {"direct": direct, "bytes": got, "seconds": seconds, "gb_per_s": got / seconds / GB}


def _copy_rate(copy: Callable[[], object], nbytes: int, device: torch.device) -> float:
    """GB/s of ``COPY_REPEATS`` calls of ``copy`` (one warm-up call first), device synchronized around them."""
    copy()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(COPY_REPEATS):
        copy()
    torch.cuda.synchronize(device)
    return COPY_REPEATS * nbytes / (time.perf_counter() - start) / GB


def registered_mmap_rate(target: torch.Tensor, device: torch.device) -> float | None:
    """GB/s into ``target`` from a page-aligned anonymous mmap pinned with ``cudaHostRegister``, as accel_nvme pins.

    None when the registration fails.
    """
    nbytes = target.numel()
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    host = torch.frombuffer(buffer, dtype=torch.uint8)
    pointer = host.data_ptr()
    cudart = torch.cuda.cudart()
    with torch.cuda.device(device):
        registered = int(cudart.cudaHostRegister(pointer, nbytes, HOST_REGISTER_PORTABLE)) == 0
    try:
        if not registered:
            return None
        return _copy_rate(functools.partial(target.copy_, host, non_blocking=True), nbytes, device)
    finally:
        torch.cuda.synchronize(device)
        if registered:
            cudart.cudaHostUnregister(pointer)
        del host
        gc.collect()
        with contextlib.suppress(BufferError):  # a view still alive keeps the mapping until it is collected
            buffer.close()


def h2d_rates(settings: Settings, nbytes: int) -> dict[str, Any]:
    """Host-to-device GB/s of ``nbytes``: plain pinned tensor, registered mmap, and accel_nvme's side-stream copy."""
    device = settings.device
    nbytes = -(-nbytes // PAGE) * PAGE
    result: dict[str, Any] = {"status": "ok", "bytes": nbytes, "repeats": COPY_REPEATS}
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)

    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    result["plain_pinned_gb_per_s"] = _copy_rate(
        functools.partial(target.copy_, pinned, non_blocking=True), nbytes, device
    )
    del pinned

    result["registered_mmap_gb_per_s"] = registered_mmap_rate(target, device)
    del target

    # As Prefetcher._copy_to_device does it: into a device buffer of its ring, the copy and an event on the side
    # stream, then the I/O thread waits for the event before the staging buffer is reused.
    staging = StagingBuffer(nbytes, device)
    result["staging_pinned"] = staging.pinned  # False: cudaHostRegister failed or the pinned cap was reached
    side = torch.cuda.Stream(device)
    data = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def side_stream_copy() -> None:
        with torch.cuda.device(device), torch.cuda.stream(side):
            data.copy_(staging.tensor[:nbytes], non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(side)
        copied.synchronize()

    try:
        result["accel_nvme_side_stream_gb_per_s"] = _copy_rate(side_stream_copy, nbytes, device)
    finally:
        torch.cuda.synchronize(device)
        staging.close()
    plain = result["plain_pinned_gb_per_s"]
    result["ratio"] = result["accel_nvme_side_stream_gb_per_s"] / plain if plain else None
    return result


# ---------------------------------------------------------------- the report


def step_floor(modes: dict[str, Any]) -> float | None:
    """The least an nvme step can take: the larger of the raw read of its streamed bytes and the no_offload step."""
    nvme = modes.get("nvme", {})
    compute = modes.get("no_offload", {}).get("step_s")
    raw = (nvme.get("raw_read") or {}).get("gb_per_s")
    drive = nvme["bytes_read_per_step"] / raw / GB if raw and "bytes_read_per_step" in nvme else None
    floors = [f for f in (drive, compute) if f]
    return max(floors) if floors else None


def targets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The targets, each with its value, limit and verdict (None where not measured); the ratio to diffusers' stream
    from pinned RAM is information only (no limit)."""
    modes = report["modes"]
    nvme_s = modes.get("nvme", {}).get("step_s")
    diffusers_s = modes.get("diffusers_stream", {}).get("step_s")
    floor = step_floor(modes)
    floor_ratio = nvme_s / floor if nvme_s and floor else None
    step_ratio = nvme_s / diffusers_s if nvme_s and diffusers_s else None
    rate_ratio = report["transfer"].get("ratio")
    return {
        "nvme_vs_floor": {
            "value": floor_ratio,
            "limit": STEP_TARGET,
            "pass": None if floor_ratio is None else floor_ratio <= STEP_TARGET,
        },
        "nvme_vs_diffusers_stream": {"value": step_ratio, "limit": None, "pass": None},
        "side_stream_vs_plain_pinned": {
            "value": rate_ratio,
            "limit": RATE_TARGET,
            "pass": None if rate_ratio is None else rate_ratio >= RATE_TARGET,
        },
    }


def _fmt(value: float | None, spec: str, scale: float = 1.0, unit: str = "") -> str:
    return "-" if value is None else f"{value / scale:{spec}}{unit}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _verdict(passed: bool | None) -> str:
    return "n/a" if passed is None else ("PASS" if passed else "FAIL")


def table_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per mode (two for nvme: cold and warm) with times, ratios, exactness and memory."""
    modes = report["modes"]
    base = modes.get("no_offload", {}).get("step_s")
    anchor = modes.get("diffusers_stream", {}).get("step_s")
    rows = [("mode", "step s (median)", "vs no_offload", "vs diffusers_stream", "exact", "peak GPU GB", "host RSS GB")]
    for name, entry in modes.items():
        if entry["status"] != "ok":
            rows.append((name, f"{entry['status']}: {entry['reason']}", "", "", "", "", ""))
            continue
        exact_text = {True: "yes", False: "NO", None: "n/a"}[entry.get("exact")]
        memory = (_fmt(entry["peak_gpu_bytes"], ".2f", GB), _fmt(entry["host_rss_bytes"], ".2f", GB))
        timings = [(name, entry["step_s"])]
        if name == "nvme":
            timings = [("nvme (cold)", entry["step_s"]), ("nvme (warm)", entry["warm_step_s"])]
        for label, seconds in timings:
            rows.append(
                (label, _fmt(seconds, ".4f"), _ratio(seconds, base), _ratio(seconds, anchor), exact_text, *memory)
            )
    return rows


def format_report(report: dict[str, Any]) -> str:
    """The table, the transfer rates and the target lines, as printed."""
    config = report["config"]
    lines = [
        f"Flux-like bf16 stack: {config['blocks']} blocks, hidden {config['hidden']}, {config['tokens']} tokens, "
        f"{config['block_bytes'] / 1e6:.3g} MB per block, {config['model_bytes'] / GB:.2f} GB in all; "
        f"device {config['device']} ({config['device_name']}); {config['steps']} timed steps after 1 warm-up"
        + (" [dry run on the CPU]" if config["dry_run"] else ""),
        "",
    ]
    rows = table_rows(report)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * width for width in widths))
    lines.append("")
    nvme = report["modes"].get("nvme", {})
    if nvme.get("status") == "ok":
        total = nvme["stats_total"]
        raw = nvme["raw_read"]
        lines.append(
            f"nvme stream: {total['gb_per_s']:.2f} GB/s while reading, overlap {total['overlap']:.2f}, "
            f"stalls {total['stall_seconds']:.3f} s in {1 + 2 * config['steps']} steps, "
            f"{nvme['bytes_read_per_step'] / GB:.2f} GB read per step = {_fmt(nvme['stream_gb_per_s'], '.2f')} GB/s "
            "of step time"
        )
        lines.append(
            f"raw {'O_DIRECT' if raw['direct'] else 'buffered (O_DIRECT refused)'} read of the group files: "
            f"{raw['gb_per_s']:.2f} GB/s ({raw['bytes'] / GB:.2f} GB, {READ_THREADS} threads x "
            f"{READ_REQUEST_BYTES >> 20} MiB)"
        )
    transfer = report["transfer"]
    if transfer["status"] == "ok":
        lines.append(
            f"host->device, {transfer['bytes'] / 1e6:.0f} MB x {transfer['repeats']}: plain pinned "
            f"{transfer['plain_pinned_gb_per_s']:.2f} GB/s, cudaHostRegister'ed mmap "
            f"{_fmt(transfer['registered_mmap_gb_per_s'], '.2f')} GB/s, accel_nvme side stream "
            f"{transfer['accel_nvme_side_stream_gb_per_s']:.2f} GB/s"
        )
    else:
        lines.append(f"host->device rates: {transfer['status']} ({transfer['reason']})")
    lines.append("")
    goals = report["targets"]
    step = goals["nvme_vs_floor"]
    rate = goals["side_stream_vs_plain_pinned"]
    lines.append(
        f"target nvme (cold) / max(drive floor, no_offload) <= {STEP_TARGET:.2f}: {_fmt(step['value'], '.3f')} -> "
        f"{_verdict(step['pass'])}"
    )
    lines.append(
        f"info nvme (cold) / diffusers_stream (pinned RAM, no drive): "
        f"{_fmt(goals['nvme_vs_diffusers_stream']['value'], '.3f')}"
    )
    lines.append(
        f"target accel_nvme side-stream H2D >= {RATE_TARGET:.0%} of plain pinned copy: "
        f"{_fmt(rate['value'], '.1%')} -> {_verdict(rate['pass'])}"
    )
    if config["dry_run"]:
        lines.append("(dry run: tiny model on the CPU; the timings and verdicts say nothing about a GPU)")
    if any(entry.get("exact") is False for entry in report["modes"].values()):
        lines.append("WARNING: an output differs from no_offload's (see 'exact'): streaming must not change results")
    return "\n".join(lines)


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "accel_nvme": accel_nvme.__version__,
    }
    for name in ("accelerate", "diffusers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return versions


def run(settings: Settings) -> dict[str, Any]:
    """Every selected mode and the transfer rates, as one report."""
    inputs = make_inputs(settings)
    probe = FluxLikeTransformer(1, settings.hidden, device="meta")
    block_bytes = block_nbytes(probe)
    model_bytes = sum(p.numel() * p.element_size() for p in probe.parameters()) + (settings.blocks - 1) * block_bytes
    report: dict[str, Any] = {
        "config": {
            "blocks": settings.blocks,
            "hidden": settings.hidden,
            "heads": probe.blocks[0].heads,
            "tokens": settings.tokens,
            "steps": settings.steps,
            "prefetch_depth": settings.prefetch_depth,
            "dtype": str(DTYPE).removeprefix("torch."),
            "device": str(settings.device),
            "device_name": torch.cuda.get_device_name(settings.device) if settings.cuda else "cpu",
            "block_params": block_bytes // DTYPE.itemsize,
            "block_bytes": block_bytes,
            "model_bytes": model_bytes,
            "offload_folder": str(settings.offload_folder),
            "dry_run": settings.dry_run,
            "versions": _versions(),
        },
        "modes": {},
    }
    if settings.cuda:
        progress(f"host->device copies of {block_bytes / 1e6:.0f} MB")
        try:
            report["transfer"] = h2d_rates(settings, block_bytes)
        except Exception as e:  # a failing cudaHostRegister or copy must not hide the modes' figures
            traceback.print_exc()
            report["transfer"] = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
        release_memory(settings.device)
    else:
        report["transfer"] = {"status": "skipped", "reason": "pinned host->device copies need CUDA"}
    runners = {"no_offload": mode_no_offload, "diffusers_stream": mode_diffusers_stream, "nvme": mode_nvme}
    reference = None
    failed = False
    for name in MODES:
        if name not in settings.modes:
            continue
        progress(f"mode {name}")
        try:
            entry = runners[name](settings, inputs)
        except Exception as e:  # a mode that fails (out of memory, full disk) must not hide the others' figures
            traceback.print_exc()
            entry = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
            failed = True
        release_memory(settings.device)
        outputs = entry.pop("outputs", [])
        if name == "no_offload" and "output" in entry:
            reference = entry.pop("output")
        if entry["status"] == "ok":
            entry["exact"] = exact(outputs, reference)
            entry["finite"] = all(bool(torch.isfinite(output.float()).all()) for output in outputs)
        report["modes"][name] = entry
    report["targets"] = targets(report)
    report["failed"] = failed
    return report


# ---------------------------------------------------------------- command line


def parse_modes(text: str) -> tuple[str, ...]:
    """``--modes`` as a tuple, checked against the known modes."""
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(MODES)}, got {text!r}")
    return modes


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        description="Step time of accel_nvme vs diffusers in-RAM group offloading and no offload on a CUDA GPU.",
    )
    p.add_argument("--blocks", type=int, default=24, help="transformer blocks (default 24)")
    p.add_argument("--hidden", type=int, default=3072, help="hidden size (default 3072, as Flux)")
    p.add_argument("--tokens", type=int, default=4096, help="image+text tokens of a step (default 4096: 1024x1024)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode after 1 warm-up (default 5)")
    p.add_argument(
        "--offload-folder",
        type=Path,
        default=None,
        help="where nvme group files go (default: a temporary folder in the current directory, removed at the end)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the whole report to this JSON file")
    p.add_argument(
        "--modes", type=parse_modes, default=MODES, help=f"comma-separated subset of {','.join(MODES)} (default all)"
    )
    p.add_argument("--device", default="cuda:0", help="the CUDA device (default cuda:0)")
    p.add_argument(
        "--prefetch-depth", type=int, default=2, help="nvme groups read ahead (default 2; 1 matches diffusers' VRAM)"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="run on the CPU at a tiny size (2 blocks, hidden 64, 16 tokens), without the CUDA-only measurements",
    )
    return p


def _settings(args: argparse.Namespace, offload_folder: Path) -> Settings:
    size = DRY_RUN_SIZE if args.dry_run else {"blocks": args.blocks, "hidden": args.hidden, "tokens": args.tokens}
    if args.dry_run:
        device = torch.device("cpu")
    else:
        device = torch.device(args.device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)  # diffusers creates its side stream on the current device
    return Settings(
        steps=args.steps,
        device=device,
        modes=args.modes,
        offload_folder=offload_folder,
        dry_run=args.dry_run,
        prefetch_depth=args.prefetch_depth,
        **size,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every selected mode ran, 1 when one failed, 2 without a CUDA device."""
    args = parser().parse_args(argv)
    if min(args.steps, args.blocks, args.hidden, args.tokens, args.prefetch_depth) < 1:
        parser().error("--steps, --blocks, --hidden, --tokens and --prefetch-depth must be >= 1")
    try:
        torch.device(args.device)
    except RuntimeError as e:
        parser().error(f"--device {args.device!r}: {e}")
    if not args.dry_run and (not torch.cuda.is_available() or torch.device(args.device).type != "cuda"):
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return 2
    temporary = args.offload_folder is None
    folder = Path(tempfile.mkdtemp(prefix=".gpu-bench-", dir=Path.cwd())) if temporary else args.offload_folder
    folder.mkdir(parents=True, exist_ok=True)
    try:
        report = run(_settings(args, folder))
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
