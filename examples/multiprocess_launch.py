"""Several processes, one offload folder: ``accelerate launch`` with every process loading onto the nvme tier.

What it shows: each process of an ``accelerate launch`` run calls ``from_pretrained(..., offload_backend="nvme",
offload_folder=DIR)`` with the SAME ``DIR``. They serialise on a lock file per set of weights: the first writes the
group files (into a temporary folder, renamed into place when complete), the others wait and then reuse them, so
the folder ends up holding one copy however many processes there are. Each process then generates and checks its
tokens against the same model loaded fully in RAM.

By default rank 0 builds a tiny random Llama from a config (no download) next to the offload folder, and the others
wait for it (``PartialState().wait_for_everyone()``) before loading. Two processes on CPUs (a few seconds each)::

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        examples/multiprocess_launch.py --offload-folder /tmp/accel-nvme-shared

``--multi_gpu`` is what makes ``accelerate launch`` start one process per ``--num_processes`` (through torchrun);
on a machine without GPUs each process runs on the CPU with the gloo backend (``PartialState(cpu=True)``). With
``--cpu`` instead, accelerate 1.x starts a single process. The script also runs as a single plain process
(``python examples/multiprocess_launch.py --offload-folder DIR``).

With a real model (a hub id or a local folder; every process holds its own CPU share of it)::

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        examples/multiprocess_launch.py --model Qwen/Qwen2.5-0.5B --offload-folder /mnt/nvme/offload --cpu-budget 200MB

(no in-RAM comparison for a real model unless ``--compare`` is given).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import accel_nvme
from accel_nvme.store import FOLDER_PREFIX


def build_tiny_llama(path: Path) -> None:
    """Save a tiny random LlamaForCausalLM (6 layers, seed 0) built from a config to ``path``."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).eval().save_pretrained(path)


def generate(model, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy generation on the CPU (deterministic, so offloaded and in-RAM tokens can be compared)."""
    with torch.inference_mode():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, top_p=None
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of this example."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--offload-folder", required=True, help="the folder every process loads into")
    parser.add_argument(
        "--model", help="hub id or local path (default: a tiny random Llama, built by rank 0 next to the folder)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--cpu-budget", default="20KB", help="max_memory for the CPU (default: 20KB: all on nvme)")
    parser.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also generate with the model fully in RAM and check the tokens are identical (default: tiny model only)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build (rank 0), load into the shared folder (all ranks), generate and check; returns the exit status."""
    args = parse_args(argv)
    # cpu=True where there is no GPU: without it, accelerate treats a torchrun-started CPU process as not distributed.
    state = PartialState(cpu=not torch.cuda.is_available())
    rank = f"rank {state.process_index}/{state.num_processes}"
    offload_folder = Path(args.offload_folder).resolve()
    compare = args.model is None if args.compare is None else args.compare

    checkpoint = args.model
    if checkpoint is None:
        checkpoint = str(offload_folder.with_name(offload_folder.name + "-tiny-llama"))
        if state.is_main_process and not (Path(checkpoint) / "config.json").exists():
            build_tiny_llama(Path(checkpoint))
        state.wait_for_everyone()  # the others read the checkpoint only once rank 0 has written it

    # All processes at once, into the same folder: one writes the group files, the others wait on its lock and reuse.
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint,
        device_map="auto",
        max_memory={"cpu": args.cpu_budget},
        offload_backend="nvme",
        offload_folder=str(offload_folder),
    )
    tiers = list(
        (getattr(model, "nvme_device_map", None) or getattr(model, "hf_device_map", None) or {"": "cpu"}).values()
    )
    ids = torch.arange(3, 11).reshape(1, 8) + state.process_index  # a different prompt per process
    tokens = generate(model, ids, args.max_new_tokens)
    streamed = accel_nvme.stats(model).total.bytes_read if "nvme" in tiers else 0
    print(
        f"{rank}: {tiers.count('nvme')} of {len(tiers)} device_map entries on nvme, "
        f"tokens {tokens[0].tolist()}, {streamed / 1e6:.2f} MB streamed",
        flush=True,
    )
    ok = True
    if compare:
        identical = torch.equal(
            tokens, generate(AutoModelForCausalLM.from_pretrained(checkpoint).eval(), ids, args.max_new_tokens)
        )
        ok &= identical
        print(f"{rank}: identical to in-RAM: {identical}", flush=True)

    state.wait_for_everyone()
    if state.is_main_process:
        folders = [
            p.name for p in offload_folder.iterdir() if p.name.startswith(FOLDER_PREFIX) and ".tmp-" not in p.name
        ]
        leftovers = [p.name for p in offload_folder.iterdir() if ".tmp-" in p.name]
        print(f"{rank}: weight folders in {offload_folder}: {folders}, temporary leftovers: {leftovers}", flush=True)
        if args.model is None and "nvme" in tiers:
            shared = len(folders) == 1 and not leftovers
            ok &= shared
            print(f"one shared set of group files: {shared}", flush=True)
    state.wait_for_everyone()
    state.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
