"""diffusers: a tiny Flux-style transformer and a tiny pipeline, built from configs, saved, loaded on the nvme tier."""

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from accelerate.utils import compute_module_sizes  # noqa: E402
from conformance_models import SPECS  # noqa: E402
from diffusers import (  # noqa: E402
    CogVideoXTransformer3DModel,
    DiffusionPipeline,
    FluxTransformer2DModel,
    WanTransformer3DModel,
)
from helpers import assert_streamed_block_by_block, tiny_ddpm_pipeline  # noqa: E402

import accel_nvme  # noqa: E402
from accel_nvme import NvmeAlignDevicesHook  # noqa: E402
from accel_nvme.store import FOLDER_PREFIX  # noqa: E402


def cogvideox():
    """Three blocks (the conformance config has two), so that no group is a third of the model."""
    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=8,
        num_layers=3,
        sample_width=8,
        sample_height=8,
        sample_frames=8,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=8,
    ).eval()


def cogvideox_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 1, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(1, 8, 8, generator=g),
        timestep=torch.tensor([3]),
    )


# the other tiny configs are the conformance suite's (tests/conformance_models.py)
MODELS = {name: (SPECS[name].build, SPECS[name].inputs) for name in ("flux", "wan", "hunyuan_video")}
MODELS["cogvideox"] = (cogvideox, cogvideox_inputs)
flux, flux_inputs = MODELS["flux"]
wan, wan_inputs = MODELS["wan"]


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


def sample(model, inputs):
    with torch.inference_mode():
        return model(**inputs()).sample


def assert_resident_tensors_owned(model):
    """Weights kept in RAM are allocator-owned and 64-byte aligned, not views into the mapped checkpoint."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type == "cpu":
            assert tensor.untyped_storage().resizable(), f"{name} views memory torch does not own"
            assert tensor.data_ptr() % 64 == 0, f"{name} sits at data_ptr % 64 == {tensor.data_ptr() % 64}"


@pytest.mark.parametrize("fraction", [0.4, 0.7])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_budgets_keep_owned_weights_in_ram_and_are_exact(tmp_path, offload_dir, name, fraction):
    build, inputs = MODELS[name]
    model = build()
    model.save_pretrained(tmp_path / name)
    expected = sample(model, inputs)
    budget = {"cpu": int(fraction * compute_module_sizes(model)[""])}
    baseline = type(model).from_pretrained(
        tmp_path / name, device_map="auto", max_memory=budget, offload_folder=tmp_path / "disk"
    )
    assert torch.equal(sample(baseline, inputs), expected)
    loaded = type(model).from_pretrained(
        tmp_path / name, device_map="auto", max_memory=budget, offload_backend="nvme", offload_folder=offload_dir
    )
    assert nvme_hooks(loaded)
    assert fraction < 0.5 or "cpu" in loaded.nvme_device_map.values(), "some weights stay in RAM"
    assert_resident_tensors_owned(loaded)
    for _ in range(2):
        assert torch.equal(sample(loaded, inputs), expected)


def test_offload_state_dict_true_is_accepted(tmp_path, offload_dir):
    flux().save_pretrained(tmp_path / "flux")
    loaded = FluxTransformer2DModel.from_pretrained(
        tmp_path / "flux",
        device_map="auto",
        max_memory={"cpu": int(0.5 * compute_module_sizes(flux())[""])},
        offload_state_dict=True,
        offload_backend="nvme",
        offload_folder=offload_dir,
    )
    assert nvme_hooks(loaded)
    assert_resident_tensors_owned(loaded)
    assert torch.equal(sample(loaded, flux_inputs), sample(flux(), flux_inputs))


@pytest.mark.parametrize("device_map", ["auto", "whole"])
def test_bin_checkpoints_become_group_files(tmp_path, offload_dir, device_map):
    flux().save_pretrained(tmp_path / "flux", safe_serialization=False)
    assert list((tmp_path / "flux").glob("*.bin")) and not list((tmp_path / "flux").glob("*.safetensors"))
    kwargs = (
        dict(device_map="auto", max_memory={"cpu": "20KB"}, offload_backend="nvme")
        if device_map == "auto"
        else dict(device_map={"": "nvme"})
    )

    def load():
        return FluxTransformer2DModel.from_pretrained(tmp_path / "flux", offload_folder=offload_dir, **kwargs)

    loaded = load()
    assert len(nvme_hooks(loaded)) >= 4
    expected = sample(flux(), flux_inputs)
    assert torch.equal(sample(loaded, flux_inputs), expected)
    written = {p: p.stat().st_mtime_ns for p in offload_dir.rglob("*") if p.is_file()}
    assert any(p.name.startswith("group-") for p in written)
    assert not [p for p in written if p.suffix == ".dat" or p.name == "index.json"]
    again = load()
    assert {p: p.stat().st_mtime_ns for p in offload_dir.rglob("*") if p.is_file()} == written, "reused"
    assert torch.equal(sample(again, flux_inputs), expected)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_whole_model_map_streams_block_by_block(tmp_path, offload_dir, name):
    build, inputs = MODELS[name]
    model = build()
    model.save_pretrained(tmp_path / name)
    loaded = type(model).from_pretrained(tmp_path / name, device_map={"": "nvme"}, offload_folder=offload_dir)
    assert_streamed_block_by_block(loaded, set(model._no_split_modules), more_than=3)
    assert_resident_tensors_owned(loaded)
    assert torch.equal(sample(loaded, inputs), sample(model, inputs))


def test_wan_root_tensor_key_at_a_60kb_budget(tmp_path, offload_dir):
    wan().save_pretrained(tmp_path / "wan")
    loaded = WanTransformer3DModel.from_pretrained(
        tmp_path / "wan",
        device_map="auto",
        max_memory={"cpu": "60KB"},
        offload_backend="nvme",
        offload_folder=offload_dir,
    )
    assert "scale_shift_table" in loaded.hf_device_map
    assert nvme_hooks(loaded)
    assert torch.equal(sample(loaded, wan_inputs), sample(wan(), wan_inputs))


def tiny_stable_diffusion():
    """A StableDiffusionPipeline of tiny random components; the tokenizer is byte-level CLIP BPE without merges."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {
        token: i for i, token in enumerate([*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"])
    }
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    )
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
    )
    text_config = CLIPTextConfig(
        bos_token_id=len(vocab) - 2,
        eos_token_id=len(vocab) - 1,
        pad_token_id=1,
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
    )
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=CLIPTextModel(text_config).eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def test_encode_prompt_reaches_the_streamed_text_encoder_blocks(tmp_path, offload_dir):
    pipe = tiny_stable_diffusion()
    pipe.save_pretrained(tmp_path / "sd")

    def encode(p):
        with torch.inference_mode():
            return p.encode_prompt("a cat", "cpu", 1, True, negative_prompt="a dog")

    loaded = DiffusionPipeline.from_pretrained(tmp_path / "sd", offload_backend="nvme", offload_folder=offload_dir)
    assert accel_nvme.stats(loaded.text_encoder).groups > 2, "the text encoder streams block by block"
    assert accel_nvme.stats(loaded.unet).groups > 4
    for got, expected in zip(encode(loaded), encode(pipe), strict=True):
        assert torch.equal(got, expected)
