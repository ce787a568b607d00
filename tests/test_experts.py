"""Fused MoE experts read one expert at a time (experts.py): real transformers MoE classes at tiny configs."""

import json
import os
import signal
import time
from concurrent.futures import Future

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import accel_nvme
from accel_nvme import NvmeAlignDevicesHook, NvmeConfig
from accel_nvme.experts import ExpertsHook, is_fused_experts
from accel_nvme.format import ALIGNMENT, GroupFileError
from accel_nvme.store import StoreError, load_manifest, manifest_digest

TINY = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    intermediate_size=64,
)
MODELS = {  # 8 experts, top-2; each expert's rows a multiple of 4096 bytes, as in real MoE models
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(moe_intermediate_size=32, num_experts=8, head_dim=8)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=32, num_local_experts=8)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=32, num_experts=8)),
    "qwen2_moe": (  # with a shared expert, which streams with its block
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8),
    ),
    "deepseek_v3": (  # its first layer dense, a shared expert, grouped routing
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            moe_intermediate_size=32,
            n_routed_experts=8,
            n_shared_experts=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            n_group=2,
            topk_group=1,
            num_hidden_layers=3,
            num_key_value_heads=4,
        ),
    ),
}
IDS = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))


def build(name, **overrides):
    config_name, model_name, fields = MODELS[name]
    config = getattr(transformers, config_name)(**{**TINY, **fields, "num_experts_per_tok": 2, **overrides})
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each model saved, with its greedy tokens and logits in RAM."""
    saved = {}
    for name in MODELS:
        model = build(name)
        path = tmp_path_factory.mktemp(name) / "checkpoint"
        model.save_pretrained(path)
        with torch.inference_mode():
            tokens = model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=6, do_sample=False)
            logits = model(IDS).logits
        saved[name] = (path, tokens, logits, model)
    return saved


def load(path, offload_dir, **config):
    return AutoModelForCausalLM.from_pretrained(
        path,
        device_map="auto",
        max_memory={"cpu": "20KB"},
        offload_backend="nvme",
        offload_folder=str(offload_dir),
        nvme_config=NvmeConfig(**config) if config else None,
    )


def generate(model, ids=IDS, new=6):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)


def experts_hooks(model):
    return [m._hf_hook for m in model.modules() if isinstance(getattr(m, "_hf_hook", None), ExpertsHook)]


@pytest.mark.parametrize(
    "name, cache", [*((name, 0) for name in MODELS), ("qwen3_moe", 1 << 30), ("deepseek_v3", 1 << 30)]
)
def test_generate_and_forward_equal_the_model_in_ram(checkpoints, offload_dir, name, cache):
    path, tokens, logits, reference = checkpoints[name]
    model = load(path, offload_dir, expert_cache_bytes=cache)
    fused = [n for n, m in reference.named_modules() if is_fused_experts(m)]
    hooked = [n for n, m in model.named_modules() if isinstance(getattr(m, "_hf_hook", None), ExpertsHook)]
    assert fused and hooked == fused, "every fused experts module is read per expert"
    assert torch.equal(generate(model), tokens)
    with torch.inference_mode():
        assert torch.equal(model(IDS).logits, logits)
    assert torch.equal(generate(model), tokens)
    assert all(f.expert_bytes_read > 0 or f.expert_cache_hits > 0 for f in accel_nvme.stats(model).forwards)


def routed_experts(model):
    """Record the experts ``top_k_index`` routes each experts module to, by a forward pre-hook of torch's."""
    seen = {}
    for module in model.modules():
        if is_fused_experts(module):

            def note(mod, args, kwargs):
                seen[mod] = sorted(set(args[1].reshape(-1).tolist()))

            module.register_forward_pre_hook(note, with_kwargs=True)
    return seen


def test_a_decode_token_reads_only_its_routed_experts(checkpoints, offload_dir):
    """At batch 1, bytes per decode token <= dense part + k/E x experts + one page per expert read (here the rows
    are page multiples, so exactly k experts' rows per layer); rows read ahead for the previous token's experts
    that routing did not confirm are counted apart, at most k experts' rows per layer more."""
    path, tokens, _, _ = checkpoints["qwen3_moe"]
    model = load(path, offload_dir, expert_cache_bytes=0)
    seen = routed_experts(model)
    hooks = experts_hooks(model)
    assert torch.equal(generate(model), tokens)
    dense = sum(source.nbytes for source in hooks[0].prefetcher.sources)
    per_expert = hooks[0].rows.expert_bytes
    assert per_expert == 8192 + 4096, "gate_up_proj and down_proj rows of one expert, nothing more"
    experts_bytes = sum(h.num_experts * h.rows.expert_bytes for h in hooks)
    report = accel_nvme.stats(model)
    decode = report.forwards[1:]
    assert len(decode) == 5
    routed = 2 * len(hooks)
    for forward in decode:
        assert forward.expert_cache_hits + forward.expert_cache_misses == routed
        used = forward.expert_bytes_read - forward.expert_bytes_unused
        assert used == routed * per_expert <= experts_bytes * 2 / 8 + routed * ALIGNMENT
        assert forward.expert_bytes_unused <= routed * per_expert
    # the dense part is read once per forward (a forward's window may hold the next one's first reads: read ahead)
    ahead = 2 * max(source.nbytes for source in hooks[0].prefetcher.sources)
    assert report.total.bytes_read - report.total.expert_bytes_read <= 6 * dense + ahead
    for hook in hooks:
        module = next(m for m in model.modules() if getattr(m, "_hf_hook", None) is hook)
        assert hook.rows.last_read == seen[module], "the last token read exactly the experts it was routed to"


def test_the_previous_tokens_experts_are_read_ahead(checkpoints, offload_dir):
    """Without a cache, a one-token forward starts reading each layer's experts of the previous token before that
    layer runs: the same token again reads exactly those (none unused); another token equals the model in RAM."""
    path, _, _, reference = checkpoints["qwen3_moe"]
    model = load(path, offload_dir, expert_cache_bytes=0)
    seen = routed_experts(model)
    hooks = {m: m._hf_hook for m in model.modules() if isinstance(getattr(m, "_hf_hook", None), ExpertsHook)}
    (first, first_hook), *rest = hooks.items()
    with torch.inference_mode():
        model(IDS[:, :1])
        # after a first token only the first layer knows a previous token: the last layer started its reads
        assert first_hook.rows.reading_ahead == seen[first] and all(hook.rows.reading_ahead == [] for _, hook in rest)
        model(IDS[:, :1])
        again = accel_nvme.stats(model).forwards[-1]
        assert again.expert_bytes_unused == 0 and again.expert_cache_hits == 0
        assert again.expert_bytes_read == sum(len(seen[m]) * h.rows.expert_bytes for m, h in hooks.items())
        before = dict(seen)
        other = model(IDS[:, 1:2]).logits
        assert torch.equal(other, reference(IDS[:, 1:2]).logits)
    # rows read ahead for the previous token's experts that this token did not route to are counted as unused
    unused = {m: set(before[m]) - set(seen[m]) for m in hooks}
    assert any(unused.values()), "the two tokens route alike: pick another second token"
    expected = sum(len(unused[m]) * h.rows.expert_bytes for m, h in hooks.items())
    assert accel_nvme.stats(model).forwards[-1].expert_bytes_unused == expected
    # and their rows are given back: with no cache, the other layers' buffers keep only this token's experts, whose
    # pages the next token's reads ahead fill again
    for module, hook in rest:
        held = [
            e
            for e in range(hook.num_experts)
            if any(hook.rows.buffer.tensor[slice(*t.rows(e))].any() for t in hook.tensors)
        ]
        assert held == seen[module]
    accel_nvme.close(model)
    assert all(hook.rows.reading_ahead == [] for hook in hooks.values())


def test_a_forked_child_does_not_wait_for_its_parents_reads_ahead(checkpoints, offload_dir):
    """Reads ahead in flight at a fork never complete in the child (the parent's threads run them): the child reads
    those rows again, exactly, instead of hanging; the parent goes on."""
    path, _, _, reference = checkpoints["qwen3_moe"]
    model = load(path, offload_dir, expert_cache_bytes=0)
    with torch.inference_mode():
        model(IDS[:, :1])
    first = experts_hooks(model)[0]
    assert first.rows.reading_ahead
    in_flight = Future()  # a read still running at the fork: finished in the parent only
    first.rows._speculation.futures.append(in_flight)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            torch.set_num_threads(1)  # torch's OpenMP pool is not fork-safe; one thread sums in its own order
            with torch.inference_mode():
                exact = torch.equal(model(IDS[:, :1]).logits, reference(IDS[:, :1]).logits)
            os.write(write, b"exact" if exact else b"wrong")
        finally:
            os._exit(0)
    os.close(write)
    in_flight.set_result(0)
    deadline = time.monotonic() + 60
    while os.waitpid(pid, os.WNOHANG)[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung on its parent's reads ahead")
        time.sleep(0.05)
    assert os.read(read, 16) == b"exact"
    os.close(read)
    with torch.inference_mode():
        assert torch.equal(model(IDS[:, :1]).logits, reference(IDS[:, :1]).logits)


def test_rows_not_routed_are_never_read(checkpoints, offload_dir):
    """With a cache holding everything, the buffers show what was read: routed experts' rows equal the weights,
    every other row is still zeros (and a forward using one would differ from the model in RAM)."""
    path, _, _, reference = checkpoints["qwen3_moe"]
    model = load(path, offload_dir, expert_cache_bytes=1 << 30)
    seen = routed_experts(model)
    with torch.inference_mode():
        model(IDS[:, :1])
    for name, module in model.named_modules():
        if not isinstance(getattr(module, "_hf_hook", None), ExpertsHook):
            continue
        hook = module._hf_hook
        routed = seen[module]
        assert len(routed) == 2
        for t in hook.tensors:
            rows = hook.rows.buffer.tensor[t.start : t.start + t.shape[0] * t.row_bytes].view(t.dtype).view(t.shape)
            weight = reference.get_submodule(name).get_parameter(t.attr)
            for e in range(hook.num_experts):
                if e in routed:
                    assert torch.equal(rows[e], weight[e])
                else:
                    assert not rows[e].any(), f"expert {e} of {name}.{t.attr} was read but not routed"


def test_cache_hits_are_counted_and_skip_the_read(checkpoints, offload_dir):
    path = checkpoints["qwen3_moe"][0]
    one = IDS[:, :1]
    model = load(path, offload_dir, expert_cache_bytes=1 << 30)
    with torch.inference_mode():
        first = model(one).logits
        again = model(one).logits
        model(one)
    assert torch.equal(first, again)
    cold, warm = accel_nvme.stats(model).forwards[:2]
    layers = len(experts_hooks(model))
    assert (cold.expert_cache_hits, cold.expert_cache_misses) == (0, 2 * layers)
    assert (warm.expert_cache_hits, warm.expert_cache_misses) == (2 * layers, 0)
    assert warm.expert_bytes_read == 0 and warm.expert_cache_hit_rate == 1.0
    assert accel_nvme.stats(model).as_dict()["forwards"][1]["expert_cache_hit_rate"] == 1.0

    uncached = load(path, offload_dir, expert_cache_bytes=0)
    with torch.inference_mode():
        uncached(one)
        uncached(one)
        uncached(one)
    warm = accel_nvme.stats(uncached).forwards[1]
    assert (warm.expert_cache_hits, warm.expert_cache_misses) == (0, 2 * layers)
    assert warm.expert_bytes_read == 2 * layers * experts_hooks(uncached)[0].rows.expert_bytes


def test_the_cache_keeps_the_most_recent_experts_within_its_budget(checkpoints, offload_dir):
    path = checkpoints["qwen3_moe"][0]
    model = load(path, offload_dir, expert_cache_bytes=3 * (8192 + 4096))  # three experts, of four per token
    hooks = experts_hooks(model)
    with torch.inference_mode():
        model(IDS[:, :1])
    cache = hooks[0].rows.cache
    assert cache.nbytes == 3 * hooks[0].rows.expert_bytes
    kept = [[e for e in range(8) if cache.holds(h.rows, e)] for h in hooks]
    assert len(kept[1]) == 2 and len(kept[0]) == 1, "the last layer's two experts and the first layer's last one"


def test_a_prefill_reads_every_row_in_one_pass(checkpoints, offload_dir):
    path = checkpoints["qwen3_moe"][0]
    model = load(path, offload_dir, expert_cache_bytes=0)
    many = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        model(many)
    forward = accel_nvme.stats(model).forwards[0]
    hooks = experts_hooks(model)
    assert forward.expert_bytes_read == sum(h.num_experts * h.rows.expert_bytes for h in hooks)
    assert all(h.rows.last_read == list(range(8)) for h in hooks)
    # no cache and several tokens: no read ahead follows, so every row read is given back at once
    assert all(not h.rows.buffer.tensor.any() and h.rows.reading_ahead == [] for h in hooks)


def test_expert_tensors_start_on_a_page_and_carry_a_digest_per_expert(checkpoints, offload_dir):
    path = checkpoints["mixtral"][0]
    model = load(path, offload_dir)
    for hook in experts_hooks(model):
        assert all(t.start % ALIGNMENT == 0 and len(t.digests) == 8 for t in hook.tensors)
        assert hook.group.data_offset % ALIGNMENT == 0
    manifest = json.loads(next(offload_dir.glob("accel-nvme-*/manifest.json")).read_text())
    rows = [g["rows"] for g in manifest["groups"] if "rows" in g]
    assert len(rows) == 2 and all(len(d) == 8 for r in rows for d in r.values())


def test_a_damaged_expert_is_refused_naming_the_file(checkpoints, offload_dir):
    path = checkpoints["olmoe"][0]
    model = load(path, offload_dir, expert_cache_bytes=0, verify_on_read=True)
    hook = experts_hooks(model)[0]
    seen = routed_experts(model)
    with torch.inference_mode():
        model(IDS[:, :2])  # two tokens: nothing is read ahead for the next forward (what was read is verified)
    module = next(m for m in model.modules() if getattr(m, "_hf_hook", None) is hook)
    expert = seen[module][0]
    t = hook.tensors[-1]
    start, _ = t.rows(expert)
    with open(hook.group.path, "r+b") as f:
        f.seek(hook.group.data_offset + start)
        byte = f.read(1)
        f.seek(hook.group.data_offset + start)
        f.write(bytes([byte[0] ^ 0xFF]))
    damaged = f"{hook.group.path}: expert {expert} of '{t.attr}' does not match"
    with pytest.raises(GroupFileError, match=damaged), torch.inference_mode():
        model(IDS[:, :2])
    assert not hook.rows.buffer.tensor.any(), "the rows read by the forward that raised are forgotten"
    with torch.inference_mode():
        model(IDS[:, 1:2])  # a forward after the error starts clean (meta tensors were put back)


def test_rows_that_are_not_page_multiples_read_the_pages_they_touch(offload_dir, tmp_path):
    model = build("qwen3_moe", moe_intermediate_size=24)  # gate_up rows 6144 bytes, down rows 3072
    model.save_pretrained(tmp_path / "checkpoint")
    expected = generate(model)
    loaded = load(tmp_path / "checkpoint", offload_dir, expert_cache_bytes=0)
    assert torch.equal(generate(loaded), expected)
    hook = experts_hooks(loaded)[0]
    rows = 6144 + 3072
    for forward in accel_nvme.stats(loaded).forwards[1:]:
        used = forward.expert_bytes_read - forward.expert_bytes_unused  # without rows read ahead and not routed
        assert used <= forward.expert_cache_misses * (rows + 2 * 2 * ALIGNMENT)
    assert hook.rows.expert_bytes <= rows + 2 * 2 * ALIGNMENT


def test_close_loads_the_experts_back(checkpoints, offload_dir):
    path, tokens, _, _ = checkpoints["qwen2_moe"]
    model = load(path, offload_dir)
    accel_nvme.close(model)
    assert not experts_hooks(model)
    assert not any(isinstance(getattr(m, "_hf_hook", None), NvmeAlignDevicesHook) for m in model.modules())
    assert torch.equal(generate(model), tokens)


def test_without_expert_streaming_the_experts_stream_with_their_block(checkpoints, offload_dir):
    path, tokens, _, _ = checkpoints["qwen3_moe"]
    model = load(path, offload_dir, expert_streaming=False)
    assert not experts_hooks(model)
    assert torch.equal(generate(model), tokens)
    forwards = accel_nvme.stats(model).forwards
    assert all(f.expert_bytes_read == 0 and f.expert_cache_hit_rate == 0.0 for f in forwards)


def test_save_pretrained_round_trips(checkpoints, offload_dir, tmp_path):
    path, _, _, reference = checkpoints["deepseek_v3"]
    load(path, offload_dir).save_pretrained(tmp_path / "again")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    for name, tensor in reference.state_dict().items():
        assert torch.equal(saved.state_dict()[name], tensor), name


def test_settings(monkeypatch):
    assert NvmeConfig(expert_cache_bytes="1GiB").expert_cache_bytes == 1 << 30
    assert NvmeConfig().expert_streaming is True
    with pytest.raises(ValueError, match="expert_cache_bytes must be a size >= 0"):
        NvmeConfig(expert_cache_bytes=-1)
    with pytest.raises(ValueError, match="expert_streaming must be True or False"):
        NvmeConfig(expert_streaming="no")
    monkeypatch.setenv("ACCEL_NVME_EXPERT_STREAMING", "off")
    monkeypatch.setenv("ACCEL_NVME_EXPERT_CACHE_BYTES", "64MiB")
    config = accel_nvme.config.load_config()
    assert (config.expert_streaming, config.expert_cache_bytes) == (False, 64 << 20)


def test_a_forward_with_grad_enabled_equals_the_model_in_ram(checkpoints, offload_dir):
    path, _, _, reference = checkpoints["mixtral"]
    assert_exact_with_grad(load(path, offload_dir, expert_cache_bytes=0), reference)


def assert_exact_with_grad(model, reference):
    """A forward with grad enabled, and the gradient of its inputs, ``torch.equal`` to ``reference``'s."""
    embeds = reference.get_input_embeddings()(IDS).detach().requires_grad_()
    expected = reference(inputs_embeds=embeds).logits
    (expected_grad,) = torch.autograd.grad(expected.sum(), embeds)
    streamed = model(inputs_embeds=embeds).logits
    (grad,) = torch.autograd.grad(streamed.sum(), embeds)
    assert torch.equal(streamed, expected) and torch.equal(grad, expected_grad)


def test_dispatch_model_reuses_the_folder_and_its_manifest_rows_are_checked(checkpoints, offload_dir):
    reference = checkpoints["olmoe"][3]
    with torch.inference_mode():
        expected = reference(IDS).logits
    model = accel_nvme.dispatch_model(build("olmoe"), {"": "nvme"}, offload_dir=offload_dir)
    with torch.inference_mode():
        assert torch.equal(model(IDS).logits, expected)
    assert len(experts_hooks(model)) == 2
    (folder,) = offload_dir.glob("accel-nvme-*")
    again = accel_nvme.dispatch_model(build("olmoe"), {"": "nvme"}, offload_dir=offload_dir)
    assert [p.name for p in offload_dir.glob("accel-nvme-*")] == [folder.name]
    assert accel_nvme.group_files(again) == accel_nvme.group_files(model)
    manifest = json.loads((folder / "manifest.json").read_text())
    rows = next(g["rows"] for g in manifest["groups"] if "rows" in g)
    rows[next(iter(rows))].pop()
    manifest["digest"] = manifest_digest(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="rows must give one digest per expert"):
        load_manifest(folder)
