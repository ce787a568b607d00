"""Generate text with a transformers causal LM whose decoder layers stream from the nvme tier.

What it shows: ``AutoModelForCausalLM.from_pretrained(..., device_map="auto", max_memory={"cpu": BUDGET},
offload_backend="nvme", offload_folder=DIR)`` after ``import accel_nvme``. Whatever does not fit the CPU budget
(by default almost everything) is written once into aligned group files under ``DIR`` and read back, ahead of use,
on every forward. The script prints the generated token ids (and text, when the model has a tokenizer), how many
modules landed on each tier, and ``accel_nvme.stats(model).total``.

Run it on a tiny random Llama built from a config (no download; the default, a few seconds on a CPU). It also
generates with the same model loaded fully in RAM and checks that the tokens are identical::

    python examples/generate_llm.py
    python examples/generate_llm.py --offload-folder /mnt/nvme/offload --max-new-tokens 16

or on a real model (a hub id or a local folder), with a CPU budget that leaves most layers on the drive::

    python examples/generate_llm.py --model Qwen/Qwen2.5-0.5B --prompt "The capital of France is" \\
        --offload-folder /mnt/nvme/offload --cpu-budget 200MB --dtype bfloat16

``--offload-folder`` may be left out when ``ACCEL_NVME_OFFLOAD_FOLDER`` or ``accel-nvme config`` names one (with the
tiny default model a temporary folder is used). ``--compare`` also checks a real model against an in-RAM copy (it
needs the RAM for the whole model).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import accel_nvme  # makes "nvme" a tier that from_pretrained(..., offload_backend="nvme") understands

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_tiny_llama(path: Path) -> Path:
    """Save a tiny random LlamaForCausalLM (8 layers, seed 0) built from a config to ``path`` and return it."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).eval().save_pretrained(path)
    return path


def generate(model, ids: torch.Tensor, max_new_tokens: int, device: str = "cpu") -> torch.Tensor:
    """Greedy generation (deterministic, so an offloaded and an in-RAM model can be compared token for token).

    ``device`` is where the prompt goes: ``model.device`` is no guide, since the weights of modules on the nvme tier
    sit on the meta device between forwards.
    """
    ids = ids.to(device)
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, top_p=None
        )
    return out.cpu()


def load_tokenizer(model: str | None):
    """The model's tokenizer, or None (the tiny default model and checkpoints without one)."""
    if model is None:
        return None
    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError):
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of this example."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="hub id or local path (default: a tiny random Llama built from a config)")
    parser.add_argument("--offload-folder", help="folder for the group files (put it on the fastest drive)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument(
        "--cpu-budget", default="400KB", help="max_memory for the CPU; what does not fit goes to nvme (default: 400KB)"
    )
    parser.add_argument("--gpu-budget", help="max_memory for GPU 0 when CUDA is available (default: no GPU)")
    parser.add_argument(
        "--prompt-ids", default="1 17 42 99 7 3", help="prompt as token ids separated by spaces or commas"
    )
    parser.add_argument("--prompt", help="prompt text (needs a model with a tokenizer; wins over --prompt-ids)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto")
    parser.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also generate with the model fully in RAM and check the tokens are identical (default: tiny model only)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Load, generate, report; returns the exit status (1 when a comparison found different tokens)."""
    args = parse_args(argv)
    compare = args.model is None if args.compare is None else args.compare
    with tempfile.TemporaryDirectory(prefix="accel-nvme-example-") as scratch:
        checkpoint = args.model or str(build_tiny_llama(Path(scratch) / "tiny-llama"))
        offload_folder = args.offload_folder
        if offload_folder is None and args.model is None:
            offload_folder = str(Path(scratch) / "offload")
        tokenizer = load_tokenizer(args.model)
        if args.prompt is not None:
            if tokenizer is None:
                sys.exit("--prompt needs a model with a tokenizer; use --prompt-ids")
            ids = tokenizer(args.prompt, return_tensors="pt").input_ids
        else:
            ids = torch.tensor([[int(t) for t in args.prompt_ids.replace(",", " ").split()]])

        max_memory = {"cpu": args.cpu_budget}
        device = "cpu"
        if args.gpu_budget and torch.cuda.is_available():
            max_memory[0], device = args.gpu_budget, "cuda:0"
        folder_kwargs = {} if offload_folder is None else {"offload_folder": offload_folder}
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint,
            device_map="auto",
            max_memory=max_memory,
            dtype=DTYPES[args.dtype],
            offload_backend="nvme",
            **folder_kwargs,
        )
        # nvme_device_map: hf_device_map with the nvme entries named so (set only when some module is on the tier)
        device_map = getattr(model, "nvme_device_map", None) or getattr(model, "hf_device_map", None) or {"": "cpu"}
        tiers = list(device_map.values())
        print(f"model: {args.model or 'tiny random Llama (built from a config)'}")
        print(f"offload folder: {offload_folder or '(from ACCEL_NVME_OFFLOAD_FOLDER / accel-nvme config)'}")
        counts = ", ".join(f"on {tier}: {tiers.count(tier)}" for tier in sorted(set(tiers), key=str))
        print(f"device_map entries: {len(tiers)} ({counts})")
        print(f"not on nvme: {[name for name, tier in device_map.items() if tier != 'nvme'][:8]}")

        tokens = generate(model, ids, args.max_new_tokens, device)
        print(f"generated token ids: {tokens[0].tolist()}")
        if tokenizer is not None:
            print(f"generated text: {tokenizer.decode(tokens[0], skip_special_tokens=True)!r}")

        if "nvme" in tiers:  # stats() raises for a model with nothing on the tier (a budget that fits it all)
            s = accel_nvme.stats(model)
            t = s.total
            print(
                f"nvme stream: {s.groups} groups ({len(s.resident)} resident), {len(s.forwards)} forwards, "
                f"{t.groups_read} group reads, {t.bytes_read / 1e6:.2f} MB read in {t.read_seconds:.3f} s "
                f"({t.gb_per_s:.2f} GB/s), compute waited {t.stall_seconds:.3f} s, overlap {t.overlap:.0%}"
            )

        if compare:
            in_ram = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=DTYPES[args.dtype]).eval()
            identical = torch.equal(tokens, generate(in_ram, ids, args.max_new_tokens))
            print(f"identical to in-RAM: {identical}")
            if not identical:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
