"""The name of an offload folder is pinned: the same weights and grouping must find the folder prepared before."""

import pytest
import torch
from helpers import TinyLM

import accel_nvme
from accel_nvme import NvmeConfig

DEVICE_MAP = {"embed": "nvme", **{f"body.layers.{i}": "nvme" for i in range(4)}, "body.final": "nvme", "head": "cpu"}

# Computed once (2026-12-03) from the model below. If this test fails, the fingerprint changed: every folder users
# have prepared is orphaned (written again on the next load, the old one left on disk). Change it only on purpose,
# with a new FORMAT_VERSION and a note in the format's changelog saying that existing folders must be prepared again.
EXPECTED_FOLDER = "accel-nvme-01cab05378d71180608fa002764f6210"


def fixed_model() -> TinyLM:
    """A TinyLM whose every tensor holds values set here, not drawn from torch's random generator."""
    model = TinyLM(vocab=11, width=8, depth=4).eval()
    tensors = [*model.parameters(), *model.buffers()]
    with torch.no_grad():
        for i, tensor in enumerate(tensors):
            tensor.copy_((torch.arange(tensor.numel()) % 7).reshape(tensor.shape) / 8 + i)
    return model


def test_the_offload_folder_name_of_fixed_weights_is_pinned(offload_dir):
    model = accel_nvme.dispatch_model(fixed_model(), DEVICE_MAP, offload_dir=offload_dir, config=NvmeConfig())
    try:
        assert sorted(p.name for p in offload_dir.iterdir() if p.is_dir()) == [EXPECTED_FOLDER]
        files = accel_nvme.group_files(model)
        assert [(p.parent.name, p.name) for p in files] == [
            (EXPECTED_FOLDER, f"group-{i:05d}.safetensors") for i in range(6)
        ]
    finally:
        accel_nvme.close(model)


@pytest.mark.parametrize("expert_streaming", [True, False])
def test_a_moe_loaded_again_reuses_its_folder_though_transformers_re_saves_its_experts(tmp_path, expert_streaming):
    """transformers fuses a MoE checkpoint's per-expert tensors at load and re-saves them into the offload folder at
    every load (new mtime, maybe a new inode). Those are identified by their bytes, and copied (never read in place
    from a file rewritten at each load), so the second load finds the first one's folder: no second folder, no group
    file rewritten, the same outputs."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = Qwen3MoeForCausalLM(config).eval()
    reference.save_pretrained(tmp_path / "checkpoint")
    ids = torch.tensor([[5, 9, 3, 7]])
    with torch.inference_mode():
        expected = reference(ids).logits
    offload = tmp_path / "offload"
    seen = []
    for _ in range(2):
        model = AutoModelForCausalLM.from_pretrained(
            tmp_path / "checkpoint",
            device_map="auto",
            max_memory={"cpu": "20KB"},
            offload_backend="nvme",
            offload_folder=str(offload),
            nvme_config=NvmeConfig(expert_streaming=expert_streaming),
        )
        resaved = sorted(p.name for p in offload.glob("*experts*.safetensors"))
        assert resaved, "transformers re-saved the fused experts into the offload folder"
        with torch.inference_mode():
            assert torch.equal(model(ids).logits, expected)
        files = accel_nvme.group_files(model)
        assert all(f.parent.parent == offload for f in files), files  # group files, not the re-saved ones
        seen.append({str(f): (f.stat().st_ino, f.stat().st_mtime_ns) for f in files})
        accel_nvme.close(model)
    assert len([p for p in offload.iterdir() if p.is_dir()]) == 1
    assert seen[0] == seen[1]  # the same group files, not written again
