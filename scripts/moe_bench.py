"""Decode speed of a synthetic Qwen3-MoE checkpoint: per-expert reads against whole-block streaming and disk offload.

Builds a ``Qwen3MoeForCausalLM`` with random weights (default: 64 experts, top-4, 2 layers, ~200 MB in fp32), saves
it, and runs greedy generation in a fresh process per mode, each with the page cache of the files it reads dropped:
``experts`` (nvme, per-expert reads and the default expert cache), ``experts-nocache`` (``expert_cache_bytes=0``),
``blocks`` (nvme, ``expert_streaming=False``: experts stream whole with their block), ``disk`` (transformers' own
disk offload) and ``ram`` (no offload: the compute floor). Prints per mode: decode tokens/s, bytes read per decode
token (nvme modes) and whether the tokens equal those of the model in RAM; and the bound: bytes a token needs (dense
part + k routed experts per layer) over the raw O_DIRECT read rate of the group files. Run from the repository root:
``OMP_NUM_THREADS=1 python scripts/moe_bench.py [--layers 10]`` (one compute thread: steadier on a shared machine).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.generation.streamers import BaseStreamer

MODES = ("experts", "experts-nocache", "blocks", "disk", "ram")


class Clock(BaseStreamer):
    """The time each generated token arrives (the first ``put`` is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def build(args) -> Qwen3MoeForCausalLM:
    config = Qwen3MoeConfig(
        vocab_size=1024,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        moe_intermediate_size=args.moe_intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=args.hidden // 8,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(config).eval()


def prompt(args) -> torch.Tensor:
    return torch.randint(3, 1024, (1, args.prompt), generator=torch.Generator().manual_seed(0))


def drop_cache(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def worker(args) -> None:
    """One mode, in this process: load, generate, print a JSON line."""
    import accel_nvme

    root = Path(args.root)
    folder = root / f"offload-{args.mode}"
    options = {"device_map": "auto", "max_memory": {"cpu": "1MB"}, "offload_folder": str(folder)}
    if args.mode == "ram":
        options = {}
    elif args.mode != "disk":
        options["offload_backend"] = "nvme"
        options["nvme_expert_streaming"] = args.mode != "blocks"
        options["nvme_expert_cache_bytes"] = 0 if args.mode == "experts-nocache" else args.cache
    model = AutoModelForCausalLM.from_pretrained(root / "checkpoint", **options)
    if folder.exists():
        drop_cache(folder)
    clock = Clock()
    ids = prompt(args)
    with torch.inference_mode():
        tokens = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens, do_sample=False, streamer=clock
        )
    decode = clock.times[2:]
    row = {
        "mode": args.mode,
        "tokens_per_s": (len(decode)) / (decode[-1] - clock.times[1]),
        "equal": torch.equal(tokens, torch.load(root / "tokens.pt")),
    }
    if args.mode not in ("disk", "ram"):
        forwards = accel_nvme.stats(model).forwards[1:]
        row["bytes_per_token"] = sum(f.bytes_read for f in forwards) / len(forwards)
        row["expert_bytes_per_token"] = sum(f.expert_bytes_read for f in forwards) / len(forwards)
        row["hit_rate"] = sum(f.expert_cache_hit_rate for f in forwards) / len(forwards)
        if args.mode == "experts-nocache":
            row.update(bound_parts(model, args))
    print(json.dumps(row))


def bound_parts(model, args) -> dict:
    """The bytes one decode token needs, and the raw O_DIRECT rate of reading every group file once, cold."""
    import accel_nvme
    from accel_nvme.experts import ExpertsHook
    from accel_nvme.io import FileReader, Segment
    from accel_nvme.staging import StagingBuffer

    hooks = [m._hf_hook for m in model.modules() if isinstance(getattr(m, "_hf_hook", None), ExpertsHook)]
    prefetcher = hooks[0].prefetcher
    needed = sum(s.nbytes for s in prefetcher.sources) + sum(args.top_k * h.expert_bytes for h in hooks)
    files = [*accel_nvme.group_files(model), *(h.group.path for h in hooks)]
    drop_cache(files[0].parent)
    reader = FileReader("on", 4, 4 << 20)
    size = max(f.stat().st_size for f in files)
    buffer = StagingBuffer(size + 4096)
    total, start = 0, time.perf_counter()
    for path in files:
        length = -(-path.stat().st_size // 4096) * 4096
        for future in reader.submit([Segment(path, 0, length, 0, path.stat().st_size)], buffer):
            total += future.result()
    seconds = time.perf_counter() - start
    reader.close()
    return {"needed_bytes_per_token": needed, "raw_gb_per_s": total / seconds / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--moe-intermediate", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16, help="tokens generated (the first one is the prefill's)")
    parser.add_argument("--cache", type=int, default=256 << 20, help="expert_cache_bytes of the 'experts' mode")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        worker(args)
        return
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        model = build(args)
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
        print(f"Qwen3-MoE: {nbytes / 1e6:.0f} MB, experts {experts / nbytes:.0%}, E={args.experts}, k={args.top_k}")
        model.save_pretrained(Path(tmp) / "checkpoint")
        ids = prompt(args)
        with torch.inference_mode():
            tokens = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens, do_sample=False
            )
        torch.save(tokens, Path(tmp) / "tokens.pt")
        del model
        rows = []
        for mode in args.modes.split(","):
            command = [sys.executable, __file__, *sys.argv[1:], "--mode", mode, "--root", tmp]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]))
        bound = next((r for r in rows if "needed_bytes_per_token" in r), None)
        if bound:
            seconds = bound["needed_bytes_per_token"] / (bound["raw_gb_per_s"] * 1e9)
            print(
                f"bound: {bound['needed_bytes_per_token'] / 1e6:.1f} MB/token at {bound['raw_gb_per_s']:.2f} GB/s: "
                f"{1 / seconds:.1f} tokens/s"
            )


if __name__ == "__main__":
    main()
