"""from_pretrained(..., offload_backend="nvme") on real transformers model classes, built from configs and saved."""

import os

import pytest
import torch
from helpers import tiny_llama
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from accel_nvme import NvmeAlignDevicesHook
from accel_nvme.store import FOLDER_PREFIX

IDS = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))


def llama():
    return tiny_llama()


def gpt2():
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=128, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def checkpoint(request, tmp_path_factory):
    model = {"llama": llama, "gpt2": gpt2}[request.param]()
    path = tmp_path_factory.mktemp(request.param) / "checkpoint"
    model.save_pretrained(path)
    with torch.inference_mode():
        expected = model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=8, do_sample=False)
    return path, expected


def load(path, offload_dir, **kwargs):
    return AutoModelForCausalLM.from_pretrained(
        path,
        device_map="auto",
        max_memory={"cpu": "20KB"},
        offload_backend="nvme",
        offload_folder=str(offload_dir),
        **kwargs,
    )


def generate(model):
    with torch.inference_mode():
        return model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=8, do_sample=False)


def snapshot(folder):
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_generate_gives_the_same_tokens(checkpoint, offload_dir):
    path, expected = checkpoint
    model = load(path, offload_dir)
    assert set(model.nvme_device_map.values()) == {"nvme"}
    assert set(model.hf_device_map.values()) == {"disk"}, "transformers keeps seeing 'disk'"
    assert sum(isinstance(getattr(m, "_hf_hook", None), NvmeAlignDevicesHook) for m in model.modules()) >= 4
    assert torch.equal(generate(model), expected)
    assert torch.equal(generate(model), expected)


def test_nothing_but_group_files_is_written(checkpoint, offload_dir):
    load(checkpoint[0], offload_dir)
    names = {p.name for p in offload_dir.rglob("*") if p.is_file()}
    assert names and all(n.endswith(".safetensors") or n in ("manifest.json",) or n.endswith(".lock") for n in names)


def test_save_pretrained_round_trips(checkpoint, offload_dir, tmp_path):
    path, _ = checkpoint
    load(path, offload_dir).save_pretrained(tmp_path / "resaved")
    original, resaved = load_file(path / "model.safetensors"), load_file(tmp_path / "resaved" / "model.safetensors")
    assert original.keys() == resaved.keys()
    for key in original:
        assert torch.equal(original[key], resaved[key]), key


def test_second_load_reuses_the_files(checkpoint, offload_dir):
    path, expected = checkpoint
    load(path, offload_dir)
    before = snapshot(offload_dir)
    model = load(path, offload_dir)
    assert snapshot(offload_dir) == before
    assert torch.equal(generate(model), expected)


def test_changed_checkpoint_is_rewritten(tmp_path, offload_dir):
    model = llama()
    model.save_pretrained(tmp_path / "ckpt")
    load(tmp_path / "ckpt", offload_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(-1)
    model.save_pretrained(tmp_path / "ckpt")
    expected = generate(model)
    reloaded = load(tmp_path / "ckpt", offload_dir)
    assert len([p for p in offload_dir.iterdir() if p.name.startswith(FOLDER_PREFIX)]) == 2
    assert torch.equal(generate(reloaded), expected)


def test_explicit_device_map_with_nvme_values(tmp_path, offload_dir):
    model = llama()
    model.save_pretrained(tmp_path / "ckpt")
    expected = generate(model)
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers": "nvme",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "nvme",
    }
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "ckpt", device_map=device_map, offload_folder=offload_dir)
    assert loaded.nvme_device_map["model.layers.0"] == "nvme"
    assert loaded.model.embed_tokens.weight.device.type == "cpu"
    assert torch.equal(generate(loaded), expected)


def test_offload_backend_disk_or_none_leaves_transformers_alone(checkpoint, tmp_path):
    path, expected = checkpoint
    model = AutoModelForCausalLM.from_pretrained(
        path,
        device_map="auto",
        max_memory={"cpu": "20KB"},
        offload_backend="disk",
        offload_folder=str(tmp_path / "disk"),
    )
    assert not any(isinstance(getattr(m, "_hf_hook", None), NvmeAlignDevicesHook) for m in model.modules())
    assert torch.equal(generate(model), expected)
    assert not any(p.name.startswith(FOLDER_PREFIX) for p in (tmp_path / "disk").iterdir())


def test_bad_backend_and_missing_folder_are_clear(checkpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("ACCEL_NVME_OFFLOAD_FOLDER", raising=False)
    monkeypatch.delenv("ACCEL_NVME_OFFLOAD_DIR", raising=False)
    with pytest.raises(ValueError, match="offload_backend must be one of"):
        AutoModelForCausalLM.from_pretrained(checkpoint[0], device_map="auto", offload_backend="ssd")
    with pytest.raises(ValueError, match="no 'nvme' budget"):
        AutoModelForCausalLM.from_pretrained(
            checkpoint[0], device_map="auto", offload_backend="nvme", max_memory={"cpu": "1GB", "nvme": "10GB"}
        )
    with pytest.raises(ValueError, match="needs a folder"):
        AutoModelForCausalLM.from_pretrained(checkpoint[0], device_map="auto", offload_backend="nvme")


def test_env_folder_is_used_when_no_kwarg(checkpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("ACCEL_NVME_OFFLOAD_FOLDER", str(tmp_path / "from-env"))
    path, expected = checkpoint
    model = AutoModelForCausalLM.from_pretrained(
        path, device_map="auto", max_memory={"cpu": "20KB"}, offload_backend="nvme"
    )
    assert torch.equal(generate(model), expected)
    assert any(p.name.startswith(FOLDER_PREFIX) for p in (tmp_path / "from-env").iterdir())
    assert os.environ["ACCEL_NVME_OFFLOAD_FOLDER"].endswith("from-env")
