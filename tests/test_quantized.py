"""Quantized and small-dtype weights stream as stored: outputs equal to the same model in RAM, bytes per forward equal
to the stored size (within alignment padding), or a clear refusal at dispatch."""

import pytest
import torch
from torch import nn

import accel_nvme
from accel_nvme.format import ALIGNMENT, TENSOR_ALIGNMENT, align_up, read_layout
from accel_nvme.tensorkinds import UnstreamableTensorError

WIDTH = 64
DEPTH = 4
CONFIG = accel_nvme.NvmeConfig(prefetch_depth=1)  # two staging buffers for four groups: every forward reads all


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self, width: int = WIDTH, depth: int = DEPTH):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, width)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


NVME_MAP = {**{f"blocks.{i}": "nvme" for i in range(DEPTH)}, "head": "cpu"}


def net(dtype=torch.float32) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype).eval()


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor as stored: a tensor subclass's inner tensors, recursively."""
    if hasattr(type(tensor), "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def streamed_bytes(model: nn.Module) -> tuple[int, int]:
    """Stored bytes of the blocks mapped to nvme, and their number of tensors."""
    tensors = [t for block in model.blocks for t in block.parameters()]
    return sum(stored_bytes(t) for t in tensors), len(tensors)


def bytes_per_forward(model: nn.Module) -> int:
    """Bytes one forward reads: each group's data section (whole pages), as every forward reads every group."""
    stats = accel_nvme.stats(model)
    assert stats.total.groups_read >= 3 * stats.groups, "groups stayed in the staging buffers"
    return sum(align_up(read_layout(path).data_bytes) for path in accel_nvme.group_files(model))


def assert_streams_as_stored(model: nn.Module, quantized_bytes: int, tensors: int) -> None:
    """A forward reads the stored bytes, give or take the alignment of each group and tensor."""
    padding = accel_nvme.stats(model).groups * ALIGNMENT + tensors * 2 * TENSOR_ALIGNMENT
    assert quantized_bytes <= bytes_per_forward(model) <= quantized_bytes + padding


def check(make, offload_dir, device_map=NVME_MAP, x: torch.Tensor | None = None) -> nn.Module:
    """``make()`` in RAM and another ``make()`` dispatched with ``device_map`` give equal outputs, three times (the
    later forwards read what the earlier ones left), each forward reading the stored bytes; the dispatched model."""
    x = torch.randn(2, WIDTH) if x is None else x
    model = make()
    with torch.no_grad():
        expected = model(x)
    quantized_bytes, tensors = streamed_bytes(model)
    streamed = accel_nvme.dispatch_model(make(), device_map, offload_dir=offload_dir, config=CONFIG)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(streamed(x), expected)
    assert_streams_as_stored(streamed, quantized_bytes, tensors)
    return streamed


def test_torchao_int8_weight_only(offload_dir):
    torchao = pytest.importorskip("torchao.quantization")

    def make():
        model = net()
        torchao.quantize_(model, torchao.Int8WeightOnlyConfig())
        return model

    model = make()
    assert type(model.blocks[0].up.weight).__name__ == "Int8Tensor"
    assert streamed_bytes(model)[0] < streamed_bytes(net())[0] / 3
    check(make, offload_dir)


@pytest.mark.parametrize("qtype", ["qint8", "qint4"])
def test_quanto(offload_dir, qtype):
    quanto = pytest.importorskip("optimum.quanto")

    def make():
        model = net()
        quanto.quantize(model, weights=getattr(quanto, qtype))
        quanto.freeze(model)
        return model

    check(make, offload_dir)
    assert streamed_bytes(make())[0] < streamed_bytes(net())[0] / (3 if qtype == "qint8" else 4)


def assert_refused(model: nn.Module, offload_dir, match: str) -> None:
    """Dispatch raises naming the module and class, writes nothing and leaves the model as it was."""
    before = {name: type(t) for name, t in model.named_parameters()}
    with pytest.raises(UnstreamableTensorError, match=match):
        accel_nvme.dispatch_model(model, NVME_MAP, offload_dir=offload_dir, config=CONFIG)
    assert list(offload_dir.iterdir()) == []
    assert {name: type(t) for name, t in model.named_parameters()} == before


class TaggedParameter(nn.Parameter):
    """A Parameter subclass with state the tier does not know."""


def test_unknown_parameter_subclass_is_refused(offload_dir):
    model = net()
    tagged = TaggedParameter(model.blocks[1].down.weight.detach())
    tagged.scale = 2.0
    model.blocks[1].down.weight = tagged
    assert_refused(model, offload_dir, r"module 'blocks\.1\.down': tensor 'weight' is a \S*TaggedParameter, .*'cpu'")


def linear_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the streamed blocks when their Linear weights are stored as ``dtype`` (norms and biases stay)."""
    total = 0
    for block in model.blocks:
        for name, tensor in block.named_parameters():
            total += tensor.numel() * (dtype.itemsize if name.endswith("weight") and "norm" not in name else 4)
    return total


def test_layerwise_casting_before_dispatch_streams_the_storage_dtype(offload_dir):
    hooks = pytest.importorskip("diffusers.hooks")

    def make():
        model = net()
        hooks.apply_layerwise_casting(model, torch.float8_e4m3fn, torch.float32, skip_modules_pattern=["norm"])
        return model

    streamed = check(make, offload_dir)
    fp8, fp32 = linear_bytes(net(), torch.float8_e4m3fn), linear_bytes(net(), torch.float32)
    assert bytes_per_forward(streamed) < fp8 + DEPTH * ALIGNMENT < fp32


def test_layerwise_casting_after_dispatch_streams_the_storage_dtype(offload_dir, caplog):
    """Applied after dispatch, the casting rewrites the groups once in fp8 (tests/test_layerwise_casting.py)."""
    hooks = pytest.importorskip("diffusers.hooks")
    x = torch.randn(2, WIDTH)
    model = net()
    hooks.apply_layerwise_casting(model, torch.float8_e4m3fn, torch.float32, skip_modules_pattern=["norm"])
    with torch.no_grad():
        expected = model(x)
        unrounded = net()(x)
    streamed = accel_nvme.dispatch_model(net(), NVME_MAP, offload_dir=offload_dir, config=CONFIG)
    hooks.apply_layerwise_casting(streamed, torch.float8_e4m3fn, torch.float32, skip_modules_pattern=["norm"])
    with torch.no_grad():
        outputs = [streamed(x) for _ in range(3)]
    assert not torch.equal(expected, unrounded)
    assert all(torch.equal(output, expected) for output in outputs)
    assert "converted to" not in caplog.text
    fp8, fp32 = linear_bytes(net(), torch.float8_e4m3fn), linear_bytes(net(), torch.float32)
    assert bytes_per_forward(streamed) < fp8 + DEPTH * ALIGNMENT < fp32


CUDA = pytest.param(
    "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_bf16_checkpoint_loaded_as_float32(tmp_path, offload_dir, device):
    """For a GPU the group files keep the checkpoint's bf16, converted on the device after each read as transformers
    converts it in RAM; for the CPU they hold fp32 (there the conversion costs more than the read it saves)."""
    transformers = pytest.importorskip("transformers")
    from helpers import tiny_llama

    tiny_llama().to(torch.bfloat16).save_pretrained(tmp_path / "ckpt")
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0)).to(device)
    in_ram = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).to(device)
    main = 0 if device == "cuda" else "cpu"
    streamed = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ckpt",
        dtype=torch.float32,
        device_map={"model.embed_tokens": main, "model.layers": "nvme", "model.norm": main, "lm_head": main},
        offload_backend="nvme",
        offload_folder=str(offload_dir),
    )
    assert streamed.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    with torch.no_grad():
        expected = in_ram(ids).logits
        outputs = [streamed(ids).logits for _ in range(3)]
    assert all(torch.equal(output, expected) for output in outputs)
    stored = sum(p.numel() for p in in_ram.model.layers.parameters()) * (2 if device == "cuda" else 4)
    tensors = len(list(in_ram.model.layers.parameters()))
    padding = len(in_ram.model.layers) * ALIGNMENT + tensors * 2 * TENSOR_ALIGNMENT
    assert stored <= bytes_per_forward(streamed) <= stored + padding


GGUF_TYPES = ("Q8_0", "Q4_0", "BF16")


def gguf_net() -> Net:
    """``net()`` with its blocks' Linear layers as diffusers loads a GGUF file (``GGUFLinear``, ``GGUFParameter``),
    quantized as Q8_0, Q4_0 and BF16 in turn."""
    gguf = pytest.importorskip("gguf")
    utils = pytest.importorskip("diffusers.quantizers.gguf.utils")
    model = net()
    linears = [(block, attr) for block in model.blocks for attr in ("up", "down")]
    for i, (block, attr) in enumerate(linears):
        linear = getattr(block, attr)
        qtype = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[i % len(GGUF_TYPES)])
        quantized = utils.GGUFLinear(linear.in_features, linear.out_features, True, compute_dtype=torch.float32)
        data = gguf.quants.quantize(linear.weight.detach().numpy(), qtype)
        quantized.weight = utils.GGUFParameter(torch.from_numpy(data.copy()), quant_type=qtype)
        quantized.bias = linear.bias
        setattr(block, attr, quantized)
    return model


def test_gguf_dispatch_model(offload_dir):
    streamed = check(gguf_net, offload_dir)
    assert streamed.blocks[0].up.weight.device.type == "meta"
    assert streamed_bytes(gguf_net())[0] < streamed_bytes(net())[0] / 2.5


def flux():
    """A tiny Flux transformer whose Linear layers are 32 wide (GGUF blocks are 32 values)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
    ).eval()


def flux_inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 16, 4, generator=g),
        "encoder_hidden_states": torch.randn(1, 5, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(5, 3),
    }


def write_gguf(model: nn.Module, path) -> int:
    """``model``'s state dict as a GGUF file (2-D weights Q8_0, Q4_0, BF16 in turn, the rest F32); its data bytes."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "flux")
    total = 0
    for i, (name, tensor) in enumerate(model.state_dict().items()):
        array = tensor.numpy()
        if array.ndim == 2 and array.shape[-1] % 32 == 0:
            qtype = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[i % len(GGUF_TYPES)])
            array = gguf.quants.quantize(array, qtype)
            writer.add_tensor(name, array, raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)
        total += array.nbytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return total


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_from_single_file_streams(tmp_path, offload_dir, fmt):
    """diffusers loads a single file whole and dispatches it to the CPU; with offload_backend="nvme" it streams."""
    diffusers = pytest.importorskip("diffusers")
    model = flux()
    model.save_pretrained(tmp_path / "config")
    path = tmp_path / f"flux.{fmt}"
    kwargs = {"config": str(tmp_path / "config")}
    if fmt == "gguf":
        stored = write_gguf(model, path)
        kwargs["quantization_config"] = diffusers.GGUFQuantizationConfig(compute_dtype=torch.float32)
    else:
        from safetensors.torch import save_file

        save_file(model.state_dict(), path)
        stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    in_ram = diffusers.FluxTransformer2DModel.from_single_file(str(path), **kwargs)
    streamed = diffusers.FluxTransformer2DModel.from_single_file(
        str(path),
        device_map="auto",
        max_memory={"cpu": "20KB"},
        offload_backend="nvme",
        offload_folder=str(offload_dir),
        **kwargs,
    )
    if fmt == "gguf":
        assert type(streamed.transformer_blocks[0].attn.to_q.weight).__name__ != "GGUFParameter"  # meta, between
        assert type(in_ram.transformer_blocks[0].attn.to_q.weight).__name__ == "GGUFParameter"
    with torch.no_grad():
        expected = in_ram(**flux_inputs()).sample
        outputs = [streamed(**flux_inputs()).sample for _ in range(3)]
    assert all(torch.equal(output, expected) for output in outputs)
    groups = accel_nvme.stats(streamed).groups
    assert groups >= 4 and set(streamed.nvme_device_map.values()) == {"nvme"}
    tensors = len(model.state_dict())
    assert stored * 0.9 <= bytes_per_forward(streamed) <= stored + groups * ALIGNMENT + tensors * 2 * TENSOR_ALIGNMENT


def test_quantized_weights_with_grad_enabled_and_loaded_back(offload_dir):
    """With grad enabled (weights copied out of the staging buffer) outputs stay equal; ``close`` loads each quantized
    weight back into RAM in its own class."""
    x = torch.randn(2, WIDTH)
    expected = gguf_net()(x)
    streamed = accel_nvme.dispatch_model(gguf_net(), NVME_MAP, offload_dir=offload_dir, config=CONFIG)
    assert all(torch.equal(streamed(x), expected) for _ in range(3))
    accel_nvme.close(streamed)
    weight = streamed.blocks[2].down.weight
    assert type(weight).__name__ == "GGUFParameter" and weight.quant_type == gguf_net().blocks[2].down.weight.quant_type
    assert torch.equal(streamed(x), expected)
