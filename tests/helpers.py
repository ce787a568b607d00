"""Tiny models and small utilities shared by the tests."""

import ctypes
import os

import torch
from conformance_models import decoder_config
from torch import nn

import accel_nvme
from accel_nvme import NvmeAlignDevicesHook

IDS_SEED = 1


class Block(nn.Module):
    """A residual MLP block with a persistent and a non-persistent buffer."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.register_buffer("scale", torch.rand(width) + 0.5)
        self.register_buffer("shift", torch.rand(width), persistent=False)

    def forward(self, x):
        return x + self.mlp(self.norm(x)) * self.scale + self.shift


class TinyLM(nn.Module):
    """Embedding, nested blocks, and a head tied to the embedding."""

    def __init__(self, vocab: int = 97, width: int = 32, depth: int = 4, tie: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.body = nn.Module()
        self.body.layers = nn.ModuleList(Block(width) for _ in range(depth))
        self.body.final = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.body.layers:
            h = layer(h)
        return self.head(self.body.final(h))


def tiny_lm(dtype=torch.float32, seed: int = 0, **kwargs) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(**kwargs).to(dtype).eval()


def reference(model: nn.Module, *inputs):
    with torch.inference_mode():
        return model(*inputs)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def cached_bytes(path) -> int:
    """How many bytes of ``path`` sit in the page cache (mincore over a read-only mapping)."""
    size = os.path.getsize(path)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    with open(path, "rb") as f:
        address = libc.mmap(None, size, 1, 1, f.fileno(), 0)  # PROT_READ, MAP_SHARED
    pages = (size + 4095) // 4096
    vector = (ctypes.c_ubyte * pages)()
    rc = libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector)
    libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t(size))
    assert rc == 0, f"mincore failed with errno {ctypes.get_errno()}"
    return sum(v & 1 for v in vector) * 4096


def assert_streamed_block_by_block(model: nn.Module, no_split: set[str], more_than: int) -> None:
    """``{"": "nvme"}`` gave more than ``more_than`` groups: never the root, none above a ``no_split`` block, and
    none holding a third of the model."""
    streamed = [m for m in model.modules() if isinstance(getattr(m, "_hf_hook", None), NvmeAlignDevicesHook)]
    assert accel_nvme.stats(model).groups == len(streamed) > more_than
    for module in streamed:
        assert module is not model
        assert type(module).__name__ in no_split or not any(type(m).__name__ in no_split for m in module.modules())
    sizes = [s.nbytes for s in streamed[0]._hf_hook.prefetcher.sources]
    assert max(sizes) < sum(sizes) / 3, "no group holds the model"


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 4, **overrides):
    """A small random LlamaForCausalLM built from a config (no hub access needed); ``overrides`` go to the config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = decoder_config(
        LlamaConfig, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, **overrides
    )
    return LlamaForCausalLM(config).eval()


def tiny_ddpm_pipeline(seed: int = 0):
    """A DDPM pipeline with a small random UNet2DModel, built from components."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10))


def tiny_dit_pipeline(seed: int = 0, dtype=torch.float32):
    """A DiT pipeline (class-conditioned transformer and a VAE), small and random, built from components."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=3,
        norm_num_groups=4,
        sample_size=8,
        patch_size=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    pipe = DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=DDIMScheduler(num_train_timesteps=10))
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def run_dit(pipe, device="cpu"):
    """Two denoising steps of class 1 from a fixed seed, as a numpy array."""
    generator = torch.Generator(device).manual_seed(0)
    return pipe(class_labels=[1], num_inference_steps=2, generator=generator, output_type="np").images


def adapter_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of a peft model's adapter weights, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def adamw_losses(model: nn.Module, ids: torch.Tensor, steps: int = 3) -> list[torch.Tensor]:
    """Losses of ``steps`` AdamW steps (lr 1e-2) on ``model``'s trainable parameters, ``ids`` as inputs and labels."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses
