"""Per-expert modules read one expert at a time (expert_modules.py): a remote-code MoE model (tests/remote_moe), its
experts an ``nn.ModuleList`` of MLPs, loaded with ``trust_remote_code=True`` from a saved folder."""

import itertools
import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
from helpers import adamw_losses, adapter_weights
from transformers import AutoConfig, AutoModelForCausalLM

import accel_nvme
from accel_nvme import NvmeConfig
from accel_nvme.dispatch import group_files
from accel_nvme.expert_modules import ExpertModuleHook, ExpertRoundHook, is_expert_list, routed_by
from accel_nvme.format import ALIGNMENT, GroupFileError
from accel_nvme.store import load_manifest

REMOTE = Path(__file__).resolve().parent / "remote_moe"
AUTO_MAP = {
    "AutoConfig": "configuration_tiny_moe.TinyMoeConfig",
    "AutoModelForCausalLM": "modeling_tiny_moe.TinyMoeForCausalLM",
}
STYLES = ("deepseek", "mixtral")
IDS = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
EXPERT_BYTES = 3 * 32 * 32 * 4  # gate_proj, up_proj, down_proj of one expert, fp32: three whole pages


def save(path, style, **fields):
    """A remote-code checkpoint: its modeling files beside its config and weights, random weights from a seed."""
    path.mkdir(parents=True)
    for file in REMOTE.glob("*_tiny_moe.py"):
        shutil.copy(file, path)
    (path / "config.json").write_text(
        json.dumps({"model_type": "tiny_moe", "auto_map": AUTO_MAP, "moe_style": style, **fields})
    )
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, trust_remote_code=True).save_pretrained(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each style saved, with the model in RAM and its greedy tokens and logits."""
    saved = {}
    for style in STYLES:
        path = tmp_path_factory.mktemp(style) / "checkpoint"
        save(path, style)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        with torch.inference_mode():
            tokens = model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=6, do_sample=False)
            logits = model(IDS).logits
        saved[style] = (path, tokens, logits, model)
    return saved


def load(path, offload_dir, **config):
    return AutoModelForCausalLM.from_pretrained(
        path,
        trust_remote_code=True,
        device_map="auto",
        max_memory={"cpu": "20KB"},
        offload_backend="nvme",
        offload_folder=str(offload_dir),
        nvme_config=NvmeConfig(**config) if config else None,
    ).eval()


def generate(model, ids=IDS, new=6):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)


def hooks_of(model, kind):
    return {name: m._hf_hook for name, m in model.named_modules() if isinstance(getattr(m, "_hf_hook", None), kind)}


def lists(model):
    """Each experts list's ``ExpertRows``, in layer order."""
    return list({id(h.rows): h.rows for h in hooks_of(model, ExpertModuleHook).values()}.values())


def called_experts(model):
    """Record which experts each layer's MoE module calls in a forward, by torch's forward pre-hooks."""
    seen = {}
    for name, module in model.named_modules():
        if name.endswith(".mlp.experts"):
            layer = name
            seen[layer] = []
            for i, expert in enumerate(module):
                expert.register_forward_pre_hook(lambda mod, args, layer=layer, i=i: seen[layer].append(i))
    return seen


@pytest.mark.parametrize("style, cache", [("deepseek", 0), ("mixtral", 0), ("deepseek", 1 << 30)])
def test_generate_and_forward_equal_the_model_in_ram(checkpoints, offload_dir, style, cache):
    path, tokens, logits, reference = checkpoints[style]
    model = load(path, offload_dir, expert_cache_bytes=cache)
    layers = reference.config.num_hidden_layers
    experts = hooks_of(model, ExpertModuleHook)
    assert sorted(experts) == sorted(
        f"model.layers.{layer}.mlp.experts.{e}" for layer in range(layers) for e in range(8)
    )
    assert sorted(hooks_of(model, ExpertRoundHook)) == [f"model.layers.{layer}.mlp" for layer in range(layers)]
    assert torch.equal(generate(model), tokens)
    with torch.inference_mode():
        assert torch.equal(model(IDS).logits, logits)
    assert torch.equal(generate(model), tokens)
    report = accel_nvme.stats(model)
    assert report.groups == len(load_manifest(group_files(model)[0].parent).groups)
    assert all(f.expert_bytes_read > 0 or f.expert_cache_hits > 0 for f in report.forwards)


def test_a_decode_token_reads_only_the_experts_it_calls(checkpoints, offload_dir):
    """At batch 1 a decode token reads, per layer, the experts its MoE module calls: one request each, of exactly the
    expert's bytes (a multiple of the page here); the dense part is read once per forward."""
    path, tokens, _, _ = checkpoints["deepseek"]
    model = load(path, offload_dir, expert_cache_bytes=0)
    every = lists(model)
    assert [rows.expert_bytes for rows in every] == [EXPERT_BYTES] * 2
    seen = called_experts(model)
    assert torch.equal(generate(model), tokens)
    report = accel_nvme.stats(model)
    decode = report.forwards[1:]
    assert len(decode) == 5
    for forward in decode:
        routed = forward.expert_cache_hits + forward.expert_cache_misses
        assert routed <= 2 * len(every)
        assert forward.expert_bytes_read - forward.expert_bytes_unused == routed * EXPERT_BYTES
        assert forward.expert_bytes_unused <= 2 * len(every) * EXPERT_BYTES
    for rows, layer in zip(every, seen, strict=True):
        assert rows.last_read == sorted(seen[layer][-2:]), "the last token read exactly the experts it called"


def test_experts_not_called_are_never_read(checkpoints, offload_dir):
    """With a cache holding everything, the buffers show what was read: the called experts' tensors equal the
    weights, every other expert's pages are still zeros."""
    path, _, _, reference = checkpoints["mixtral"]
    model = load(path, offload_dir, expert_cache_bytes=1 << 30)
    seen = called_experts(model)
    with torch.inference_mode():
        model(IDS[:, :1])
    for name, hook in hooks_of(model, ExpertModuleHook).items():
        layer, _, index = name.rpartition(".")
        for local, entry in hook.entries.items():
            stored = hook.rows.buffer.tensor[entry.start : entry.end].view(entry.dtype).view(entry.shape)
            if int(index) in seen[layer]:
                assert torch.equal(stored, reference.get_submodule(name).get_parameter(local))
            else:
                assert not stored.any(), f"{name}.{local} was read but its expert was not called"
    assert all(len(seen[layer]) == 2 for layer in seen)


def test_the_previous_tokens_experts_are_read_ahead(checkpoints, offload_dir):
    """Without a cache, a one-token round reads ahead, for the next token, the experts it called: the same token
    again finds them read (none unused); another token counts those it did not call as unused, and is exact."""
    path, _, _, reference = checkpoints["deepseek"]
    model = load(path, offload_dir, expert_cache_bytes=0)
    first, last = lists(model)
    seen = called_experts(model)
    with torch.inference_mode():
        model(IDS[:, :1])
        layer_first = next(iter(seen))
        assert first.reading_ahead == sorted(seen[layer_first]), "the last layer's round read ahead for the first"
        assert last.reading_ahead == [], "the first layer's round ran before the last knew a previous token"
        for layer in seen:
            seen[layer].clear()
        model(IDS[:, :1])
        again = accel_nvme.stats(model).forwards[-1]
        assert again.expert_bytes_unused == 0 and again.expert_cache_hits == 0
        assert again.expert_bytes_read == sum(len(called) for called in seen.values()) * EXPERT_BYTES
        before = {layer: set(called) for layer, called in seen.items()}
        for layer in seen:
            seen[layer].clear()
        assert torch.equal(model(IDS[:, 2:3]).logits, reference(IDS[:, 2:3]).logits)
    unused = sum(len(before[layer] - set(seen[layer])) for layer in seen)
    assert unused, "the two tokens call the same experts: pick another second token"
    assert accel_nvme.stats(model).forwards[-1].expert_bytes_unused == unused * EXPERT_BYTES
    accel_nvme.close(model)
    assert first.reading_ahead == [] and last.reading_ahead == []


def test_a_decode_round_starts_its_experts_reads_once_the_router_has_run(checkpoints, offload_dir):
    """Both styles route with a linear gate (logits over the experts) and the MoE module's ``top_k``: when the first
    expert is called, the reads of every expert the round calls are in flight or done already (not one at a time)."""
    path, tokens, _, _ = checkpoints["mixtral"]
    model = load(path, offload_dir, expert_cache_bytes=0)
    rounds = []
    every = [m for n, m in model.named_modules() if n.endswith(".mlp.experts")]
    for rows, experts in zip(lists(model), every, strict=True):

        def first_call(expert, args, rows=rows, experts=experts):
            if not rounds or rounds[-1][0] is not rows:
                rounds.append((rows, set(rows.pending) | set(rows.used), set()))
            rounds[-1][2].add(next(i for i, e in enumerate(experts) if e is expert))

        for expert in experts:
            expert.register_forward_pre_hook(first_call)
    assert torch.equal(generate(model, new=4), tokens[:, : IDS.shape[1] + 4])
    decode = rounds[2:]  # after the prefill's
    assert len(decode) == 3 * 2 and all(len(called) == 2 for _, _, called in decode)
    for _, started, called in decode:
        assert called <= started, "an expert the round calls was not being read when its first expert ran"


def test_what_a_router_routes_to():
    assert routed_by((torch.tensor([[3, 1], [1, 7]]), torch.ones(2, 2)), 8, None) == [1, 3, 7], "DeepSeek's gate"
    logits = torch.tensor([[0.1, 0.9, 0.3, 0.8], [0.7, 0.0, 0.2, 0.1]])
    assert routed_by(logits, 4, 2) == [0, 1, 2, 3] and routed_by(logits[:1], 4, 2) == [1, 3], "a linear gate"
    assert routed_by(logits, 4, None) is None, "logits without top_k say nothing"
    assert routed_by(torch.ones(2, 5), 4, 2) is None, "not over the experts (a shared expert's output)"
    assert routed_by(torch.tensor([[0, 9]]), 8, None) is None, "not expert indices"
    assert routed_by(torch.tensor([True, False]), 2, None) is None


def test_a_prefill_reads_every_expert_in_one_pass(checkpoints, offload_dir, monkeypatch):
    """A round with more tokens than half the experts reads all of them at once (one request per list here, the
    experts being consecutive), not one by one as they are called; with no cache, none stays in RAM after."""
    path, _, _, reference = checkpoints["deepseek"]
    model = load(path, offload_dir, expert_cache_bytes=0)
    every = lists(model)
    reader = every[0].prefetcher.reader
    submit, requests = reader.submit, []

    def counted(segments, buffer):
        requests.append((buffer, len(segments)))
        return submit(segments, buffer)

    monkeypatch.setattr(reader, "submit", counted)
    seen = called_experts(model)
    with torch.inference_mode():
        assert torch.equal(model(IDS[:, :5]).logits, reference(IDS[:, :5]).logits)
    assert any(len(set(called)) < 8 for called in seen.values()), "every expert was called: pick a shorter prompt"
    for rows in every:
        assert [n for buffer, n in requests if buffer is rows.buffer] == [1], "one request for the whole list"
        assert rows.last_read == list(range(8))
        assert not rows.buffer.tensor.any(), "no cache: every expert read is given back, called or not"
    assert accel_nvme.stats(model).forwards[-1].expert_bytes_read == 2 * 8 * EXPERT_BYTES


def test_each_expert_is_stored_from_a_page_and_the_folder_is_reused(tmp_path, offload_dir, caplog):
    """Experts of 3 x 3072 bytes: each starts on a page of its own (one request per expert), and a second load
    reuses the folder; both are exact."""
    save(tmp_path / "checkpoint", "deepseek", moe_intermediate_size=24)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint", trust_remote_code=True).eval()
    tokens = generate(reference)
    model = load(tmp_path / "checkpoint", offload_dir, expert_cache_bytes=0)
    assert torch.equal(generate(model), tokens)
    manifest = load_manifest(group_files(model)[0].parent)
    experts = [g for g in manifest.groups if g.expert_starts]
    assert len(experts) == 2
    for group in experts:
        assert group.expert_starts == tuple(f"{group.name}.{e}.gate_proj.weight" for e in range(8))
        starts = sorted(e.start for e in group.entries if e.name in group.expert_starts)
        assert [b - a for a, b in itertools.pairwise(starts)] == [3 * ALIGNMENT] * 7, "each expert from a page"
    assert all(rows.expert_bytes == 3 * ALIGNMENT for rows in lists(model))
    assert all(f.expert_bytes_read % (3 * ALIGNMENT) == 0 for f in accel_nvme.stats(model).forwards)
    with caplog.at_level("INFO", logger="accel_nvme"):
        again = load(tmp_path / "checkpoint", offload_dir)
    assert "reusing offload folder" in caplog.text
    assert torch.equal(generate(again), tokens)


def test_without_expert_streaming_the_experts_stream_with_their_block(checkpoints, offload_dir):
    path, tokens, _, _ = checkpoints["deepseek"]
    model = load(path, offload_dir, expert_streaming=False)
    assert not hooks_of(model, ExpertModuleHook) and not hooks_of(model, ExpertRoundHook)
    assert torch.equal(generate(model), tokens)
    assert all(f.expert_bytes_read == 0 for f in accel_nvme.stats(model).forwards)


def test_a_damaged_expert_is_refused_naming_the_file_and_tensor(checkpoints, offload_dir):
    path, _, _, _ = checkpoints["mixtral"]
    model = load(path, offload_dir, expert_cache_bytes=0, verify_on_read=True)
    seen = called_experts(model)
    with torch.inference_mode():
        model(IDS[:, :1])
    layer = list(seen)[-1]  # its reads ahead start in the next forward, after the damage
    name = f"{layer}.{seen[layer][0]}"
    hook = model.get_submodule(name)._hf_hook
    entry = hook.entries["up_proj.weight"]
    with open(hook.group.path, "r+b") as f:
        f.seek(hook.group.data_offset + entry.start)
        byte = f.read(1)
        f.seek(hook.group.data_offset + entry.start)
        f.write(bytes([byte[0] ^ 0xFF]))
    damaged = f"{hook.group.path}: '{name}.up_proj.weight' does not match"
    with pytest.raises(GroupFileError, match=damaged), torch.inference_mode():
        model(IDS[:, :1])
    assert not hook.rows.buffer.tensor.any(), "what the forward that raised read is forgotten"
    assert all(m.weight.device.type == "meta" for m in model.get_submodule(name).modules() if hasattr(m, "weight"))


def test_a_forward_with_grad_enabled_equals_the_model_in_ram(checkpoints, offload_dir):
    """In training mode the DeepSeek-style module calls every expert: each is read, and the loss and its gradients
    for the tensors kept in RAM equal the model in RAM's, in the same grad mode."""
    path, _, _, reference = checkpoints["deepseek"]
    model = load(path, offload_dir, expert_cache_bytes=0)
    model.train()
    reference.train()
    try:
        loss = model(IDS, labels=IDS).loss
        expected = reference(IDS, labels=IDS).loss
    finally:
        reference.eval()
    assert torch.equal(loss, expected)
    assert accel_nvme.stats(model).forwards[-1].expert_cache_misses == 8 * 2, "every expert of both layers"


def test_close_loads_the_experts_back(checkpoints, offload_dir):
    path, tokens, _, _ = checkpoints["deepseek"]
    model = load(path, offload_dir)
    assert torch.equal(generate(model), tokens)
    assert model.model.layers[0].mlp.gate._forward_hooks, "the router is watched"
    accel_nvme.close(model)
    assert not hooks_of(model, ExpertModuleHook) and not hooks_of(model, ExpertRoundHook)
    assert not any(m._forward_hooks for m in model.modules()), "and no longer"
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert torch.equal(generate(model), tokens)


def test_a_meta_tensor_that_is_not_streamed_is_refused_by_name(checkpoints, offload_dir):
    path, _, _, _ = checkpoints["mixtral"]
    model = load(path, offload_dir)
    for expert in model.model.layers[0].mlp.experts:
        expert.up_proj.register_buffer("scale", torch.ones(1, device="meta"))
    with pytest.raises(RuntimeError, match=r"about to compute with 'up_proj.scale', a meta tensor"):
        generate(model)


def test_what_counts_as_a_list_of_experts():
    def mlps(n=4, size=8):
        return torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(size, size)) for _ in range(n))

    assert is_expert_list("mlp.experts", mlps())
    assert not is_expert_list("mlp.layers", mlps()), "named for its experts"
    assert not is_expert_list("mlp.experts", mlps(n=1)), "two or more"
    uneven = mlps()
    uneven[1] = torch.nn.Sequential(torch.nn.Linear(8, 4))
    assert not is_expert_list("mlp.experts", uneven), "the same shapes"
    shared = mlps()
    shared[1][0].weight = shared[0][0].weight
    assert not is_expert_list("mlp.experts", shared), "no tensor shared"
    mixed = mlps()
    mixed[2].half()
    assert not is_expert_list("mlp.experts", mixed), "one dtype"
    with_buffers = torch.nn.ModuleList(torch.nn.BatchNorm1d(8) for _ in range(2))
    assert not is_expert_list("experts", with_buffers), "no buffers"


def test_lora_on_the_experts_trains_and_loads_as_in_ram(checkpoints, offload_dir, tmp_path):
    """peft LoRA on every expert's projections (DeepSeek style, training mode: every expert called): three AdamW steps
    give the losses and adapters of the model in RAM; the adapter saved and loaded again with
    ``PeftModel.from_pretrained`` onto a fresh streamed model generates the same tokens; the experts still stream."""
    path, _, _, _ = checkpoints["deepseek"]
    targets = ["gate_proj", "up_proj", "down_proj"]
    models = []
    for streamed in (False, True):
        base = (
            load(path, offload_dir) if streamed else AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
        )
        torch.manual_seed(0)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        models.append(peft.get_peft_model(base, config))
    reference, model = models
    assert adapter_weights(model) and all(w.device.type == "cpu" for w in adapter_weights(model).values())
    assert any(".experts.3.up_proj.lora_A" in n for n in adapter_weights(model)), "the experts have adapters"
    losses = [adamw_losses(m.train(), IDS) for m in models]
    assert all(torch.equal(a, b) for a, b in zip(*losses, strict=True)), losses
    assert not torch.equal(losses[1][0], losses[1][2]), "the adapter trained"
    trained = adapter_weights(model)
    assert all(torch.equal(trained[n], w) for n, w in adapter_weights(reference).items())
    assert all(p.device.type == "meta" for n, p in model.named_parameters() if ".experts." in n and "lora_" not in n)
    last = accel_nvme.stats(model).forwards[-1]
    assert last.expert_cache_hits + last.expert_cache_misses == 2 * 8, "every expert of both layers ran"

    reference.eval()
    reference.save_pretrained(tmp_path / "adapter")
    expected = generate(reference)
    loaded = peft.PeftModel.from_pretrained(load(path, tmp_path / "offload2"), tmp_path / "adapter").eval()
    assert hooks_of(loaded, ExpertModuleHook), "our hooks stay"
    assert torch.equal(generate(loaded), expected)
