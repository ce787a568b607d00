"""Conformance (issue 10): every model, map and entry point that accelerate's "disk" tier serves, "nvme" serves.

Each case loads a real transformers/diffusers class (tiny config, saved once per session) through one entry point,
on the "nvme" tier and on accelerate's "disk" tier as the baseline, and compares its output with ``torch.equal``
to the model in RAM — under ``no_grad`` and with grad enabled. A case the baseline fails for its own reasons is
listed in ``BASELINE_FAILS`` and asserted to fail that way.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import accelerate
import pytest
import torch
from accelerate import init_empty_weights, load_checkpoint_and_dispatch
from accelerate.hooks import AlignDevicesHook
from accelerate.utils import compute_module_sizes
from conformance_models import SPECS, Spec
from packaging.version import Version
from safetensors.torch import save_model
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import accel_nvme
from accel_nvme.experts import ExpertsHook
from accel_nvme.maintenance import inspect_folder

# Fractions of the model's size given as the CPU budget: some, most, and all blocks stream.
BUDGETS = {"cpu70": 0.7, "cpu40": 0.4, "cpu0": 0.0}
ENTRIES = (*BUDGETS, "dispatch", "load_checkpoint", "whole", "whole_pretrained")
FROM_PRETRAINED = (*BUDGETS, "whole_pretrained")
TIERS = ("nvme", "disk")

# Checkpoint loads stream in place (issue 23) unless the suite runs with ACCEL_NVME_COPY=true: then they copy.
COPYING = os.environ.get("ACCEL_NVME_COPY", "auto").strip().lower() in {"1", "true", "yes", "on"}
FROM_CHECKPOINT = (*FROM_PRETRAINED, "load_checkpoint")

MAP_BUDGET = 0.7  # infer_auto_device_map on a CPU-only box keeps room for the largest layer: below this, {"": "disk"}

# (model, entry) -> what accelerate's "disk" tier raises there, for reasons of its own.
BASELINE_FAILS: dict[tuple[str, str], tuple[type[BaseException], str]] = {
    # proj_out is tied to model.decoder.embed_tokens, which the checkpoint stores once under the decoder's name and
    # which stays on the CPU: the disk hook of proj_out looks its own name up in the offload index and misses.
    ("whisper", "load_checkpoint"): (KeyError, r"proj_out\.weight"),
}
# models whose output on accelerate's "disk" tier may differ from RAM in the last bits, for reasons of its own: CLIP
# through from_pretrained is off by 4.5e-8 with transformers 5.17, and with 5.25 on some machines (the nvme tier exact)
BASELINE_INEXACT = {"clip"}
if Version(accelerate.__version__) < Version("1.16"):
    # its load_checkpoint_in_model leaves the buffers of "disk" entries at their initial values (BART's
    # final_logits_bias): silently wrong outputs; the nvme tier loads them as 1.16 does
    BASELINE_FAILS["bart", "load_checkpoint"] = (AssertionError, "load_checkpoint/disk under no_grad: max diff")
# (model, entry) -> what the library itself raises before any tier is involved: both tiers must raise it.
LIBRARY_REFUSES: dict[tuple[str, str], tuple[type[BaseException], str]] = {
    ("ltx_video", budget): (ValueError, "does not support `device_map='auto'`") for budget in BUDGETS
}


@dataclass
class Saved:
    """A model saved once per session, with its outputs in RAM."""

    spec: Spec
    model: torch.nn.Module
    folder: Path
    expected: torch.Tensor
    expected_with_grad: tuple[torch.Tensor, torch.Tensor | None]

    @property
    def size(self) -> int:
        return compute_module_sizes(self.model)[""]

    @property
    def weights(self) -> Path:
        """The state dict as accelerate's users save it (transformers 5 renames some keys in save_pretrained)."""
        return self.folder / "accelerate" / "model.safetensors"

    def no_split(self) -> list[str]:
        return sorted(getattr(self.model, "_no_split_modules", None) or [])

    def fresh(self) -> torch.nn.Module:
        return copy.deepcopy(self.model)

    def empty(self) -> torch.nn.Module:
        """The model's class built on the meta device, for ``load_checkpoint_and_dispatch``."""
        model_class = type(self.model)
        with init_empty_weights():
            if self.spec.library == "diffusers":
                model = model_class.from_config(self.model.config)
            else:
                model = model_class(self.model.config)
        _tie_like(model, self.model)
        return model.eval()

    def device_map(self, tier: str, fraction: float = MAP_BUDGET) -> dict:
        """accelerate's ``infer_auto_device_map`` at ``fraction`` of the model's size, "disk" mapped to ``tier``."""
        inferred = accelerate.infer_auto_device_map(
            self.model, max_memory={"cpu": int(fraction * self.size)}, no_split_module_classes=self.no_split()
        )
        assert "disk" in inferred.values(), f"{self.spec.name}: nothing offloaded by {inferred}"
        return {name: tier if device == "disk" else device for name, device in inferred.items()}


def _tie_like(empty: torch.nn.Module, model: torch.nn.Module) -> None:
    """Share ``empty``'s parameters exactly where ``model`` shares them (``tie_weights`` may tie more, or less)."""
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        canonical = first.setdefault(id(param), name)
        if canonical != name:
            owner, _, attr = name.rpartition(".")
            setattr(empty.get_submodule(owner), attr, empty.get_parameter(canonical))


_SAVED: dict[str, Saved] = {}


@pytest.fixture(scope="session")
def models_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("conformance")


def saved(name: str, folder: Path) -> Saved:
    """The model ``name`` saved with ``save_pretrained`` (once per session) and its output in RAM."""
    if name not in _SAVED:
        spec = SPECS[name]
        model = spec.build()
        path = folder / name
        model.save_pretrained(path)
        (path / "accelerate").mkdir()
        save_model(model, str(path / "accelerate" / "model.safetensors"), metadata={"format": "pt"})
        with torch.no_grad():
            expected = spec.run(model, spec.inputs())
        expected_with_grad = run_with_grad(spec, model)  # T5 differs in the last bit with grad on
        _SAVED[name] = Saved(spec, model, path, expected, expected_with_grad)
    return _SAVED[name]


def run_with_grad(spec: Spec, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output with grad enabled, and the gradient of its sum for the first floating-point input (if any)."""
    inputs = spec.inputs()
    name = next((k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
    with torch.enable_grad():
        if name is not None:
            inputs[name].requires_grad_(True)
        out = spec.run(model, inputs)
        grad = torch.autograd.grad(out.sum(), inputs[name])[0] if name is not None else None
    return out.detach(), grad


def load(case: Saved, entry: str, tier: str, offload: Path) -> torch.nn.Module:
    """``case``'s model through ``entry`` with its offloaded modules on ``tier``."""
    offload.mkdir(exist_ok=True)
    model_class = type(case.model)
    nvme = {"offload_backend": "nvme"} if tier == "nvme" else {}
    if entry in BUDGETS:
        budget = {"cpu": int(BUDGETS[entry] * case.size)}
        return model_class.from_pretrained(
            case.folder, device_map="auto", max_memory=budget, offload_folder=str(offload), **nvme
        )
    if entry == "dispatch":
        dispatch = accel_nvme.dispatch_model if tier == "nvme" else accelerate.dispatch_model
        return dispatch(case.fresh(), case.device_map(tier), offload_dir=str(offload))
    if entry == "load_checkpoint":
        return load_checkpoint_and_dispatch(
            case.empty(), str(case.weights), device_map=case.device_map(tier), offload_folder=str(offload)
        )
    if entry == "whole_pretrained":  # how diffusers pipelines load their streamed components
        return model_class.from_pretrained(case.folder, device_map={"": tier}, offload_folder=str(offload))
    assert entry == "whole"
    if tier == "disk":  # accelerate's dispatch_model fails on {"": "disk"} (see the test below): its own way instead
        return accelerate.disk_offload(case.fresh(), str(offload), execution_device="cpu")
    return accel_nvme.dispatch_model(case.fresh(), {"": "nvme"}, offload_dir=str(offload))


def assert_offloaded(model: torch.nn.Module, tier: str) -> None:
    """Something really streams: nvme groups, or accelerate hooks that offload."""
    if tier == "nvme":
        assert accel_nvme.stats(model).groups >= 1
    else:
        hooks = [getattr(m, "_hf_hook", None) for m in model.modules()]
        assert any(isinstance(h, AlignDevicesHook) and h.offload for h in hooks), "nothing offloaded to disk"


def assert_reads_from(offload: Path, in_place: bool) -> None:
    """The groups stream from the checkpoint (in place), or from group files."""
    sources = {group["source"] for model in inspect_folder(offload)["models"] for group in model["groups"]}
    assert sources == {"checkpoint" if in_place else "group file"}, sources


class WeightAlignment(TorchFunctionMode):
    """Records every CPU parameter an op reads at an address that is not 64-byte aligned (issue items 4 and 5).

    CPU kernels may give other bits for the same weights at another alignment; torch's allocator aligns to 64.
    A read is "streamed" when its address is none of the model's CPU parameters at rest (before the forward).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.at_rest = {p.data_ptr() for p in model.parameters() if p.device.type == "cpu"}
        self.misaligned: list[tuple[str, tuple[int, ...], int, bool]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        for value in tree_leaves((args, kwargs or {})):
            if isinstance(value, torch.nn.Parameter) and value.device.type == "cpu" and value.data_ptr() % 64:
                op, streamed = getattr(func, "__name__", str(func)), value.data_ptr() not in self.at_rest
                self.misaligned.append((op, tuple(value.shape), value.data_ptr() % 64, streamed))
        return func(*args, **(kwargs or {}))


def assert_exact(case: Saved, model: torch.nn.Module, what: str, resident_aligned: bool | None = None) -> None:
    """Outputs equal the model in RAM under no_grad and with grad, and so does the gradient of a floating-point input.

    With ``resident_aligned`` not None (the nvme tier), every streamed weight is read 64-byte aligned, and so is
    every weight kept in RAM when ``resident_aligned`` (transformers' own loading leaves those as views into the
    mapped checkpoint, on the disk tier too).
    """
    spec = case.spec
    with torch.no_grad(), WeightAlignment(model) as alignment:
        out = spec.run(model, spec.inputs())
    assert torch.equal(out, case.expected), f"{spec.name} {what} under no_grad: max diff {_diff(out, case.expected)}"
    if resident_aligned is not None:
        wrong = [read for read in alignment.misaligned if read[3] or resident_aligned]
        assert not wrong, (
            f"{spec.name} {what}: {len(wrong)} weight reads not 64-byte aligned, first (op, shape, address % 64, "
            f"streamed): {wrong[0]}"
        )
    (out, grad), (expected, expected_grad) = run_with_grad(spec, model), case.expected_with_grad
    assert torch.equal(out, expected), f"{spec.name} {what} with grad: max diff {_diff(out, expected)}"
    assert grad is None or torch.equal(grad, expected_grad), f"{spec.name} {what}: input gradient differs"


def _diff(a: torch.Tensor, b: torch.Tensor) -> float | str:
    return (a - b).abs().max().item() if a.shape == b.shape else f"shape {tuple(a.shape)} vs {tuple(b.shape)}"


@contextlib.contextmanager
def as_recorded(name: str, entry: str, tier: str) -> Iterator[None]:
    """Run the block; where the library or the disk baseline fails for its own reasons, assert it fails that way."""
    failure = LIBRARY_REFUSES.get((name, entry)) or (BASELINE_FAILS.get((name, entry)) if tier == "disk" else None)
    if failure is None:
        yield
        return
    error, match = failure
    with pytest.raises(error, match=match):
        yield


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("name", SPECS)
def test_outputs_equal_the_model_in_ram(name, entry, tier, models_folder, tmp_path):
    case = saved(name, models_folder)
    with as_recorded(name, entry, tier):
        model = load(case, entry, tier, tmp_path / "offload")
        assert_offloaded(model, tier)
        if tier == "nvme":
            fused_experts = any(isinstance(getattr(m, "_hf_hook", None), ExpertsHook) for m in model.modules())
            in_place = entry in FROM_CHECKPOINT and not COPYING and not fused_experts  # experts: page-aligned copies
            assert_reads_from(tmp_path / "offload", in_place=in_place)
        resident_aligned = not (case.spec.library == "transformers" and entry in FROM_PRETRAINED)
        if tier == "disk" and name in BASELINE_INEXACT:
            try:
                assert_exact(case, model, f"{entry}/{tier}", None)
            except AssertionError as error:
                pytest.xfail(f"accelerate's disk tier is inexact here, for reasons of its own: {error}")
            return
        assert_exact(case, model, f"{entry}/{tier}", resident_aligned if tier == "nvme" else None)


# The suite runs checkpoint entries in one mode; these run them in the other one (ACCEL_NVME_COPY=true runs it all).
OTHER_MODE = ("llama", "bart", "whisper", "flux")  # a decoder, tied encoder-decoders, a diffusers model


@pytest.mark.parametrize("entry", ("cpu40", "load_checkpoint", "whole_pretrained"))
@pytest.mark.parametrize("name", OTHER_MODE)
def test_checkpoint_entries_in_the_other_mode(name, entry, models_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCEL_NVME_COPY", "false" if COPYING else "true")
    case = saved(name, models_folder)
    with as_recorded(name, entry, "nvme"):
        model = load(case, entry, "nvme", tmp_path / "offload")
        assert_reads_from(tmp_path / "offload", in_place=COPYING)
        resident_aligned = not (case.spec.library == "transformers" and entry in FROM_PRETRAINED)
        assert_exact(case, model, f"{entry}/nvme, {'in place' if COPYING else 'copied'}", resident_aligned)


def test_accelerate_dispatch_fails_on_a_whole_model_disk_map(models_folder, tmp_path):
    """Why the "whole" baseline is ``disk_offload``: accelerate's ``extract_submodules_state_dict`` matches keys
    starting with ``"" + "."`` only, so ``{"": "disk"}`` writes nothing and the index it then opens does not exist."""
    case = saved("llama", models_folder)
    with pytest.raises(FileNotFoundError, match=r"index\.json"):
        accelerate.dispatch_model(case.fresh(), {"": "disk"}, offload_dir=str(tmp_path / "offload"))


GENERATE = [name for name, spec in SPECS.items() if spec.generate]
IDS = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("entry", ["cpu40", "whole"])
@pytest.mark.parametrize("name", GENERATE)
def test_greedy_generate_gives_the_same_tokens(name, entry, tier, models_folder, tmp_path):
    case = saved(name, models_folder)

    def generate(model):
        with torch.no_grad():
            return model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=6, do_sample=False)

    expected = generate(case.model)
    with as_recorded(name, entry, tier):
        assert torch.equal(generate(load(case, entry, tier, tmp_path / "offload")), expected)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("entry", ["cpu40", "load_checkpoint", "whole"])
def test_clip_text_and_image_features(entry, tier, models_folder, tmp_path):
    case = saved("clip", models_folder)
    inputs = case.spec.inputs()

    def features(model):
        with torch.no_grad():
            text = model.get_text_features(inputs["input_ids"]).pooler_output
            image = model.get_image_features(inputs["pixel_values"]).pooler_output
        return text, image

    text, image = features(case.model)
    with as_recorded("clip", entry, tier):
        offloaded_text, offloaded_image = features(load(case, entry, tier, tmp_path / "offload"))
        exact = torch.equal(offloaded_text, text) and torch.equal(offloaded_image, image)
        if tier == "disk" and not exact and "clip" in BASELINE_INEXACT:
            pytest.xfail("accelerate's disk tier is inexact here, for reasons of its own")
        assert exact


@pytest.mark.parametrize("name", SPECS)
def test_whole_model_map_streams_block_by_block(name, models_folder, tmp_path):
    """``{"": "nvme"}`` keeps the RAM bound: the largest group is one block, not the model."""
    case = saved(name, models_folder)
    model = load(case, "whole", "nvme", tmp_path / "offload")
    groups = {
        group["name"]: group["data_bytes"] for group in inspect_folder(tmp_path / "offload")["models"][0]["groups"]
    }
    nested = [name for name, module in case.model.named_modules() if type(module).__name__ in case.no_split()]
    blocks = [b for b in nested if not any(b.startswith(f"{outer}.") for outer in nested)]  # outermost only
    assert accel_nvme.stats(model).groups == len(groups) > 1
    largest = max(groups, key=groups.get)
    assert groups[largest] < case.size / 2, f"{name}: group {largest!r} holds {groups[largest]} B of {case.size} B"
    for group in groups:
        inside = [block for block in blocks if group == "" or block == group or block.startswith(f"{group}.")]
        assert len(inside) <= 1, f"{name}: group {group!r} holds {len(inside)} blocks ({inside[:3]}, ...)"
