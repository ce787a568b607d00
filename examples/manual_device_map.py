"""Dispatch a plain ``nn.Module`` by hand with a device_map that mixes ``"cpu"`` and ``"nvme"``.

What it shows: ``accel_nvme.dispatch_model(model, device_map, offload_dir=DIR, main_device="cpu")`` on a model of
your own (an embedding, a stack of residual blocks, a final norm and a head). Every device_map entry mapped to
``"nvme"`` becomes one group file under ``DIR``; its weights leave RAM and are read back, ahead of use, by background
threads on every forward. Options go in an ``accel_nvme.NvmeConfig``. The script runs a few forwards, checks each
output is ``torch.equal`` to the model without offload, and prints ``accel_nvme.stats(model)``.

Run it (no download, a couple of seconds on a CPU)::

    python examples/manual_device_map.py
    python examples/manual_device_map.py --offload-folder /mnt/nvme/offload --width 1024 --depth 12 --forwards 5

By default even-numbered blocks and the head stream from the drive, the embedding, odd blocks and the norm stay in RAM.
``--nvme-blocks`` picks the streamed blocks (``--nvme-blocks all``, ``--nvme-blocks 0 1 2``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import accel_nvme


class Block(nn.Module):
    """A pre-norm residual MLP block."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` plus the MLP of its normalised self."""
        return x + self.mlp(self.norm(x))


class TinyModel(nn.Module):
    """Token embedding, ``depth`` residual blocks, a final norm and a linear head."""

    def __init__(self, vocab: int, width: int, depth: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(*ids.shape, vocab)``."""
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def build(args: argparse.Namespace) -> TinyModel:
    """The model with seeded random weights (call twice for two identical copies)."""
    torch.manual_seed(args.seed)
    return TinyModel(args.vocab, args.width, args.depth).eval()


def make_device_map(depth: int, nvme_blocks: list[int]) -> dict[str, str]:
    """A device_map with one entry per top-level piece: the chosen blocks and the head on nvme, the rest on cpu."""
    device_map = {"embed": "cpu"}
    device_map.update({f"blocks.{i}": "nvme" if i in nvme_blocks else "cpu" for i in range(depth)})
    device_map.update({"norm": "cpu", "head": "nvme"})
    return device_map


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of this example."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--offload-folder", help="folder for the group files (default: a temporary folder)")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--forwards", type=int, default=3, help="forwards to run and check (default: 3)")
    parser.add_argument("--nvme-blocks", nargs="+", default=None, help="blocks on nvme: indices or 'all'")
    parser.add_argument("--prefetch-depth", type=int, default=2, help="groups read ahead of the one in use")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Dispatch, run, check, report; returns the exit status (1 when an output differs)."""
    args = parse_args(argv)
    if args.nvme_blocks is None:
        nvme_blocks = list(range(0, args.depth, 2))
    elif args.nvme_blocks == ["all"]:
        nvme_blocks = list(range(args.depth))
    else:
        nvme_blocks = [int(i) for i in args.nvme_blocks]
    device_map = make_device_map(args.depth, nvme_blocks)

    reference = build(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed))
    with tempfile.TemporaryDirectory(prefix="accel-nvme-example-") as scratch:
        offload_folder = args.offload_folder or str(Path(scratch) / "offload")
        config = accel_nvme.NvmeConfig(offload_dir=offload_folder, prefetch_depth=args.prefetch_depth)
        model = accel_nvme.dispatch_model(build(args), device_map, main_device="cpu", config=config)
        on_nvme = [name for name, tier in device_map.items() if tier == "nvme"]
        print(f"offload folder: {offload_folder}")
        print(f"device_map: {device_map}")
        print(f"on nvme: {len(on_nvme)} of {len(device_map)} entries ({on_nvme})")
        print(f"head.weight between forwards: on {model.head.weight.device} (its bytes live in a group file)")

        all_equal = True
        with torch.inference_mode():
            for i in range(args.forwards):
                equal = torch.equal(model(ids), reference(ids))
                all_equal &= equal
                print(f"forward {i}: torch.equal to the model without offload: {equal}")

        s = accel_nvme.stats(model)
        for i, f in enumerate(s.forwards):
            print(
                f"forward {i}: {f.groups_read} groups, {f.bytes_read / 1e6:.2f} MB read in "
                f"{f.read_seconds * 1e3:.1f} ms, compute waited {f.stall_seconds * 1e3:.1f} ms, overlap {f.overlap:.0%}"
            )
        t = s.total
        print(
            f"total: {s.groups} groups, {t.bytes_read / 1e6:.2f} MB read at {t.gb_per_s:.2f} GB/s, "
            f"overlap {t.overlap:.0%}"
        )
        print(f"identical to in-RAM: {all_equal}")
    return 0 if all_equal else 1


if __name__ == "__main__":
    sys.exit(main())
