"""The RAM-bound table of docs/conformance.md: each conformance class dispatched with ``{"": "nvme"}``.

Prints, per class, the group count (``accel_nvme.stats``), the largest group and the whole model in bytes (as
``accel-nvme inspect`` lists the group files), and the largest ``_no_split_modules`` block, as a Markdown table.
Run from the repository root: ``python scripts/conformance_groups.py``.
"""

import sys
import tempfile
from pathlib import Path

from accelerate.utils import compute_module_sizes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conformance_models import SPECS

import accel_nvme
from accel_nvme.maintenance import inspect_folder


def row(name: str, folder: Path) -> str:
    model = SPECS[name].build()
    total = compute_module_sizes(model)[""]
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [compute_module_sizes(m)[""] for m in model.modules() if type(m).__name__ in no_split]
    model = accel_nvme.dispatch_model(model, {"": "nvme"}, offload_dir=str(folder))
    sizes = [g["data_bytes"] for m in inspect_folder(folder)["models"] for g in m["groups"]]
    largest_block = max(blocks, default=0)
    return (
        f"| {type(model).__name__} | {accel_nvme.stats(model).groups} | {max(sizes):,} | {total:,} | "
        f"{largest_block:,} | {max(sizes) / total:.0%} |"
    )


def main() -> None:
    print("| class | groups | largest group (B) | model (B) | largest block (B) | largest / model |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in SPECS:
            print(row(name, Path(tmp) / name))


if __name__ == "__main__":
    main()
