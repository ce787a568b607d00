"""Ten diffusers pipelines, built tiny, saved, loaded with offload_backend="nvme" through the generic
``DiffusionPipeline.from_pretrained`` and through their own class: each call ``torch.equal`` to the pipeline in RAM."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan, DiffusionPipeline, FluxPipeline, StableAudioDiTModel  # noqa: E402
from tiny_pipelines import PIPELINES  # noqa: E402

import accel_nvme  # noqa: E402
from accel_nvme.integrations import pipelines  # noqa: E402
from accel_nvme.placement import streamed_by_default  # noqa: E402

CPU = torch.device("cpu")


def run(pipe, name, prompt="a cat", **kwargs):
    with torch.inference_mode():
        out = pipe(prompt, generator=torch.Generator().manual_seed(0), **{**PIPELINES[name].call, **kwargs})
    return out.images if hasattr(out, "images") else out.frames


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (folder, the pipeline's class, its output in RAM), each pipeline built and saved once."""
    cache = {}

    def save(name):
        if name not in cache:
            pipe = PIPELINES[name].build()
            folder = tmp_path_factory.mktemp(name) / "pipe"
            pipe.save_pretrained(folder)
            cache[name] = folder, type(pipe), run(pipe, name), pipe
        return cache[name]

    return save


def load(pipeline_class, folder, offload_dir, **kwargs):
    return pipeline_class.from_pretrained(folder, offload_backend="nvme", offload_folder=str(offload_dir), **kwargs)


@pytest.mark.parametrize("generic", [True, False], ids=["DiffusionPipeline", "own_class"])
@pytest.mark.parametrize("name", list(PIPELINES))
def test_pipeline_is_exact(saved, offload_dir, name, generic):
    folder, pipeline_class, expected, _ = saved(name)
    pipe = load(DiffusionPipeline if generic else pipeline_class, folder, offload_dir)
    assert type(pipe) is pipeline_class
    streamed = pipelines.streamed_components(pipe)
    expected_streamed = {
        n for n, c in pipe.components.items() if isinstance(c, torch.nn.Module) and streamed_by_default(n)
    }
    assert set(streamed) == expected_streamed, "every component announced as streamed is the one the pipeline holds"
    assert pipe.device == pipe._execution_device == CPU, "where it computes, not the meta of a streamed encoder"
    assert torch.equal(run(pipe, name), expected)


def test_flux_batches_callbacks_and_a_second_load(saved, offload_dir):
    folder, _, _, in_ram = saved("flux")
    seen = []

    def callback(pipe, step, timestep, kwargs):
        seen.append(kwargs["latents"].clone())
        return kwargs

    def variants(pipe):
        seen.clear()
        batch = run(pipe, "flux", ["a cat", "a dog"], num_images_per_prompt=2, callback_on_step_end=callback)
        return batch, list(seen)

    expected, expected_steps = variants(in_ram)
    assert expected.shape[0] == 4
    got, steps = variants(load(DiffusionPipeline, folder, offload_dir))
    assert torch.equal(got, expected)
    assert len(steps) == len(expected_steps) == 2
    assert all(torch.equal(a, b) for a, b in zip(steps, expected_steps, strict=True))
    files = {p: p.stat().st_mtime_ns for p in offload_dir.rglob("*.safetensors")}
    again = load(FluxPipeline, folder, offload_dir, device_map="cpu")
    assert {p: p.stat().st_mtime_ns for p in offload_dir.rglob("*.safetensors")} == files, "the folder is reused"
    assert torch.equal(variants(again)[0], expected)


def test_a_streamed_component_replaced_by_diffusers_is_refused(saved, offload_dir, monkeypatch):
    """Loaded through the generic class as is, Wan's optional transformer is loaded again in RAM by diffusers."""
    folder, *_ = saved("wan")
    monkeypatch.setattr(pipelines, "_concrete_class", lambda cls, folder, kwargs: cls)
    with pytest.raises(RuntimeError, match="'transformer' was loaded to stream from nvme, but the pipeline holds"):
        load(DiffusionPipeline, folder, offload_dir)


def test_diffusers_offloading_is_refused_on_a_streamed_pipeline(saved, offload_dir):
    folder, _, expected, _ = saved("pixart_sigma")
    pipe = load(DiffusionPipeline, folder, offload_dir)
    for method in pipelines.OFFLOAD_METHODS:
        with pytest.raises(ValueError, match=f"{method}\\(\\): .*text_encoder.* already stream from nvme"):
            getattr(pipe, method)(**({"onload_device": CPU} if method == "enable_group_offload" else {}))
    pipe.reset_device_map()  # what it asks for: the weights read back into RAM
    assert not pipelines.streamed_components(pipe)
    assert torch.equal(run(pipe, "pixart_sigma"), expected)
    in_ram = load(DiffusionPipeline, folder, offload_dir, nvme_components=[])
    assert not pipelines.streamed_components(in_ram)
    assert in_ram.device == CPU


def test_wan_vae_decodes_exactly_with_every_block_streamed(saved, tmp_path, offload_dir):
    """Its decoder blocks update the ``feat_cache``/``feat_idx`` lists they are passed, in place."""
    vae = saved("wan")[3].vae
    vae.save_pretrained(tmp_path / "vae")
    latents = torch.randn(1, 4, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    streamed = AutoencoderKLWan.from_pretrained(tmp_path / "vae", device_map={"": "nvme"}, offload_folder=offload_dir)
    assert len(accel_nvme.stats(streamed).modules) > 4
    with torch.inference_mode():
        assert torch.equal(streamed.decode(latents).sample, vae.decode(latents).sample)


def test_stable_audio_dit_under_no_grad(tmp_path, offload_dir):
    """``proj_in(x.transpose(1, 2))``: torch picks the matmul kernel partly on ``weight.requires_grad``."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    torch.manual_seed(0)
    model = StableAudioDiTModel(
        sample_size=4,
        in_channels=8,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=2,
        num_key_value_attention_heads=2,
        out_channels=8,
        cross_attention_dim=4,
        time_proj_dim=8,
        global_states_input_dim=8,
        cross_attention_input_dim=4,
    ).eval()
    model.save_pretrained(tmp_path / "dit")
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(2, 8, 16, generator=g),
        timestep=torch.tensor([10, 20]),
        encoder_hidden_states=torch.randn(2, 3, 4, generator=g),
        global_hidden_states=torch.randn(2, 1, 8, generator=g),
        rotary_embedding=get_1d_rotary_pos_embed(2, 17, use_real=True, repeat_interleave_real=False),
        return_dict=False,
    )
    streamed = StableAudioDiTModel.from_pretrained(
        tmp_path / "dit", device_map={"": "nvme"}, offload_folder=offload_dir
    )
    with torch.no_grad():
        assert torch.equal(streamed(**inputs)[0], model(**inputs)[0])
