"""diffusers: a tiny Flux-style transformer and a tiny pipeline, built from configs, saved, loaded on the nvme tier."""

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DiffusionPipeline, FluxTransformer2DModel  # noqa: E402
from helpers import tiny_ddpm_pipeline  # noqa: E402

from accel_nvme import NvmeAlignDevicesHook  # noqa: E402
from accel_nvme.store import FOLDER_PREFIX  # noqa: E402


def flux():
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def flux_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 16, 4, generator=g),
        encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
        pooled_projections=torch.randn(1, 8, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(5, 3),
    )


def nvme_hooks(model):
    return [m._hf_hook for m in model.modules() if isinstance(getattr(m, "_hf_hook", None), NvmeAlignDevicesHook)]


def test_flux_transformer_streams_block_by_block_and_is_exact(tmp_path, offload_dir):
    model = flux()
    model.save_pretrained(tmp_path / "flux")
    with torch.inference_mode():
        expected = model(**flux_inputs()).sample
    loaded = FluxTransformer2DModel.from_pretrained(
        tmp_path / "flux",
        device_map="auto",
        max_memory={"cpu": "10KB"},
        offload_backend="nvme",
        offload_folder=offload_dir,
    )
    assert loaded.nvme_device_map["transformer_blocks.0"] == "nvme"
    assert loaded.nvme_device_map["single_transformer_blocks.1"] == "nvme"
    assert len(nvme_hooks(loaded)) >= 4
    with torch.inference_mode():
        for _ in range(3):
            assert torch.equal(loaded(**flux_inputs()).sample, expected)
    written = [p.name for p in offload_dir.rglob("*") if p.is_file()]
    assert not [n for n in written if n.endswith(".dat") or n == "index.json"], "diffusers' .dat files were written"


def test_second_load_reuses_the_group_files(tmp_path, offload_dir):
    flux().save_pretrained(tmp_path / "flux")

    def load():
        return FluxTransformer2DModel.from_pretrained(
            tmp_path / "flux", device_map={"": "nvme"}, offload_folder=offload_dir
        )

    load()
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in offload_dir.rglob("*") if p.is_file()}
    again = load()
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in offload_dir.rglob("*") if p.is_file()} == before
    with torch.inference_mode():
        assert torch.equal(again(**flux_inputs()).sample, flux()(**flux_inputs()).sample)


def tiny_pipeline():
    return tiny_ddpm_pipeline()


def run(pipe):
    return pipe(
        batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="np"
    ).images


def test_pipeline_streams_its_denoiser_and_is_exact(tmp_path, offload_dir):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    expected = run(pipe)
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe", offload_backend="nvme", offload_folder=offload_dir)
    assert nvme_hooks(loaded.unet)
    assert np.array_equal(run(loaded), expected)
    assert any(p.name.startswith(FOLDER_PREFIX) for p in offload_dir.iterdir())


def test_pipeline_components_can_be_chosen(tmp_path, offload_dir):
    tiny_pipeline().save_pretrained(tmp_path / "pipe")
    resident = DiffusionPipeline.from_pretrained(
        tmp_path / "pipe", offload_backend="nvme", offload_folder=offload_dir, nvme_components=[]
    )
    assert not nvme_hooks(resident.unet)
    with pytest.raises(ValueError, match="not components of this pipeline"):
        DiffusionPipeline.from_pretrained(
            tmp_path / "pipe", offload_backend="nvme", offload_folder=offload_dir, nvme_components=["vae"]
        )
