"""diffusers' layerwise casting applied after a model is streamed: the group files are rewritten once in the storage
dtype (only the weights diffusers cast), each forward reads those bytes, and outputs equal the same casting in RAM."""

import pytest
import torch

pytest.importorskip("diffusers")
from conformance_models import SPECS
from diffusers import FluxTransformer2DModel
from diffusers.hooks import apply_layerwise_casting

import accel_nvme
from accel_nvme import tensorkinds
from accel_nvme.expert_modules import ExpertModuleHook
from accel_nvme.format import ALIGNMENT, TENSOR_ALIGNMENT, align_up, read_layout
from accel_nvme.store import FOLDER_PREFIX

flux, flux_inputs = SPECS["flux"].build, SPECS["flux"].inputs
FP8 = torch.float8_e4m3fn
CONFIG = accel_nvme.NvmeConfig(prefetch_depth=1)  # two staging buffers for nine groups: every forward reads every group


def cast(model):
    model.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=torch.float32)
    return model


def expected_outputs():
    """The casting applied to the model in RAM (its own allocations, 64-byte aligned), and without it."""
    with torch.no_grad():
        return cast(flux())(**flux_inputs()).sample, flux()(**flux_inputs()).sample


def file_dtypes(model) -> dict[str, torch.dtype]:
    """Each tensor's dtype in the group files ``model`` streams from."""
    return {e.name: e.dtype for path in accel_nvme.group_files(model) for e in read_layout(path).entries}


def check_streams_as_cast(model, expected, unrounded) -> None:
    """Three forwards equal to the model cast in RAM; the files hold exactly the weights diffusers cast in fp8; each
    forward reads the fp8 bytes (plus alignment), less than half the fp32 ones (norms and embeddings stay fp32)."""
    in_ram = cast(flux())
    with torch.no_grad():
        outputs = [model(**flux_inputs()).sample for _ in range(3)]
    assert not torch.equal(expected, unrounded)
    assert all(torch.equal(output, expected) for output in outputs)
    cast_dtypes = {name: tensor.dtype for name, tensor in in_ram.state_dict().items()}
    assert FP8 in cast_dtypes.values() and torch.float32 in cast_dtypes.values()  # norms and embeddings skipped
    assert file_dtypes(model) == cast_dtypes
    stored = sum(t.numel() * t.element_size() for t in in_ram.state_dict().values())
    unrounded_bytes = sum(t.numel() * t.element_size() for t in flux().state_dict().values())
    stats = accel_nvme.stats(model)
    padding = stats.groups * ALIGNMENT + len(cast_dtypes) * TENSOR_ALIGNMENT
    sections = [align_up(read_layout(path).data_bytes) for path in accel_nvme.group_files(model)]
    assert stored <= sum(sections) <= stored + padding < unrounded_bytes
    assert stored < unrounded_bytes / 2
    # every group read in every forward; the stream read one group ahead for a fourth forward
    assert stats.total.groups_read >= 3 * stats.groups
    assert stats.total.bytes_read <= 3 * (stored + padding) + max(sections)


def folders(offload_dir) -> dict:
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in offload_dir.rglob("*") if p.is_file()}


def test_enable_layerwise_casting_after_from_pretrained(tmp_path, offload_dir, caplog):
    expected, unrounded = expected_outputs()
    flux().save_pretrained(tmp_path / "flux")

    def load():
        return FluxTransformer2DModel.from_pretrained(
            tmp_path / "flux", device_map={"": "nvme"}, offload_folder=offload_dir, nvme_config=CONFIG
        )

    first = cast(load())
    check_streams_as_cast(first, expected, unrounded)
    assert "converted to" not in caplog.text
    written = folders(offload_dir)
    assert len(list(offload_dir.glob(f"{FOLDER_PREFIX}*"))) == 2  # the uncast weights' folder, and the fp8 one
    again = cast(load())  # a later load cast the same way finds both folders
    assert folders(offload_dir) == written
    check_streams_as_cast(again, expected, unrounded)
    with torch.no_grad():
        assert torch.equal(load()(**flux_inputs()).sample, unrounded)  # and a load without the casting is not cast


def test_enable_layerwise_casting_after_dispatch_model(offload_dir):
    expected, unrounded = expected_outputs()
    streamed = accel_nvme.dispatch_model(flux(), {"": "nvme"}, offload_dir=offload_dir, config=CONFIG)
    with torch.no_grad():
        assert torch.equal(streamed(**flux_inputs()).sample, unrounded)
    check_streams_as_cast(cast(streamed), expected, unrounded)


def test_a_layer_cast_on_its_own_is_rewritten(offload_dir):
    """``apply_layerwise_casting`` on a part of the model (here ``x_embedder``, an nvme group of its own, whose
    placeholder diffusers casts back to fp32 before each read) rewrites that layer's group."""
    model = flux()
    apply_layerwise_casting(model.x_embedder, FP8, torch.float32, skip_modules_pattern=None)
    with torch.no_grad():
        expected = model(**flux_inputs()).sample
    streamed = accel_nvme.dispatch_model(flux(), {"": "nvme"}, offload_dir=offload_dir, config=CONFIG)
    apply_layerwise_casting(streamed.x_embedder, FP8, torch.float32, skip_modules_pattern=None)
    assert {name for name, dtype in file_dtypes(streamed).items() if dtype == FP8} == {
        "x_embedder.weight",
        "x_embedder.bias",
    }
    with torch.no_grad():
        assert torch.equal(streamed(**flux_inputs()).sample, expected)


def test_half_after_dispatch_is_converted_then_recast(offload_dir, caplog, monkeypatch):
    """A dtype changed by other means (``model.half()``) is converted after each read, with a warning naming
    ``accel_nvme.recast``, which then rewrites the groups."""
    monkeypatch.setattr(tensorkinds, "_WARNED_NARROWED", set())  # warned once per process: maybe by an earlier test
    with torch.no_grad():
        expected = flux().half()(**{k: v.half() if v.is_floating_point() else v for k, v in flux_inputs().items()})
    inputs = {k: v.half() if v.is_floating_point() else v for k, v in flux_inputs().items()}
    streamed = accel_nvme.dispatch_model(flux(), {"": "nvme"}, offload_dir=offload_dir, config=CONFIG).half()
    with torch.no_grad():
        assert torch.equal(streamed(**inputs).sample, expected.sample)
    assert "call accel_nvme.recast(model)" in caplog.text
    assert set(file_dtypes(streamed).values()) == {torch.float32}
    assert accel_nvme.recast(streamed) == len(file_dtypes(streamed))
    assert set(file_dtypes(streamed).values()) == {torch.float16}
    with torch.no_grad():
        assert torch.equal(streamed(**inputs).sample, expected.sample)


def test_a_damaged_group_file_is_refused_and_nothing_is_left(offload_dir):
    """The rewrite reads the old group files checked against their digests; a mismatch raises, writes nothing."""
    streamed = accel_nvme.dispatch_model(flux(), {"": "nvme"}, offload_dir=offload_dir, config=CONFIG)
    path = accel_nvme.group_files(streamed)[3]
    layout = read_layout(path)
    with open(path, "r+b") as f:
        f.seek(layout.data_offset + 8)
        byte = f.read(1)
        f.seek(layout.data_offset + 8)
        f.write(bytes([byte[0] ^ 0x40]))
    before = sorted(p.name for p in offload_dir.iterdir() if not p.name.endswith(".lock"))
    with pytest.raises(Exception, match="does not match its digest"):
        cast(streamed)
    assert sorted(p.name for p in offload_dir.iterdir() if not p.name.endswith(".lock")) == before
    assert accel_nvme.group_files(streamed)[3] == path  # still the old folder


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


def test_a_tied_weight_is_rewritten_once(offload_dir):
    """Tied names share one placeholder, so casting one module casts the weight of both, as in RAM."""
    model = Tied()
    apply_layerwise_casting(model, FP8, torch.float32, skip_modules_pattern=())
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    streamed = accel_nvme.dispatch_model(Tied(), {"a": "nvme", "b": "nvme"}, offload_dir=offload_dir)
    apply_layerwise_casting(streamed, FP8, torch.float32, skip_modules_pattern=())
    assert file_dtypes(streamed) == {"a.weight": FP8, "a.bias": FP8, "b.bias": FP8}
    with torch.no_grad():
        assert torch.equal(streamed(x), expected)


def test_a_model_with_fused_moe_experts_is_refused(offload_dir):
    """Its experts groups are read by their own hooks (experts.py): not rewritten, refused with what to do."""
    transformers = pytest.importorskip("transformers")
    config = transformers.OlmoeConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, num_experts=8, num_experts_per_tok=2,
    )  # fmt: skip
    torch.manual_seed(0)
    streamed = accel_nvme.dispatch_model(transformers.OlmoeForCausalLM(config), {"": "nvme"}, offload_dir=offload_dir)
    with pytest.raises(RuntimeError, match=r"cannot be rewritten in a model with MoE experts .*before dispatch"):
        apply_layerwise_casting(streamed, FP8, torch.float32, skip_modules_pattern=())
    assert len(list(offload_dir.glob(f"{FOLDER_PREFIX}*"))) == 1


class ExpertList(torch.nn.Module):
    """A block holding a list of expert modules (as remote code does), calling the first two."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(16, 4)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        return self.experts[0](x) + self.experts[1](self.gate(x).sum() * x)


def test_a_model_with_a_list_of_expert_modules_is_refused(offload_dir):
    torch.manual_seed(0)
    model = torch.nn.Sequential(ExpertList(), torch.nn.Linear(16, 256))  # the block under half the model: not split
    x = torch.randn(2, 16)
    expected = model(x)
    streamed = accel_nvme.dispatch_model(model, {"0": "nvme", "1": "nvme"}, offload_dir=offload_dir)
    assert isinstance(streamed[0].experts[2]._hf_hook, ExpertModuleHook)
    assert torch.equal(streamed(x), expected)
    with pytest.raises(RuntimeError, match=r"MoE experts read one expert at a time \('0.experts'\)"):
        apply_layerwise_casting(streamed, FP8, torch.float32, skip_modules_pattern=())
    assert len(list(offload_dir.glob(f"{FOLDER_PREFIX}*"))) == 1
