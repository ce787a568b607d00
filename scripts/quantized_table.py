"""Issue 19's table: per quantized/small-dtype case, bytes one forward reads on the nvme tier, the stored and the
dequantized size, whether outputs equal the same model in RAM, and what accelerate's disk tier does with it.

Run: ``python scripts/quantized_table.py [NAME]`` (only the cases whose name contains NAME; needs ``.[quant]`` and
diffusers/transformers; CPU only, ~1 min).
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

import accel_nvme
from accel_nvme.dispatch import _accelerate_dispatch_model
from accel_nvme.format import align_up, read_layout

WIDTH, DEPTH = 256, 4
NVME = {**{f"blocks.{i}": "nvme" for i in range(DEPTH)}, "head": "cpu"}
DISK = {**{f"blocks.{i}": "disk" for i in range(DEPTH)}, "head": "cpu"}
CONFIG = accel_nvme.NvmeConfig(prefetch_depth=1)
X = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(1))
ONLY = sys.argv[1] if len(sys.argv) > 1 else ""  # run only the cases whose name contains this


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.up = nn.Linear(WIDTH, 2 * WIDTH)
        self.down = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(DEPTH))
        self.head = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def stored(tensor: torch.Tensor) -> int:
    if hasattr(type(tensor), "__tensor_flatten__"):
        return sum(stored(getattr(tensor, n)) for n in tensor.__tensor_flatten__()[0])
    return tensor.numel() * tensor.element_size()


def state_tensors(module: nn.Module, tensor: torch.Tensor) -> list[torch.Tensor]:
    """The tensors of a bitsandbytes weight's state (4-bit: QuantState, nested too; 8-bit: SCB), streamed with it."""
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        nested = getattr(state, "state2", None)
        return [v for s in (state, nested) if s is not None for v in vars(s).values() if isinstance(v, torch.Tensor)]
    if type(tensor).__name__ == "Int8Params":
        return [tensor.SCB if tensor.SCB is not None else module.state.SCB]
    return []


def blocks_bytes(model: nn.Module) -> int:
    return sum(
        stored(t) + sum(stored(s) for s in state_tensors(m, t))
        for m in model.blocks.modules()
        for t in m.parameters(recurse=False)
    )


def per_forward(model: nn.Module) -> int:
    return sum(align_up(read_layout(p).data_bytes) for p in accel_nvme.group_files(model))


def run(model: nn.Module) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(X) for _ in range(3)]


def disk_baseline(make, expected: torch.Tensor) -> str:
    try:
        with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _accelerate_dispatch_model(make(), DISK, main_device="cpu", offload_dir=folder)
            outputs = run(model)
        return "exact" if all(torch.equal(o, expected) for o in outputs) else "runs, NOT equal"
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:60]}"


def case(name: str, make, after=None) -> None:
    if ONLY and ONLY not in name:
        return
    with torch.no_grad():
        reference = make()
        if after is not None:
            after(reference)
        expected = reference(X)
    # as dispatched: the reference's first forward may have changed its state (bitsandbytes' CPU repack)
    quantized, dequantized = blocks_bytes(reference if after else make()), blocks_bytes(net())
    with tempfile.TemporaryDirectory() as folder:
        try:
            model = accel_nvme.dispatch_model(make(), NVME, offload_dir=folder, config=CONFIG)
            if after is not None:
                after(model)
            outputs = run(model)
            exact = "exact" if all(torch.equal(o, expected) for o in outputs) else "NOT equal"
            nvme = f"{per_forward(model) / 1e6:.3f}"
            accel_nvme.close(model, load_back=False)
        except Exception as e:
            exact, nvme = f"refused: {type(e).__name__}", "—"
    disk = disk_baseline(make, expected) if after is None else "n/a"
    print(f"| {name} | {nvme} / {quantized / 1e6:.3f} / {dequantized / 1e6:.3f} | {exact} | {disk} |")


def main() -> None:
    from diffusers.hooks import apply_layerwise_casting
    from diffusers.quantizers.gguf import utils as gguf_utils

    def fp8(model):
        apply_layerwise_casting(model, torch.float8_e4m3fn, torch.float32, skip_modules_pattern=["norm", "head"])
        return model

    def torchao():
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model = net()
        quantize_(model, Int8WeightOnlyConfig())
        return model

    def quanto(qtype):
        def make():
            from optimum import quanto

            model = net()
            quanto.quantize(model, weights=getattr(quanto, qtype))
            quanto.freeze(model)
            return model

        return make

    def gguf_model(qtype_name):
        def make():
            import gguf

            qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
            model = net()
            for block in model.blocks:
                for attr in ("up", "down"):
                    linear = getattr(block, attr)
                    new = gguf_utils.GGUFLinear(linear.in_features, linear.out_features, True, torch.float32)
                    data = torch.from_numpy(gguf.quants.quantize(linear.weight.detach().numpy(), qtype).copy())
                    new.weight = gguf_utils.GGUFParameter(data, quant_type=qtype)
                    new.bias = linear.bias
                    setattr(block, attr, new)
            return model

        return make

    def bnb(bits, quant_type="nf4", repacked=False):
        def make():
            import bitsandbytes

            model = net()
            for block in model.blocks:
                for attr in ("up", "down"):
                    linear = getattr(block, attr)
                    if bits == 4:
                        new = bitsandbytes.nn.Linear4bit(
                            linear.in_features, linear.out_features, compute_dtype=torch.float32, quant_type=quant_type
                        )
                    else:
                        new = bitsandbytes.nn.Linear8bitLt(
                            linear.in_features, linear.out_features, has_fp16_weights=False
                        )
                    new.load_state_dict(linear.state_dict())
                    setattr(block, attr, new.to("cpu"))
            model.eval()  # bitsandbytes repacks for the CPU in eval mode only
            if repacked:
                with torch.no_grad():
                    model(X)
            return model

        return make

    print("| case | bytes/forward MB: nvme / quantized / dequantized | nvme | accelerate disk tier |")
    print("|---|---|---|---|")
    case("layerwise fp8 casting before dispatch", lambda: fp8(net()))
    case("layerwise fp8 casting after dispatch", net, after=fp8)
    case("torchao int8 weight-only", torchao)
    case("quanto qint8", quanto("qint8"))
    case("quanto qint4", quanto("qint4"))
    for qtype in ("Q8_0", "Q4_0", "BF16"):
        case(f"GGUF {qtype} (GGUFParameter), dispatch_model", gguf_model(qtype))
    case("bitsandbytes 4-bit nf4 on CPU, repacked before dispatch", bnb(4, repacked=True))
    case("bitsandbytes 4-bit fp4 on CPU, repacked before dispatch", bnb(4, "fp4", repacked=True))
    # nf4, not repacked before dispatch: repacked after each read
    case("bitsandbytes 4-bit on CPU", bnb(4))
    case("bitsandbytes 8-bit on CPU", bnb(8))
    bf16_checkpoint()
    flux_cast_after_from_pretrained()


def flux_cast_after_from_pretrained() -> None:
    """``enable_layerwise_casting`` (fp8 storage, fp32 compute) after ``from_pretrained(..., offload_backend="nvme")``
    of a small Flux transformer, against the same casting of the model in RAM (its own allocations)."""
    from diffusers import FluxTransformer2DModel

    def build() -> FluxTransformer2DModel:
        torch.manual_seed(0)
        return FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=64,
            num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=64, axes_dims_rope=(16, 24, 24),
        ).eval()  # fmt: skip

    def cast(model):
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        return model

    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 64, 16, generator=g),
        encoder_hidden_states=torch.randn(1, 8, 256, generator=g),
        pooled_projections=torch.randn(1, 64, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(64, 3),
        txt_ids=torch.zeros(8, 3),
    )
    in_ram = cast(build())
    with torch.no_grad():
        expected = in_ram(**inputs).sample
    quantized = sum(t.numel() * t.element_size() for t in in_ram.state_dict().values())
    dequantized = sum(t.numel() * t.element_size() for t in build().state_dict().values())
    with tempfile.TemporaryDirectory() as folder:
        build().save_pretrained(f"{folder}/flux")
        results = []
        for backend in ("nvme", None):
            options = {"offload_backend": "nvme", "nvme_config": CONFIG} if backend else {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = cast(
                    FluxTransformer2DModel.from_pretrained(
                        f"{folder}/flux", device_map={"": "disk"}, offload_folder=f"{folder}/{backend}", **options
                    )
                )
                with torch.no_grad():
                    outputs = [model(**inputs).sample for _ in range(3)]
            results.append("exact" if all(torch.equal(o, expected) for o in outputs) else "NOT equal")
            if backend:
                nvme = per_forward(model) / 1e6
    sizes = f"{nvme:.3f} / {quantized / 1e6:.3f} / {dequantized / 1e6:.3f}"
    print(f"| Flux, enable_layerwise_casting(fp8) after from_pretrained | {sizes} | {results[0]} | {results[1]} |")


def bf16_checkpoint() -> None:
    """A bf16 Llama checkpoint loaded with dtype=float32: nvme through from_pretrained, disk through transformers."""
    if ONLY:
        return
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=DEPTH,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    device_map = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ckpt"
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
        in_ram = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            expected = in_ram(ids).logits
        nvme = LlamaForCausalLM.from_pretrained(
            path, dtype=torch.float32, device_map=device_map, offload_backend="nvme", offload_folder=f"{folder}/nvme"
        )
        with torch.no_grad():
            exact = all(torch.equal(nvme(ids).logits, expected) for _ in range(3))
        disk = LlamaForCausalLM.from_pretrained(
            path, dtype=torch.float32, device_map=device_map, offload_folder=f"{folder}/disk"
        )
        with torch.no_grad():
            disk_exact = all(torch.equal(disk(ids).logits, expected) for _ in range(3))
        layers = sum(p.numel() for p in in_ram.model.layers.parameters())
        sizes = f"{per_forward(nvme) / 1e6:.3f} / {layers * 2 / 1e6:.3f} / {layers * 4 / 1e6:.3f}"
        results = f"{'exact' if exact else 'NOT equal'} | {'exact' if disk_exact else 'NOT equal'}"
        print(f"| bf16 checkpoint, from_pretrained(dtype=float32) | {sizes} | {results} |")


if __name__ == "__main__":
    main()
