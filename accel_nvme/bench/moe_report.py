"""What an MoE decode bench run says: decode tokens/s per mode, the bound (the bytes a token needs over the raw read
rate, and the in-RAM decode), the issue's targets against both, and the printed text (``format_moe_report``)."""

from __future__ import annotations

from accel_nvme.bench.analysis import fmt
from accel_nvme.bench.moe import DecodeConfig, config_json

TARGET_SHARE_OF_E_OVER_K = 0.8  # per-expert decode: at least 0.8 x E/k of whole-block streaming's tokens/s
TARGET_OVER_BOUND = 1.25  # and within 1.25x of the bound


def _best(entry: dict | None, key: str) -> float | None:
    values = [r[key] for r in entry["runs"] if r.get(key) is not None] if entry and entry["status"] == "ok" else []
    return max(values, default=None)


def _mean(entry: dict, key: str) -> float | None:
    values = [r[key] for r in entry["runs"] if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def _summarized(entry: dict) -> dict:
    """A mode's entry with its best decode tokens/s and its mean bytes per decode token (nvme modes)."""
    if entry["status"] != "ok" or entry["mode"] == "raw_direct":
        return entry
    keys = ("bytes_per_token", "expert_bytes_per_token", "unused_expert_bytes_per_token", "expert_cache_hit_rate")
    means = {k: _mean(entry, k) for k in keys}
    return entry | {"tokens_per_s": _best(entry, "tokens_per_s")} | (means if entry["mode"].startswith("nvme") else {})


def _read_rates(modes: dict[str, dict]) -> dict[str, float]:
    """The read rates the run showed, GB/s: the raw O_DIRECT read, and each nvme mode's bytes read per decode token x
    its tokens/s (a floor of what the disk gave it while computing too)."""
    rates = {"raw_direct": _best(modes.get("raw_direct"), "gb_per_s")}
    for name, entry in modes.items():
        if name.startswith("nvme") and entry["status"] == "ok":
            rates[name] = max(r["bytes_per_token"] * r["tokens_per_s"] / 1e9 for r in entry["runs"])
    return {name: rate for name, rate in rates.items() if rate}


def _bound(modes: dict[str, dict], config: DecodeConfig) -> dict:
    """The fastest a decode token can go here: max(needed bytes / the best read rate seen, the in-RAM decode token)."""
    needed = config.shape.needed_bytes_per_token
    rates = _read_rates(modes)
    source = max(rates, key=rates.get, default=None)
    io = rates[source] * 1e9 / needed if source else None
    compute = _best(modes.get("ram"), "tokens_per_s")
    bound = min((t for t in (io, compute) if t is not None), default=None)
    return {
        "needed_bytes_per_token": needed,
        "read_rate_gb_per_s": rates.get(source),
        "read_rate_source": source,
        "raw_direct_gb_per_s": rates.get("raw_direct"),
        "io_tokens_per_s": io,
        "compute_tokens_per_s": compute,
        "tokens_per_s": bound,
        "bound_by": None if bound is None else ("io" if bound == io else "compute"),
    }


def _targets(modes: dict[str, dict], config: DecodeConfig, bound: float | None) -> dict:
    """For each per-expert mode: its speed-up over whole-block streaming against 0.8 x E/k, and the bound over it
    against 1.25."""
    blocks = _best(modes.get("nvme_blocks"), "tokens_per_s")
    wanted = TARGET_SHARE_OF_E_OVER_K * config.shape.experts / config.shape.top_k
    targets = {}
    for name in ("nvme", "nvme_nocache"):
        tps = _best(modes.get(name), "tokens_per_s")
        speedup = tps / blocks if tps and blocks else None
        over = bound / tps if tps and bound else None
        targets[name] = {
            "tokens_per_s": tps,
            "speedup_over_blocks": speedup,
            "target_speedup": wanted,
            "meets_speedup": None if speedup is None else speedup >= wanted,
            "bound_over_tokens_per_s": over,
            "target_bound_over": TARGET_OVER_BOUND,
            "meets_bound": None if over is None else over <= TARGET_OVER_BOUND,
        }
    return targets


def moe_report(machine: dict, config: DecodeConfig, results: list[dict], settings: dict, squeeze: dict | None) -> dict:
    """The report of an MoE decode run, as ``run_moe`` returns it and ``--json`` writes it."""
    entries = [_summarized(r) for r in results]
    modes = {e["mode"]: e for e in entries}
    bound = _bound(modes, config)
    return {
        "machine": machine,
        "config": config_json(config) | {"model": "qwen3_moe", "modes": [e["mode"] for e in entries]},
        "nvme_settings": settings,
        "modes": entries,
        "squeeze": squeeze,
        "bound": bound,
        "targets": _targets(modes, config, bound["tokens_per_s"]),
    }


def _row(e: dict) -> str:
    if e["status"] != "ok":
        return f"{e['mode']:<16} {e['status']}: {e['error']}"
    if e["mode"] == "raw_direct":
        return f"{e['mode']:<16} {'-':>10} {'-':>10} {'-':>12} (O_DIRECT read: {_best(e, 'gb_per_s'):.2f} GB/s)"
    exact = "ref" if e["mode"] == "ram" else _exact_text(e)
    return (
        f"{e['mode']:<16} {e['tokens_per_s']:>10.2f} {1 / e['tokens_per_s']:>10.3f}"
        f" {_megabytes(e.get('bytes_per_token')):>12} {_megabytes(e.get('expert_bytes_per_token')):>12}"
        f" {_megabytes(e.get('unused_expert_bytes_per_token')):>10}"
        f" {fmt(e.get('expert_cache_hit_rate'), '.0%'):>8} {e['peak_rss_mb']:>9.0f}  {exact}"
    )


def _megabytes(nbytes: float | None) -> str:
    return fmt(None if nbytes is None else nbytes / 1e6, ".1f")


def _exact_text(e: dict) -> str:
    if e["exact"] is None:
        return "n/a"
    return "yes" if e["exact"] else f"NO (tokens {'equal' if e['tokens_equal'] else 'DIFFER'}, logits differ)"


def format_moe_report(report: dict) -> str:
    """The MoE report as text: the model, a row per mode, the bound and the targets."""
    c, b, load = report["config"], report["bound"], report["machine"]["load_average_at_start"]
    s = c["shape"]
    lines = [
        f"load average at start: {load[0]:.2f} on {report['machine']['cpus']} CPUs (timings need a quiet machine)",
        f"model: Qwen3-MoE {s['layers']} layers, hidden {s['hidden']}, {s['experts']} experts top-{s['top_k']}, fp32 ="
        f" {c['model_bytes'] / 1e9:.2f} GB (experts {1 - c['dense_bytes'] / c['model_bytes']:.0%}); prompt of"
        f" {c['prompt_tokens']} tokens, {c['new_tokens']} new tokens, {c['runs']} timed run(s), page cache dropped"
        " before each",
    ]
    if report["squeeze"]:
        lines.append(f"squeezed: {report['squeeze']['free_ram_bytes'] / 1e9:.2f} GB of RAM left available")
    lines.append(
        f"{'mode':<16} {'tokens/s':>10} {'s/token':>10} {'MB/token':>12} {'expert MB':>12} {'unused MB':>10}"
        f" {'hits':>8}"
        f" {'peak MB':>9}  exact (tokens and logits equal to ram)"
    )
    lines += [_row(e) for e in report["modes"]]
    lines.append(
        f"bound: {b['needed_bytes_per_token'] / 1e6:.1f} MB a token needs at {fmt(b['read_rate_gb_per_s'], '.2f')} GB/s"
        f" (the best read rate seen: {b['read_rate_source'] or '-'})"
        f" = {fmt(b['io_tokens_per_s'], '.2f')} tokens/s; in RAM {fmt(b['compute_tokens_per_s'], '.2f')} tokens/s"
        f" -> {fmt(b['tokens_per_s'], '.2f')} tokens/s ({b['bound_by'] or '-'} bound)"
    )
    for name, t in report["targets"].items():
        lines.append(
            f"target {name}: {fmt(t['speedup_over_blocks'], '.1f')}x whole-block streaming (target"
            f" {t['target_speedup']:.1f}x: {_verdict(t['meets_speedup'])}); bound / it ="
            f" {fmt(t['bound_over_tokens_per_s'], '.2f')} (target <= {t['target_bound_over']}:"
            f" {_verdict(t['meets_bound'])})"
        )
    return "\n".join(lines)


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "NOT met")
