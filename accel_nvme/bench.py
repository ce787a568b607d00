"""Cold and warm forwards of offloading modes on a synthetic model, each mode run in a fresh subprocess.

The parent (``run``) starts one worker per mode (``python -m accel_nvme.bench --mode ...``) so that peak RSS is
the mode's own, compares every worker's outputs with the all-in-RAM model and reports times, bandwidth, memory and
page-cache growth, the ratios the design measures against (raw read speed, accelerate and diffusers disk) and a
recommendation: nvme, or the page cache when the model fits in free RAM and buffered reads win once warm.

With ``free_ram`` (``accel-nvme bench --free-ram``, the default) a ``Ballast`` process holds all but that much of the
available RAM while the modes run, so they meet the regime the nvme tier exists for: a model bigger than free RAM.

Two synthetic models: a Sequential of fp32 Linear layers built in RAM (``linear``), or, when the model does not fit in
RAM or ``from_pretrained`` is asked for, a Llama checkpoint written shard by shard and loaded with
``from_pretrained(..., offload_backend="nvme")`` (``llama``). See docs/bench.md.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import mmap
import os
import platform
import resource
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger(__name__)

MODES = ("ram", "raw_direct", "raw_buffered", "accelerate_disk", "diffusers_disk", "nvme", "nvme_auto")
RAW_MODES = ("raw_direct", "raw_buffered")
DISK_ANCHORS = ("accelerate_disk", "diffusers_disk")
NVME_MODES = ("nvme", "nvme_auto")  # streaming only, and resident_budget="auto"
WARM_ANCHORS = ("raw_buffered", "accelerate_disk")  # buffered paths that the page cache speeds up once warm
PAGE = 4096
DIRECT_REQUEST_BYTES = 4 << 20
DIRECT_THREADS = 4
BUFFERED_REQUEST_BYTES = 16 << 20
DIFFUSERS_OFFLOAD_TYPE = "leaf_level"  # block_level puts the Linears of a bare Sequential into one group
WORKER_TIMEOUT_S = 1800
PROGRESS_INTERVAL_S = 0.5
RAM_HEADROOM_BYTES = 2_000_000_000  # beyond the weights: interpreter, torch, activations, outputs
LLAMA_VOCAB = 1024
LLAMA_MAX_HIDDEN = 2048  # keeps one decoder layer (one nvme group) near 200 MB, so the nvme worker's RSS stays small
LLAMA_MIN_LAYERS = 4
MIN_FREE_RAM_BYTES = 800_000_000  # one worker: interpreter, torch and transformers (~0.3 GB), staging, activations
BALLAST_CHUNK_BYTES = 64 << 20
BALLAST_POLL_S = 0.05  # while a mode runs, the ballast takes back what other processes free this often
SQUEEZE_STAGING_SHARE = 0.15  # under --free-ram, nvme's staging buffers (3 decoder layers) stay within this share


@dataclass(frozen=True)
class LlamaShape:
    """The synthetic LlamaForCausalLM: tiny vocabulary, untied head, MLP 11/4 of hidden, fp32."""

    hidden: int
    layers: int
    vocab: int = LLAMA_VOCAB

    @property
    def intermediate(self) -> int:
        """MLP width (5632 for hidden 2048, as in Llama)."""
        return self.hidden * 11 // 4

    @property
    def layer_bytes(self) -> int:
        """Bytes of one decoder layer: q, k, v, o, gate, up, down and two norms."""
        return (4 * self.hidden**2 + 3 * self.hidden * self.intermediate + 2 * self.hidden) * 4

    @property
    def model_bytes(self) -> int:
        """Bytes of all tensors: embeddings, layers, final norm and head."""
        return self.layers * self.layer_bytes + (2 * self.vocab * self.hidden + self.hidden) * 4

    @classmethod
    def for_size(cls, size_bytes: int, max_hidden: int = LLAMA_MAX_HIDDEN) -> LlamaShape:
        """The shape closest to ``size_bytes``: hidden grows up to ``max_hidden`` (4 layers at least), then layers."""
        hidden = max(128, min(max_hidden, round((size_bytes / (LLAMA_MIN_LAYERS * 49)) ** 0.5 / 128) * 128))
        shape = cls(hidden=hidden, layers=1)
        return replace(shape, layers=max(1, round((size_bytes - shape.model_bytes) / shape.layer_bytes) + 1))


@dataclass(frozen=True)
class BenchConfig:
    """The synthetic model and the forwards timed on it.

    ``layers`` × Linear(hidden, hidden) fp32 in RAM, or with ``from_pretrained`` a Llama checkpoint of about the same
    size (``llama_shape``, hidden at most ``max_hidden``); ``forwards`` cold and then ``warm_forwards`` warm forwards
    per batch.
    """

    layers: int = 16
    hidden: int = 4096
    batches: tuple[int, ...] = (64, 512)
    forwards: int = 3
    seed: int = 0
    warm_forwards: int = 2
    from_pretrained: bool = False
    resident_shares: tuple[float, ...] = ()
    max_hidden: int = LLAMA_MAX_HIDDEN

    @property
    def linear_bytes(self) -> int:
        """Bytes of the Linear model's weights and biases (also the size the Llama checkpoint aims at)."""
        return self.layers * (self.hidden * self.hidden + self.hidden) * 4

    @property
    def llama_shape(self) -> LlamaShape:
        """The Llama checkpoint's shape, for ``from_pretrained``."""
        return LlamaShape.for_size(self.linear_bytes, self.max_hidden)

    @property
    def model_bytes(self) -> int:
        """Bytes of the weights of the model the bench runs."""
        return self.llama_shape.model_bytes if self.from_pretrained else self.linear_bytes


def hidden_for_size(size_bytes: int, layers: int) -> int:
    """The hidden size (a multiple of 128) that makes ``layers`` fp32 Linear layers weigh about ``size_bytes``."""
    return max(128, round((size_bytes / (4 * layers)) ** 0.5 / 128) * 128)


def squeezed_max_hidden(free_ram: int, max_hidden: int = LLAMA_MAX_HIDDEN) -> int:
    """The largest Llama hidden size (a multiple of 128) whose 3 staging buffers (one decoder layer each, 49 bytes
    per hidden²) stay within ``SQUEEZE_STAGING_SHARE`` of ``free_ram``."""
    return max(128, min(max_hidden, int((SQUEEZE_STAGING_SHARE * free_ram / (3 * 49)) ** 0.5) // 128 * 128))


def fits_in_ram(model_bytes: int, available_bytes: int) -> bool:
    """Whether a model of ``model_bytes`` fits in ``available_bytes`` of RAM with 2 GB to spare."""
    return model_bytes + RAM_HEADROOM_BYTES <= available_bytes


# ---------------------------------------------------------------- page cache and memory probes


def meminfo_cached_mb() -> float:
    """The ``Cached:`` line of /proc/meminfo, in MiB."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/meminfo has no 'Cached:' line")


def _proc_status_mb(field: str) -> float | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0), so later peaks belong to the forwards."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        logger.debug("cannot reset the peak RSS: %s", e)
        return False
    return True


def drop_page_cache(folders: Iterable[Path]) -> dict[str, float | None]:
    """Evict the files under ``folders`` from the page cache, by fadvise and by drop_caches.

    Returns the MiB each method freed from ``Cached:``, or None where the method failed.
    """
    os.sync()
    freed: dict[str, float | None] = {}
    before = meminfo_cached_mb()
    try:
        for path in (p for folder in folders for p in folder.rglob("*") if p.is_file()):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        freed["fadvise"] = before - meminfo_cached_mb()
    except OSError as e:
        logger.debug("posix_fadvise(DONTNEED) failed: %s", e)
        freed["fadvise"] = None
    before = meminfo_cached_mb()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        freed["drop_caches"] = before - meminfo_cached_mb()
    except OSError as e:
        logger.debug("writing /proc/sys/vm/drop_caches failed: %s", e)
        freed["drop_caches"] = None
    return freed


def files_cached_bytes(folders: Iterable[Path]) -> int:
    """Bytes of the files under ``folders`` that sit in the page cache now (``mincore`` on a mapping of each file):
    unlike ``Cached:``, blind to what other processes read."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    total = 0
    for path in (p for folder in folders for p in folder.rglob("*") if p.is_file()):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                continue
            address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if address in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
            try:
                pages = (ctypes.c_ubyte * (-(-size // PAGE)))()
                if libc.mincore(address, size, pages) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
                total += sum(page & 1 for page in pages) * PAGE
            finally:
                libc.munmap(address, size)
        finally:
            os.close(fd)
    return total


def _folder_bytes(folder: Path) -> int:
    """Bytes allocated on disk under ``folder``; files that vanish while it is walked count as zero."""
    total = 0
    for path in folder.rglob("*"):
        try:
            total += path.stat().st_blocks * 512 if path.is_file() else 0
        except FileNotFoundError:
            continue
    return total


# ---------------------------------------------------------------- the Linear model


def build_model(config: BenchConfig):
    """The synthetic Sequential of fp32 Linear layers, with weights fixed by ``config.seed``."""
    import torch

    torch.manual_seed(config.seed)
    return torch.nn.Sequential(*(torch.nn.Linear(config.hidden, config.hidden) for _ in range(config.layers)))


def make_input(config: BenchConfig, batch: int):
    """The input of a forward at ``batch``: rows of hidden states, or ``batch`` token ids for the Llama."""
    import torch

    generator = torch.Generator().manual_seed(config.seed + batch)
    if config.from_pretrained:
        return torch.randint(3, config.llama_shape.vocab, (1, batch), generator=generator)
    return torch.randn(batch, config.hidden, generator=generator)


def _write_layer_files(config: BenchConfig, folder: Path) -> list[Path]:
    """Write each layer's weight and bias as one file, as the raw modes read them."""
    model = build_model(config)
    paths = []
    for i, layer in enumerate(model):
        path = folder / f"layer_{i:03d}.bin"
        with open(path, "wb") as f:
            f.write(layer.weight.numpy().tobytes())
            f.write(layer.bias.numpy().tobytes())
            os.fsync(f.fileno())
        paths.append(path)
    return paths


# ---------------------------------------------------------------- the Llama checkpoint


def _llama_config(shape: LlamaShape):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.hidden // 128,
        num_key_value_heads=shape.hidden // 128,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype="float32",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _shard_of(name: str) -> str:
    if name.startswith("model.layers."):
        return f"layer-{int(name.split('.')[2]):05d}"
    return "embed" if name.startswith("model.embed_tokens") else "head"


def write_llama_checkpoint(shape: LlamaShape, folder: Path, seed: int = 0) -> int:
    """Write a random LlamaForCausalLM checkpoint of ``shape`` to ``folder``, one shard per decoder layer.

    Names and shapes come from a meta-device model; each shard's tensors are generated, saved and freed before the
    next, so RAM holds one shard at a time. Returns the bytes of all tensors.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    config = _llama_config(shape)
    config.save_pretrained(folder)
    with torch.device("meta"):
        tensors = LlamaForCausalLM(config).state_dict()
    shards: dict[str, list[str]] = {}
    for name in tensors:
        shards.setdefault(_shard_of(name), []).append(name)
    files = {shard: f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, shard in enumerate(shards)}
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    with tqdm(
        total=shape.model_bytes, unit="B", unit_scale=True, desc="writing synthetic weights", disable=None
    ) as bar:
        for shard, names in shards.items():
            data = {}
            for name in names:
                meta = tensors[name]
                if name.endswith("norm.weight"):
                    data[name] = torch.ones(meta.shape, dtype=meta.dtype)
                else:
                    data[name] = torch.empty(meta.shape, dtype=meta.dtype).normal_(0, 0.02, generator=generator)
                weight_map[name] = files[shard]
            nbytes = sum(t.numel() * t.element_size() for t in data.values())
            save_file(data, str(folder / files[shard]), metadata={"format": "pt"})
            del data
            total += nbytes
            bar.update(nbytes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


def _load_llama(checkpoint: Path, **kwargs):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, **kwargs).eval()


def _logits(model, ids):
    return model(ids, use_cache=False).logits


# ---------------------------------------------------------------- the modes


def _aligned_buffer(nbytes: int) -> mmap.mmap:
    return mmap.mmap(-1, -(-nbytes // PAGE) * PAGE)


def _submit_direct_reads(pool: ThreadPoolExecutor, fd: int, view: memoryview, size: int) -> list[Future]:
    length = -(-size // PAGE) * PAGE
    return [
        pool.submit(os.preadv, fd, [view[offset : min(offset + DIRECT_REQUEST_BYTES, length)]], offset)
        for offset in range(0, length, DIRECT_REQUEST_BYTES)
    ]


def _data_files(config: BenchConfig, folder: Path, checkpoint: Path | None) -> list[Path]:
    """What the raw modes read: the checkpoint's shards, or layer files written for the Linear model."""
    if checkpoint is not None:
        return sorted(checkpoint.glob("*.safetensors"))
    return _write_layer_files(config, folder)


def _setup_raw_direct(config: BenchConfig, folder: Path, checkpoint: Path | None) -> Callable:
    """Read every data file with O_DIRECT: 4 threads of 4 MiB requests, two staging buffers taking turns."""
    paths = _data_files(config, folder, checkpoint)
    sizes = [p.stat().st_size for p in paths]
    buffers = [memoryview(_aligned_buffer(max(sizes))) for _ in range(2)]
    pool = ThreadPoolExecutor(DIRECT_THREADS, thread_name_prefix="raw-direct")

    def read_all(_x) -> None:
        total, in_flight = 0, None
        fds = [os.open(p, os.O_RDONLY | os.O_DIRECT) for p in paths]
        try:
            for i, (fd, size) in enumerate(zip(fds, sizes, strict=True)):
                futures = _submit_direct_reads(pool, fd, buffers[i % 2], size)
                if in_flight is not None:
                    total += sum(f.result() for f in in_flight)
                in_flight = futures
            total += sum(f.result() for f in in_flight or [])
        finally:
            for fd in fds:
                os.close(fd)
        if total != sum(sizes):
            raise RuntimeError(f"O_DIRECT read {total} bytes, expected {sum(sizes)} from {paths[0].parent}")

    return read_all


def _setup_raw_buffered(config: BenchConfig, folder: Path, checkpoint: Path | None) -> Callable:
    """Read every data file buffered and sequentially in 16 MiB requests (the page cache keeps what it can)."""
    paths = _data_files(config, folder, checkpoint)
    sizes = [p.stat().st_size for p in paths]
    view = memoryview(_aligned_buffer(max(sizes)))

    def read_all(_x) -> None:
        for path, size in zip(paths, sizes, strict=True):
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

    return read_all


def _setup_ram(config: BenchConfig, folder: Path, checkpoint: Path | None) -> Callable:
    return build_model(config)


def _setup_accelerate_disk(config: BenchConfig, folder: Path, checkpoint: Path | None) -> Callable:
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


def _setup_diffusers_disk(config: BenchConfig, folder: Path, checkpoint: Path | None) -> Callable:
    return _apply_diffusers_disk(build_model(config), folder)


def _setup_nvme(config: BenchConfig, folder: Path, checkpoint: Path | None, resident_budget: int | str = 0) -> Callable:
    import accel_nvme

    device_map = {str(i): "nvme" for i in range(config.layers)}
    settings = accel_nvme.config.load_config(resident_budget=resident_budget)
    return accel_nvme.dispatch_model(
        build_model(config), device_map, offload_dir=str(folder), main_device="cpu", config=settings
    )


def _setup_llama_ram(config: BenchConfig, folder: Path, checkpoint: Path) -> Callable:
    """The model all in RAM: from_pretrained leaves tensors mapped from the checkpoint (read from disk on first use,
    evicted with the page cache, at offsets not aligned to 64 bytes), so they are copied into memory of their own."""
    import torch

    model = _load_llama(checkpoint)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    return functools.partial(_logits, model)


def _setup_llama_accelerate_disk(config: BenchConfig, folder: Path, checkpoint: Path) -> Callable:
    """transformers' own disk offload: accelerate's hooks read each tensor from the checkpoint's shards."""
    model = _load_llama(checkpoint, device_map="auto", max_memory={"cpu": "20KB"}, offload_folder=str(folder))
    return functools.partial(_logits, model)


def _setup_llama_diffusers_disk(config: BenchConfig, folder: Path, checkpoint: Path) -> Callable:
    return functools.partial(_logits, _apply_diffusers_disk(_load_llama(checkpoint), folder))


def _setup_llama_nvme(config: BenchConfig, folder: Path, checkpoint: Path, resident_budget: int | str = 0) -> Callable:
    """What a user runs: ``from_pretrained(..., offload_backend="nvme")`` streams the checkpoint's layers."""
    import accel_nvme  # noqa: F401  (teaches from_pretrained offload_backend="nvme")

    kwargs = {"offload_backend": "nvme", "offload_folder": str(folder), "nvme_resident_budget": resident_budget}
    model = _load_llama(checkpoint, device_map="auto", max_memory={"cpu": "20KB"}, **kwargs)
    return functools.partial(_logits, model)


SETUPS: dict[str, dict[str, Callable[[BenchConfig, Path, Path | None], Callable]]] = {
    "linear": {
        "ram": _setup_ram,
        "raw_direct": _setup_raw_direct,
        "raw_buffered": _setup_raw_buffered,
        "accelerate_disk": _setup_accelerate_disk,
        "diffusers_disk": _setup_diffusers_disk,
        "nvme": _setup_nvme,
    },
    "llama": {
        "ram": _setup_llama_ram,
        "raw_direct": _setup_raw_direct,
        "raw_buffered": _setup_raw_buffered,
        "accelerate_disk": _setup_llama_accelerate_disk,
        "diffusers_disk": _setup_llama_diffusers_disk,
        "nvme": _setup_llama_nvme,
    },
}
NEEDS_MODEL_IN_RAM = {"linear": frozenset(MODES), "llama": frozenset({"ram", "diffusers_disk"})}


RESIDENT_PREFIX = "nvme_resident_"


def resident_mode(share: float) -> str:
    """The mode name of nvme with ``share`` of the model kept resident, e.g. ``nvme_resident_25``."""
    return f"{RESIDENT_PREFIX}{round(share * 100)}"


def _setup(config: BenchConfig, mode: str) -> Callable[[BenchConfig, Path, Path | None], Callable]:
    setups = SETUPS[model_kind(config)]
    if mode == "nvme_auto":
        return functools.partial(setups["nvme"], resident_budget="auto")
    if mode.startswith(RESIDENT_PREFIX):
        share = int(mode.removeprefix(RESIDENT_PREFIX)) / 100
        return functools.partial(setups["nvme"], resident_budget=int(share * config.model_bytes))
    return setups[mode]


def is_nvme(mode: str) -> bool:
    """Whether ``mode`` streams with accel_nvme (``nvme``, ``nvme_auto``, ``nvme_resident_<percent>``)."""
    return mode in NVME_MODES or mode.startswith(RESIDENT_PREFIX)


def model_kind(config: BenchConfig) -> str:
    """``llama`` (a checkpoint loaded by from_pretrained) or ``linear`` (a Sequential built in RAM)."""
    return "llama" if config.from_pretrained else "linear"


def _skip_reason(mode: str) -> str | None:
    if mode == "diffusers_disk":
        try:
            import diffusers.hooks  # noqa: F401
        except ImportError as e:
            return f"diffusers is not importable: {e}"
    return None


# ---------------------------------------------------------------- the worker


@dataclass
class _Forwards:
    """What ``count`` timed forwards gave: times (s), page-cache growth (MiB; system-wide, and of the mode's own
    files), major page faults, outputs, and for nvme modes the bytes streamed and the seconds spent waiting for I/O."""

    times: list[float]
    growth: list[float]
    file_growth: list[float]
    major_faults: list[int]
    outputs: list
    streamed: list[int]
    stalls: list[float]


def _timed_forwards(
    forward: Callable,
    x,
    count: int,
    folders: list[Path],
    drop: Callable[[], None] | None,
    stream: Callable[[], tuple[int, float]] | None,
) -> _Forwards:
    """``count`` forwards, each after ``drop()`` when given; ``folders`` hold the mode's files; ``stream()`` gives
    nvme's running (bytes read, stalls)."""
    done = _Forwards([], [], [], [], [], [], [])
    for _ in range(count):
        if drop is not None:
            drop()
        files = files_cached_bytes(folders)
        cached = meminfo_cached_mb()
        before = stream() if stream else None
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        t0 = time.perf_counter()
        done.outputs.append(forward(x))
        done.times.append(time.perf_counter() - t0)
        done.major_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults)
        done.growth.append(meminfo_cached_mb() - cached)
        done.file_growth.append((files_cached_bytes(folders) - files) / (1 << 20))
        if stream and before:
            after = stream()
            done.streamed.append(after[0] - before[0])
            done.stalls.append(after[1] - before[1])
    return done


def _nvme_stream(forward: Callable) -> tuple[Callable[[], tuple[int, float]], dict]:
    """For an nvme mode's forward: a function giving (bytes read, stall seconds) so far, and the model's residency."""
    import accel_nvme

    model = forward.args[0] if isinstance(forward, functools.partial) else forward
    hooks = (getattr(m, "_hf_hook", None) for m in model.modules())
    hook = next(h for h in hooks if isinstance(h, accel_nvme.NvmeAlignDevicesHook))
    before = accel_nvme.stats(model)
    residency = {
        "groups": before.groups,
        "group_bytes": max(s.nbytes for s in hook.prefetcher.sources),
        "resident_groups": len(before.resident),
        "resident_bytes": before.resident_bytes,
    }

    def totals() -> tuple[int, float]:
        total = accel_nvme.stats(model).total
        return total.bytes_read, total.stall_seconds

    return totals, residency


def run_worker(mode: str, config: BenchConfig, folder: Path, outputs_path: Path, checkpoint: Path | None) -> dict:
    """Set ``mode`` up in this process, time cold then warm forwards and save their outputs; returns measurements.

    Cold: the page cache is dropped (fadvise on the files read, then drop_caches) before each forward. Warm: the
    forwards that follow, without dropping.
    """
    import torch

    skip = _skip_reason(mode)
    if skip is not None:
        return {"mode": mode, "status": "skipped", "error": skip}
    folders = [folder] if checkpoint is None else [folder, checkpoint]
    drops: list[dict[str, float | None]] = []
    start = time.perf_counter()
    with torch.inference_mode():
        forward = _setup(config, mode)(config, folder, checkpoint)
        gc.collect()
        setup_s = time.perf_counter() - start
        rss_after_setup = _proc_status_mb("VmRSS")
        setup_peak = _proc_status_mb("VmHWM") or 0.0
        peak_reset = _reset_peak_rss()
        stream, residency = _nvme_stream(forward) if is_nvme(mode) else (None, None)
        batches, outputs = [], {}
        for batch in config.batches[:1] if mode in RAW_MODES else config.batches:  # a read is the same at any batch
            x = make_input(config, batch)
            forward(x)  # warm-up: the code paths of this batch size are paged in before drop_caches runs
            drop = functools.partial(_drop_and_record, folders, drops)
            cold = _timed_forwards(forward, x, config.forwards, folders, drop, stream)
            warm = _timed_forwards(forward, x, config.warm_forwards, folders, None, stream)
            ys = [y for y in cold.outputs + warm.outputs if y is not None]
            if ys:
                outputs[batch] = ys[0]
            entry = {
                "batch": batch,
                "times_s": cold.times,
                "page_cache_growth_mb": cold.growth,
                "warm_times_s": warm.times,
                "warm_page_cache_growth_mb": warm.growth,
                "file_cache_growth_mb": cold.file_growth,
                "warm_file_cache_growth_mb": warm.file_growth,
                "major_faults": cold.major_faults + warm.major_faults,  # pages read back from disk (thrashing)
                "stable": all(torch.equal(ys[0], y) for y in ys),
            }
            if stream is not None:
                entry |= {"streamed_bytes": cold.streamed + warm.streamed, "stall_s": cold.stalls + warm.stalls}
            batches.append(entry)
    forward_peak = _proc_status_mb("VmHWM") if peak_reset else None
    if outputs:
        torch.save(outputs, outputs_path)
    return {
        "mode": mode,
        "status": "ok",
        "setup_s": setup_s,
        "rss_after_setup_mb": rss_after_setup,
        "forward_peak_rss_mb": forward_peak,
        "rss_above_setup_mb": None if forward_peak is None else forward_peak - rss_after_setup,
        # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork and exec, so it starts at the bench's own RSS
        "peak_rss_mb": max(setup_peak, forward_peak or _proc_status_mb("VmHWM") or 0.0),
        "page_cache_drop": _summarize_drops(drops),
        "diffusers_offload_type": DIFFUSERS_OFFLOAD_TYPE if mode == "diffusers_disk" else None,
        "nvme_residency": residency,
        "batches": batches,
    }


def _drop_and_record(folders: list[Path], drops: list[dict[str, float | None]]) -> None:
    drops.append(drop_page_cache(folders))


def _summarize_drops(drops: list[dict[str, float | None]]) -> dict[str, dict[str, float] | None]:
    """For each drop method: None when it failed, else the MiB it freed (first drop, which follows the warm-up)."""
    return {
        method: None if any(d[method] is None for d in drops) else {"first_freed_mb": drops[0][method]}
        for method in drops[0]
    }


def _worker_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One accel-nvme bench mode (started by `accel-nvme bench`).")
    parser.add_argument("--mode", required=True, help="one of MODES, or nvme_resident_<percent>")
    parser.add_argument("--config", required=True, help="BenchConfig as JSON")
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, help="the Llama checkpoint (from_pretrained runs)")
    parser.add_argument("--outputs", type=Path, required=True)
    parser.add_argument("--json-out", type=Path, required=True)
    parser.add_argument("--parent-pid", type=int, help="die with this process (the bench)")
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        _die_with_parent(args.parent_pid)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    fields = json.loads(args.config)
    config = BenchConfig(
        **{**fields, "batches": tuple(fields["batches"]), "resident_shares": tuple(fields["resident_shares"])}
    )
    args.folder.mkdir(parents=True, exist_ok=True)
    result = run_worker(args.mode, config, args.folder, args.outputs, args.checkpoint)
    args.json_out.write_text(json.dumps(result))


# ---------------------------------------------------------------- the ballast: a squeezed machine


class BallastError(RuntimeError):
    """The ballast could not be started or died: the machine is not squeezed as asked."""


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (PR_SET_PDEATHSIG), and exit if it is already gone."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError) as e:
        logger.debug("prctl(PR_SET_PDEATHSIG) failed: %s", e)
    if os.getppid() != parent_pid:
        os._exit(1)


def _meminfo_available() -> int:
    """``MemAvailable:`` of /proc/meminfo, in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no 'MemAvailable:' line")


def _ballast_main(free_bytes: int, parent_pid: int) -> None:
    """The ballast process: hold touched anonymous pages so that ``free_bytes`` stay available, until stdin ends.

    Its oom_score_adj is 1000, so under memory pressure the OOM killer takes the ballast, never a mode or another
    process. Each line ``adjust`` on stdin tops it up or releases chunks to bring MemAvailable back to ``free_bytes``;
    each reply on stdout is ``<held bytes> <available bytes>``. Between lines (while a mode runs) it only takes: what
    other processes free is held at once, so a mode never gets more than ``free_bytes`` (plus a margin) for its
    page cache. End of stdin (the parent closed it, exited or was killed) ends the process, and with it the memory.
    """
    _die_with_parent(parent_pid)
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
    fill = b"\x5a" * BALLAST_CHUNK_BYTES
    chunks: list[mmap.mmap] = []

    def adjust(release: bool) -> None:
        for _ in range(100_000):  # measured again after each step: other processes allocate and free meanwhile
            excess = _meminfo_available() - free_bytes
            if excess >= BALLAST_CHUNK_BYTES // 4:
                size = min(BALLAST_CHUNK_BYTES, excess - excess % PAGE)
                chunk = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                chunk.write(fill[:size])  # touched: every page is resident, not a promise
                chunks.append(chunk)
            elif release and chunks and excess < -BALLAST_CHUNK_BYTES // 2:
                chunks.pop().close()
            else:
                break

    def reply() -> None:
        print(sum(len(c) for c in chunks), _meminfo_available(), flush=True)

    adjust(release=True)
    reply()
    while True:
        if select.select([sys.stdin], [], [], BALLAST_POLL_S)[0]:
            line = sys.stdin.readline()
            if not line:
                return
            adjust(release=True)
            reply()
        else:
            adjust(release=False)


class Ballast:
    """A helper process holding all but ``free_bytes`` of the available RAM, so each mode runs in a squeezed machine.

    Refuses a ``free_bytes`` larger than what is available or below ``MIN_FREE_RAM_BYTES``. ``adjust()`` before each
    mode brings the available RAM back to ``free_bytes`` (other processes come and go); ``close()`` releases it all,
    and so does the end of this process, however it ends (the ballast reads a pipe from it and dies with it).
    """

    def __init__(self, free_bytes: int):
        self.check(free_bytes, _meminfo_available())
        self.free_bytes = free_bytes
        # this file alone, not the package (which imports torch): the ballast's own RSS stays a few MB
        run = "import runpy, sys; runpy.run_path(sys.argv[1])['_ballast_main'](int(sys.argv[2]), int(sys.argv[3]))"
        command = [sys.executable, "-c", run, __file__, str(free_bytes), str(os.getpid())]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_worker_env()
        )
        self.held_bytes, self.available_bytes = self._reply()
        logger.info(
            "ballast (pid %d) holds %.2f GB; %.2f GB available for the modes",
            self.process.pid,
            self.held_bytes / 1e9,
            self.available_bytes / 1e9,
        )

    @staticmethod
    def check(free_bytes: int, available: int) -> None:
        """Refuse a ``free_bytes`` above ``available`` or below ``MIN_FREE_RAM_BYTES``, saying why."""
        if free_bytes > available:
            raise BallastError(
                f"--free-ram {free_bytes / 1e9:.2f} GB is more than the {available / 1e9:.2f} GB available now:"
                " give a smaller size, or --no-squeeze"
            )
        if free_bytes < MIN_FREE_RAM_BYTES:
            raise BallastError(
                f"--free-ram {free_bytes / 1e9:.2f} GB is too small to run a mode: give at least"
                f" {MIN_FREE_RAM_BYTES / 1e9:.1f} GB (interpreter, torch, transformers, staging buffers)"
            )

    def _reply(self) -> tuple[int, int]:
        line = self.process.stdout.readline()
        if not line:
            status = self.process.wait()
            raise BallastError(
                f"the ballast process (pid {self.process.pid}) exited with status {status}"
                f"{' (SIGKILL: the OOM killer, most likely)' if status == -9 else ''}; the machine is not squeezed"
            )
        held, available = line.split()
        return int(held), int(available)

    def adjust(self) -> tuple[int, int]:
        """Top up or release so that ``free_bytes`` are available again; returns (held, available) bytes."""
        try:
            self.process.stdin.write("adjust\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # _reply says how it died
        self.held_bytes, self.available_bytes = self._reply()
        return self.held_bytes, self.available_bytes

    def close(self) -> None:
        """Release the memory: close the pipe, and kill the process if it does not exit at once."""
        if self.process.stdin and not self.process.stdin.closed:
            with suppress(BrokenPipeError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


# ---------------------------------------------------------------- the parent


def _machine_info(folder: Path, available_bytes: int) -> dict:
    import accelerate
    import psutil
    import torch

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    mounts = [p for p in psutil.disk_partitions(all=True) if folder.resolve().is_relative_to(p.mountpoint)]
    mount = max(mounts, key=lambda p: len(p.mountpoint), default=None)
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "ram_gb": psutil.virtual_memory().total / 1e9,
        "available_ram_gb": available_bytes / 1e9,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "accelerate": accelerate.__version__,
        "diffusers": diffusers_version,
        "folder": str(folder.resolve()),
        "filesystem": f"{mount.device} ({mount.fstype})" if mount else None,
    }


def _worker_env() -> dict[str, str]:
    """The environment of a worker: this one, with this package first on PYTHONPATH."""
    package_parent = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


@contextmanager
def _files_progress(folder: Path, total: int, desc: str, enabled: bool) -> Iterator[Callable[[], None]]:
    """A bar of the bytes written under ``folder`` (a worker's offload files); yields the function that updates it."""
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None if enabled else True) as bar:

        def update() -> None:
            if not bar.disable:
                bar.update(min(total, _folder_bytes(folder)) - bar.n)

        yield update


def _wait(process: subprocess.Popen, update: Callable[[], None]) -> int | None:
    """Wait for ``process``, updating the bar; None when it ran past the timeout (it is then killed)."""
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    try:
        while True:
            try:
                return process.wait(timeout=PROGRESS_INTERVAL_S)
            except subprocess.TimeoutExpired:
                update()
                if time.monotonic() > deadline:
                    process.kill()
                    process.wait()
                    return None
    except BaseException:  # Ctrl-C: the worker must be gone before the parent removes the folder
        process.kill()
        process.wait()
        raise


def _run_mode(mode: str, config: BenchConfig, root: Path, checkpoint: Path | None) -> dict:
    """Run one mode in a fresh interpreter; a failing worker becomes a 'failed' result, never an exception."""
    json_out = root / f"{mode}.json"
    folder = root / ("nvme" if is_nvme(mode) else mode)  # nvme modes share their group files (reused, not rewritten)
    command = [
        sys.executable,
        "-m",
        "accel_nvme.bench",
        "--mode",
        mode,
        "--config",
        json.dumps(asdict(config)),
        "--folder",
        str(folder),
        "--outputs",
        str(root / f"{mode}.outputs.pt"),
        "--json-out",
        str(json_out),
        "--parent-pid",
        str(os.getpid()),
        *(["--checkpoint", str(checkpoint)] if checkpoint is not None else []),
    ]
    logger.info("running mode %s", mode)
    start = time.perf_counter()
    log_path = root / f"{mode}.log"
    writes_files = mode != "ram" if checkpoint is None else mode.startswith(("nvme", "diffusers_disk"))
    with (
        open(log_path, "w") as log,
        _files_progress(folder, config.model_bytes, f"{mode}: files", writes_files) as update,
    ):
        returncode = _wait(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_worker_env()), update)
    output = log_path.read_text(errors="replace")
    logger.debug("worker %s output:\n%s", mode, output)
    if not is_nvme(mode):
        shutil.rmtree(folder, ignore_errors=True)
    if returncode is None:
        return {"mode": mode, "status": "failed", "error": f"timed out after {WORKER_TIMEOUT_S} s"}
    if returncode == -9:
        error = "killed by SIGKILL (the OOM killer, most likely: see dmesg)"
        logger.warning("mode %s %s", mode, error)
        return {"mode": mode, "status": "killed", "error": error}
    if returncode != 0 or not json_out.exists():
        error = f"exit status {returncode}: {_last_line(output)}"
        logger.warning("mode %s failed, %s", mode, error)
        return {"mode": mode, "status": "failed", "error": error}
    logger.info("mode %s done in %.1f s", mode, time.perf_counter() - start)
    return json.loads(json_out.read_text())


def _stats(times: list[float], model_bytes: int) -> tuple[float | None, float | None, float | None]:
    """min, median (s) and GB/s at the min; Nones for no forwards."""
    if not times:
        return None, None, None
    return min(times), statistics.median(times), model_bytes / min(times) / 1e9


def _compare_outputs(result: dict, outputs: Path, reference: Path | None) -> None:
    """Add per-batch time statistics, GB/s and exactness (``torch.equal`` with the ram mode) to ``result``."""
    import torch

    mine = torch.load(outputs) if outputs.exists() else None
    ref = torch.load(reference) if reference is not None and reference.exists() else None
    for entry in result["batches"]:
        entry["min_s"], entry["median_s"], entry["gb_per_s"] = _stats(entry["times_s"], result["model_bytes"])
        entry["warm_min_s"], entry["warm_median_s"], entry["warm_gb_per_s"] = _stats(
            entry["warm_times_s"], result["model_bytes"]
        )
        batch = entry["batch"]
        if mine is None or ref is None or batch not in mine or batch not in ref:
            entry["exact"], entry["max_abs_diff"] = None, None
            continue
        entry["exact"] = bool(torch.equal(mine[batch], ref[batch])) and entry["stable"]
        entry["max_abs_diff"] = float((mine[batch] - ref[batch]).abs().max())


def _time(results: list[dict], mode: str, batch: int, key: str = "min_s") -> float | None:
    """``key`` of ``mode`` at ``batch`` (a raw read: at any batch, it is measured once), or None when it did not run."""
    for r in results:
        if r["mode"] == mode and r["status"] == "ok":
            entries = [e for e in r["batches"] if e["batch"] == batch or mode in RAW_MODES]
            return entries[0][key] if entries else None
    return None


def compute_ratios(results: list[dict], batches: Iterable[int]) -> dict[str, dict[str, float | None]]:
    """Ratios on min times, per batch: nvme against max(raw best, ram), and speed-ups = other's time / nvme's.

    ``nvme_speedup_over_<mode>`` compares cold forwards; ``..._warm`` compares nvme cold with the buffered anchors'
    warm forwards (what a user whose page cache holds the files gets).
    """
    ratios: dict[str, dict[str, float | None]] = {"nvme_over_bound": {}}
    ratios |= {f"nvme_speedup_over_{m}": {} for m in MODES if not is_nvme(m)}
    ratios |= {f"nvme_speedup_over_{m}_warm": {} for m in WARM_ANCHORS}
    for batch in batches:
        key = str(batch)
        nvme = _time(results, "nvme", batch)
        raw = [t for t in (_time(results, m, batch) for m in RAW_MODES) if t is not None]
        bound = max((t for t in (min(raw, default=None), _time(results, "ram", batch)) if t is not None), default=None)
        ratios["nvme_over_bound"][key] = nvme / bound if nvme and bound else None
        for m in (m for m in MODES if not is_nvme(m)):
            t = _time(results, m, batch)
            ratios[f"nvme_speedup_over_{m}"][key] = t / nvme if nvme and t else None
        for m in WARM_ANCHORS:
            t = _time(results, m, batch, "warm_min_s")
            ratios[f"nvme_speedup_over_{m}_warm"][key] = t / nvme if nvme and t else None
    return ratios


def _result(results: list[dict], mode: str) -> dict | None:
    return next((r for r in results if r["mode"] == mode and r["status"] == "ok"), None)


def best_raw_rate(results: list[dict], batch: int) -> float | None:
    """The best disk read rate of the run at ``batch``, bytes/s: raw reads when cold, and O_DIRECT (never cached)."""
    rates = [
        r["model_bytes"] / t
        for mode, key in (("raw_direct", "min_s"), ("raw_buffered", "min_s"), ("raw_direct", "warm_min_s"))
        if (r := _result(results, mode)) and (t := _time(results, mode, batch, key))
    ]
    return max(rates, default=None)


def nvme_auto_summary(results: list[dict], batches: Iterable[int]) -> dict | None:
    """nvme with ``resident_budget="auto"`` against its bound and the disk anchors, per batch (warm forwards, min).

    ``bound_s`` = max(bytes it streams per forward / the run's best raw read rate, the in-RAM forward (min of all));
    ``speedup_warm`` = the faster anchor's warm forward / nvme_auto's. None when nvme_auto did not run.
    """
    auto = _result(results, "nvme_auto")
    if auto is None:
        return None
    residency = auto["nvme_residency"]
    summary = {"resident_bytes": residency["resident_bytes"], "group_bytes": residency["group_bytes"], "batches": {}}
    for entry in auto["batches"]:
        batch, warm = entry["batch"], entry["warm_min_s"]
        anchors = {m: t for m in DISK_ANCHORS if (t := _time(results, m, batch, "warm_min_s")) is not None}
        anchor = min(anchors, key=anchors.get, default=None)
        streamed = min(entry["streamed_bytes"][len(entry["times_s"]) :] or entry["streamed_bytes"], default=None)
        rate = best_raw_rate(results, batch)
        io_s = streamed / rate if streamed is not None and rate else None
        ram = [t for key in ("min_s", "warm_min_s") if (t := _time(results, "ram", batch, key)) is not None]
        compute_s = min(ram, default=None)  # in RAM, cold and warm forwards are the same work
        bound = max((t for t in (io_s, compute_s) if t is not None), default=None)
        growth = max(entry["file_cache_growth_mb"] + entry["warm_file_cache_growth_mb"])
        summary["batches"][str(batch)] = {
            "warm_s": warm,
            "cold_s": entry["min_s"],
            "anchor": anchor,
            "anchor_warm_s": anchors.get(anchor),
            "speedup_warm": anchors[anchor] / warm if anchor and warm else None,
            "not_slower_than_anchors": all(warm <= t for t in anchors.values()) if warm and anchors else None,
            "streamed_bytes": streamed,
            "raw_rate_gb_per_s": rate / 1e9 if rate else None,
            "io_bound_s": io_s,
            "compute_s": compute_s,
            "bound_s": bound,
            "bound_by": None if bound is None else ("io" if bound == io_s else "compute"),
            "over_bound": warm / bound if warm and bound else None,
            "page_cache_growth_mb": growth,
            "page_cache_within_one_group": growth * (1 << 20) <= residency["group_bytes"],
        }
    return summary


def resident_sweep(results: list[dict], batches: Iterable[int], shares: Iterable[float]) -> dict[str, dict]:
    """Cold forward time per resident share and batch, against the time nvme would take if it fell in proportion to
    the streamed share, floored by compute (``expected_s`` = max(in-RAM time, nvme's time × (1 − share)));
    ``vs_ram`` compares with the in-RAM forward."""
    sweep = {}
    for share in sorted({0.0, *shares}) if shares else ():
        mode = "nvme" if share == 0 else resident_mode(share)
        sweep[str(round(share * 100))] = {
            str(batch): {
                "time_s": (t := _time(results, mode, batch)),
                "expected_s": max(n * (1 - share), _time(results, "ram", batch) or 0.0)
                if (n := _time(results, "nvme", batch))
                else None,
                "vs_ram": t / ram if t and (ram := _time(results, "ram", batch)) else None,
            }
            for batch in batches
        }
    return sweep


def _page_cache_time(results: list[dict], batch: int) -> tuple[float | None, str | None]:
    """The best warm forward the page cache offers at ``batch``, and where it comes from.

    accelerate disk's warm forward counts as measured; a raw buffered warm read counts as max(read, in-RAM forward),
    the least a forward that reads it must take.
    """
    candidates = []
    accelerate = _time(results, "accelerate_disk", batch, "warm_min_s")
    if accelerate is not None:
        candidates.append((accelerate, "accelerate disk, warm"))
    raw = _time(results, "raw_buffered", batch, "warm_min_s")
    if raw is not None:
        ram = _time(results, "ram", batch)
        if ram is None:
            candidates.append((raw, "buffered read, warm"))
        else:
            candidates.append((max(raw, ram), "max(buffered read warm, in-RAM forward)"))
    return min(candidates, default=(None, None))


def recommend(report: dict) -> dict:
    """The setting the measurements favour: ``page_cache`` or ``nvme`` (None when nvme was not measured).

    The page cache wins when the model fits in the RAM that was available (2 GB to spare) and, at every batch, a
    buffered anchor's warm forward beats nvme's cold forward; otherwise nvme, with the settings in force.
    """
    results, config = report["modes"], report["config"]
    available = report["machine"]["available_ram_gb"]
    model_gb = config["model_bytes"] / 1e9
    settings = ", ".join(f"{k}={v}" for k, v in report["nvme_settings"].items() if k != "offload_dir")
    comparisons = {}
    for batch in config["batches"]:
        nvme = _time(results, "nvme", batch)
        page_cache, source = _page_cache_time(results, batch)
        comparisons[str(batch)] = {"nvme_cold_s": nvme, "page_cache_warm_s": page_cache, "page_cache_source": source}
    if all(c["nvme_cold_s"] is None for c in comparisons.values()):
        return {"setting": None, "comparisons": comparisons, "text": "no recommendation: nvme was not measured"}
    fits = fits_in_ram(config["model_bytes"], int(available * 1e9))
    page_cache_wins = all(
        c["page_cache_warm_s"] is not None
        and c["nvme_cold_s"] is not None
        and c["page_cache_warm_s"] < c["nvme_cold_s"]
        for c in comparisons.values()
    )
    times = "; ".join(
        f"batch {b}: {_fmt(c['page_cache_warm_s'], '.3f')} s ({c['page_cache_source'] or 'not measured'})"
        f" vs nvme cold {_fmt(c['nvme_cold_s'], '.3f')} s"
        for b, c in comparisons.items()
    )
    if fits and page_cache_wins:
        text = (
            f"the page cache serves this machine better: the {model_gb:.2f} GB model fits in the {available:.1f} GB"
            f" of available RAM and warm buffered forwards beat nvme's cold ones ({times}). Keep the model in RAM"
            ' (no offload), or use accelerate "disk" offload, which reads from the page cache once warm; choose'
            ' offload_backend="nvme" when that RAM is needed for something else.'
        )
        return {"setting": "page_cache", "fits_in_ram": fits, "comparisons": comparisons, "text": text}
    auto = report.get("nvme_auto")
    if not fits and auto and any(b["speedup_warm"] for b in auto["batches"].values()):
        cells = "; ".join(
            f"batch {b}: {v['warm_s']:.3f} s vs {v['anchor']} {v['anchor_warm_s']:.3f} s = {v['speedup_warm']:.1f}x"
            f" faster, {_fmt(v['over_bound'], '.2f')}x its bound"
            for b, v in auto["batches"].items()
            if v["speedup_warm"]
        )
        text = (
            f'offload_backend="nvme" with resident_budget="auto": the {model_gb:.2f} GB model does not fit in the'
            f" {available:.1f} GB of available RAM, so the page cache cannot keep it and disk offload reads it all on"
            f' every forward, warm or not; "auto" kept {auto["resident_bytes"] / 1e9:.2f} GB resident and streamed'
            f" the rest. Expected speed-up, warm forwards: {cells}."
        )
        return {
            "setting": "nvme",
            "resident_budget": "auto",
            "fits_in_ram": fits,
            "comparisons": comparisons,
            "text": text,
        }
    if not fits:
        why = f"the {model_gb:.2f} GB model does not fit in the {available:.1f} GB of available RAM (2 GB to spare)"
    elif all(c["page_cache_warm_s"] is None for c in comparisons.values()):
        why = "no buffered anchor (raw_buffered, accelerate_disk) was measured warm to compare with"
    else:
        why = f"warm buffered forwards do not beat nvme's cold ones ({times})"
    text = f'offload_backend="nvme" with the settings in force ({settings}): {why}.'
    return {"setting": "nvme", "fits_in_ram": fits, "comparisons": comparisons, "text": text}


def _does_not_fit(mode: str, config: BenchConfig, available: int) -> dict | None:
    if mode in NEEDS_MODEL_IN_RAM[model_kind(config)] and not fits_in_ram(config.model_bytes, available):
        error = (
            f"needs the {config.model_bytes / 1e9:.2f} GB model in RAM, {available / 1e9:.1f} GB available"
            " (2 GB kept to spare)"
        )
        return {"mode": mode, "status": "does not fit", "error": error}
    return None


def run(
    config: BenchConfig,
    modes: Iterable[str] = MODES,
    offload_folder: str | os.PathLike | None = None,
    json_path: str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = None,
    warm_forwards: int | None = None,
    from_pretrained: bool | None = None,
    free_ram: int | None = None,
) -> dict:
    """Run each mode in its own subprocess under a fresh temporary folder and gather the report.

    The folder (worker files and, for ``from_pretrained``, the synthetic checkpoint) is created inside
    ``offload_folder`` (default: the current directory) and removed at the end, Ctrl-C included.
    ``warm_forwards`` overrides the config's; ``from_pretrained`` too, and when None it is switched on if the Linear
    model would not fit in the available RAM. ``free_ram`` squeezes the machine: a ``Ballast`` holds all but that
    many bytes while the modes run (the ``ram`` reference runs before it, when the model fits the whole machine).
    ``json_path`` and ``plot_path`` also write the report there.
    """
    import psutil

    from accel_nvme.config import load_config

    machine_available = psutil.virtual_memory().available
    if free_ram is not None:
        Ballast.check(free_ram, machine_available)
    available = machine_available if free_ram is None else free_ram
    if from_pretrained is None:
        from_pretrained = config.from_pretrained or not fits_in_ram(config.linear_bytes, available)
        if from_pretrained and not config.from_pretrained:
            logger.info(
                "%.1f GB does not fit in %.1f GB of free RAM: using from_pretrained",
                config.linear_bytes / 1e9,
                available / 1e9,
            )
    config = replace(
        config,
        from_pretrained=from_pretrained,
        warm_forwards=config.warm_forwards if warm_forwards is None else warm_forwards,
        max_hidden=config.max_hidden if free_ram is None else squeezed_max_hidden(free_ram, config.max_hidden),
    )
    modes = [m for m in MODES if m in set(modes)] + [resident_mode(s) for s in config.resident_shares if s > 0]
    root = Path(tempfile.mkdtemp(prefix="accel-nvme-bench-", dir=offload_folder or "."))
    ballast, squeeze = None, None
    try:
        machine = _machine_info(root, available)
        machine["available_before_squeeze_gb"] = machine_available / 1e9
        checkpoint = None
        if config.from_pretrained:
            checkpoint = root / "checkpoint"
            checkpoint.mkdir()
            write_llama_checkpoint(config.llama_shape, checkpoint, config.seed)
        results = {}
        if free_ram is not None and "ram" in modes:  # the reference, in the whole machine, before the squeeze
            reference = _does_not_fit("ram", config, machine_available) or _run_mode("ram", config, root, checkpoint)
            results["ram"] = reference
            results["ram"]["squeezed"] = False
        if free_ram is not None:
            ballast = Ballast(free_ram)
            squeeze = {
                "free_ram_bytes": free_ram,
                "held_at_start_bytes": ballast.held_bytes,
                "available_at_start_bytes": ballast.available_bytes,
                "modes": {},
            }
        for mode in (m for m in modes if m not in results):
            if ballast is not None:
                held, now = ballast.adjust()
                squeeze["modes"][mode] = {"held_bytes": held, "available_bytes": now}
            results[mode] = _does_not_fit(mode, config, available) or _run_mode(mode, config, root, checkpoint)
            if ballast is not None:
                results[mode]["squeezed"] = True
                if ballast.process.poll() is not None:
                    raise BallastError(
                        f"the ballast process died (status {ballast.process.returncode}) while mode {mode} ran:"
                        " the machine was no longer squeezed"
                    )
        results = [results[m] for m in modes]
        for result in results:
            if result["status"] == "ok":
                result["model_bytes"] = config.model_bytes
                reference = root / "ram.outputs.pt" if "ram" in modes else None
                _compare_outputs(result, root / f"{result['mode']}.outputs.pt", reference)
    finally:
        if ballast is not None:
            ballast.close()
        shutil.rmtree(root, ignore_errors=True)
    report = {
        "machine": machine,
        "config": {
            **asdict(config),
            "model": model_kind(config),
            "model_bytes": config.model_bytes,
            "llama_shape": {**asdict(config.llama_shape), "intermediate": config.llama_shape.intermediate}
            if config.from_pretrained
            else None,
            "modes": modes,
        },
        "nvme_settings": asdict(load_config()),
        "modes": results,
        "ratios": compute_ratios(results, config.batches),
        "resident_sweep": resident_sweep(results, config.batches, config.resident_shares),
        "squeeze": squeeze,
        "nvme_auto": nvme_auto_summary(results, config.batches),
    }
    report["recommendation"] = recommend(report)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=2))
    if plot_path is not None:
        plot_report(report, plot_path)
    return report


# ---------------------------------------------------------------- the printed report and the plot


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _exact_text(mode: str, entry: dict) -> str:
    if mode == "ram":
        return "ref"
    if mode in RAW_MODES or entry["exact"] is None:
        return "n/a"
    return "yes" if entry["exact"] else f"no (max |diff| {entry['max_abs_diff']:.3g})"


def _pair(a: float | None, b: float | None, spec: str) -> str:
    return "-" if a is None else f"{a:{spec}} / {_fmt(b, spec)}"


def _model_text(config: dict) -> str:
    if config["model"] == "llama":
        s = config["llama_shape"]
        return (
            f"LlamaForCausalLM {s['layers']} layers, hidden {s['hidden']}, MLP {s['intermediate']}, vocab {s['vocab']},"
            f" fp32 = {config['model_bytes'] / 1e9:.2f} GB, loaded by from_pretrained; batch = tokens of one sequence"
        )
    h = config["hidden"]
    return f"{config['layers']} x Linear({h}, {h}) fp32 = {config['model_bytes'] / 1e9:.2f} GB"


TABLE_HEADER = (
    "mode",
    "batch",
    "cold s min/med",
    "cold GB/s",
    "warm s min/med",
    "warm GB/s",
    "RSS setup MB",
    "fwd peak RSS MB",
    "RSS above setup MB",
    "process peak MB",
    "files cached MB cold/warm",
    "exact",
)


def _rows(report: dict) -> list[tuple[str, ...]]:
    rows = []
    for r in report["modes"]:
        if r["status"] != "ok":
            rows.append((r["mode"], "-", r["status"], *[""] * (len(TABLE_HEADER) - 3)))
            continue
        for e in r["batches"]:
            rows.append(
                (
                    r["mode"] + (" (whole machine)" if r.get("squeezed") is False else ""),
                    "any" if r["mode"] in RAW_MODES else str(e["batch"]),
                    _pair(e["min_s"], e["median_s"], ".3f"),
                    f"{e['gb_per_s']:.2f}",
                    _pair(e["warm_min_s"], e["warm_median_s"], ".3f"),
                    _fmt(e["warm_gb_per_s"], ".2f"),
                    _fmt(r["rss_after_setup_mb"], ".0f"),
                    _fmt(r["forward_peak_rss_mb"], ".0f"),
                    _fmt(r["rss_above_setup_mb"], ".0f"),
                    f"{r['peak_rss_mb']:.0f}",
                    _pair(max(e["file_cache_growth_mb"]), max(e["warm_file_cache_growth_mb"], default=None), ".0f"),
                    _exact_text(r["mode"], e),
                )
            )
    return rows


def format_report(report: dict) -> str:
    """The report as a text table, the nvme ratios and the recommendation."""
    config, machine = report["config"], report["machine"]
    rows = _rows(report)
    widths = [max(len(str(row[i])) for row in [TABLE_HEADER, *rows]) for i in range(len(TABLE_HEADER))]
    load = machine["load_average_at_start"]
    lines = [
        f"load average at start: {load[0]:.2f} on {machine['cpus']} CPUs (timings need a quiet machine);"
        f" RAM {machine['ram_gb']:.1f} GB, {machine['available_ram_gb']:.1f} GB available",
        f"model: {_model_text(config)}",
        f"per batch: a warm-up forward, {config['forwards']} cold forwards (page cache dropped before each), then"
        f" {config['warm_forwards']} warm forwards (not dropped)",
        " | ".join(h.ljust(w) for h, w in zip(TABLE_HEADER, widths, strict=True)),
        "-+-".join("-" * w for w in widths),
        *(" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows),
        "RSS setup: after setup; fwd peak: peak from the warm-ups to the end; RSS above setup: fwd peak - RSS setup"
        " (what the forwards add to the resident part); process peak: the whole worker, setup included;"
        " files cached: largest rise over one forward of the mode's own files in the page cache (mincore; the"
        " system-wide rise of Cached: is in the JSON)",
    ]
    lines += [f"{r['mode']} {r['status']}: {r['error']}" for r in report["modes"] if r["status"] != "ok"]
    lines += _squeeze_lines(report)
    drops = next((r["page_cache_drop"] for r in report["modes"] if r["status"] == "ok"), {})
    lines.append("page-cache drop: " + ", ".join(f"{m} {'ok' if v else 'failed'}" for m, v in drops.items()))
    lines.append(
        "ratios on min times (nvme / max(min(raw_direct, raw_buffered), ram); speed-ups = other / nvme cold,"
        " >1: nvme faster):"
    )
    for name, per_batch in report["ratios"].items():
        if any(v is not None for v in per_batch.values()):
            values = ", ".join(f"batch {b}: {_fmt(v, '.2f')}" for b, v in per_batch.items())
            lines.append(f"  {name}: {values}")
    if report.get("resident_sweep"):
        lines.append(
            "resident budget sweep (cold forward s; expected = max(in-RAM, nvme x streamed share); vs in-RAM):"
        )
        for share, per_batch in report["resident_sweep"].items():
            cells = "; ".join(
                f"batch {b}: {_fmt(v['time_s'], '.3f')} (expected {_fmt(v['expected_s'], '.3f')}, "
                f"x{_fmt(v['vs_ram'], '.2f')} in-RAM)"
                for b, v in per_batch.items()
            )
            lines.append(f"  {share:>3}% resident: {cells}")
    lines += _nvme_auto_lines(report.get("nvme_auto"))
    lines.append(f"recommendation: {report['recommendation']['text']}")
    return "\n".join(lines)


def _squeeze_lines(report: dict) -> list[str]:
    squeeze = report.get("squeeze")
    if not squeeze:
        return []
    held = ", ".join(
        f"{mode} {m['held_bytes'] / 1e9:.2f} GB held, {m['available_bytes'] / 1e9:.2f} GB available"
        for mode, m in squeeze["modes"].items()
    )
    lines = [
        f"squeezed: a ballast process held all but {squeeze['free_ram_bytes'] / 1e9:.2f} GB of the available RAM"
        f" ({report['machine']['available_before_squeeze_gb']:.1f} GB before); at each mode's start: {held}"
    ]
    if any(r.get("squeezed") is False for r in report["modes"]):
        lines.append("ram ran before the squeeze, in the whole machine: the reference for exactness and compute time")
    return lines


def _nvme_auto_lines(summary: dict | None) -> list[str]:
    if not summary:
        return []
    lines = [
        f'nvme_auto (resident_budget="auto"): {summary["resident_bytes"] / 1e9:.2f} GB resident, groups of'
        f" {summary['group_bytes'] / 1e6:.0f} MB; warm forwards (min), bound = max(streamed bytes / best raw read"
        " rate, in-RAM forward):"
    ]
    for batch, v in summary["batches"].items():
        anchor = f"{v['anchor']} {v['anchor_warm_s']:.3f} s" if v["anchor"] else "no disk anchor"
        lines.append(
            f"  batch {batch}: {_fmt(v['warm_s'], '.3f')} s; {anchor} -> {_fmt(v['speedup_warm'], '.2f')}x faster;"
            f" streamed {_fmt(v['streamed_bytes'] and v['streamed_bytes'] / 1e9, '.2f')} GB at"
            f" {_fmt(v['raw_rate_gb_per_s'], '.2f')} GB/s = {_fmt(v['io_bound_s'], '.3f')} s, in-RAM"
            f" {_fmt(v['compute_s'], '.3f')} s -> {_fmt(v['over_bound'], '.2f')}x the {v['bound_by'] or '-'} bound;"
            f" page cache +{v['page_cache_growth_mb']:.0f} MB"
            f" ({'within' if v['page_cache_within_one_group'] else 'MORE than'} one group)"
        )
    return lines


def _import_pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the bench plot needs matplotlib: pip install 'accel-nvme[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_label(result: dict) -> str:
    if result["mode"] in RAW_MODES:
        return f"{result['mode']}\n(read only)"
    return f"{result['mode']}\n(whole machine)" if result.get("squeezed") is False else result["mode"]


def _regime_text(report: dict) -> str:
    squeeze = report.get("squeeze")
    return f", squeezed to {squeeze['free_ram_bytes'] / 1e9:.1f} GB free RAM" if squeeze else ""


def plot_report(report: dict, path: str | os.PathLike) -> None:
    """Write the report as a PNG: forward times per batch (cold and warm, with the in-RAM and raw-read floors)
    and, below, each mode's memory (RSS above setup, process peak RSS, page-cache growth)."""
    plt = _import_pyplot()
    batches = report["config"]["batches"]
    results = report["modes"]
    modes = [r["mode"] for r in results]
    sweep = report.get("resident_sweep") or {}
    rows = 3 if sweep else 2
    fig = plt.figure(figsize=(max(11, 6 * len(batches) + 2), 9 + 4 * (rows - 2)), layout="constrained")
    grid = fig.add_gridspec(rows, len(batches), height_ratios=(3, 2, 2)[:rows])
    y = range(len(modes))
    for col, batch in enumerate(batches):
        ax = fig.add_subplot(grid[0, col])
        cold = [_time(results, m, batch) for m in modes]
        warm = [_time(results, m, batch, "warm_min_s") for m in modes]
        ax.barh([i - 0.2 for i in y], [t or 0 for t in cold], 0.4, color="tab:blue", label="cold (page cache dropped)")
        ax.barh([i + 0.2 for i in y], [t or 0 for t in warm], 0.4, color="tab:orange", label="warm (files cached)")
        top = max((t for t in cold + warm if t), default=1.0)
        for i, r in enumerate(results):
            if r["status"] != "ok":
                ax.text(top * 0.02, i, r["status"], va="center", color="gray", style="italic")
                continue
            for t, offset in ((cold[i], -0.2), (warm[i], 0.2)):
                if t:
                    ax.text(t, i + offset, f" {t:.3g}", va="center", fontsize=8)
        ram = min((t for k in ("min_s", "warm_min_s") if (t := _time(results, "ram", batch, k))), default=None)
        raw = min((t for t in (_time(results, m, batch) for m in RAW_MODES) if t), default=None)
        bound = ((report.get("nvme_auto") or {}).get("batches") or {}).get(str(batch), {}).get("bound_s")
        for value, label, style in (
            (ram, "in-RAM forward", "--"),
            (raw, "raw read of the weights (cold)", ":"),
            (bound, "nvme_auto's bound", "-."),
        ):
            if value:
                ax.axvline(value, color="black", linestyle=style, linewidth=1.2, label=f"{label}: {value:.2f} s")
        ax.set_yticks(list(y), [_plot_label(r) for r in results])
        ax.invert_yaxis()
        ax.set_xlim(0, top * 1.15)
        ax.set_xlabel("seconds per forward (min) — shorter is better")
        ax.set_title(f"batch {batch}{_regime_text(report)}")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8)  # below: never on a bar
    ax = fig.add_subplot(grid[1, :])
    ok = [r for r in results if r["status"] == "ok"]
    series = (
        ("RSS above setup (what forwards add)", [r["rss_above_setup_mb"] or 0 for r in ok], "tab:green"),
        ("process peak RSS", [r["peak_rss_mb"] for r in ok], "tab:purple"),
        (
            "page-cache growth, its own files (largest over one forward)",
            [max(max(e["file_cache_growth_mb"] + e["warm_file_cache_growth_mb"]) for e in r["batches"]) for r in ok],
            "tab:gray",
        ),
    )
    for k, (label, values, color) in enumerate(series):
        bars = ax.bar([i + (k - 1) * 0.27 for i in range(len(ok))], values, 0.27, label=label, color=color)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(ok)), [_plot_label(r) for r in ok])
    ax.set_ylabel("MB")
    squeeze = report.get("squeeze")
    if squeeze:
        free_mb = squeeze["free_ram_bytes"] / (1 << 20)
        ax.axhline(free_mb, color="black", linestyle="--", linewidth=1.2, label=f"RAM available: {free_mb:.0f} MB")
    ax.set_title(f"memory per mode, MB (lower is better){_regime_text(report)}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=4, fontsize=8)
    for col, batch in enumerate(batches if sweep else ()):
        ax = fig.add_subplot(grid[2, col])
        shares = [int(share) for share in sweep]
        ax.plot(shares, [sweep[s][str(batch)]["time_s"] for s in sweep], "o-", label="accel_nvme, cold")
        ax.plot(
            shares,
            [sweep[s][str(batch)]["expected_s"] for s in sweep],
            ":",
            color="gray",
            label="in proportion to the streamed share",
        )
        ram = _time(results, "ram", batch)
        if ram:
            ax.axhline(ram, color="black", linestyle="--", linewidth=1.2, label=f"in-RAM forward: {ram:.2f} s")
        ax.set_xlabel("resident budget, % of the model")
        ax.set_ylabel("seconds per forward")
        ax.set_title(f"resident budget sweep, batch {batch}")
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize=8)
    config = report["config"]
    if config["model"] == "llama":
        shape = config["llama_shape"]
        model = f"Llama, {shape['layers']} layers of hidden {shape['hidden']}"
    else:
        model = f"{config['layers']} x Linear({config['hidden']}, {config['hidden']})"
    setting = {"page_cache": "the page cache (the model fits in free RAM)", "nvme": "nvme"}
    if report["recommendation"].get("resident_budget") == "auto":
        setting["nvme"] = 'nvme with resident_budget="auto"'
    fig.suptitle(
        f"accel-nvme bench: {model}, {config['model_bytes'] / 1e9:.2f} GB fp32\n"
        f"recommendation: {setting.get(report['recommendation']['setting'], 'none')}",
        fontsize=11,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    _worker_main()
