"""Issue 23's table: load time, first forward and extra disk of transformers' disk offload and of the nvme tier
streaming in place (``copy=False``) and copying (``copy=True``), first load and reuse of the folder.

Each run is its own process, which imports everything (the Llama modules too), drops the page cache (``sync; echo 3 >
/proc/sys/vm/drop_caches``: needs root), then times ``from_pretrained(device_map="auto", max_memory={"cpu": "50MB"},
offload_folder=...)`` and a first forward of 16 tokens. nvme runs then time three warm forwards and a raw O_DIRECT read
of the same byte ranges (same reader, same threads, group after group): the I/O bound of a forward.

    python scripts/inplace_table.py --folder /work/inplace-bench --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("disk", "inplace_first", "inplace_reuse", "copy_first", "copy_reuse")
TOKENS = 16


def prepare(checkpoint: Path) -> None:
    """A random fp32 Llama of 2.06 GB saved by ``save_pretrained`` in 5 shards (once)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (checkpoint / "config.json").exists():
        return
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=35,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    LlamaForCausalLM(config).save_pretrained(checkpoint, max_shard_size="450MB")


def disk_bytes(folder: Path) -> int:
    return sum(os.lstat(Path(root, name)).st_blocks * 512 for root, _, files in os.walk(folder) for name in files)


def run(mode: str, checkpoint: Path, offload: Path) -> dict:
    """One measurement, in this process (called in a child)."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (imports are not what is measured)
    from transformers import AutoModelForCausalLM

    import accel_nvme
    from accel_nvme.io import FileReader
    from accel_nvme.staging import StagingBuffer

    nvme = {} if mode == "disk" else {"offload_backend": "nvme", "nvme_copy": mode.startswith("copy")}
    ids = torch.randint(3, 32000, (1, TOKENS), generator=torch.Generator().manual_seed(0))
    subprocess.run("sync; echo 3 > /proc/sys/vm/drop_caches", shell=True, check=True)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, device_map="auto", max_memory={"cpu": "50MB"}, offload_folder=str(offload), **nvme
    )
    loaded = time.perf_counter()
    with torch.inference_mode():
        model(ids)
    result = {
        "mode": mode,
        "load_s": loaded - start,
        "first_forward_s": time.perf_counter() - loaded,
        "extra_disk_bytes": disk_bytes(offload),
        "loadavg": os.getloadavg()[0],
    }
    if mode != "disk":
        warm = []
        with torch.inference_mode():
            for _ in range(3):
                t = time.perf_counter()
                model(ids)
                warm.append(time.perf_counter() - t)
        sources = accel_nvme.stats(model)
        prefetcher = model.model.layers[0]._hf_hook.prefetcher
        reader = FileReader("on", prefetcher.reader.io_threads, prefetcher.reader.request_bytes)
        buffer = StagingBuffer(max(s.nbytes for s in prefetcher.sources))
        t = time.perf_counter()
        for source in prefetcher.sources:
            for future in reader.submit(list(source.segments), buffer):
                future.result()
        raw = time.perf_counter() - t
        reader.close()
        streamed = sum(s.nbytes for s in prefetcher.sources)
        result.update(warm_forward_s=min(warm), raw_read_s=raw, streamed_bytes=streamed, groups=sources.groups)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, required=True, help="holds the checkpoint and the offload folders")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    checkpoint = args.folder / "llama"
    if args.run:
        offload = args.folder / f"offload-{args.run.split('_')[0]}"
        print(json.dumps(run(args.run, checkpoint, offload)))
        return
    args.folder.mkdir(parents=True, exist_ok=True)
    prepare(checkpoint)
    ckpt_bytes = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    print(f"checkpoint {ckpt_bytes / 1e9:.2f} GB in {len(list(checkpoint.glob('*.safetensors')))} shards", flush=True)
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in MODES:
            offload = args.folder / f"offload-{mode.split('_')[0]}"
            if mode.endswith("first") or mode == "disk":
                shutil.rmtree(offload, ignore_errors=True)
            offload.mkdir(exist_ok=True)
            out = subprocess.run(
                [sys.executable, __file__, "--folder", str(args.folder), "--run", mode],
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode:
                sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results[mode].append(result)
            print(f"repeat {repeat} {json.dumps(result)}", flush=True)
    print(
        "\n| mode | load (s) | first forward, 16 tokens (s) | extra disk | warm forward / raw O_DIRECT read "
        "| load avg |"
    )
    print("|---|---|---|---|---|---|")
    for mode, runs in results.items():
        if not runs:
            continue
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "mode"}
        ratio = "-"
        if "raw_read_s" in med:
            warm, raw = med["warm_forward_s"], med["raw_read_s"]
            ratio = f"{warm:.3f} / {raw:.3f} s = {warm / raw:.2f}x"
        print(
            f"| {mode} | {med['load_s']:.2f} | {med['first_forward_s']:.2f} | "
            f"{med['extra_disk_bytes'] / 1e6:.1f} MB ({med['extra_disk_bytes'] / ckpt_bytes:.2%}) | {ratio} | "
            f"{med['loadavg']:.1f} |"
        )
    print(f"\nmedians of {args.repeats} runs; checkpoint {ckpt_bytes / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
