"""The printed report: a table of every mode and batch, the squeeze, the ratios, the resident budget sweep, nvme_auto
against its bound and the recommendation. It reads the report's JSON, so a saved ``--json`` file prints the same."""

from __future__ import annotations

from accel_nvme.bench.analysis import fmt
from accel_nvme.bench.modes import parse_mode

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
TABLE_NOTE = (
    "RSS setup: after setup; fwd peak: peak from the warm-ups to the end; RSS above setup: fwd peak - RSS setup"
    " (what the forwards add to the resident part); process peak: the whole worker, setup included;"
    " files cached: largest rise over one forward of the mode's own files in the page cache (mincore; the"
    " system-wide rise of Cached: is in the JSON)"
)


def _exact_text(mode: str, entry: dict) -> str:
    if mode == "ram":
        return "ref"
    if parse_mode(mode).raw or entry["exact"] is None:
        return "n/a"
    return "yes" if entry["exact"] else f"no (max |diff| {entry['max_abs_diff']:.3g})"


def _pair(a: float | None, b: float | None, spec: str) -> str:
    return "-" if a is None else f"{a:{spec}} / {fmt(b, spec)}"


def _model_text(config: dict) -> str:
    if config["model"] == "llama":
        s = config["llama_shape"]
        return (
            f"LlamaForCausalLM {s['layers']} layers, hidden {s['hidden']}, MLP {s['intermediate']}, vocab {s['vocab']},"
            f" {_stored(config)} = {config['model_bytes'] / 1e9:.2f} GB, loaded by from_pretrained;"
            " batch = tokens of one sequence"
        )
    h = config["hidden"]
    return f"{config['layers']} x Linear({h}, {h}) {_stored(config)} = {config['model_bytes'] / 1e9:.2f} GB"


def _stored(config: dict) -> str:
    dtype = config.get("storage_dtype", "float32")
    return "fp32" if dtype == "float32" else f"{dtype} (computed in fp32)"


def _row(r: dict, e: dict) -> tuple[str, ...]:
    return (
        r["mode"] + (" (whole machine)" if r.get("squeezed") is False else ""),
        "any" if parse_mode(r["mode"]).raw else str(e["batch"]),
        _pair(e["min_s"], e["median_s"], ".3f"),
        f"{e['gb_per_s']:.2f}",
        _pair(e["warm_min_s"], e["warm_median_s"], ".3f"),
        fmt(e["warm_gb_per_s"], ".2f"),
        fmt(r["rss_after_setup_mb"], ".0f"),
        fmt(r["forward_peak_rss_mb"], ".0f"),
        fmt(r["rss_above_setup_mb"], ".0f"),
        f"{r['peak_rss_mb']:.0f}",
        _pair(max(e["file_cache_growth_mb"]), max(e["warm_file_cache_growth_mb"], default=None), ".0f"),
        _exact_text(r["mode"], e),
    )


def _rows(report: dict) -> list[tuple[str, ...]]:
    rows = []
    for r in report["modes"]:
        if r["status"] != "ok":
            rows.append((r["mode"], "-", r["status"], *[""] * (len(TABLE_HEADER) - 3)))
        else:
            rows += [_row(r, e) for e in r["batches"]]
    return rows


def _table_lines(report: dict) -> list[str]:
    rows = _rows(report)
    widths = [max(len(str(row[i])) for row in [TABLE_HEADER, *rows]) for i in range(len(TABLE_HEADER))]
    return [
        " | ".join(h.ljust(w) for h, w in zip(TABLE_HEADER, widths, strict=True)),
        "-+-".join("-" * w for w in widths),
        *(" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows),
        TABLE_NOTE,
    ]


def _header_lines(report: dict) -> list[str]:
    config, machine = report["config"], report["machine"]
    load = machine["load_average_at_start"]
    return [
        f"load average at start: {load[0]:.2f} on {machine['cpus']} CPUs (timings need a quiet machine);"
        f" RAM {machine['ram_gb']:.1f} GB, {machine['available_ram_gb']:.1f} GB available",
        f"model: {_model_text(config)}",
        f"per batch: a warm-up forward, {config['forwards']} cold forwards (page cache dropped before each), then"
        f" {config['warm_forwards']} warm forwards (not dropped)",
    ]


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


def _ratio_lines(report: dict) -> list[str]:
    drops = next((r["page_cache_drop"] for r in report["modes"] if r["status"] == "ok"), {})
    lines = [
        "page-cache drop: " + ", ".join(f"{m} {'ok' if v else 'failed'}" for m, v in drops.items()),
        "ratios on min times (nvme / max(min(raw_direct, raw_buffered), ram); speed-ups = other / nvme cold,"
        " >1: nvme faster):",
    ]
    for name, per_batch in report["ratios"].items():
        if any(v is not None for v in per_batch.values()):
            lines.append(f"  {name}: " + ", ".join(f"batch {b}: {fmt(v, '.2f')}" for b, v in per_batch.items()))
    return lines


def _sweep_lines(sweep: dict | None) -> list[str]:
    if not sweep:
        return []
    lines = ["resident budget sweep (cold forward s; expected = max(in-RAM, nvme x streamed share); vs in-RAM):"]
    for share, per_batch in sweep.items():
        cells = "; ".join(
            f"batch {b}: {fmt(v['time_s'], '.3f')} (expected {fmt(v['expected_s'], '.3f')}, "
            f"x{fmt(v['vs_ram'], '.2f')} in-RAM)"
            for b, v in per_batch.items()
        )
        lines.append(f"  {share:>3}% resident: {cells}")
    return lines


def _auto_line(batch: str, v: dict) -> str:
    anchor = f"{v['anchor']} {v['anchor_warm_s']:.3f} s" if v["anchor"] else "no disk anchor"
    return (
        f"  batch {batch}: {fmt(v['warm_s'], '.3f')} s; {anchor} -> {fmt(v['speedup_warm'], '.2f')}x faster;"
        f" streamed {fmt(v['streamed_bytes'] and v['streamed_bytes'] / 1e9, '.2f')} GB at"
        f" {fmt(v['raw_rate_gb_per_s'], '.2f')} GB/s = {fmt(v['io_bound_s'], '.3f')} s, in-RAM"
        f" {fmt(v['compute_s'], '.3f')} s -> {fmt(v['over_bound'], '.2f')}x the {v['bound_by'] or '-'} bound;"
        f" page cache +{v['page_cache_growth_mb']:.0f} MB"
        f" ({'within' if v['page_cache_within_one_group'] else 'MORE than'} one group)"
    )


def _nvme_auto_lines(summary: dict | None) -> list[str]:
    if not summary:
        return []
    return [
        f'nvme_auto (resident_budget="auto"): {summary["resident_bytes"] / 1e9:.2f} GB resident, groups of'
        f" {summary['group_bytes'] / 1e6:.0f} MB; warm forwards (min), bound = max(streamed bytes / best raw read"
        " rate, in-RAM forward):",
        *(_auto_line(batch, v) for batch, v in summary["batches"].items()),
    ]


def format_report(report: dict) -> str:
    """The report (as ``run`` returns it, or loaded from its JSON) as a text table, the ratios and the
    recommendation."""
    return "\n".join(
        [
            *_header_lines(report),
            *_table_lines(report),
            *(f"{r['mode']} {r['status']}: {r['error']}" for r in report["modes"] if r["status"] != "ok"),
            *_squeeze_lines(report),
            *_ratio_lines(report),
            *_sweep_lines(report.get("resident_sweep")),
            *_nvme_auto_lines(report.get("nvme_auto")),
            f"recommendation: {report['recommendation']['text']}",
        ]
    )
