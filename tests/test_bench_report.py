"""The bench's pure parts (table, ratios, recommendation, sizing, checkpoint) and the JSON/PNG of a tiny real run."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from accel_nvme import bench
from accel_nvme.bench.results import BatchResult, ModeResult, Residency, Squeeze

HERE = Path(__file__).resolve().parent

GB = 1_000_000_000


def _mode(mode, cold, warm, batch=8, status="ok", model_bytes=1 * GB):
    if status != "ok":
        return ModeResult(bench.parse_mode(mode), status, error="needs the model in RAM")
    entry = BatchResult(
        batch=batch,
        times_s=[cold, cold * 1.1],
        page_cache_growth_mb=[0.0, 1.0],
        warm_times_s=[warm],
        warm_page_cache_growth_mb=[0.0],
        file_cache_growth_mb=[0.0, 1.0],
        warm_file_cache_growth_mb=[0.0],
        major_faults=[0, 0, 0],
        stable=True,
        exact=True,
        max_abs_diff=0.0,
    )
    return ModeResult(
        bench.parse_mode(mode),
        "ok",
        setup_s=1.0,
        rss_after_setup_mb=300.0,
        forward_peak_rss_mb=500.0,
        peak_rss_mb=520.0,
        page_cache_drop={"fadvise": {"first_freed_mb": 1.0}, "drop_caches": {"first_freed_mb": 0.0}},
        batches=(entry,),
        model_bytes=model_bytes,
    )


def _report(results, model_bytes=1 * GB, available_gb=20.0, squeeze=None):
    machine = {
        "load_average_at_start": (0.1, 0.1, 0.1),
        "cpus": 2,
        "ram_gb": 24.0,
        "available_ram_gb": available_gb,
        "available_before_squeeze_gb": 20.0,
    }
    hidden = bench.hidden_for_size(model_bytes, 4)
    config = bench.BenchConfig(layers=4, hidden=hidden, batches=(8,), forwards=2, warm_forwards=1)
    settings = {"offload_dir": None, "prefetch_depth": 2, "io_threads": 4}
    return bench.Report.of(machine, config, results, settings, squeeze).to_json()


MEASURED = [
    _mode("ram", 0.5, 0.5),
    _mode("raw_direct", 0.8, 0.8),
    _mode("raw_buffered", 0.9, 0.2),
    _mode("accelerate_disk", 3.0, 1.5),
    _mode("diffusers_disk", 2.0, 1.0, status="does not fit"),
    _mode("nvme", 1.0, 1.0),
]


def test_ratios_against_the_bound_and_each_anchor():
    ratios = bench.compute_ratios(MEASURED, [8])
    assert ratios["nvme_over_bound"]["8"] == pytest.approx(1.0 / 0.8)  # max(min(raw), ram) = max(0.8, 0.5)
    assert ratios["nvme_speedup_over_accelerate_disk"]["8"] == pytest.approx(3.0)
    assert ratios["nvme_speedup_over_ram"]["8"] == pytest.approx(0.5)
    assert ratios["nvme_speedup_over_diffusers_disk"]["8"] is None
    assert ratios["nvme_speedup_over_accelerate_disk_warm"]["8"] == pytest.approx(1.5)
    assert ratios["nvme_speedup_over_raw_buffered_warm"]["8"] == pytest.approx(0.2)


def test_page_cache_is_recommended_when_the_model_fits_and_warm_buffered_wins():
    rec = _report(MEASURED)["recommendation"]
    assert rec["setting"] == "page_cache"
    # a warm buffered read counts as max(read, in-RAM forward): max(0.2, 0.5)
    assert rec["comparisons"]["8"]["page_cache_warm_s"] == pytest.approx(0.5)
    assert "page cache serves" in rec["text"]


def test_nvme_is_recommended_when_the_model_does_not_fit():
    rec = _report(MEASURED, model_bytes=30 * GB, available_gb=20.0)["recommendation"]
    assert rec["setting"] == "nvme"
    assert "does not fit" in rec["text"] and "prefetch_depth=2" in rec["text"]


def test_nvme_is_recommended_when_warm_buffered_forwards_are_slower():
    slow = [_mode("ram", 1.2, 1.2), _mode("raw_buffered", 0.9, 0.3), _mode("accelerate_disk", 3.0, 2.0)]
    rec = _report([*slow, _mode("nvme", 1.0, 1.0)])["recommendation"]
    assert rec["setting"] == "nvme" and "do not beat" in rec["text"]


def test_no_recommendation_without_nvme():
    assert _report(MEASURED[:4])["recommendation"]["setting"] is None


def test_table_shows_cold_warm_rss_above_setup_and_statuses():
    text = bench.format_report(_report(MEASURED))
    header = next(line for line in text.splitlines() if line.startswith("mode "))
    for column in ("cold s min/med", "warm s min/med", "RSS above setup MB", "files cached MB cold/warm"):
        assert column in header
    nvme_row = next(line for line in text.splitlines() if line.startswith("nvme "))
    assert "1.000 / 1.050" in nvme_row and "| 200 " in nvme_row
    assert "diffusers_disk does not fit: needs the model in RAM" in text
    assert "nvme_speedup_over_diffusers_disk" not in text  # all-None ratios are left out
    assert text.splitlines()[-1].startswith("recommendation: the page cache serves")


def test_llama_shape_reaches_the_size_with_small_layers():
    for size in (300_000_000, 4 * GB, 36 * GB):
        shape = bench.LlamaShape.for_size(size)
        assert abs(shape.model_bytes - size) <= shape.layer_bytes
        assert shape.layer_bytes <= 210_000_000  # one nvme group per decoder layer keeps the worker's RSS small
        assert shape.layers >= 1


def test_modes_that_need_the_model_in_ram_do_not_fit():
    config = bench.BenchConfig(from_pretrained=True)
    small_ram = config.model_bytes
    statuses = {m: bench.does_not_fit(bench.parse_mode(m), config, small_ram) for m in bench.MODES}
    assert {m for m, r in statuses.items() if r} == {"ram", "diffusers_disk"}
    assert statuses["ram"].status == "does not fit" and "needs the" in statuses["ram"].error
    assert all(bench.does_not_fit(bench.parse_mode(m), config, 100 * GB) is None for m in bench.MODES)


def test_llama_checkpoint_matches_its_shape_and_index(tmp_path):
    pytest.importorskip("transformers")
    from safetensors import safe_open

    shape = bench.LlamaShape(hidden=128, layers=2, vocab=64)
    total = bench.write_llama_checkpoint(shape, tmp_path)
    assert total == shape.model_bytes
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) == shape.layers + 2  # one per decoder layer, embeddings, norm + head
    stored = {}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            stored |= dict.fromkeys(f.keys(), shard.name)
    assert stored == index["weight_map"]


def test_nvme_copy_mode_copies_the_checkpoint_and_nvme_streams_it_in_place(tmp_path):
    """``--modes nvme,nvme_copy`` measures both ways of reading a checkpoint (issue 23): the groups of ``nvme`` read the
    shards, those of ``nvme_copy`` read group files in its own folder."""
    pytest.importorskip("transformers")
    import accel_nvme

    config = bench.BenchConfig(from_pretrained=True, layers=2, hidden=128)
    checkpoint = tmp_path / "checkpoint"
    bench.write_llama_checkpoint(bench.LlamaShape(hidden=128, layers=2, vocab=64), checkpoint)
    copying = bench.parse_mode("nvme_copy")
    assert copying.copy is True and copying.folder_name == "nvme_copy" and bench.parse_mode("nvme").copy is None
    for mode, parent in (("nvme", checkpoint), ("nvme_copy", tmp_path / "nvme_copy")):
        folder = tmp_path / bench.parse_mode(mode).folder_name
        forward = bench.parse_mode(mode).setup(config)(config, folder, checkpoint)
        files = accel_nvme.group_files(forward.args[0])
        assert files and all(parent in f.parents for f in files), (mode, files)
        accel_nvme.close(forward.args[0])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    config = bench.BenchConfig(layers=2, hidden=128, batches=(2,), forwards=1)
    report = bench.run(config, ("ram", "nvme"), offload_folder=folder, json_path=folder / "report.json")
    return folder, report


def test_json_of_a_tiny_run(tiny_run):
    folder, _ = tiny_run
    report = json.loads((folder / "report.json").read_text())
    assert set(report) == {
        "machine",
        "config",
        "nvme_settings",
        "modes",
        "ratios",
        "resident_sweep",
        "squeeze",
        "nvme_auto",
        "recommendation",
    }
    assert report["squeeze"] is None and report["nvme_auto"] is None
    assert report["config"]["model"] == "linear" and report["config"]["warm_forwards"] == 2
    modes = {m["mode"]: m for m in report["modes"]}
    assert set(modes) == {"ram", "nvme"} and all(m["status"] == "ok" for m in modes.values())
    nvme = modes["nvme"]
    assert nvme["rss_above_setup_mb"] == pytest.approx(nvme["forward_peak_rss_mb"] - nvme["rss_after_setup_mb"])
    (entry,) = nvme["batches"]
    assert len(entry["times_s"]) == 1 and len(entry["warm_times_s"]) == 2
    assert entry["warm_min_s"] == min(entry["warm_times_s"]) and entry["exact"] is True
    assert report["recommendation"]["setting"] == "nvme"  # no buffered anchor was measured
    assert [p.name for p in folder.iterdir()] == ["report.json"]  # the temporary bench folder is gone


def test_plot_is_a_png(tiny_run, tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs the optional extra: pip install 'accel-nvme[plot]'")
    _, report = tiny_run
    path = tmp_path / "bench.png"
    bench.plot_report(report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"accel-nvme\[plot\]"):
        bench.plot_report(_report(MEASURED), tmp_path / "bench.png")


def test_resident_sweep_runs_each_share_exactly(tmp_path):
    config = bench.BenchConfig(
        layers=4, hidden=128, batches=(2,), forwards=1, warm_forwards=0, resident_shares=(0.5, 1.0)
    )
    report = bench.run(config, ("ram", "nvme"), offload_folder=tmp_path)
    modes = {r["mode"]: r for r in report["modes"]}
    assert {"nvme_resident_50", "nvme_resident_100"} <= set(modes)
    for mode in ("nvme", "nvme_resident_50", "nvme_resident_100"):
        assert modes[mode]["status"] == "ok" and modes[mode]["batches"][0]["exact"], mode
    assert set(report["resident_sweep"]) == {"0", "50", "100"}
    assert report["resident_sweep"]["100"]["2"]["time_s"] > 0
    assert "resident budget sweep" in bench.format_report(report)


def _auto(warm, streamed, model_bytes=2 * GB):
    result = _mode("nvme_auto", warm * 1.2, warm, model_bytes=model_bytes)
    (entry,) = result.batches
    return replace(
        result,
        nvme_residency=Residency(groups=40, group_bytes=50_000_000, resident_groups=10, resident_bytes=GB // 2),
        batches=(replace(entry, streamed_bytes=[streamed, streamed, streamed]),),  # two cold forwards, one warm
    )


SQUEEZED = [
    replace(_mode("ram", 0.3, 0.3, model_bytes=2 * GB), squeezed=False),
    _mode("raw_direct", 1.0, 1.1, model_bytes=2 * GB),  # 2 GB/s, the best raw rate of the run
    _mode("raw_buffered", 1.25, 1.2, model_bytes=2 * GB),
    _mode("accelerate_disk", 3.5, 3.0, model_bytes=2 * GB),
    _mode("diffusers_disk", 0, 0, status="does not fit"),
    _mode("nvme", 1.1, 1.05, model_bytes=2 * GB),
    _auto(0.8, int(1.5 * GB)),
]


def test_nvme_auto_is_measured_against_its_bound_and_the_faster_disk_anchor():
    summary = bench.nvme_auto_summary(SQUEEZED, [8]).to_json()
    assert summary["resident_bytes"] == GB // 2 and summary["group_bytes"] == 50_000_000
    row = summary["batches"]["8"]
    assert row["anchor"] == "accelerate_disk" and row["speedup_warm"] == pytest.approx(3.0 / 0.8)
    assert row["raw_rate_gb_per_s"] == pytest.approx(2.0)
    assert row["io_bound_s"] == pytest.approx(0.75) and row["bound_by"] == "io"
    assert row["over_bound"] == pytest.approx(0.8 / 0.75)
    assert row["not_slower_than_anchors"] is True
    assert row["page_cache_growth_mb"] == 1.0 and row["page_cache_within_one_group"] is True
    assert bench.nvme_auto_summary(SQUEEZED[:-1], [8]) is None


def test_compute_bound_batch_is_bounded_by_the_in_ram_forward():
    results = [_mode("ram", 0.9, 0.9, model_bytes=2 * GB), *SQUEEZED[1:-1], _auto(1.0, int(1.5 * GB))]
    row = bench.nvme_auto_summary(results, [8]).batches["8"]
    assert row.bound_by == "compute" and row.bound_s == pytest.approx(0.9)


def test_squeezed_regime_recommends_auto_with_its_speed_up():
    squeeze = Squeeze(free_ram_bytes=1_200_000_000, held_at_start_bytes=18 * GB, available_at_start_bytes=0)
    report = _report(SQUEEZED, model_bytes=2 * GB, available_gb=1.2, squeeze=squeeze)
    rec = report["recommendation"]
    assert rec["setting"] == "nvme" and rec["resident_budget"] == "auto" and rec["fits_in_ram"] is False
    assert 'resident_budget="auto"' in rec["text"] and "0.50 GB resident" in rec["text"]
    assert "3.8x faster" in rec["text"] and "accelerate_disk 3.000 s" in rec["text"]
    text = bench.format_report(report)
    assert "ram (whole machine)" in text and "ram ran before the squeeze" in text
    assert "squeezed: a ballast process held all but 1.20 GB" in text
    assert "batch 8: 0.800 s; accelerate_disk 3.000 s -> 3.75x faster" in text


def test_squeezed_llama_keeps_three_staging_buffers_small():
    hidden = bench.squeezed_max_hidden(1_200_000_000)
    assert hidden == 1024
    assert 3 * bench.LlamaShape(hidden=hidden, layers=1).layer_bytes <= bench.SQUEEZE_STAGING_SHARE * 1_200_000_000
    assert bench.squeezed_max_hidden(100 * GB) == bench.LLAMA_MAX_HIDDEN


def test_plot_of_a_squeezed_report(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs the optional extra: pip install 'accel-nvme[plot]'")
    squeeze = Squeeze(free_ram_bytes=1_200_000_000, held_at_start_bytes=18 * GB, available_at_start_bytes=0)
    path = tmp_path / "squeezed.png"
    bench.plot_report(_report(SQUEEZED, model_bytes=2 * GB, available_gb=1.2, squeeze=squeeze), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mode_names_parse_into_records_with_their_parameters():
    resident = bench.parse_mode("nvme_resident_25")
    assert resident.nvme and resident.resident == 0.25 and resident.folder_name == "nvme"
    assert resident.resident_budget(4 * GB) == GB
    assert bench.parse_mode("nvme_auto").resident_budget(4 * GB) == "auto"
    assert bench.parse_mode("nvme").resident_budget(4 * GB) == 0
    assert [m.name for m in bench.BASE_MODES] == list(bench.MODES)
    raw = bench.parse_mode("raw_direct")
    assert raw.raw and not raw.nvme and raw.folder_name == "raw_direct"
    llama, linear = bench.BenchConfig(from_pretrained=True), bench.BenchConfig()
    assert raw.writes(linear) and not raw.writes(llama) and not raw.needs_ram(llama) and raw.needs_ram(linear)
    assert bench.parse_mode("diffusers_disk").offload_type == "leaf_level"
    for bad in ("nvme_resident_x", "bogus", "nvme_resident_"):
        with pytest.raises(ValueError, match=rf"expected a bench mode among ram, .* got '{bad}'"):
            bench.parse_mode(bad)
    missing = replace(bench.parse_mode("diffusers_disk"), requires="no_such_module.hooks")
    assert missing.skip_reason().startswith("no_such_module is not importable")
    assert bench.parse_mode("diffusers_disk").skip_reason() is None


def test_worker_refuses_an_unknown_mode_saying_which_exist(tmp_path):
    command = [sys.executable, "-m", "accel_nvme.bench", "--mode", "nvme_resident_x", "--config", "{}"]
    paths = ["--folder", str(tmp_path / "f"), "--outputs", str(tmp_path / "o"), "--json-out", str(tmp_path / "j")]
    result = subprocess.run([*command, *paths], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "expected a bench mode among ram, raw_direct" in result.stderr and "'nvme_resident_x'" in result.stderr
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_a_saved_report_is_reproduced_from_its_measurements():
    """tests/bench_report_squeezed.{json,txt}: a squeezed run's JSON and printed report, recorded with the bench
    before it became a package. Parsed into records and analysed again, it gives the same JSON and the same text."""
    saved = json.loads((HERE / "bench_report_squeezed.json").read_text())
    again = json.loads(json.dumps(bench.Report.from_json(saved).to_json()))
    assert again == saved
    assert json.dumps(again) == json.dumps(saved)  # the keys in the same order too
    assert bench.format_report(saved) + "\n" == (HERE / "bench_report_squeezed.txt").read_text()
