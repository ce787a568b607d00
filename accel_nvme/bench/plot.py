"""The report as a PNG, one function per panel: forward times per batch (cold and warm, with the in-RAM, raw-read
and nvme_auto floors), each mode's memory, and the resident budget sweep. Needs matplotlib (``accel-nvme[plot]``)."""

from __future__ import annotations

import os

from accel_nvme.bench.results import ModeResult, seconds

COLD_WARM = ((False, -0.2, "tab:blue", "cold (page cache dropped)"), (True, 0.2, "tab:orange", "warm (files cached)"))


def _import_pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the bench plot needs matplotlib: pip install 'accel-nvme[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(result: ModeResult) -> str:
    if result.mode.raw:
        return f"{result.mode.name}\n(read only)"
    return f"{result.mode.name}\n(whole machine)" if result.squeezed is False else result.mode.name


def _regime_text(report: dict) -> str:
    squeeze = report.get("squeeze")
    return f", squeezed to {squeeze['free_ram_bytes'] / 1e9:.1f} GB free RAM" if squeeze else ""


def _floors(report: dict, results: list[ModeResult], batch: int) -> tuple[tuple[float | None, str, str], ...]:
    """The vertical lines of a times panel: the in-RAM forward, the cold raw read and nvme_auto's bound."""
    ram = min((t for warm in (False, True) if (t := seconds(results, "ram", batch, warm))), default=None)
    raw = min((t for r in results if r.mode.raw and (t := r.time(batch))), default=None)
    bound = ((report.get("nvme_auto") or {}).get("batches") or {}).get(str(batch), {}).get("bound_s")
    return (
        (ram, "in-RAM forward", "--"),
        (raw, "raw read of the weights (cold)", ":"),
        (bound, "nvme_auto's bound", "-."),
    )


def plot_times(ax, report: dict, results: list[ModeResult], batch: int) -> None:
    """Seconds per forward of each mode at ``batch``, cold and warm, with the floors as vertical lines."""
    times = {warm: [r.time(batch, warm) for r in results] for warm, *_ in COLD_WARM}
    for warm, offset, color, label in COLD_WARM:
        y = [i + offset for i in range(len(results))]
        ax.barh(y, [t or 0 for t in times[warm]], 0.4, color=color, label=label)
        for i, t in enumerate(times[warm]):
            if t and results[i].ok:
                ax.text(t, i + offset, f" {t:.3g}", va="center", fontsize=8)
    top = max((t for ts in times.values() for t in ts if t), default=1.0)
    for i, r in enumerate(results):
        if not r.ok:
            ax.text(top * 0.02, i, r.status, va="center", color="gray", style="italic")
    for value, label, style in _floors(report, results, batch):
        if value:
            ax.axvline(value, color="black", linestyle=style, linewidth=1.2, label=f"{label}: {value:.2f} s")
    ax.set_yticks(list(range(len(results))), [_label(r) for r in results])
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.15)
    ax.set_xlabel("seconds per forward (min) — shorter is better")
    ax.set_title(f"batch {batch}{_regime_text(report)}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8)  # below: never on a bar


def plot_memory(ax, report: dict, results: list[ModeResult]) -> None:
    """Each measured mode's RSS above setup, process peak RSS and page-cache growth of its own files, in MB."""
    ok = [r for r in results if r.ok]
    series = (
        ("RSS above setup (what forwards add)", [r.rss_above_setup_mb or 0 for r in ok], "tab:green"),
        ("process peak RSS", [r.peak_rss_mb for r in ok], "tab:purple"),
        (
            "page-cache growth, its own files (largest over one forward)",
            [max(e.largest_file_growth_mb for e in r.batches) for r in ok],
            "tab:gray",
        ),
    )
    for k, (label, values, color) in enumerate(series):
        bars = ax.bar([i + (k - 1) * 0.27 for i in range(len(ok))], values, 0.27, label=label, color=color)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(ok)), [_label(r) for r in ok])
    ax.set_ylabel("MB")
    squeeze = report.get("squeeze")
    if squeeze:
        free_mb = squeeze["free_ram_bytes"] / (1 << 20)
        ax.axhline(free_mb, color="black", linestyle="--", linewidth=1.2, label=f"RAM available: {free_mb:.0f} MB")
    ax.set_title(f"memory per mode, MB (lower is better){_regime_text(report)}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=4, fontsize=8)


def plot_sweep(ax, report: dict, results: list[ModeResult], batch: int) -> None:
    """Cold forward time per resident share at ``batch``, against the time in proportion to the streamed share."""
    sweep = report["resident_sweep"]
    shares = [int(share) for share in sweep]
    ax.plot(shares, [sweep[s][str(batch)]["time_s"] for s in sweep], "o-", label="accel_nvme, cold")
    expected = [sweep[s][str(batch)]["expected_s"] for s in sweep]
    ax.plot(shares, expected, ":", color="gray", label="in proportion to the streamed share")
    ram = seconds(results, "ram", batch)
    if ram:
        ax.axhline(ram, color="black", linestyle="--", linewidth=1.2, label=f"in-RAM forward: {ram:.2f} s")
    ax.set_xlabel("resident budget, % of the model")
    ax.set_ylabel("seconds per forward")
    ax.set_title(f"resident budget sweep, batch {batch}")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize=8)


def _title(report: dict) -> str:
    config = report["config"]
    if config["model"] == "llama":
        shape = config["llama_shape"]
        model = f"Llama, {shape['layers']} layers of hidden {shape['hidden']}"
    else:
        model = f"{config['layers']} x Linear({config['hidden']}, {config['hidden']})"
    recommendation = report["recommendation"]
    nvme = 'nvme with resident_budget="auto"' if recommendation.get("resident_budget") == "auto" else "nvme"
    setting = {"page_cache": "the page cache (the model fits in free RAM)", "nvme": nvme}
    return (
        f"accel-nvme bench: {model}, {config['model_bytes'] / 1e9:.2f} GB fp32\n"
        f"recommendation: {setting.get(recommendation['setting'], 'none')}"
    )


def plot_report(report: dict, path: str | os.PathLike) -> None:
    """Write the report (as ``run`` returns it, or loaded from its JSON) as a PNG: forward times per batch and,
    below, each mode's memory and, when measured, the resident budget sweep."""
    plt = _import_pyplot()
    batches = report["config"]["batches"]
    results = [ModeResult.from_json(r) for r in report["modes"]]
    rows = 3 if report.get("resident_sweep") else 2
    fig = plt.figure(figsize=(max(11, 6 * len(batches) + 2), 9 + 4 * (rows - 2)), layout="constrained")
    grid = fig.add_gridspec(rows, len(batches), height_ratios=(3, 2, 2)[:rows])
    for col, batch in enumerate(batches):
        plot_times(fig.add_subplot(grid[0, col]), report, results, batch)
    plot_memory(fig.add_subplot(grid[1, :]), report, results)
    for col, batch in enumerate(batches if rows == 3 else ()):
        plot_sweep(fig.add_subplot(grid[2, col]), report, results, batch)
    fig.suptitle(_title(report), fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
