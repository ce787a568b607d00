"""The MoE decode bench's model and one mode in its process: a synthetic Qwen3-MoE checkpoint, greedy decoding timed
token by token, and the bytes each decode token read (``python -m accel_nvme.bench.moe --mode ...``).

Modes: ``ram`` (no offload: the compute floor and the reference for exactness), ``raw_direct`` (no compute: the
checkpoint's shards read with O_DIRECT, the disk's rate), ``accelerate_disk`` (transformers' own disk offload), ``nvme``
(per-expert reads with the expert cache), ``nvme_nocache`` (``expert_cache_bytes=0``) and ``nvme_blocks``
(``expert_streaming=False``: experts stream whole with their block).
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from accel_nvme.bench.probes import drop_page_cache, proc_status_mb, reset_peak_rss
from accel_nvme.bench.worker import worker_arguments

logger = logging.getLogger(__name__)

MOE_MODES = ("ram", "raw_direct", "accelerate_disk", "nvme", "nvme_nocache", "nvme_blocks")
MOE_VOCAB = 1024
MOE_HIDDEN = 512  # with moe_intermediate 256 and 64 experts: ~100 MB a layer, so whole-block staging fits 1.2 GB


@dataclass(frozen=True)
class MoeShape:
    """The synthetic Qwen3MoeForCausalLM: ``experts`` experts of which ``top_k`` run per token, fp32, untied head."""

    hidden: int = MOE_HIDDEN
    layers: int = 20
    experts: int = 64
    top_k: int = 4
    vocab: int = MOE_VOCAB

    @property
    def moe_intermediate(self) -> int:
        """Each expert's MLP width: half of hidden."""
        return self.hidden // 2

    @property
    def heads(self) -> int:
        """Attention heads of 64 (8 at least); KV heads are a quarter of them."""
        return max(8, self.hidden // 64)

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert of one layer: gate_up [2I, H] and down [H, I]."""
        return 3 * self.moe_intermediate * self.hidden * 4

    @property
    def dense_layer_bytes(self) -> int:
        """Bytes of one layer but its experts: q, k, v, o, q/k norms, router and two norms."""
        head_dim, kv = self.hidden // self.heads, self.heads // 4
        attention = 2 * self.hidden * self.heads * head_dim + 2 * self.hidden * kv * head_dim + 2 * head_dim
        return (attention + self.experts * self.hidden + 2 * self.hidden) * 4

    @property
    def dense_bytes(self) -> int:
        """Bytes of everything but the experts: the layers' dense parts, embeddings, final norm and head."""
        return self.layers * self.dense_layer_bytes + (2 * self.vocab * self.hidden + self.hidden) * 4

    @property
    def model_bytes(self) -> int:
        """Bytes of all tensors."""
        return self.dense_bytes + self.layers * self.experts * self.expert_bytes

    @property
    def needed_bytes_per_token(self) -> int:
        """What a decode token needs at the least: the dense part and ``top_k`` experts per layer."""
        return self.dense_bytes + self.layers * self.top_k * self.expert_bytes

    @classmethod
    def for_size(cls, size_bytes: int, hidden: int = MOE_HIDDEN, experts: int = 64, top_k: int = 4) -> MoeShape:
        """The shape of about ``size_bytes`` at ``hidden``: as many layers as reach it (one at least)."""
        layer = cls(hidden=hidden, layers=1, experts=experts, top_k=top_k)
        per_layer = layer.model_bytes - (layer.dense_bytes - layer.dense_layer_bytes)
        return cls(hidden=hidden, layers=max(1, round(size_bytes / per_layer)), experts=experts, top_k=top_k)


@dataclass(frozen=True)
class DecodeConfig:
    """The MoE decode bench: the model's shape, the prompt, the tokens generated per run and the timed runs; the
    expert cache of the ``nvme`` mode; the model's seed."""

    shape: MoeShape = MoeShape()
    prompt_tokens: int = 8
    new_tokens: int = 16
    runs: int = 1
    expert_cache_bytes: int = 256 << 20
    seed: int = 0

    @classmethod
    def from_json(cls, entry: dict) -> DecodeConfig:
        """The config of a JSON entry (``asdict`` of one)."""
        return cls(**{**entry, "shape": MoeShape(**entry["shape"])})


def _qwen3_moe_config(shape: MoeShape):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.hidden * 2,
        moe_intermediate_size=shape.moe_intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads // 4,
        head_dim=shape.hidden // shape.heads,
        num_experts=shape.experts,
        num_experts_per_tok=shape.top_k,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def write_moe_checkpoint(shape: MoeShape, folder: Path, seed: int = 0) -> int:
    """Build the model with random weights (seeded) and save it to ``folder`` as transformers does; returns its
    bytes. The model is in RAM while it is written (before any squeeze)."""
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(_qwen3_moe_config(shape)).eval()
    model.save_pretrained(folder, max_shard_size="200MB")
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if nbytes != shape.model_bytes:
        raise RuntimeError(f"the synthetic Qwen3-MoE has {nbytes} bytes, its shape says {shape.model_bytes}")
    return nbytes


def prompt(config: DecodeConfig, run: int) -> torch.Tensor:
    """The prompt of timed run ``run`` (-1: the warm-up), each its own so the expert cache starts no warmer."""
    generator = torch.Generator().manual_seed(config.seed + 1000 + run)
    return torch.randint(3, config.shape.vocab, (1, config.prompt_tokens), generator=generator)


class _Clock:
    """A generate streamer recording when each token arrives (the first ``put`` is the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def load(mode: str, checkpoint: Path, folder: Path, config: DecodeConfig):
    """The model of ``mode`` loaded by ``from_pretrained`` the way a user would."""
    from transformers import AutoModelForCausalLM

    import accel_nvme  # noqa: F401  (teaches from_pretrained offload_backend="nvme")

    offload = {"device_map": "auto", "max_memory": {"cpu": "20KB"}, "offload_folder": str(folder)}
    if mode == "ram":
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.data = tensor.data.clone()  # from_pretrained leaves them mapped from the checkpoint
        return model
    if mode != "accelerate_disk":
        cache = 0 if mode == "nvme_nocache" else config.expert_cache_bytes
        offload |= {"offload_backend": "nvme", "nvme_expert_cache_bytes": cache}
        offload |= {"nvme_expert_streaming": mode != "nvme_blocks"}
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, **offload).eval()


def _generate(model, ids: torch.Tensor, new_tokens: int, clock: _Clock | None = None):
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        streamer=clock,
        return_dict_in_generate=True,
        output_logits=True,
    )


def _stream_figures(model, first: int) -> dict:
    """nvme modes: per decode token (forwards after ``first``, the prefill), the bytes read, the expert bytes (those
    read ahead and not routed too, also apart), the expert cache hit rate."""
    import accel_nvme

    decode = accel_nvme.stats(model).forwards[first + 1 :]
    hits = sum(f.expert_cache_hits for f in decode)
    routed = hits + sum(f.expert_cache_misses for f in decode)
    return {
        "bytes_per_token": sum(f.bytes_read for f in decode) / len(decode),
        "expert_bytes_per_token": sum(f.expert_bytes_read for f in decode) / len(decode),
        "unused_expert_bytes_per_token": sum(f.expert_bytes_unused for f in decode) / len(decode),
        "expert_cache_hit_rate": hits / routed if routed else None,
    }


def _decode_run(model, mode: str, config: DecodeConfig, run: int, folders: list[Path]) -> tuple[dict, dict]:
    """One timed greedy generate after the page cache is dropped: its figures, and its tokens and logits."""
    import accel_nvme

    first = len(accel_nvme.stats(model).forwards) if mode.startswith("nvme") else 0
    drop_page_cache(folders)
    clock, faults = _Clock(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    out = _generate(model, prompt(config, run), config.new_tokens, clock)
    decode_s = clock.times[-1] - clock.times[1]  # from the prefill's token to the last
    figures = {
        "decode_tokens": len(clock.times) - 2,
        "decode_s": decode_s,
        "tokens_per_s": (len(clock.times) - 2) / decode_s,
        "major_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults,
    }
    if mode.startswith("nvme"):
        figures |= _stream_figures(model, first)
    return figures, {"tokens": out.sequences, "logits": torch.stack(out.logits)}


def _raw_runs(config: DecodeConfig, folder: Path, checkpoint: Path) -> list[dict]:
    """``raw_direct``: read the checkpoint's shards with O_DIRECT, cold, once per run: the disk's read rate."""
    from accel_nvme.bench.setups import setup_raw_direct

    read_all = setup_raw_direct(None, folder, checkpoint)
    nbytes = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    runs = []
    for _ in range(config.runs):
        drop_page_cache([checkpoint])
        start = time.perf_counter()
        read_all(None)
        seconds = time.perf_counter() - start
        runs.append({"read_bytes": nbytes, "read_s": seconds, "gb_per_s": nbytes / seconds / 1e9})
    return runs


def run_mode(mode: str, config: DecodeConfig, folder: Path, checkpoint: Path, outputs: Path) -> dict:
    """``mode`` in this process: load, a short warm-up generate, then ``config.runs`` timed ones; the mode's JSON."""
    start = time.perf_counter()
    if mode == "raw_direct":
        return {"mode": mode, "status": "ok", "runs": _raw_runs(config, folder, checkpoint)}
    with torch.inference_mode():
        model = load(mode, checkpoint, folder, config)
        setup_s, rss = time.perf_counter() - start, proc_status_mb("VmRSS")
        setup_peak, reset = proc_status_mb("VmHWM") or 0.0, reset_peak_rss()
        _generate(model, prompt(config, -1), 2)  # code paths paged in; nvme records its order
        measured = [_decode_run(model, mode, config, run, [folder, checkpoint]) for run in range(config.runs)]
    torch.save([kept for _, kept in measured], outputs)
    forward_peak = proc_status_mb("VmHWM") if reset else None
    return {
        "mode": mode,
        "status": "ok",
        "setup_s": setup_s,
        "rss_after_setup_mb": rss,
        "peak_rss_mb": max(setup_peak, forward_peak or 0.0),
        "runs": [figures for figures, _ in measured],
    }


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m accel_nvme.bench.moe`` (started by ``accel-nvme bench --model moe``)."""
    description = "One accel-nvme MoE decode bench mode."
    args = worker_arguments(argv, description, {"choices": MOE_MODES}, {"required": True})
    config = DecodeConfig.from_json(json.loads(args.config))
    args.json_out.write_text(json.dumps(run_mode(args.mode, config, args.folder, args.checkpoint, args.outputs)))


def config_json(config: DecodeConfig) -> dict:
    """``config`` as the report's JSON: its fields and the model's sizes."""
    shape = config.shape
    sizes = {"model_bytes": shape.model_bytes, "dense_bytes": shape.dense_bytes, "expert_bytes": shape.expert_bytes}
    return asdict(config) | sizes | {"needed_bytes_per_token": shape.needed_bytes_per_token}


if __name__ == "__main__":
    main()
