"""What the bench measured, as typed records: per batch, per mode, and the squeeze. ``to_json`` and ``from_json``
are the only places where they meet the report's JSON (also the worker's answer to the parent)."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, fields

from accel_nvme.bench.modes import Mode, parse_mode

OK = "ok"
_LATER_KEYS = ("streamed_bytes", "stall_s", "exact", "max_abs_diff")  # placed after the times in a batch's JSON


def _min_median(times: list[float]) -> tuple[float | None, float | None]:
    return (min(times), statistics.median(times)) if times else (None, None)


def _rate(model_bytes: int | None, seconds: float | None) -> float | None:
    return model_bytes / seconds / 1e9 if model_bytes is not None and seconds else None


@dataclass(frozen=True)
class BatchResult:
    """The forwards of one mode at one batch: cold times (page cache dropped before each) and warm ones, page-cache
    growth (MiB; system-wide, and of the mode's own files), major faults, whether the outputs were stable and, once
    compared with the ram mode, exact; for nvme modes the bytes streamed and the seconds stalled per forward."""

    batch: int
    times_s: list[float]
    page_cache_growth_mb: list[float]
    warm_times_s: list[float]
    warm_page_cache_growth_mb: list[float]
    file_cache_growth_mb: list[float]
    warm_file_cache_growth_mb: list[float]
    major_faults: list[int]
    stable: bool
    streamed_bytes: list[int] | None = None
    stall_s: list[float] | None = None
    exact: bool | None = None
    max_abs_diff: float | None = None

    @property
    def min_s(self) -> float | None:
        """The fastest cold forward."""
        return _min_median(self.times_s)[0]

    @property
    def warm_min_s(self) -> float | None:
        """The fastest warm forward, None without warm forwards."""
        return _min_median(self.warm_times_s)[0]

    @property
    def largest_file_growth_mb(self) -> float:
        """The largest rise of the mode's own files in the page cache over one forward, cold or warm."""
        return max(self.file_cache_growth_mb + self.warm_file_cache_growth_mb)

    def to_json(self, model_bytes: int | None) -> dict:
        """The batch's JSON entry, with min/median times and GB/s at the min over ``model_bytes``."""
        (cold_min, cold_median), (warm_min, warm_median) = _min_median(self.times_s), _min_median(self.warm_times_s)
        stream = {} if self.streamed_bytes is None else {"streamed_bytes": self.streamed_bytes, "stall_s": self.stall_s}
        measured = {k: v for k, v in asdict(self).items() if k not in _LATER_KEYS}
        return (
            measured
            | stream
            | {
                "min_s": cold_min,
                "median_s": cold_median,
                "gb_per_s": _rate(model_bytes, cold_min),
                "warm_min_s": warm_min,
                "warm_median_s": warm_median,
                "warm_gb_per_s": _rate(model_bytes, warm_min),
                "exact": self.exact,
                "max_abs_diff": self.max_abs_diff,
            }
        )

    @classmethod
    def from_json(cls, entry: dict) -> BatchResult:
        """The record of a JSON entry (derived figures dropped)."""
        return cls(**{f.name: entry[f.name] for f in fields(cls) if f.name in entry})


@dataclass(frozen=True)
class Residency:
    """What an nvme mode keeps loaded: its groups, the largest group's bytes, the resident ones and their bytes."""

    groups: int
    group_bytes: int
    resident_groups: int
    resident_bytes: int


@dataclass(frozen=True)
class ModeResult:
    """One mode's outcome: ``status`` ok with its measurements, or skipped, failed, killed, does not fit (``error``
    says why). ``squeezed``: whether it ran under the ballast (None: no squeeze in this run)."""

    mode: Mode
    status: str
    error: str | None = None
    setup_s: float | None = None
    rss_after_setup_mb: float | None = None
    forward_peak_rss_mb: float | None = None
    peak_rss_mb: float | None = None
    page_cache_drop: dict[str, dict[str, float] | None] | None = None
    nvme_residency: Residency | None = None
    batches: tuple[BatchResult, ...] = ()
    model_bytes: int | None = None
    squeezed: bool | None = None

    @property
    def ok(self) -> bool:
        """Whether the mode ran and was measured."""
        return self.status == OK

    @property
    def rss_above_setup_mb(self) -> float | None:
        """What the forwards added to the RSS after setup (None when the peak could not be reset)."""
        if self.forward_peak_rss_mb is None or self.rss_after_setup_mb is None:
            return None
        return self.forward_peak_rss_mb - self.rss_after_setup_mb

    def entry(self, batch: int) -> BatchResult | None:
        """The measurements at ``batch`` (a raw read's single entry at any batch), None when not measured."""
        entries = [e for e in self.batches if e.batch == batch or self.mode.raw] if self.ok else []
        return entries[0] if entries else None

    def time(self, batch: int, warm: bool = False) -> float | None:
        """The fastest cold (or ``warm``) forward at ``batch``, None when not measured."""
        entry = self.entry(batch)
        if entry is None:
            return None
        return entry.warm_min_s if warm else entry.min_s

    def to_json(self) -> dict:
        """The mode's JSON entry in the report."""
        squeezed = {} if self.squeezed is None else {"squeezed": self.squeezed}
        if not self.ok:
            return {"mode": self.mode.name, "status": self.status, "error": self.error} | squeezed
        measured = {
            "mode": self.mode.name,
            "status": self.status,
            "setup_s": self.setup_s,
            "rss_after_setup_mb": self.rss_after_setup_mb,
            "forward_peak_rss_mb": self.forward_peak_rss_mb,
            "rss_above_setup_mb": self.rss_above_setup_mb,
            "peak_rss_mb": self.peak_rss_mb,
            "page_cache_drop": self.page_cache_drop,
            "diffusers_offload_type": self.mode.offload_type,
            "nvme_residency": None if self.nvme_residency is None else asdict(self.nvme_residency),
            "batches": [e.to_json(self.model_bytes) for e in self.batches],
        }
        return measured | squeezed | {"model_bytes": self.model_bytes}

    @classmethod
    def from_json(cls, result: dict) -> ModeResult:
        """The record of a JSON entry (a worker's answer, or a mode of a saved report)."""
        residency = result.get("nvme_residency")
        return cls(
            mode=parse_mode(result["mode"]),
            status=result["status"],
            error=result.get("error"),
            setup_s=result.get("setup_s"),
            rss_after_setup_mb=result.get("rss_after_setup_mb"),
            forward_peak_rss_mb=result.get("forward_peak_rss_mb"),
            peak_rss_mb=result.get("peak_rss_mb"),
            page_cache_drop=result.get("page_cache_drop"),
            nvme_residency=None if residency is None else Residency(**residency),
            batches=tuple(BatchResult.from_json(e) for e in result.get("batches", ())),
            model_bytes=result.get("model_bytes"),
            squeezed=result.get("squeezed"),
        )


def find(results: list[ModeResult], name: str) -> ModeResult | None:
    """The measured result of the mode called ``name``, None when it did not run or failed."""
    return next((r for r in results if r.mode.name == name and r.ok), None)


def seconds(results: list[ModeResult], name: str, batch: int, warm: bool = False) -> float | None:
    """The fastest cold (or ``warm``) forward of mode ``name`` at ``batch``, None when it was not measured."""
    result = find(results, name)
    return None if result is None else result.time(batch, warm)


@dataclass(frozen=True)
class SqueezePoint:
    """What the ballast held, and what was available, as a mode started."""

    mode: str
    held_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class Squeeze:
    """The squeezed machine: the RAM left free, what the ballast held at start, and at each mode's start."""

    free_ram_bytes: int
    held_at_start_bytes: int
    available_at_start_bytes: int
    points: tuple[SqueezePoint, ...] = ()

    def to_json(self) -> dict:
        """The report's ``squeeze`` entry."""
        modes = {p.mode: {"held_bytes": p.held_bytes, "available_bytes": p.available_bytes} for p in self.points}
        return {
            "free_ram_bytes": self.free_ram_bytes,
            "held_at_start_bytes": self.held_at_start_bytes,
            "available_at_start_bytes": self.available_at_start_bytes,
            "modes": modes,
        }

    @classmethod
    def from_json(cls, entry: dict) -> Squeeze:
        """The record of a report's ``squeeze`` entry."""
        points = tuple(SqueezePoint(mode, m["held_bytes"], m["available_bytes"]) for mode, m in entry["modes"].items())
        return cls(entry["free_ram_bytes"], entry["held_at_start_bytes"], entry["available_at_start_bytes"], points)
