"""bitsandbytes on the CPU streams as stored: 4-bit (Params4bit, nf4/fp4) and 8-bit (Int8Params, LLM.int8) weights
keep their class and state, outputs equal the same quantized model in RAM (same forwards in the same order, so both
are in the same state), and a forward reads the quantized bytes."""

import pytest
import torch
from test_quantized import CONFIG, NVME_MAP, WIDTH, net

import accel_nvme
from accel_nvme import bnb as accel_bnb
from accel_nvme.format import ALIGNMENT, TENSOR_ALIGNMENT
from accel_nvme.tensorkinds import UnstreamableTensorError, kind_of, stored_form

bnb = pytest.importorskip("bitsandbytes")

# name: (bits, Linear4bit/Linear8bitLt keyword arguments, one inference forward in RAM before dispatch)
LINEARS = {
    "nf4-nested-repacked": (4, {"quant_type": "nf4", "compress_statistics": True}, True),
    "fp4-flat-repacked": (4, {"quant_type": "fp4", "compress_statistics": False}, True),
    "nf4-nested-fresh": (4, {"quant_type": "nf4", "compress_statistics": True}, False),
    "int8": (8, {"threshold": 0.0}, False),
    "int8-outliers-warm": (8, {"threshold": 6.0}, True),
}


def quantized_linear(linear: torch.nn.Linear, bits: int, **kwargs) -> torch.nn.Module:
    """``linear`` quantized on the CPU by bitsandbytes, as its docs do it (load the weights, then ``.to(device)``)."""
    if bits == 4:
        new = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, linear.bias is not None, compute_dtype=torch.float32, **kwargs
        )
    else:
        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, linear.bias is not None, False, **kwargs)
    new.load_state_dict(linear.state_dict())
    return new.to("cpu")


def quantize(model: torch.nn.Module, root: torch.nn.Module, bits: int, **kwargs) -> torch.nn.Module:
    """Every ``nn.Linear`` under ``root`` replaced by its bitsandbytes counterpart; the model frozen, in eval."""
    for name, module in list(root.named_modules()):
        if type(module) is torch.nn.Linear:
            parent, _, attr = name.rpartition(".")
            setattr(root.get_submodule(parent), attr, quantized_linear(module, bits, **kwargs))
    return model.eval()


def quantized_bytes(root: torch.nn.Module) -> tuple[int, int]:
    """Bytes of ``root``'s tensors as stored and their number: a bitsandbytes weight's bytes plus every tensor of its
    state (4-bit: QuantState's absmax, code, nested statistics; 8-bit: SCB, kept in the module's state after a forward).
    """
    total = count = 0
    for module in root.modules():
        for tensor in module.parameters(recurse=False):
            parts = [tensor]
            if isinstance(tensor, bnb.nn.Params4bit):
                state = tensor.quant_state
                parts += [v for v in vars(state).values() if isinstance(v, torch.Tensor)]
                if getattr(state, "state2", None) is not None:
                    parts += [v for v in vars(state.state2).values() if isinstance(v, torch.Tensor)]
            elif isinstance(tensor, bnb.nn.Int8Params):
                parts.append(tensor.SCB if tensor.SCB is not None else module.state.SCB)
            total += sum(p.numel() * p.element_size() for p in parts)
            count += 1
    return total, count


def bytes_per_forward(model: torch.nn.Module, forward, forwards: int = 4) -> float:
    """Bytes one forward reads, from ``accel_nvme.stats`` over ``forwards`` more forwards: every group is read once
    per forward (the group read ahead across the wrap-around may be counted in a neighbouring window: give or take
    one read), and the groups here are of one size, so a forward reads ``groups`` times the bytes of one read."""
    before = accel_nvme.stats(model).total
    for _ in range(forwards):
        forward()
    after = accel_nvme.stats(model)
    reads = after.total.groups_read - before.groups_read
    assert abs(reads - forwards * after.groups) <= 1, "every group is read once per forward"
    return (after.total.bytes_read - before.bytes_read) / reads * after.groups


def assert_reads_the_quantized_bytes(model, forward, stored: int, tensors: int) -> None:
    """Per forward: the quantized bytes, plus at most a page per group and two tensor alignments per tensor."""
    padding = accel_nvme.stats(model).groups * ALIGNMENT + tensors * 2 * TENSOR_ALIGNMENT
    assert stored <= bytes_per_forward(model, forward) <= stored + padding


def same_forwards(ram, streamed, x) -> None:
    """Three inference forwards, then two with grad enabled: each output equal to the model in RAM's."""
    for grad in (False, False, False, True, True):
        with torch.set_grad_enabled(grad):
            assert torch.equal(streamed(x), ram(x))


@pytest.mark.parametrize("case", LINEARS)
def test_linear_layers_stream_as_stored(offload_dir, caplog, monkeypatch, case):
    bits, kwargs, repacked = LINEARS[case]
    monkeypatch.setattr(accel_bnb, "_WARNED_REPACK", set())
    x = torch.randn(3, WIDTH)

    def make():
        model = net()
        quantize(model, model.blocks, bits, **kwargs).requires_grad_(False)
        if repacked:
            with torch.no_grad():
                model(x)
        return model

    ram, model = make(), make()
    stored, tensors = quantized_bytes(model.blocks)
    assert stored < quantized_bytes(net().blocks)[0] / (3 if bits == 8 else 5)
    streamed = accel_nvme.dispatch_model(model, NVME_MAP, offload_dir=offload_dir, config=CONFIG)
    assert streamed.blocks[0].up.weight.device.type == "meta"
    same_forwards(ram, streamed, x)
    assert_reads_the_quantized_bytes(streamed, lambda: streamed(x), stored, tensors)
    # bitsandbytes repacks 4-bit weights at their first inference forward only on CPUs with AVX512-BF16
    repacks = bits == 4 and not repacked and bnb.functional.has_avx512bf16()
    assert ("repacked the 4-bit weights" in caplog.text) == repacks
    accel_nvme.close(streamed)
    weight = streamed.blocks[1].down.weight
    assert type(weight) is type(ram.blocks[1].down.weight) and weight.device.type == "cpu"
    with torch.no_grad():
        assert torch.equal(streamed(x), ram(x))


@pytest.mark.parametrize("bits", [4, 8])
def test_the_module_holds_its_streamed_state_only_in_its_forward(offload_dir, bits):
    """Inside the forward the weight is its class again with its attributes, and a state of its own viewing what was
    read (not the QuantState of the model in RAM), which the module's own references point at; after it, nothing."""
    x = torch.randn(2, WIDTH)
    model = net()
    quantize(model, model.blocks, bits).requires_grad_(False)
    original = model.blocks[2].up.weight
    original_state = original.quant_state if bits == 4 else None
    streamed = accel_nvme.dispatch_model(model, NVME_MAP, offload_dir=offload_dir, config=CONFIG)
    seen = []

    def look(module, args, output):
        weight = module.weight
        assert type(weight) is type(original) and weight.requires_grad is False
        if bits == 4:
            attributes = ("blocksize", "compress_statistics", "quant_type", "quant_storage", "bnb_quantized")
            assert all(getattr(weight, a) == getattr(original, a) for a in attributes)
            assert module.quant_state is weight.quant_state and weight.quant_state is not original_state
            assert weight.quant_state.absmax.data_ptr() != original_state.absmax.data_ptr()
        else:
            assert module.state.CB.data_ptr() == weight.data_ptr() and module.state.SCB is not None
            assert weight.CB is None and weight.SCB is None  # moved into the module's state, as bnb's forward does
        seen.append(module)

    streamed.blocks[2].up.register_forward_hook(look)
    with torch.no_grad():
        streamed(x)
    up = streamed.blocks[2].up
    assert seen == [up] and up.weight.device.type == "meta"
    assert (up.quant_state if bits == 4 else up.state.CB) is None


@pytest.mark.parametrize("bits", [4, 8])
def test_a_transformers_llama_generates_exactly(tmp_path, offload_dir, bits):
    """A tiny Llama loaded with ``BitsAndBytesConfig`` on the CPU (4-bit: nf4 with nested statistics; 8-bit: LLM.int8),
    then dispatched with its layers on nvme. Not frozen: grad-mode forwards keep bnb from repacking 4-bit weights until
    an inference forward does, in RAM as streamed, and a backward gives the embedding's gradient exactly."""
    transformers = pytest.importorskip("transformers")
    from helpers import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "ckpt")
    if bits == 4:
        config = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    else:
        config = transformers.BitsAndBytesConfig(load_in_8bit=True)

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "ckpt", quantization_config=config, device_map="cpu"
        )

    ram, model = load(), load()
    assert type(model.model.layers[0].mlp.up_proj.weight) is (bnb.nn.Params4bit if bits == 4 else bnb.nn.Int8Params)
    stored, tensors = quantized_bytes(model.model.layers)
    device_map = {"model.embed_tokens": "cpu", "model.layers": "nvme", "model.norm": "cpu", "model.rotary_emb": "cpu"}
    device_map["lm_head"] = "cpu"
    # Three staging buffers for four groups: backward refills them in another order than the forward filled them.
    config = accel_nvme.NvmeConfig(prefetch_depth=2)
    streamed = accel_nvme.dispatch_model(model, device_map, offload_dir=offload_dir, config=config)
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    expected = ram(ids).logits
    got = streamed(ids).logits
    assert torch.equal(got, expected)
    expected.square().mean().backward()
    got.square().mean().backward()  # through bnb's autograd functions, which keep the weight and its state
    assert torch.equal(streamed.model.embed_tokens.weight.grad, ram.model.embed_tokens.weight.grad)
    for grad in (False, True, False):
        with torch.set_grad_enabled(grad):
            assert torch.equal(streamed(ids).logits, ram(ids).logits)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(streamed.generate(ids, **kwargs), ram.generate(ids, **kwargs))
    with torch.no_grad():
        assert_reads_the_quantized_bytes(streamed, lambda: streamed(ids), stored, tensors)


REFUSED = {
    "not quantized yet": lambda: bnb.nn.Linear4bit(WIDTH, WIDTH, compute_dtype=torch.float32),  # no .to(device)
    "only Params4bit of a Linear4bit": lambda: bnb.nn.Embedding4bit(4, WIDTH).to("cpu"),
    "requires grad": lambda: bnb.nn.Linear8bitLt(WIDTH, WIDTH, has_fp16_weights=True).to("cpu"),  # fp16 training
}


@pytest.mark.parametrize("why", REFUSED)
def test_uses_of_bitsandbytes_it_cannot_serve_are_refused(offload_dir, why):
    model = net()
    model.blocks[0].up = REFUSED[why]()
    before = {name: type(t) for name, t in model.named_parameters()}
    with pytest.raises(UnstreamableTensorError, match=rf"module 'blocks\.0\.up': .*bitsandbytes.*{why}.*'cpu'"):
        accel_nvme.dispatch_model(model, NVME_MAP, offload_dir=offload_dir, config=CONFIG)
    assert list(offload_dir.iterdir()) == []
    assert {name: type(t) for name, t in model.named_parameters()} == before


def test_a_cpu_quantized_weight_is_refused_for_a_gpu_execution_device():
    layer = quantized_linear(torch.nn.Linear(WIDTH, WIDTH), 4)
    assert kind_of("m.weight", layer.weight, layer) is not None
    with pytest.raises(UnstreamableTensorError, match=r"CPU execution device only, not 'cuda:0'"):
        stored_form("m.weight", layer.weight, layer.weight, "cuda:0", layer)
