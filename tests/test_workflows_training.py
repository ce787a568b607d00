"""LoRA on a streamed base, end to end: training and the adapter-loading paths of peft and transformers equal the same
model in RAM (``torch.equal``), and the base keeps streaming."""

import pytest
import torch
from helpers import adamw_losses, adapter_weights, tiny_llama
from torch import nn

import accel_nvme
from accel_nvme import NvmeAlignDevicesHook

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

IDS = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.layers": "nvme",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "nvme",
}


def lora(seed: int = 0, **overrides) -> LoraConfig:
    torch.manual_seed(seed)  # the adapter's initial values come from torch's generator
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **overrides})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "base"
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, checkpoint):
    """Two saved LoRA adapters with non-zero B (each changes the output), targeting different modules."""
    folder = tmp_path_factory.mktemp("adapters")
    paths = []
    for seed, targets in ((1, ["q_proj", "v_proj"]), (2, ["k_proj", "o_proj", "down_proj"])):
        model = LlamaForCausalLM.from_pretrained(checkpoint)
        config = lora(seed, target_modules=targets, init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(folder / f"adapter{seed}")
        paths.append(folder / f"adapter{seed}")
    return paths


def in_ram(checkpoint) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(checkpoint)


def streamed(checkpoint, offload_dir) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(checkpoint, device_map=DEVICE_MAP, offload_folder=str(offload_dir))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def assert_streaming(model, groups: int, forwards_before: int | None = None) -> int:
    """The same groups still stream (hooks in place, reads counted); returns the number of forwards recorded."""
    hooked = [m for m in model.modules() if isinstance(getattr(m, "_hf_hook", None), NvmeAlignDevicesHook)]
    assert len(hooked) == groups, "our hooks were removed or replaced"
    stats = accel_nvme.stats(model)
    assert stats.groups == groups and stats.total.groups_read > 0
    if forwards_before is not None:
        assert len(stats.forwards) > forwards_before, "the forwards did not go through the stream"
    assert all(p.device.type == "meta" for n, p in model.named_parameters() if ".layers." in n and "lora_" not in n)
    return len(stats.forwards)


def test_lora_training_three_adamw_steps_equal_ram(checkpoint, offload_dir):
    reference = get_peft_model(in_ram(checkpoint), lora())
    model = get_peft_model(streamed(checkpoint, offload_dir), lora())
    groups = accel_nvme.stats(model).groups
    start = adapter_weights(model)
    assert start and all(w.device.type == "cpu" for w in start.values()), "adapters have real memory"
    for name, weight in adapter_weights(reference).items():
        assert torch.equal(start[name], weight), name
    losses = [adamw_losses(m, IDS) for m in (reference, model)]
    for expected, actual in zip(*losses, strict=True):
        assert torch.equal(actual, expected)
    assert not torch.equal(losses[1][0], losses[1][2]), "the adapter trained"
    for name, weight in adapter_weights(reference).items():
        assert torch.equal(adapter_weights(model)[name], weight), name
    assert_streaming(model, groups)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n), "the base stays frozen"


def test_peft_from_pretrained_set_adapter_and_disable_adapter_equal_ram_and_keep_streaming(
    checkpoint, adapters, offload_dir
):
    base = streamed(checkpoint, offload_dir)
    groups = accel_nvme.stats(base).groups
    outputs = []
    for model in (in_ram(checkpoint), base):
        model = PeftModel.from_pretrained(model, adapters[0], adapter_name="first")
        model.load_adapter(adapters[1], adapter_name="second")
        first = logits(model)
        model.set_adapter("second")
        second = logits(model)
        with model.disable_adapter():
            plain = logits(model)
        outputs.append((first, second, plain))
    for expected, actual in zip(*outputs, strict=True):
        assert torch.equal(actual, expected)
    first, second, plain = outputs[1]
    assert not torch.equal(first, plain) and not torch.equal(second, plain), "each adapter changes the output"
    assert_streaming(model, groups, forwards_before=2)


def test_transformers_load_adapter_equals_ram_and_keeps_streaming(checkpoint, adapters, offload_dir):
    reference, model = in_ram(checkpoint), streamed(checkpoint, offload_dir)
    groups = accel_nvme.stats(model).groups
    before = logits(model)
    for m in (reference, model):
        m.load_adapter(str(adapters[0]), adapter_name="first")
    assert all(p.device.type == "cpu" for n, p in model.named_parameters() if "lora_" in n)
    expected = logits(reference)
    assert torch.equal(logits(model), expected)
    assert not torch.equal(expected, before), "the adapter changes the output"
    assert_streaming(model, groups, forwards_before=1)
    assert model.hf_device_map == streamed(checkpoint, offload_dir).hf_device_map, "the device map is put back"


def test_a_meta_tensor_that_is_not_streamed_is_refused_by_name(checkpoint, offload_dir):
    model = streamed(checkpoint, offload_dir)
    model.model.layers[1].mlp.register_buffer("scale", torch.empty(8, device="meta"))
    with pytest.raises(RuntimeError, match=r"nvme group 'model.layers.1'.* 'mlp.scale', a meta tensor"):
        logits(model)
    model.model.layers[1].mlp.scale = torch.ones(8)
    logits(model)  # the forward after the refusal starts clean


def test_peft_without_the_integration_would_put_adapters_on_meta_and_is_refused(checkpoint, offload_dir):
    model = streamed(checkpoint, offload_dir)
    accel_nvme.uninstall()
    try:
        model = get_peft_model(model, lora())
    finally:
        accel_nvme.install()
    assert any(p.is_meta for n, p in model.named_parameters() if "lora_" in n), "peft moves adapters to meta"
    with pytest.raises(RuntimeError, match=r"'self_attn.q_proj.lora_A.default.weight', a meta tensor"):
        logits(model)


def test_merging_an_adapter_into_streamed_weights_is_refused(checkpoint, offload_dir):
    model = get_peft_model(streamed(checkpoint, offload_dir), lora())
    with pytest.raises(ValueError, match=r"cannot merge an adapter into LlamaForCausalLM: .* stream their weights"):
        model.merge_and_unload()
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.lora_A, nn.ModuleDict), "not unloaded"
