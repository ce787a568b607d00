"""What the measurements say: ratios against the bounds and anchors, nvme_auto against its bound, the resident
budget sweep and the recommendation, gathered with the measurements into the ``Report`` (JSON at its boundary)."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from accel_nvme.bench.config import BenchConfig, fits_in_ram
from accel_nvme.bench.modes import BASE_MODES, nvme_resident
from accel_nvme.bench.results import ModeResult, Squeeze, find, seconds

RAW_MODES = tuple(m.name for m in BASE_MODES if m.raw)
DISK_ANCHORS = tuple(m.name for m in BASE_MODES if m.disk_anchor)
WARM_ANCHORS = tuple(m.name for m in BASE_MODES if m.warm_anchor)


def fmt(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec``, or ``-`` when None."""
    return "-" if value is None else format(value, spec)


def _nvme_over_bound(results: list[ModeResult], batch: int) -> float | None:
    nvme = seconds(results, "nvme", batch)
    raw = [t for m in RAW_MODES if (t := seconds(results, m, batch)) is not None]
    bound = max((t for t in (min(raw, default=None), seconds(results, "ram", batch)) if t is not None), default=None)
    return nvme / bound if nvme and bound else None


def _speedup(other: str, warm: bool, results: list[ModeResult], batch: int) -> float | None:
    nvme, t = seconds(results, "nvme", batch), seconds(results, other, batch, warm)
    return t / nvme if nvme and t else None


def compute_ratios(results: list[ModeResult], batches: Iterable[int]) -> dict[str, dict[str, float | None]]:
    """Ratios on min times, per batch: nvme against max(raw best, ram), and speed-ups = other's time / nvme's.

    ``nvme_speedup_over_<mode>`` compares cold forwards; ``..._warm`` compares nvme cold with the buffered anchors'
    warm forwards (what a user whose page cache holds the files gets).
    """
    figures = [
        ("nvme_over_bound", _nvme_over_bound),
        *(
            (f"nvme_speedup_over_{m.name}", functools.partial(_speedup, m.name, False))
            for m in BASE_MODES
            if not m.nvme
        ),
        *((f"nvme_speedup_over_{m}_warm", functools.partial(_speedup, m, True)) for m in WARM_ANCHORS),
    ]
    return {name: {str(batch): figure(results, batch) for batch in batches} for name, figure in figures}


def best_raw_rate(results: list[ModeResult], batch: int) -> float | None:
    """The best disk read rate of the run at ``batch``, bytes/s: raw reads when cold, and O_DIRECT (never cached)."""
    rates = [
        r.model_bytes / t
        for name, warm in (("raw_direct", False), ("raw_buffered", False), ("raw_direct", True))
        if (r := find(results, name)) and (t := r.time(batch, warm))
    ]
    return max(rates, default=None)


@dataclass(frozen=True)
class AutoBatch:
    """nvme_auto at one batch: its warm and cold forwards, the faster disk anchor, its bound and page-cache growth."""

    warm_s: float | None
    cold_s: float | None
    anchor: str | None
    anchor_warm_s: float | None
    speedup_warm: float | None
    not_slower_than_anchors: bool | None
    streamed_bytes: int | None
    raw_rate_gb_per_s: float | None
    io_bound_s: float | None
    compute_s: float | None
    bound_s: float | None
    bound_by: str | None
    over_bound: float | None
    page_cache_growth_mb: float
    page_cache_within_one_group: bool


@dataclass(frozen=True)
class AutoSummary:
    """nvme with ``resident_budget="auto"``: what it kept resident, its group size, and each batch (``AutoBatch``)."""

    resident_bytes: int
    group_bytes: int
    batches: dict[str, AutoBatch]

    def to_json(self) -> dict:
        """The report's ``nvme_auto`` entry."""
        return asdict(self)


def _auto_batch(results: list[ModeResult], auto: ModeResult, batch: int) -> AutoBatch:
    entry = auto.entry(batch)
    warm = entry.warm_min_s
    anchors = {m: t for m in DISK_ANCHORS if (t := seconds(results, m, batch, warm=True)) is not None}
    anchor = min(anchors, key=anchors.get, default=None)
    streamed = min(entry.streamed_bytes[len(entry.times_s) :] or entry.streamed_bytes, default=None)
    rate = best_raw_rate(results, batch)
    io_s = streamed / rate if streamed is not None and rate else None
    ram = [t for warm_ram in (False, True) if (t := seconds(results, "ram", batch, warm_ram)) is not None]
    compute_s = min(ram, default=None)  # in RAM, cold and warm forwards are the same work
    bound = max((t for t in (io_s, compute_s) if t is not None), default=None)
    growth = entry.largest_file_growth_mb
    return AutoBatch(
        warm_s=warm,
        cold_s=entry.min_s,
        anchor=anchor,
        anchor_warm_s=anchors.get(anchor),
        speedup_warm=anchors[anchor] / warm if anchor and warm else None,
        not_slower_than_anchors=all(warm <= t for t in anchors.values()) if warm and anchors else None,
        streamed_bytes=streamed,
        raw_rate_gb_per_s=rate / 1e9 if rate else None,
        io_bound_s=io_s,
        compute_s=compute_s,
        bound_s=bound,
        bound_by=None if bound is None else ("io" if bound == io_s else "compute"),
        over_bound=warm / bound if warm and bound else None,
        page_cache_growth_mb=growth,
        page_cache_within_one_group=growth * (1 << 20) <= auto.nvme_residency.group_bytes,
    )


def nvme_auto_summary(results: list[ModeResult], batches: Iterable[int]) -> AutoSummary | None:
    """nvme with ``resident_budget="auto"`` against its bound and the disk anchors, per batch (warm forwards, min).

    ``bound_s`` = max(bytes it streams per forward / the run's best raw read rate, the in-RAM forward (min of all));
    ``speedup_warm`` = the faster anchor's warm forward / nvme_auto's. None when nvme_auto did not run.
    """
    auto = find(results, "nvme_auto")
    if auto is None:
        return None
    return AutoSummary(
        resident_bytes=auto.nvme_residency.resident_bytes,
        group_bytes=auto.nvme_residency.group_bytes,
        batches={str(e.batch): _auto_batch(results, auto, e.batch) for e in auto.batches},
    )


def _sweep_cell(results: list[ModeResult], mode: str, share: float, batch: int) -> dict[str, float | None]:
    t, nvme, ram = (seconds(results, m, batch) for m in (mode, "nvme", "ram"))
    return {
        "time_s": t,
        "expected_s": max(nvme * (1 - share), ram or 0.0) if nvme else None,
        "vs_ram": t / ram if t and ram else None,
    }


def resident_sweep(results: list[ModeResult], batches: Iterable[int], shares: Iterable[float]) -> dict[str, dict]:
    """Cold forward time per resident share and batch, against the time nvme would take if it fell in proportion to
    the streamed share, floored by compute (``expected_s`` = max(in-RAM time, nvme's time × (1 − share)));
    ``vs_ram`` compares with the in-RAM forward."""
    return {
        str(round(share * 100)): {
            str(batch): _sweep_cell(results, "nvme" if share == 0 else nvme_resident(share).name, share, batch)
            for batch in batches
        }
        for share in (sorted({0.0, *shares}) if shares else ())
    }


@dataclass(frozen=True)
class Comparison:
    """At one batch: nvme's cold forward against the best warm forward the page cache offers, and where from."""

    nvme_cold_s: float | None
    page_cache_warm_s: float | None
    page_cache_source: str | None


def _page_cache_time(results: list[ModeResult], batch: int) -> tuple[float | None, str | None]:
    """The best warm forward the page cache offers at ``batch``, and where it comes from.

    accelerate disk's warm forward counts as measured; a raw buffered warm read counts as max(read, in-RAM forward),
    the least a forward that reads it must take.
    """
    candidates = []
    accelerate = seconds(results, "accelerate_disk", batch, warm=True)
    if accelerate is not None:
        candidates.append((accelerate, "accelerate disk, warm"))
    raw = seconds(results, "raw_buffered", batch, warm=True)
    if raw is not None:
        ram = seconds(results, "ram", batch)
        if ram is None:
            candidates.append((raw, "buffered read, warm"))
        else:
            candidates.append((max(raw, ram), "max(buffered read warm, in-RAM forward)"))
    return min(candidates, default=(None, None))


def _comparison(results: list[ModeResult], batch: int) -> Comparison:
    return Comparison(seconds(results, "nvme", batch), *_page_cache_time(results, batch))


@dataclass(frozen=True)
class Recommendation:
    """The setting the measurements favour (``page_cache``, ``nvme`` or None), why, and what it rests on."""

    setting: str | None
    comparisons: dict[str, Comparison]
    text: str
    fits_in_ram: bool | None = None
    resident_budget: str | None = None

    def to_json(self) -> dict:
        """The report's ``recommendation`` entry."""
        budget = {} if self.resident_budget is None else {"resident_budget": self.resident_budget}
        fits = {} if self.fits_in_ram is None else {"fits_in_ram": self.fits_in_ram}
        comparisons = {batch: asdict(c) for batch, c in self.comparisons.items()}
        return {"setting": self.setting} | budget | fits | {"comparisons": comparisons, "text": self.text}


def _times_text(comparisons: dict[str, Comparison]) -> str:
    return "; ".join(
        f"batch {b}: {fmt(c.page_cache_warm_s, '.3f')} s ({c.page_cache_source or 'not measured'})"
        f" vs nvme cold {fmt(c.nvme_cold_s, '.3f')} s"
        for b, c in comparisons.items()
    )


def _page_cache_wins(comparisons: dict[str, Comparison]) -> bool:
    return all(
        c.page_cache_warm_s is not None and c.nvme_cold_s is not None and c.page_cache_warm_s < c.nvme_cold_s
        for c in comparisons.values()
    )


def _auto_text(auto: AutoSummary, model_gb: float, available: float) -> str:
    cells = "; ".join(
        f"batch {b}: {v.warm_s:.3f} s vs {v.anchor} {v.anchor_warm_s:.3f} s = {v.speedup_warm:.1f}x"
        f" faster, {fmt(v.over_bound, '.2f')}x its bound"
        for b, v in auto.batches.items()
        if v.speedup_warm
    )
    return (
        f'offload_backend="nvme" with resident_budget="auto": the {model_gb:.2f} GB model does not fit in the'
        f" {available:.1f} GB of available RAM, so the page cache cannot keep it and disk offload reads it all on"
        f' every forward, warm or not; "auto" kept {auto.resident_bytes / 1e9:.2f} GB resident and streamed'
        f" the rest. Expected speed-up, warm forwards: {cells}."
    )


def _nvme_text(comparisons: dict[str, Comparison], fits: bool, model_gb: float, available: float, settings: str) -> str:
    if not fits:
        why = f"the {model_gb:.2f} GB model does not fit in the {available:.1f} GB of available RAM (2 GB to spare)"
    elif all(c.page_cache_warm_s is None for c in comparisons.values()):
        why = "no buffered anchor (raw_buffered, accelerate_disk) was measured warm to compare with"
    else:
        why = f"warm buffered forwards do not beat nvme's cold ones ({_times_text(comparisons)})"
    return f'offload_backend="nvme" with the settings in force ({settings}): {why}.'


def recommend(
    results: list[ModeResult], config: BenchConfig, available: float, settings: dict, auto: AutoSummary | None
) -> Recommendation:
    """The setting the measurements favour: ``page_cache`` or ``nvme`` (None when nvme was not measured).

    The page cache wins when the model fits in the RAM that was available (``available`` GB, 2 GB to spare) and, at
    every batch, a buffered anchor's warm forward beats nvme's cold forward; otherwise nvme, with the settings in
    force (``settings``), or with ``resident_budget="auto"`` when the model does not fit and nvme_auto beat a disk
    anchor.
    """
    comparisons = {str(batch): _comparison(results, batch) for batch in config.batches}
    if all(c.nvme_cold_s is None for c in comparisons.values()):
        return Recommendation(None, comparisons, "no recommendation: nvme was not measured")
    model_gb = config.model_bytes / 1e9
    fits = fits_in_ram(config.model_bytes, int(available * 1e9))
    if fits and _page_cache_wins(comparisons):
        text = (
            f"the page cache serves this machine better: the {model_gb:.2f} GB model fits in the {available:.1f} GB"
            f" of available RAM and warm buffered forwards beat nvme's cold ones ({_times_text(comparisons)}). Keep"
            ' the model in RAM (no offload), or use accelerate "disk" offload, which reads from the page cache once'
            ' warm; choose offload_backend="nvme" when that RAM is needed for something else.'
        )
        return Recommendation("page_cache", comparisons, text, fits)
    if not fits and auto and any(b.speedup_warm for b in auto.batches.values()):
        return Recommendation("nvme", comparisons, _auto_text(auto, model_gb, available), fits, "auto")
    in_force = ", ".join(f"{k}={v}" for k, v in settings.items() if k != "offload_dir")
    return Recommendation("nvme", comparisons, _nvme_text(comparisons, fits, model_gb, available, in_force), fits)


@dataclass(frozen=True)
class Report:
    """A run's measurements and what they say; ``to_json`` gives the report as ``run`` returns and writes it."""

    machine: dict
    config: BenchConfig
    modes: list[ModeResult]
    nvme_settings: dict
    squeeze: Squeeze | None
    nvme_auto: AutoSummary | None
    recommendation: Recommendation

    @classmethod
    def of(
        cls, machine: dict, config: BenchConfig, modes: list[ModeResult], settings: dict, squeeze: Squeeze | None
    ) -> Report:
        """The report of ``modes`` measured on ``machine`` with ``config``, its conclusions drawn."""
        auto = nvme_auto_summary(modes, config.batches)
        recommendation = recommend(modes, config, machine["available_ram_gb"], settings, auto)
        return cls(machine, config, modes, settings, squeeze, auto, recommendation)

    @classmethod
    def from_json(cls, report: dict) -> Report:
        """The record of a report's JSON (a saved ``--json`` file); its conclusions are drawn again."""
        squeeze = None if report["squeeze"] is None else Squeeze.from_json(report["squeeze"])
        modes = [ModeResult.from_json(r) for r in report["modes"]]
        config = BenchConfig.from_json(report["config"])
        return cls.of(report["machine"], config, modes, report["nvme_settings"], squeeze)

    def config_json(self) -> dict:
        """The report's ``config`` entry: the BenchConfig, the model it gives and the modes run."""
        shape = self.config.llama_shape
        return asdict(self.config) | {
            "model": self.config.model_kind,
            "model_bytes": self.config.model_bytes,
            "llama_shape": asdict(shape) | {"intermediate": shape.intermediate}
            if self.config.from_pretrained
            else None,
            "modes": [r.mode.name for r in self.modes],
        }

    def to_json(self) -> dict:
        """The report as JSON: what ``run`` returns, ``--json`` writes and ``format_report``/``plot_report`` read."""
        return {
            "machine": self.machine,
            "config": self.config_json(),
            "nvme_settings": self.nvme_settings,
            "modes": [r.to_json() for r in self.modes],
            "ratios": compute_ratios(self.modes, self.config.batches),
            "resident_sweep": resident_sweep(self.modes, self.config.batches, self.config.resident_shares),
            "squeeze": None if self.squeeze is None else self.squeeze.to_json(),
            "nvme_auto": None if self.nvme_auto is None else self.nvme_auto.to_json(),
            "recommendation": self.recommendation.to_json(),
        }
