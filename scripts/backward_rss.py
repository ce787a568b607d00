"""Peak RSS of one forward+backward through N streamed blocks of ~4 MiB, each run in a fresh process.

    python scripts/backward_rss.py --blocks 2 4 8 [--trainable] [--json]

Each run builds ``nn.Sequential`` of N ``Linear(1024, 1024)`` blocks (fp32, 4 MiB each), maps every block to
``"nvme"``, runs one warm-up forward under ``no_grad``, resets the peak RSS (``/proc/self/clear_refs``), then runs a
forward with an input that requires grad and a backward, and reports the peak RSS above the RSS before that step.
glibc is told to return freed memory at once (``MALLOC_MMAP_THRESHOLD_``), so freed weights cannot hide new ones.
``--trainable`` leaves the streamed weights with ``requires_grad=True`` (the default of a loaded model); without it
they are frozen, as peft freezes a base model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

WIDTH = 1024
BLOCK_BYTES = WIDTH * WIDTH * 4 + WIDTH * 4


def _kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def measure(blocks: int, trainable: bool) -> dict:
    """In this process: the peak RSS growth (bytes) of one forward+backward, and whether the input gradient is exact."""
    import torch
    from torch import nn

    import accel_nvme

    torch.manual_seed(0)
    torch.set_num_threads(1)

    def build() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(blocks)]).requires_grad_(trainable)

    x = torch.randn(4, WIDTH)
    reference = build()
    expected_input = x.clone().requires_grad_(True)
    reference(expected_input).square().sum().backward()
    del reference
    with tempfile.TemporaryDirectory() as folder:
        model = accel_nvme.dispatch_model(build(), {str(i): "nvme" for i in range(blocks)}, offload_dir=folder)
        with torch.no_grad():
            model(x)
        streamed = x.clone().requires_grad_(True)
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset VmHWM to the current RSS
        before = _kib("VmRSS")
        model(streamed).square().sum().backward()
        peak = _kib("VmHWM")
        accel_nvme.close(model, load_back=False)
    return {
        "blocks": blocks,
        "trainable": trainable,
        "block_bytes": BLOCK_BYTES,
        "peak_growth_bytes": (peak - before) * 1024,
        "input_grad_exact": bool(torch.equal(streamed.grad, expected_input.grad)),
    }


def run(blocks: int, trainable: bool) -> dict:
    """``measure`` in a fresh Python process (its own peak RSS)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    command = [sys.executable, __file__, "--child", str(blocks)] + (["--trainable"] if trainable else [])
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stdout}{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--trainable", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.trainable)))
        return
    rows = [run(n, args.trainable) for n in args.blocks]
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'blocks':>6} {'streamed MB':>11} {'peak RSS growth MB':>18} {'input grad exact':>16}")
    for row in rows:
        streamed, growth = row["blocks"] * row["block_bytes"] / 1e6, row["peak_growth_bytes"] / 1e6
        print(f"{row['blocks']:>6} {streamed:>11.1f} {growth:>18.1f} {row['input_grad_exact']!s:>16}")


if __name__ == "__main__":
    main()
