"""Run a diffusers pipeline whose denoiser (and text encoders) stream from the nvme tier.

What it shows: ``DiffusionPipeline.from_pretrained(path, offload_backend="nvme", offload_folder=DIR)`` after
``import accel_nvme``. The components a user expects to be large (``unet*``, ``transformer*``, ``prior``, ``decoder``,
``text_encoder*``) are written once into aligned group files under ``DIR`` (one group per ``_no_split_modules`` block;
the tiny UNet2DModel declares none, so it is a single group) and streamed back on every denoising step; the VAE,
scheduler and tokenizers load as usual. ``--nvme-components`` picks the streamed ones.

Run it on a tiny random DDPM pipeline (a small UNet2DModel built from a config, no download; the default, a few
seconds on a CPU). It also runs the same pipeline loaded fully in RAM and checks the images are identical::

    python examples/diffusers_pipeline.py
    python examples/diffusers_pipeline.py --offload-folder /mnt/nvme/offload --steps 5

or on a real pipeline (a hub id or a local folder)::

    python examples/diffusers_pipeline.py --model black-forest-labs/FLUX.1-schnell --dtype bfloat16 \\
        --prompt "a lighthouse at dusk" --steps 4 --offload-folder /mnt/nvme/offload --output lighthouse.png

With a real pipeline there is no comparison unless ``--compare`` is given (it needs the RAM for the whole pipeline).
``--offload-folder`` may be left out when ``ACCEL_NVME_OFFLOAD_FOLDER`` or ``accel-nvme config`` names one.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel

import accel_nvme  # makes DiffusionPipeline.from_pretrained accept offload_backend="nvme"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_tiny_pipeline(path: Path) -> Path:
    """Save a tiny random DDPMPipeline (UNet2DModel on 8x8 images, seed 0) to ``path`` and return it."""
    torch.manual_seed(0)
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
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10)).save_pretrained(path)
    return path


def streamed_components(pipe) -> dict[str, torch.nn.Module]:
    """The pipeline's components that have modules on the nvme tier."""
    return {
        name: component
        for name, component in pipe.components.items()
        if isinstance(component, torch.nn.Module)
        and any(isinstance(getattr(m, "_hf_hook", None), accel_nvme.NvmeAlignDevicesHook) for m in component.modules())
    }


def own_allocations(pipe) -> None:
    """Give every weight of ``pipe`` an allocation of its own: diffusers may leave them as views of the memory-mapped
    checkpoint at any alignment, and CPU kernels can give other bits at another alignment (nvme serves them aligned)."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in [*component.parameters(), *component.buffers()]:
                tensor.data = tensor.data.clone()


def call_kwargs(pipe, args: argparse.Namespace) -> dict:
    """The keyword arguments this pipeline's ``__call__`` takes among the ones the command line gives."""
    kwargs = {"num_inference_steps": args.steps}
    parameters = inspect.signature(pipe.__call__).parameters
    if "prompt" in parameters:
        kwargs["prompt"] = args.prompt if args.prompt is not None else "a lighthouse at dusk"
    elif args.prompt is not None:
        print(f"note: {type(pipe).__name__} takes no prompt; --prompt is ignored")
    if "batch_size" in parameters:
        kwargs["batch_size"] = 1
    for name in ("height", "width"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs


def run(pipe, kwargs: dict, seed: int) -> np.ndarray:
    """One call of the pipeline with a fixed seed; the images as a float array (batch, height, width, channels)."""
    with torch.inference_mode():
        return np.asarray(pipe(output_type="np", generator=torch.Generator().manual_seed(seed), **kwargs).images)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of this example."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="pipeline hub id or local folder (default: a tiny random DDPM pipeline)")
    parser.add_argument("--offload-folder", help="folder for the group files (put it on the fastest drive)")
    parser.add_argument("--steps", type=int, default=3, help="denoising steps (default: 3)")
    parser.add_argument("--prompt", help="text prompt, for pipelines that take one (default: a lighthouse at dusk)")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="torch_dtype of the pipeline (default: as saved)")
    parser.add_argument(
        "--nvme-components", nargs="*", help="components to stream (default: denoiser and text encoders)"
    )
    parser.add_argument("--output", help="save the first image here (PNG)")
    parser.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run the pipeline fully in RAM and check the images are identical (default: tiny pipeline only)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Load, run, report; returns the exit status (1 when a comparison found different images)."""
    args = parse_args(argv)
    compare = args.model is None if args.compare is None else args.compare
    with tempfile.TemporaryDirectory(prefix="accel-nvme-example-") as scratch:
        path = args.model or str(build_tiny_pipeline(Path(scratch) / "tiny-ddpm"))
        offload_folder = args.offload_folder
        if offload_folder is None and args.model is None:
            offload_folder = str(Path(scratch) / "offload")
        load_kwargs = {} if args.dtype is None else {"torch_dtype": DTYPES[args.dtype]}
        nvme_kwargs = {} if offload_folder is None else {"offload_folder": offload_folder}
        if args.nvme_components is not None:
            nvme_kwargs["nvme_components"] = args.nvme_components

        pipe = DiffusionPipeline.from_pretrained(path, offload_backend="nvme", **nvme_kwargs, **load_kwargs)
        pipe.set_progress_bar_config(disable=True)
        streamed = streamed_components(pipe)
        print(
            f"pipeline: {type(pipe).__name__} from {args.model or 'a tiny random DDPM pipeline (built from configs)'}"
        )
        print(f"offload folder: {offload_folder or '(from ACCEL_NVME_OFFLOAD_FOLDER / accel-nvme config)'}")
        print(f"components on nvme: {sorted(streamed)}")

        kwargs = call_kwargs(pipe, args)
        images = run(pipe, kwargs, args.seed)
        print(f"images: shape {images.shape}, mean {images.mean():.6f}")
        for name, component in streamed.items():
            s = accel_nvme.stats(component)
            t = s.total
            print(
                f"nvme stream of {name}: {s.groups} groups ({len(s.resident)} resident), {len(s.forwards)} forwards, "
                f"{t.bytes_read / 1e6:.2f} MB read in {t.read_seconds:.3f} s ({t.gb_per_s:.2f} GB/s), "
                f"compute waited {t.stall_seconds:.3f} s, overlap {t.overlap:.0%}"
            )
        if args.output:
            pipe.numpy_to_pil(images)[0].save(args.output)
            print(f"saved {args.output}")

        if compare:
            in_ram = DiffusionPipeline.from_pretrained(path, **load_kwargs)
            in_ram.set_progress_bar_config(disable=True)
            own_allocations(in_ram)
            identical = np.array_equal(images, run(in_ram, kwargs, args.seed))
            print(f"identical to in-RAM: {identical}")
            if not identical:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
