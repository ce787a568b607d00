"""``accel-nvme bench --model moe`` on a tiny Qwen3-MoE: every mode decodes the tokens of the model in RAM, per-expert
reads stay within the issue's bytes-per-token bound, and the report keeps its schema."""

import json
import subprocess
import sys

import pytest
from test_bench import _assert_schema

from accel_nvme import bench

PAGE = 4096
SHAPE = bench.MoeShape(hidden=64, layers=2, experts=8, top_k=2)  # an expert: 16 KiB of gate_up, 8 KiB of down


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    """Every MoE mode in the whole machine, one timed run of 6 new tokens: (the CLI's result, its JSON)."""
    tmp_path = tmp_path_factory.mktemp("moe")
    out = tmp_path / "moe.json"
    shape = ("--hidden", "64", "--layers", "2", "--experts", "8", "--top-k", "2", "--new-tokens", "6")
    command = [sys.executable, "-m", "accel_nvme.cli", "bench", "--model", "moe", "--no-squeeze", *shape]
    command += ["--forwards", "1", "--offload-folder", str(tmp_path), "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["moe.json"]  # the temporary bench folder is gone
    return result, json.loads(out.read_text())


def test_every_mode_decodes_the_tokens_of_the_model_in_ram(moe_run):
    result, report = moe_run
    modes = {m["mode"]: m for m in report["modes"]}
    assert list(modes) == list(bench.MOE_MODES) and all(m["status"] == "ok" for m in modes.values())
    for name in ("nvme", "nvme_nocache", "nvme_blocks"):
        assert modes[name]["exact"] is True, name  # tokens and every step's logits torch.equal to ram's
    assert modes["accelerate_disk"]["tokens_equal"] is True  # its logits are accelerate's own (not ours to pin)
    assert all(m["runs"][0]["decode_tokens"] == 5 for n, m in modes.items() if n != "raw_direct")
    assert "target nvme:" in result.stdout and "bound:" in result.stdout


def test_per_expert_reads_stay_within_the_bound_per_decode_token(moe_run):
    _, report = moe_run
    modes = {m["mode"]: m for m in report["modes"]}
    assert report["config"]["needed_bytes_per_token"] == SHAPE.needed_bytes_per_token
    routed = SHAPE.layers * SHAPE.top_k  # experts a decode token at batch 1 runs
    nocache = modes["nvme_nocache"]
    # no cache: each decode token reads exactly its routed experts (rows are page multiples here), and rows read
    # ahead for the previous token's experts that routing did not confirm, counted apart (at most as many)
    unused = nocache["unused_expert_bytes_per_token"]
    assert nocache["expert_bytes_per_token"] - unused == pytest.approx(routed * SHAPE.expert_bytes)  # means
    assert unused <= routed * SHAPE.expert_bytes
    assert nocache["expert_cache_hit_rate"] == 0.0
    # dense part + k/E of the experts + a page per expert read (2 tensors each) and per streamed group; over the
    # run, also the groups read ahead for the next forward (prefetch_depth 2; the largest: embeddings, head)
    pages = 2 * routed + SHAPE.layers + 2
    tokens, read_ahead = nocache["runs"][0]["decode_tokens"], 2 * (SHAPE.vocab * SHAPE.hidden * 4 + PAGE)
    needed = SHAPE.needed_bytes_per_token + pages * PAGE + unused
    assert nocache["bytes_per_token"] * tokens <= tokens * needed + read_ahead
    cached = modes["nvme"]
    assert cached["expert_bytes_per_token"] <= nocache["expert_bytes_per_token"] and cached["expert_cache_hit_rate"] > 0
    # whole-block streaming reads every expert of every layer for each token
    assert modes["nvme_blocks"]["bytes_per_token"] >= SHAPE.layers * SHAPE.experts * SHAPE.expert_bytes


def test_bound_and_targets_are_drawn_from_the_measurements(moe_run):
    _, report = moe_run
    modes = {m["mode"]: m for m in report["modes"]}
    bound = report["bound"]
    # the best read rate seen: the raw read, or what an nvme mode read per token while decoding
    rates = [modes["raw_direct"]["runs"][0]["gb_per_s"]]
    rates += [m["bytes_per_token"] * m["tokens_per_s"] / 1e9 for n, m in modes.items() if n.startswith("nvme")]
    assert bound["read_rate_gb_per_s"] == pytest.approx(max(rates))
    assert bound["io_tokens_per_s"] == pytest.approx(max(rates) * 1e9 / SHAPE.needed_bytes_per_token)
    assert bound["compute_tokens_per_s"] == modes["ram"]["tokens_per_s"]
    assert bound["tokens_per_s"] == min(bound["io_tokens_per_s"], bound["compute_tokens_per_s"])
    target = report["targets"]["nvme_nocache"]
    assert target["target_speedup"] == 0.8 * SHAPE.experts / SHAPE.top_k
    assert target["speedup_over_blocks"] == pytest.approx(
        modes["nvme_nocache"]["tokens_per_s"] / modes["nvme_blocks"]["tokens_per_s"]
    )
    assert target["meets_bound"] == (bound["tokens_per_s"] / target["tokens_per_s"] <= 1.25)


def test_json_schema_of_a_moe_run(moe_run):
    _assert_schema(moe_run[1], "moe")
