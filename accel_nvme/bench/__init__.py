"""``accel-nvme bench``: cold and warm forwards of offloading modes on a synthetic model, each mode run in a fresh
subprocess.

The parent (``run``) starts one worker per mode (``python -m accel_nvme.bench --mode ...``) so that peak RSS is the
mode's own, compares every worker's outputs with the all-in-RAM model and reports times, bandwidth, memory and
page-cache growth, the ratios the design measures against (raw read speed, accelerate and diffusers disk) and a
recommendation: nvme, or the page cache when the model fits in free RAM and buffered reads win once warm.

With ``free_ram`` (``accel-nvme bench --free-ram``, the default) a ``Ballast`` process holds all but that much of the
available RAM while the modes run, so they meet the regime the nvme tier exists for: a model bigger than free RAM.

``--model moe`` (``run_moe``, modules ``moe``, ``moe_run``, ``moe_report``): greedy decode of a synthetic Qwen3-MoE
checkpoint, per-expert reads against whole-block streaming, transformers' disk offload and the bound.

Two synthetic models: a Sequential of fp32 Linear layers built in RAM (``linear``), or, when the model does not fit in
RAM or ``from_pretrained`` is asked for, a Llama checkpoint written shard by shard and loaded with
``from_pretrained(..., offload_backend="nvme")`` (``llama``). See docs/bench.md.

Modules, data flowing one way: config (what runs) → modes (a ``Mode`` record per mode) → models, setups, probes →
worker (one mode in its process) → results (typed records, JSON at their boundary) → analysis (ratios, bounds,
recommendation, the ``Report``) → runner (``run``) → report (text) and plot (PNG), which read the report's JSON.
"""

from accel_nvme.bench.analysis import Report, compute_ratios, nvme_auto_summary, recommend, resident_sweep
from accel_nvme.bench.ballast import MIN_FREE_RAM_BYTES, Ballast, BallastError
from accel_nvme.bench.config import (
    LLAMA_MAX_HIDDEN,
    SQUEEZE_STAGING_SHARE,
    STORAGE_DTYPES,
    BenchConfig,
    LlamaShape,
    fits_in_ram,
    hidden_for_size,
    squeezed_max_hidden,
)
from accel_nvme.bench.models import write_llama_checkpoint
from accel_nvme.bench.modes import BASE_MODES, MODES, OPTIONAL_MODES, Mode, parse_mode
from accel_nvme.bench.moe import MOE_MODES, DecodeConfig, MoeShape
from accel_nvme.bench.moe_report import format_moe_report
from accel_nvme.bench.moe_run import run_moe
from accel_nvme.bench.plot import plot_report
from accel_nvme.bench.report import format_report
from accel_nvme.bench.results import BatchResult, ModeResult
from accel_nvme.bench.runner import does_not_fit, run

__all__ = [
    "BASE_MODES",
    "LLAMA_MAX_HIDDEN",
    "MIN_FREE_RAM_BYTES",
    "MODES",
    "MOE_MODES",
    "OPTIONAL_MODES",
    "SQUEEZE_STAGING_SHARE",
    "STORAGE_DTYPES",
    "Ballast",
    "BallastError",
    "BatchResult",
    "BenchConfig",
    "DecodeConfig",
    "LlamaShape",
    "Mode",
    "ModeResult",
    "MoeShape",
    "Report",
    "compute_ratios",
    "does_not_fit",
    "fits_in_ram",
    "format_moe_report",
    "format_report",
    "hidden_for_size",
    "nvme_auto_summary",
    "parse_mode",
    "plot_report",
    "recommend",
    "resident_sweep",
    "run",
    "run_moe",
    "squeezed_max_hidden",
    "write_llama_checkpoint",
]
