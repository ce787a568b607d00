"""The name of an offload folder is pinned: the same weights and grouping must find the folder prepared before."""

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
