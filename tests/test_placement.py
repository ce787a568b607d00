"""Placement policy: the device a pipeline computes on, the budget shares, and a real pipeline placed by them (CPU)."""

import logging

import numpy as np
import pytest
import torch
from accelerate import infer_auto_device_map
from helpers import run_dit, tiny_dit_pipeline, tiny_lm

import accel_nvme
from accel_nvme.devicemap import main_device
from accel_nvme.placement import (
    Budgets,
    Component,
    Placement,
    budget_of,
    compute_device,
    compute_on,
    estimate_memory,
    plan_pipeline,
    resolve_device,
)

GB = 10**9
CUDA0 = torch.device("cuda", 0)
CPU = torch.device("cpu")
# Flux.1-dev in bf16, sizes from its safetensors headers (rounded): what the "Flux on one GPU" docs compute from.
FLUX = [
    Component("text_encoder", int(0.246 * GB), True),
    Component("text_encoder_2", int(9.52 * GB), True),
    Component("transformer", int(23.8 * GB), True),
    Component("vae", int(0.168 * GB), False),
]


# ---------------------------------------------------------------- the compute device


@pytest.mark.parametrize(
    "device_map, cuda_devices, current, expected",
    [
        (None, 0, 0, "cpu"),
        (None, 2, 1, "cuda:1"),
        ("cuda", 1, 0, "cuda:0"),
        ("cuda", 2, 1, "cuda:1"),
        ("cuda:1", 2, 0, "cuda:1"),
        (1, 2, 0, "cuda:1"),
        (torch.device("cuda", 0), 1, 0, "cuda:0"),
        ("cpu", 4, 0, "cpu"),
    ],
)
def test_resolve_device(device_map, cuda_devices, current, expected):
    assert resolve_device(device_map, cuda_devices, current) == torch.device(expected)


def test_without_device_map_the_choice_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="accel_nvme.placement"):
        assert resolve_device(None, 1, 0, "FluxPipeline.from_pretrained") == CUDA0
        assert resolve_device(None, 0, 0, "FluxPipeline.from_pretrained") == CPU
    assert "FluxPipeline.from_pretrained: no device_map, computing on cuda:0 (CUDA found)" in caplog.text
    assert "computing on cpu (no CUDA)" in caplog.text


@pytest.mark.parametrize(
    "device_map, cuda_devices, message",
    [
        ("balanced", 2, r"device_map='balanced' with offload_backend='nvme': expected one device .*max_memory"),
        ({"transformer": 0}, 1, r"expected one device \('cuda', 'cuda:<index>', a GPU index or 'cpu'\)"),
        ("cuda:1", 1, r"asks for cuda:1, but this machine has 1 CUDA device\(s\)"),
        ("cuda", 0, r"asks for cuda:0, but this machine has no CUDA device"),
        ("gpu", 1, r"device_map='gpu' is not a device"),
        ("meta", 1, r"got a meta device"),
    ],
)
def test_unusable_device_maps_are_refused_by_name(device_map, cuda_devices, message):
    with pytest.raises(ValueError, match=message):
        resolve_device(device_map, cuda_devices, 0)


def test_compute_on_sets_the_device_for_the_block_only():
    assert compute_device() is None
    with compute_on(torch.device("cuda", 1)) as device:
        assert device == compute_device() == "cuda:1"
        with compute_on("cpu"):
            assert compute_device() == "cpu"
        assert compute_device() == "cuda:1"
    assert compute_device() is None


# ---------------------------------------------------------------- budgets


@pytest.mark.parametrize(
    "max_memory, device, config_device, config_host, expected",
    [
        ({0: "20GiB"}, CUDA0, 0, 0, Budgets(20 << 30, None)),
        ({"cuda:0": "20GB", "cpu": "64GB"}, CUDA0, 0, 0, Budgets(20 * GB, 64 * GB)),
        ({1: "20GiB"}, CUDA0, 0, 0, Budgets(None, None)),  # another GPU's budget is not this pipeline's
        ({1: "20GiB"}, CUDA0, "4GB", 0, Budgets(4 * GB, None)),
        (None, CUDA0, "auto", "auto", Budgets(40 * GB, 100 * GB)),  # half of the (given) free memory
        ({0: "auto"}, CUDA0, 0, 0, Budgets(40 * GB, None)),
        ({0: 0}, CUDA0, "8GB", 0, Budgets(0, None)),  # max_memory wins over the config
        ({0: "20GiB", "cpu": "2GB"}, CPU, "8GB", 0, Budgets(None, 2 * GB)),  # no device budget on the CPU
        (None, CPU, 0, "3GB", Budgets(None, 3 * GB)),
    ],
)
def test_budget_of(max_memory, device, config_device, config_host, expected):
    assert budget_of(max_memory, device, config_device, config_host, free_device=80 * GB, free_host=200 * GB) == (
        expected
    )


# ---------------------------------------------------------------- sharing budgets among components


def shares(placements):
    return {p.name: (p.streamed, p.device_resident, p.host_resident) for p in placements}


def test_flux_on_a_24gb_gpu_keeps_most_of_the_transformer_resident():
    placements = plan_pipeline(FLUX, CUDA0, Budgets(20 * GB, None))
    assert [p.name for p in placements] == ["text_encoder", "text_encoder_2", "transformer", "vae"]
    assert all(p.device == CUDA0 for p in placements)
    # the VAE is placed whole and counted first; the denoiser gets the rest before the text encoders
    assert shares(placements) == {
        "text_encoder": (True, 0, None),
        "text_encoder_2": (True, 0, None),
        "transformer": (True, 20 * GB - int(0.168 * GB), None),
        "vae": (False, None, None),
    }


def test_a_budget_larger_than_the_denoiser_goes_to_the_text_encoders_in_pipeline_order():
    budget = 30 * GB
    placements = shares(plan_pipeline(FLUX, CUDA0, Budgets(budget, 4 * GB)))
    left = budget - int(0.168 * GB)
    # each may use all that is left (its groups within it stay resident) and leaves the rest to the next
    assert placements["transformer"] == (True, left, 0)
    left -= int(23.8 * GB)
    assert placements["text_encoder"] == (True, left, 0)
    left -= int(0.246 * GB)
    # text_encoder_2: what is left of the GPU budget, then the host budget for the rest of it
    assert placements["text_encoder_2"] == (True, left, 4 * GB)


def test_on_the_cpu_components_placed_whole_count_against_the_host_budget(caplog):
    placements = shares(plan_pipeline(FLUX, CPU, Budgets(None, 12 * GB)))
    assert placements["transformer"] == (True, None, 12 * GB - int(0.168 * GB))  # less than its 23.8 GB
    assert placements["text_encoder"] == (True, None, 0)
    with caplog.at_level(logging.WARNING, logger="accel_nvme.placement"):
        placements = shares(plan_pipeline(FLUX, CPU, Budgets(None, 10**8)))
    assert placements["transformer"] == (True, None, 0)
    assert "the components placed whole (vae) take 0.168 GB, more than the cpu budget" in caplog.text


def test_no_budget_leaves_the_config_in_force():
    placements = plan_pipeline(FLUX, CUDA0, Budgets(None, None))
    assert all((p.device_resident, p.host_resident) == (None, None) for p in placements)


def test_memory_estimate_counts_whole_components_resident_groups_and_buffers():
    placements = [
        Placement("transformer", CUDA0, True, 24 * GB, device_resident=10 * GB, host_resident=2 * GB),
        Placement("text_encoder_2", CUDA0, True, 9 * GB, device_resident=12 * GB, host_resident=5 * GB),
        Placement("vae", CUDA0, False, GB),
        Placement("text_encoder", CPU, True, 9 * GB),
        Placement("safety_checker", CPU, False, GB),
    ]
    largest = {"transformer": GB // 2, "text_encoder": GB // 4, "text_encoder_2": GB // 8}
    estimate = estimate_memory(placements, largest, prefetch_depth=2)
    # a share larger than the component keeps all of it, no more (text_encoder_2 takes 9 GB of its 12 GB share),
    # and what is all resident on the device needs no device copies in flight
    assert estimate.device == GB + 10 * GB + 3 * GB // 2 + 9 * GB
    assert estimate.host == 3 * GB // 2 + 2 * GB + 3 * GB // 8 + 3 * GB // 4 + GB


# ---------------------------------------------------------------- models: GPU budget, then CPU, then nvme


def test_auto_device_map_fills_the_gpu_then_the_cpu_then_streams_and_computes_on_the_first_gpu():
    model = tiny_lm(width=64, depth=6)
    layer = sum(p.numel() * p.element_size() for p in model.body.layers[0].parameters())
    # accelerate's own policy, given budgets for GPU 0 and the CPU (the budgets are numbers: no GPU needed here)
    device_map = infer_auto_device_map(
        model, max_memory={0: 3 * layer, "cpu": 4 * layer}, no_split_module_classes=["Block"]
    )
    tiers = list(dict.fromkeys(device_map.values()))
    assert tiers == [0, "cpu", "disk"], device_map  # "disk" becomes "nvme" under offload_backend="nvme"
    assert main_device(device_map, None) == 0
    assert main_device({"": "nvme"}, None) == "cpu"
    assert main_device({"": "nvme"}, "cuda:1") == "cuda:1"


# ---------------------------------------------------------------- a real pipeline, on the CPU


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("dit")
    pipe = tiny_dit_pipeline()
    pipe.save_pretrained(root / "pipe")
    return root / "pipe", run_dit(pipe)


def nbytes(module):
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def test_pipeline_device_map_cpu_streams_the_denoiser_and_places_the_vae(dit, offload_dir, caplog):
    from diffusers import DiffusionPipeline

    path, expected = dit
    with caplog.at_level(logging.INFO, logger="accel_nvme"):
        pipe = DiffusionPipeline.from_pretrained(
            path, device_map="cpu", offload_backend="nvme", offload_folder=offload_dir
        )
    assert "transformer: " in caplog.text and "streamed from nvme, computed on cpu" in caplog.text
    assert "vae: " in caplog.text and "placed on cpu" in caplog.text
    assert accel_nvme.stats(pipe.transformer).groups >= 1
    assert pipe.vae.device == CPU and not hasattr(pipe.vae, "_hf_hook")
    assert pipe.hf_device_map == "cpu"
    assert np.array_equal(run_dit(pipe), expected)


def test_pipeline_without_device_map_uses_cuda_only_when_there_is_one(dit, offload_dir, caplog):
    from diffusers import DiffusionPipeline

    path, expected = dit
    with caplog.at_level(logging.INFO, logger="accel_nvme.placement"):
        pipe = DiffusionPipeline.from_pretrained(path, offload_backend="nvme", offload_folder=offload_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"no device_map, computing on {device}" in caplog.text
    streamed = [getattr(m, "_hf_hook", None) for m in pipe.transformer.modules()]
    hooks = [hook for hook in streamed if isinstance(hook, accel_nvme.NvmeAlignDevicesHook)]
    assert hooks and all(hook.execution_device.type == device for hook in hooks)
    if device == "cpu":
        assert np.array_equal(run_dit(pipe), expected)


@pytest.mark.parametrize("budget_kwarg", ["max_memory", "nvme_resident_budget"])
def test_pipeline_host_budget_is_shared_denoiser_first(dit, offload_dir, budget_kwarg):
    from diffusers import DiffusionPipeline

    path, expected = dit
    built = tiny_dit_pipeline()
    transformer_bytes, vae_bytes = nbytes(built.transformer), nbytes(built.vae)
    budget = transformer_bytes + vae_bytes // 2
    pipe = DiffusionPipeline.from_pretrained(
        path,
        device_map="cpu",
        **({"max_memory": {"cpu": budget}} if budget_kwarg == "max_memory" else {budget_kwarg: budget}),
        nvme_components=["transformer", "vae"],
        offload_backend="nvme",
        offload_folder=offload_dir,
    )
    transformer, vae = accel_nvme.stats(pipe.transformer), accel_nvme.stats(pipe.vae)
    assert len(transformer.resident) == transformer.groups  # the denoiser first: all of it resident
    assert transformer_bytes <= transformer.resident_bytes < transformer_bytes + 4096 * transformer.groups
    assert 0 < vae.resident_bytes <= vae_bytes // 2 + 4096 * vae.groups  # the VAE gets what is left: some groups
    assert len(vae.resident) < vae.groups
    assert np.array_equal(run_dit(pipe), expected)


def test_pipeline_refuses_device_maps_it_cannot_honour(dit, offload_dir):
    from diffusers import DiffusionPipeline

    path, _ = dit
    for device_map, message in (("balanced", "expected one device"), ("cuda:7", "asks for cuda:7")):
        with pytest.raises(ValueError, match=message):
            DiffusionPipeline.from_pretrained(
                path, device_map=device_map, offload_backend="nvme", offload_folder=offload_dir
            )
    assert not any(offload_dir.iterdir())  # refused before anything was written


def test_pipe_to_moves_the_others_or_names_what_to_pass(dit, offload_dir):
    from diffusers import DiffusionPipeline

    path, expected = dit
    pipe = DiffusionPipeline.from_pretrained(path, device_map="cpu", offload_backend="nvme", offload_folder=offload_dir)
    assert pipe.to("cpu") is pipe and pipe.to(device="cpu") is pipe
    with pytest.raises(ValueError, match=r"transformer \(on cpu\) stream from nvme .*pass device_map='cuda:1' to"):
        pipe.to("cuda:1")
    with pytest.raises(ValueError, match=r"pass torch_dtype=\.\.\. to from_pretrained instead"):
        pipe.to(torch.float16)
    assert np.array_equal(run_dit(pipe), expected)
    plain = DiffusionPipeline.from_pretrained(path)
    assert plain.to("cpu") is plain  # a pipeline without nvme components: diffusers' own to()
