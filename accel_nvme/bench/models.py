"""The two synthetic models: a Sequential of fp32 Linear layers built in RAM, and a Llama checkpoint written shard by
shard to disk; their inputs, and the files the raw modes read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from accel_nvme.bench.config import BenchConfig, LlamaShape


def build_model(config: BenchConfig):
    """The synthetic Sequential of Linear layers, with weights fixed by ``config.seed``, stored in
    ``config.storage_dtype`` and computed in fp32."""
    import torch

    torch.manual_seed(config.seed)
    model = torch.nn.Sequential(*(torch.nn.Linear(config.hidden, config.hidden) for _ in range(config.layers)))
    if config.storage_dtype != "float32":
        dtype = getattr(torch, config.storage_dtype)
        for layer in model:
            layer.to(dtype).__class__ = StoredLinear
    return model


class StoredLinear(torch.nn.Linear):
    """A Linear stored in a small dtype and computed in its input's dtype (fp32), as diffusers' layerwise casting."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


def make_input(config: BenchConfig, batch: int):
    """The input of a forward at ``batch``: rows of hidden states, or ``batch`` token ids for the Llama."""
    import torch

    generator = torch.Generator().manual_seed(config.seed + batch)
    if config.from_pretrained:
        return torch.randint(3, config.llama_shape.vocab, (1, batch), generator=generator)
    return torch.randn(batch, config.hidden, generator=generator)


def write_layer_files(config: BenchConfig, folder: Path) -> list[Path]:
    """Write each Linear layer's weight and bias as one file, as the raw modes read them."""
    model = build_model(config)
    paths = []
    for i, layer in enumerate(model):
        path = folder / f"layer_{i:03d}.bin"
        with open(path, "wb") as f:
            f.write(layer.weight.detach().view(torch.uint8).numpy().tobytes())
            f.write(layer.bias.detach().view(torch.uint8).numpy().tobytes())
            os.fsync(f.fileno())
        paths.append(path)
    return paths


def data_files(config: BenchConfig, folder: Path, checkpoint: Path | None) -> list[Path]:
    """What the raw modes read: the checkpoint's shards, or layer files written for the Linear model."""
    if checkpoint is not None:
        return sorted(checkpoint.glob("*.safetensors"))
    return write_layer_files(config, folder)


def _llama_config(shape: LlamaShape):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.hidden // 128,
        num_key_value_heads=shape.hidden // 128,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype="float32",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _shard_of(name: str) -> str:
    if name.startswith("model.layers."):
        return f"layer-{int(name.split('.')[2]):05d}"
    return "embed" if name.startswith("model.embed_tokens") else "head"


def _random_tensor(name: str, meta, generator):
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(meta.shape, dtype=meta.dtype)
    return torch.empty(meta.shape, dtype=meta.dtype).normal_(0, 0.02, generator=generator)


def write_llama_checkpoint(shape: LlamaShape, folder: Path, seed: int = 0, storage_dtype: str = "float32") -> int:
    """Write a random LlamaForCausalLM checkpoint of ``shape`` to ``folder`` in ``storage_dtype`` (loaded as fp32),
    one shard per decoder layer.

    Names and shapes come from a meta-device model; each shard's tensors are generated, saved and freed before the
    next, so RAM holds one shard at a time. Returns the bytes of all tensors.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    config = _llama_config(shape)
    config.save_pretrained(folder)
    with torch.device("meta"):
        tensors = LlamaForCausalLM(config).state_dict()
    shards = {shard: [n for n in tensors if _shard_of(n) == shard] for shard in dict.fromkeys(map(_shard_of, tensors))}
    files = {shard: f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, shard in enumerate(shards)}
    weight_map = {name: files[shard] for shard, names in shards.items() for name in names}
    generator = torch.Generator().manual_seed(seed)
    total = 0
    with tqdm(
        total=shape.model_bytes, unit="B", unit_scale=True, desc="writing synthetic weights", disable=None
    ) as bar:
        for shard, names in shards.items():
            data = {name: _random_tensor(name, tensors[name], generator) for name in names}
            data = {name: t.to(getattr(torch, storage_dtype)) for name, t in data.items()}
            nbytes = sum(t.numel() * t.element_size() for t in data.values())
            save_file(data, str(folder / files[shard]), metadata={"format": "pt"})
            del data
            total += nbytes
            bar.update(nbytes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


def load_llama(checkpoint: Path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` of the synthetic checkpoint, fp32, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, **kwargs).eval()


def logits(model, ids):
    """The Llama's forward as the bench times it: logits, no KV cache."""
    return model(ids, use_cache=False).logits
