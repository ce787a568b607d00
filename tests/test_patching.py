"""install() patches each library function once and records it; uninstall() puts every original back."""

import accelerate
import accelerate.big_modeling
import accelerate.utils.modeling
import diffusers.models.model_loading_utils
import diffusers.models.modeling_utils
import diffusers.pipelines.pipeline_loading_utils
import diffusers.pipelines.pipeline_utils
import pytest
import torch
import transformers.integrations.accelerate
import transformers.modeling_utils
from diffusers import FluxTransformer2DModel
from helpers import tiny_llama
from test_diffusers import flux, flux_inputs
from transformers import AutoModelForCausalLM

import accel_nvme
from accel_nvme import NvmeAlignDevicesHook, dispatch
from accel_nvme.integrations import diffusers as diffusers_integration
from accel_nvme.integrations import patching

IDS = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))

EXPECTED_PATCHES = [
    *(
        (module, "dispatch_model")
        for module in (
            accelerate,
            accelerate.big_modeling,
            transformers.integrations.accelerate,
            diffusers.models.modeling_utils,
            diffusers.pipelines.pipeline_loading_utils,
        )
    ),
    (accelerate.utils.modeling, "load_checkpoint_in_model"),
    (accelerate.utils.modeling, "offload_weight"),
    (transformers.modeling_utils.PreTrainedModel, "from_pretrained"),
    (diffusers.models.modeling_utils.ModelMixin, "from_pretrained"),
    (diffusers.models.modeling_utils, "save_offload_index"),
    (diffusers.models.model_loading_utils, "offload_weight"),
    (diffusers.pipelines.pipeline_utils.DiffusionPipeline, "from_pretrained"),
    (diffusers.pipelines.pipeline_utils.DiffusionPipeline, "to"),
]


def patched_values():
    return {(id(owner), attr): vars(owner)[attr] for owner, attr in EXPECTED_PATCHES}


@pytest.fixture
def reinstall():
    yield
    accel_nvme.install()


def test_every_patch_is_recorded_once():
    recorded = [(id(owner), attr) for owner, attr, *_ in patching._APPLIED]
    assert len(recorded) == len(set(recorded)), "an attribute was patched twice"
    missing = [f"{owner.__name__}.{attr}" for owner, attr in EXPECTED_PATCHES if (id(owner), attr) not in recorded]
    assert not missing, f"not recorded: {missing}"


def test_install_twice_wraps_once():
    before = patched_values()
    accel_nvme.install()
    accel_nvme.install()
    assert all(patched_values()[key] is value for key, value in before.items())
    kept = diffusers.models.modeling_utils.save_offload_index
    assert hasattr(kept, "__wrapped__"), "save_offload_index is not wrapped"
    assert not hasattr(kept.__wrapped__, "__wrapped__"), "save_offload_index was wrapped twice"


def test_uninstall_restores_every_original_and_install_works_again(tmp_path, offload_dir, reinstall):
    originals = [(owner, attr, before) for owner, attr, before, _ in patching._APPLIED]
    patched = patched_values()
    accel_nvme.uninstall()
    assert patching._APPLIED == []
    changed = [f"{owner}.{attr}" for owner, attr, before in originals if vars(owner)[attr] is not before]
    assert not changed, f"not restored: {changed}"
    assert accelerate.big_modeling.dispatch_model is dispatch._accelerate_dispatch_model
    assert transformers.integrations.accelerate.dispatch_model is dispatch._accelerate_dispatch_model
    assert not hasattr(vars(transformers.modeling_utils.PreTrainedModel)["from_pretrained"].__func__, "__wrapped__")

    accel_nvme.install()
    again = patched_values()
    unpatched = [f"{owner}.{attr}" for owner, attr, before in originals if again.get((id(owner), attr)) is before]
    assert not unpatched, f"install() after uninstall() left these alone: {unpatched}"
    assert again.keys() == patched.keys()
    model = tiny_llama()
    model.save_pretrained(tmp_path / "llama")
    with torch.inference_mode():
        expected = model(IDS).logits
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "llama",
        device_map="auto",
        max_memory={"cpu": "20KB"},
        offload_backend="nvme",
        offload_folder=str(offload_dir),
    )
    assert any(isinstance(getattr(m, "_hf_hook", None), NvmeAlignDevicesHook) for m in loaded.modules())
    with torch.inference_mode():
        assert torch.equal(loaded(IDS).logits, expected)


def spy_load_state_dict(monkeypatch, seen, fail=False):
    """Record what the diffusers loading scope holds right after a state dict is read (and fail there if asked)."""
    load_state_dict = diffusers.models.modeling_utils.load_state_dict

    def spy(*args, **kwargs):
        state_dict = load_state_dict(*args, **kwargs)
        seen.append(dict(diffusers_integration._LOADED.get() or {}))
        if fail:
            raise RuntimeError("load failed on purpose")
        return state_dict

    monkeypatch.setattr(diffusers.models.modeling_utils, "load_state_dict", spy)


def load_flux(path, offload_dir):
    return FluxTransformer2DModel.from_pretrained(
        path, device_map="auto", max_memory={"cpu": "10KB"}, offload_backend="nvme", offload_folder=offload_dir
    )


def test_loading_state_lives_one_from_pretrained_call(tmp_path, offload_dir, monkeypatch):
    model = flux()
    model.save_pretrained(tmp_path / "flux")
    with torch.inference_mode():
        expected = model(**flux_inputs()).sample
    seen = []
    spy_load_state_dict(monkeypatch, seen)
    loaded = load_flux(tmp_path / "flux", offload_dir)
    assert seen and list(map(str, seen[0].values())) == [str(tmp_path / "flux" / "diffusion_pytorch_model.safetensors")]
    assert diffusers_integration._LOADED.get() is None and diffusers_integration._SHARD.get() is None
    with torch.inference_mode():
        assert torch.equal(loaded(**flux_inputs()).sample, expected)


def test_loading_state_is_gone_after_a_load_that_raised(tmp_path, offload_dir, monkeypatch):
    flux().save_pretrained(tmp_path / "flux")
    seen = []
    spy_load_state_dict(monkeypatch, seen, fail=True)
    with pytest.raises(RuntimeError, match="on purpose"):
        load_flux(tmp_path / "flux", offload_dir)
    assert seen and seen[0], "the load did not reach the state dict"
    assert diffusers_integration._LOADED.get() is None and diffusers_integration._SHARD.get() is None
