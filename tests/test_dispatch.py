import gc
import threading

import accelerate
import pytest
import torch
from accelerate.hooks import remove_hook_from_submodules
from helpers import open_fds, reference, tiny_lm
from safetensors import safe_open

import accel_nvme
from accel_nvme import NvmeAlignDevicesHook, NvmeConfig
from accel_nvme.format import read_layout
from accel_nvme.store import FOLDER_PREFIX

IDS = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
LAYERS = [f"body.layers.{i}" for i in range(4)]

DEVICE_MAPS = {
    "all_nvme": {"": "nvme"},
    "every_module_nvme": {"embed": "nvme", **dict.fromkeys(LAYERS, "nvme"), "body.final": "nvme", "head": "nvme"},
    "nvme_between_cpu": {
        "embed": "cpu",
        "body.layers.0": "cpu",
        "body.layers.1": "nvme",
        "body.layers.2": "nvme",
        "body.layers.3": "cpu",
        "body.final": "nvme",
        "head": "cpu",
    },
    "container_entry": {"embed": "cpu", "body.layers": "nvme", "body.final": "cpu", "head": "cpu"},
    "tied_head_on_nvme_embed_on_cpu": {"embed": "cpu", "body": "nvme", "head": "nvme"},
    "tied_across_nvme_groups": {"embed": "nvme", "body": "cpu", "head": "nvme"},
}


def nvme_hooks(model):
    return [m._hf_hook for m in model.modules() if isinstance(getattr(m, "_hf_hook", None), NvmeAlignDevicesHook)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", sorted(DEVICE_MAPS))
@pytest.mark.parametrize("entry_point", ["accel_nvme", "accelerate"])
def test_outputs_equal_no_offload_over_repeated_forwards(offload_dir, dtype, shape, entry_point):
    expected = reference(tiny_lm(dtype), IDS)
    model = tiny_lm(dtype)
    dispatch = accel_nvme.dispatch_model if entry_point == "accel_nvme" else accelerate.dispatch_model
    model = dispatch(model, DEVICE_MAPS[shape], offload_dir=offload_dir, main_device="cpu")
    assert nvme_hooks(model)
    with torch.inference_mode():
        for _ in range(4):
            assert torch.equal(model(IDS), expected)


def test_batch_and_sequence_changes_stay_exact(offload_dir):
    reference_model = tiny_lm()
    model = accel_nvme.dispatch_model(tiny_lm(), DEVICE_MAPS["every_module_nvme"], offload_dir=offload_dir)
    with torch.inference_mode():
        for n in (1, 5, 2, 7):
            ids = IDS[:, :n]
            assert torch.equal(model(ids), reference_model(ids))


def test_group_files_open_with_safe_open_and_are_aligned(offload_dir):
    original = tiny_lm().state_dict()
    accel_nvme.dispatch_model(tiny_lm(), DEVICE_MAPS["every_module_nvme"], offload_dir=offload_dir)
    (folder,) = [p for p in offload_dir.iterdir() if p.name.startswith(FOLDER_PREFIX)]
    files = sorted(folder.glob("group-*.safetensors"))
    assert len(files) == 7
    seen = set()
    for path in files:
        assert read_layout(path).data_offset % 4096 == 0
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                assert torch.equal(f.get_tensor(key), original[key]), key
                seen.add(key)
    assert "embed.weight" in seen and "head.weight" not in seen, "a tied weight is written once"
    assert "body.layers.0.scale" not in seen, "buffers stay resident unless offload_buffers=True"


def test_offload_buffers_streams_persistent_buffers(offload_dir):
    expected = reference(tiny_lm(), IDS)
    model = accel_nvme.dispatch_model(tiny_lm(), {"": "nvme"}, offload_dir=offload_dir, offload_buffers=True)
    assert model.body.layers[0].scale.device.type == "meta"
    assert model.body.layers[0].shift.device.type == "cpu", "non-persistent buffers are never offloaded"
    with torch.inference_mode():
        for _ in range(3):
            assert torch.equal(model(IDS), expected)


def test_redispatch_writes_nothing_and_changed_weights_are_not_served_stale(offload_dir):
    accel_nvme.dispatch_model(tiny_lm(), {"": "nvme"}, offload_dir=offload_dir)
    (folder,) = [p for p in offload_dir.iterdir() if p.name.startswith(FOLDER_PREFIX)]
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}
    accel_nvme.dispatch_model(tiny_lm(), {"": "nvme"}, offload_dir=offload_dir)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()} == before

    changed = tiny_lm()
    with torch.no_grad():
        changed.body.layers[2].mlp[0].weight[0, 0] += 1.0
    expected = reference(changed, IDS)
    model = accel_nvme.dispatch_model(changed, {"": "nvme"}, offload_dir=offload_dir)
    with torch.inference_mode():
        assert torch.equal(model(IDS), expected)


def test_two_models_in_one_folder_both_stay_correct(offload_dir):
    a_expected, b_expected = reference(tiny_lm(seed=1), IDS), reference(tiny_lm(seed=2, width=48), IDS)
    a = accel_nvme.dispatch_model(tiny_lm(seed=1), DEVICE_MAPS["every_module_nvme"], offload_dir=offload_dir)
    b = accel_nvme.dispatch_model(tiny_lm(seed=2, width=48), DEVICE_MAPS["every_module_nvme"], offload_dir=offload_dir)
    with torch.inference_mode():
        for _ in range(3):
            assert torch.equal(a(IDS), a_expected)
            assert torch.equal(b(IDS), b_expected)


def test_hf_device_map_keeps_disk_and_nvme_map_keeps_nvme(offload_dir):
    device_map = DEVICE_MAPS["nvme_between_cpu"]
    model = accel_nvme.dispatch_model(tiny_lm(), device_map, offload_dir=offload_dir)
    assert model.hf_device_map == {k: ("disk" if v == "nvme" else v) for k, v in device_map.items()}
    assert model.nvme_device_map == device_map


def test_nothing_is_written_by_accelerate(offload_dir):
    accel_nvme.dispatch_model(tiny_lm(), DEVICE_MAPS["every_module_nvme"], offload_dir=offload_dir)
    written = [p.name for p in offload_dir.rglob("*") if p.is_file()]
    assert not [name for name in written if name.endswith(".dat") or name == "index.json"]


def test_weights_map_serves_the_stored_tensors(offload_dir):
    original = tiny_lm().state_dict()
    model = accel_nvme.dispatch_model(tiny_lm(), DEVICE_MAPS["every_module_nvme"], offload_dir=offload_dir)
    hook = model.body.layers[1]._hf_hook
    assert set(hook.weights_map) == {
        k.removeprefix("body.layers.1.") for k in original if k.startswith("body.layers.1.") and not k.endswith("scale")
    }
    for key in hook.weights_map:
        assert torch.equal(hook.weights_map[key], original[f"body.layers.1.{key}"])


def test_missing_offload_dir_is_a_clear_error():
    with pytest.raises(ValueError, match="no offload_dir"):
        accel_nvme.dispatch_model(tiny_lm(), {"": "nvme"})


def test_unknown_module_is_a_clear_error(offload_dir):
    with pytest.raises(ValueError, match="neither modules nor parameters/buffers of TinyLM"):
        accel_nvme.dispatch_model(tiny_lm(), {"": "cpu", "body.nope": "nvme"}, offload_dir=offload_dir)
    assert list(offload_dir.iterdir()) == []


def test_mixing_disk_and_nvme_is_refused(offload_dir):
    with pytest.raises(ValueError, match="mixes 'disk'"):
        accel_nvme.dispatch_model(tiny_lm(), {"embed": "disk", "body": "nvme", "head": "cpu"}, offload_dir=offload_dir)


def test_grad_enabled_forward_on_trainable_weights_runs_with_them_frozen(offload_dir):
    expected = reference(tiny_lm(), IDS)
    model = accel_nvme.dispatch_model(tiny_lm(), {"": "nvme"}, offload_dir=offload_dir)
    assert torch.equal(model(IDS), expected)
    with torch.no_grad():
        assert torch.equal(model(IDS), expected)


@pytest.mark.parametrize("close", [remove_hook_from_submodules, accel_nvme.close], ids=["accelerate", "accel_nvme"])
def test_removing_hooks_stops_threads_closes_files_and_restores_weights(offload_dir, close):
    expected = reference(tiny_lm(), IDS)
    gc.collect()  # models of earlier tests close their files when collected: not during this count
    threads = {t.ident for t in threading.enumerate()}
    fds = open_fds()
    model = accel_nvme.dispatch_model(tiny_lm(), DEVICE_MAPS["every_module_nvme"], offload_dir=offload_dir)
    with torch.inference_mode():
        model(IDS)
    close(model)
    alive = [t for t in threading.enumerate() if t.ident not in threads and t.name.startswith("accel-nvme")]
    assert alive == []
    assert open_fds() == fds
    assert all(p.device.type == "cpu" for p in model.parameters())
    with torch.inference_mode():
        assert torch.equal(model(IDS), expected)


def test_close_without_load_back_frees_everything_and_later_forwards_say_why(offload_dir):
    gc.collect()
    threads = {t.ident for t in threading.enumerate()}
    fds = open_fds()
    model = accel_nvme.dispatch_model(tiny_lm(), DEVICE_MAPS["every_module_nvme"], offload_dir=offload_dir)
    with torch.inference_mode():
        model(IDS)
    accel_nvme.close(model, load_back=False)
    alive = [t for t in threading.enumerate() if t.ident not in threads and t.name.startswith("accel-nvme")]
    assert alive == []
    assert open_fds() == fds
    with torch.inference_mode(), pytest.raises(RuntimeError, match="prefetcher was closed"):
        model(IDS)


def test_transformers_bound_dispatch_model_is_patched():
    import transformers.integrations.accelerate as hf_accelerate

    assert hf_accelerate.dispatch_model is accel_nvme.dispatch_model
    assert accelerate.big_modeling.dispatch_model is accel_nvme.dispatch_model


def test_verify_on_read_detects_a_flipped_byte(offload_dir):
    config = NvmeConfig(verify_on_read=True)
    model = accel_nvme.dispatch_model(
        tiny_lm(), DEVICE_MAPS["every_module_nvme"], offload_dir=offload_dir, config=config
    )
    with torch.inference_mode():
        model(IDS)
    hook = model.body.layers[2]._hf_hook
    path = accel_nvme.group_files(model)[hook.group]
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    with torch.inference_mode(), pytest.raises(Exception, match=f"{path}.*do not match their digest"):
        for _ in range(2):
            model(IDS)


def test_io_error_is_raised_in_the_forward_that_needs_the_group(offload_dir):
    model = accel_nvme.dispatch_model(
        tiny_lm(), DEVICE_MAPS["every_module_nvme"], offload_dir=offload_dir, config=NvmeConfig(prefetch_depth=1)
    )
    with torch.inference_mode():
        model(IDS)
        hook = model.body.layers[3]._hf_hook
        path = accel_nvme.group_files(model)[hook.group]
        original = path.read_bytes()
        path.write_bytes(original[: 4096 + 100])
        with pytest.raises(Exception, match=str(path)):
            for _ in range(2):
                model(IDS)
        path.write_bytes(original)
        assert torch.equal(model(IDS), reference(tiny_lm(), IDS))


def test_group_bytes_merges_consecutive_entries_and_reads_each_group_once(offload_dir):
    expected = reference(tiny_lm(), IDS)
    layer_bytes = sum(p.numel() * p.element_size() for p in tiny_lm().body.layers[0].parameters())
    config = NvmeConfig(group_bytes=2 * layer_bytes)
    device_map = {"embed": "cpu", "body.layers": "nvme", "body.final": "cpu", "head": "cpu"}
    model = accel_nvme.dispatch_model(tiny_lm(), device_map, offload_dir=offload_dir, config=config)
    hooks = nvme_hooks(model)
    assert [h.group for h in hooks] == [0, 0, 1, 1]
    (folder,) = [p for p in offload_dir.iterdir() if p.name.startswith(FOLDER_PREFIX)]
    assert len(list(folder.glob("group-*.safetensors"))) == 2
    prefetcher = hooks[0].prefetcher
    with torch.inference_mode():
        for _ in range(4):
            before = prefetcher.stats.groups_read
            assert torch.equal(model(IDS), expected)
            assert prefetcher.stats.groups_read - before <= 2


class RootOwned(torch.nn.Module):
    """A TinyLM whose root owns a parameter and a buffer beside its children, and names one module twice."""

    def __init__(self):
        super().__init__()
        self.lm = tiny_lm()
        self.gain = torch.nn.Parameter(torch.rand(97) + 0.5)
        self.register_buffer("offset", torch.rand(97))
        self.alias = self.lm.body.final  # one module under two names, as tied embeddings are

    def forward(self, ids):
        return self.lm(ids) * self.gain + self.offset


def root_owned():
    torch.manual_seed(3)
    return RootOwned().eval()


@pytest.mark.parametrize(
    "device_map",
    [
        {"": "nvme"},
        {"lm": "nvme", "gain": "nvme", "offset": "cpu", "alias": "nvme"},
        {"lm": "nvme", "gain": "cpu", "offset": "cpu", "alias": "nvme"},
    ],
)
def test_root_tensors_stay_resident_and_the_model_is_split(offload_dir, device_map):
    expected = reference(root_owned(), IDS)
    model = accel_nvme.dispatch_model(root_owned(), device_map, offload_dir=offload_dir)
    assert model.gain.device.type == "cpu" and model.offset.device.type == "cpu"
    assert [h.group_name for h in nvme_hooks(model)] == [
        "lm.embed",
        *(f"lm.body.layers.{i}" for i in range(4)),
        "lm.body.final",
        "lm.head",
    ]
    with torch.inference_mode():
        for _ in range(3):
            assert torch.equal(model(IDS), expected)


def test_a_tensor_key_inside_an_nvme_block_keeps_its_own_device(offload_dir):
    expected = reference(tiny_lm(), IDS)
    device_map = {"": "nvme", "body.layers.1.scale": "cpu", "body.layers.2.mlp.0.weight": "cpu"}
    model = accel_nvme.dispatch_model(tiny_lm(), device_map, offload_dir=offload_dir, offload_buffers=True)
    assert model.body.layers[2].mlp[0].weight.device.type == "cpu"
    assert model.body.layers[1].scale.device.type == "cpu" and model.body.layers[0].scale.device.type == "meta"
    with torch.inference_mode():
        assert torch.equal(model(IDS), expected)


@pytest.mark.parametrize("device_map", [{"": "nvme"}, "auto_blocks"])
def test_a_submodule_called_outside_its_group_loads_the_group(offload_dir, device_map):
    """DiT's root calls ``transformer_blocks[0].norm1.emb`` itself, before that block runs (accelerate hooks leaves)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=3, norm_num_groups=4, sample_size=8
    ).eval()
    inputs = {
        "hidden_states": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
        "timestep": torch.tensor([3]),
        "class_labels": torch.tensor([1]),
    }
    with torch.no_grad():
        expected = model(**inputs).sample
    if device_map == "auto_blocks":
        device_map = {"pos_embed": "cpu", "transformer_blocks": "nvme", "proj_out_1": "cpu", "proj_out_2": "cpu"}
    emb = model.transformer_blocks[0].norm1.emb.timestep_embedder.linear_1
    model = accel_nvme.dispatch_model(model, device_map, offload_dir=offload_dir, main_device="cpu")
    assert accel_nvme.stats(model).groups >= 3
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(**inputs).sample, expected)
        assert emb.weight.device.type == "meta"  # the group went back after the direct call
    remove_hook_from_submodules(model)
    assert "forward" not in vars(emb) or getattr(vars(emb)["forward"], "__wrapped__", None) is None
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, expected)
