"""Fused MoE experts on the device path (expert_transfer.py), with the CUDA runtime faked as test_gpu_path.py fakes it:
only streams and events are records; files, reads, the model and the copies (synchronous, into CPU memory) are real."""

import functools

import pytest
import test_expert_modules as modules
import torch
from fake_cuda import FakeRuntime
from safetensors.torch import save_file
from test_expert_modules import STYLES, checkpoints  # noqa: F401  (the remote-code checkpoints fixture)
from test_experts import IDS, assert_exact_with_grad, build, experts_hooks, generate, load, routed_experts
from test_gpu_path import load_gpu_check
from torch.multiprocessing.reductions import StorageWeakRef
from transformers import AutoModelForCausalLM

import accel_nvme
from accel_nvme import dispatch, expert_transfer, tensorkinds
from accel_nvme.expert_modules import ExpertModuleHook
from accel_nvme.expert_transfer import DeviceExperts
from accel_nvme.experts import FULL_READ_SHARE, ExpertsHook
from accel_nvme.prefetch import Prefetcher
from accel_nvme.transfer import DEVICE_ALIGNMENT

GARBAGE = 0xA5  # what a fresh device buffer holds here, standing in for uninitialised memory


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A tiny Qwen3-MoE saved, with its greedy tokens and logits in RAM."""
    model = build("qwen3_moe")
    path = tmp_path_factory.mktemp("qwen3_moe") / "checkpoint"
    model.save_pretrained(path)
    with torch.inference_mode():
        logits = model(IDS).logits
    return path, generate(model), logits, model


class Device:
    """The faked CUDA runtime dispatch gets, the device buffers handed out (weakly) and the bytes copied into them."""

    def __init__(self):
        self.runtime = FakeRuntime()
        self.buffers: list[StorageWeakRef] = []
        self.copied: list[int] = []
        self.copy_events: list = []

    def live_buffers(self) -> int:
        return sum(not ref.expired() for ref in self.buffers)


@pytest.fixture
def device(monkeypatch):
    """Dispatch takes the device path (the prefetcher gets the faked runtime); device buffers start as garbage."""
    found = Device()
    monkeypatch.setattr(dispatch, "Prefetcher", functools.partial(Prefetcher, runtime=found.runtime))
    aligned_empty, copy_runs, place = expert_transfer.aligned_empty, expert_transfer.copy_runs, DeviceExperts.place

    def garbage_empty(nbytes, on):
        data = aligned_empty(nbytes, on)
        data.fill_(GARBAGE)
        found.buffers.append(StorageWeakRef(data.untyped_storage()))
        return data

    def counted_copy(data, host, layout):
        found.copied.append(sum(run.nbytes for run in layout.runs))
        return copy_runs(data, host, layout)

    def noted_place(self, host, spans):
        tensors = place(self, host, spans)
        copied = self._copied
        copied.waited_by_host = False
        wait = copied.synchronize

        def synchronize():
            copied.waited_by_host = True
            wait()

        copied.synchronize = synchronize
        found.copy_events.append(copied)
        return tensors

    monkeypatch.setattr(expert_transfer, "aligned_empty", garbage_empty)
    monkeypatch.setattr(expert_transfer, "copy_runs", counted_copy)
    monkeypatch.setattr(DeviceExperts, "place", noted_place)
    return found


def row_bytes(hook: ExpertsHook) -> int:
    """Bytes of one expert's rows over the module's tensors."""
    return sum(t.row_bytes for t in hook.tensors)


@pytest.mark.parametrize("cache", [0, 1 << 30], ids=["no_cache", "cache"])
def test_generate_and_forward_equal_the_model_in_ram(qwen3, offload_dir, device, cache):
    path, tokens, logits, _ = qwen3
    model = load(path, offload_dir, expert_cache_bytes=cache)
    hooks = experts_hooks(model)
    assert len(hooks) == 2 and all(isinstance(h.placement, DeviceExperts) for h in hooks)
    assert torch.equal(generate(model), tokens)
    with torch.inference_mode():
        assert torch.equal(model(IDS).logits, logits)
    assert torch.equal(generate(model), tokens)
    assert device.copied and len(device.copy_events) == len(device.copied)


def test_only_the_routed_rows_go_to_the_device_and_the_others_are_zeros(qwen3, offload_dir, device, monkeypatch):
    """With a cache holding every expert read, the host buffers hold more than a forward's experts (a prefill reads them
    all); each forward copies the rows of its routed experts only, into a device buffer that is zeros elsewhere."""
    path, tokens, _, reference = qwen3
    model = load(path, offload_dir, expert_cache_bytes=1 << 30)
    seen = routed_experts(model)
    hooked = [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, "_hf_hook", None), ExpertsHook)]
    modules = {m._hf_hook.placement: (n, m) for n, m in hooked}
    checked = {"decode": 0, "prefill": 0, "cached_elsewhere": 0}
    place = DeviceExperts.place

    def checked_place(self, host, spans):
        name, module = modules[self]
        routed, copied = seen[module], len(device.copied)
        full = len(routed) > FULL_READ_SHARE * self.tensors[0].shape[0]
        wanted = set(routed)
        hook = module._hf_hook
        others = [e for e in range(hook.num_experts) if e not in wanted]
        checked["cached_elsewhere"] += any(hook.rows.cache.holds(hook.rows, e) for e in others)
        tensors = place(self, host, spans)
        assert sum(device.copied[copied:]) == len(wanted) * row_bytes(hook), f"{name}: bytes copied"
        for t in self.tensors:
            value, weight = tensors[t.name], reference.get_submodule(name).get_parameter(t.name)
            assert value.data_ptr() % DEVICE_ALIGNMENT == 0
            for e in range(t.shape[0]):
                if e in wanted:
                    assert torch.equal(value[e], weight[e]), (name, t.name, e)
                else:
                    assert not value[e].any(), f"{name}.{t.name}: expert {e} is not routed, yet not zeros"
        checked["prefill" if full else "decode"] += 1
        return tensors

    monkeypatch.setattr(DeviceExperts, "place", checked_place)
    assert torch.equal(generate(model), tokens)
    assert checked["decode"] == 2 * 5 and checked["prefill"] == 2  # 2 layers, a prompt then 5 decode tokens
    assert checked["cached_elsewhere"] > 0, "no host buffer held an expert the forward did not route to"


def test_device_memory_is_released_after_each_experts_forward(qwen3, offload_dir, device):
    path, tokens, _, _ = qwen3
    model = load(path, offload_dir, expert_cache_bytes=0)
    after = []
    for module in model.modules():
        if isinstance(getattr(module, "_hf_hook", None), ExpertsHook):
            module.register_forward_hook(lambda *_: after.append(device.live_buffers()))
    assert torch.equal(generate(model), tokens)
    assert len(after) == 2 * 6 and after == [0] * len(after), "a device buffer outlived its module's forward"
    assert len(device.buffers) == len(after)


def test_copies_run_on_the_side_stream_after_the_zeroing_and_compute_waits_for_them(
    qwen3, offload_dir, device, monkeypatch
):
    """Each experts copy: on the side stream (where the ring's fills run too, from the reader's threads), after a wait
    on the event compute recorded once the buffer was zeroed; then compute waits on the copy's event."""
    path, tokens, _, _ = qwen3
    model = load(path, offload_dir, expert_cache_bytes=0)
    runtime, place, calls = device.runtime, DeviceExperts.place, []

    def logged_place(self, host, spans):
        (side,) = runtime.side
        compute_from, side_from = len(runtime.compute.log), len(side.log)
        tensors = place(self, host, spans)
        calls.append((runtime.compute.log[compute_from:], side.log[side_from:], self._copied))
        return tensors

    monkeypatch.setattr(DeviceExperts, "place", logged_place)
    assert torch.equal(generate(model), tokens)
    assert len(calls) == 2 * 6
    for compute, side, copied in calls:
        recorded = [event for kind, event in compute if kind == "record"]
        at = next(i for i, (kind, event) in enumerate(side) if kind == "record" and event is copied)
        waited = [event for kind, event in side[:at] if kind == "wait"]
        zeroed = next((e for e in waited if any(e is r for r in recorded)), None)
        assert zeroed is not None, "the copy did not wait for the zeroing on the compute stream"
        after = [kind == "wait" and event is copied for kind, event in compute]
        assert True in after, "compute did not wait for the copy"
        assert [event for kind, event in compute].index(zeroed) < after.index(True)
    assert all(event.waited_by_host for event in device.copy_events), "a module's forward ended before its copy did"


def test_a_forward_with_grad_enabled_equals_the_model_in_ram(qwen3, offload_dir, device):
    """Autograd keeps the experts' device buffer until backward: nothing may reuse it before."""
    path, _, _, reference = qwen3
    assert_exact_with_grad(load(path, offload_dir, expert_cache_bytes=0), reference)
    assert device.copy_events


def test_experts_stored_narrower_for_cuda_are_widened_on_the_device(offload_dir, device, monkeypatch, tmp_path):
    """A bf16 checkpoint holding fused experts tensors, loaded in fp32, keeps bf16 in its group files for a CUDA
    execution device (faked here): the experts' rows are copied as stored and widened on the device, exactly."""
    saved = build("qwen3_moe").to(torch.bfloat16)
    saved.save_pretrained(tmp_path / "checkpoint")  # the config; its weights file holds one tensor per expert
    fused = {name: tensor.contiguous() for name, tensor in saved.state_dict().items()}
    save_file(fused, str(tmp_path / "checkpoint" / "model.safetensors"), metadata={"format": "pt"})
    eager = dict(dtype=torch.float32, experts_implementation="eager")  # F.linear: no cast of the weights to fp32
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint", **eager).eval()
    monkeypatch.setattr(tensorkinds, "_is_cuda", lambda main_device: True)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "checkpoint",
        **eager,
        device_map="auto",
        max_memory={"cpu": "20KB"},
        offload_backend="nvme",
        offload_folder=str(offload_dir),
    )
    hooks = experts_hooks(model)
    assert hooks and all(t.dtype == torch.bfloat16 for h in hooks for t in h.tensors)
    assert torch.equal(generate(model), generate(reference))


def test_without_expert_streaming_the_experts_stream_with_their_block(qwen3, offload_dir, device):
    path, tokens, _, _ = qwen3
    model = load(path, offload_dir, expert_streaming=False)
    assert not experts_hooks(model) and not device.copy_events
    assert torch.equal(generate(model), tokens)
    assert accel_nvme.stats(model).total.expert_bytes_read == 0


def test_the_gpu_checks_moe_step_copies_the_routed_experts_only(device, tmp_path):
    """scripts/gpu_check.py's MoE step on the faked device path: exact tokens, and per decode token exactly k experts
    per layer copied (top-k picks k distinct experts), which its row accepts; a copy of every row it refuses."""
    check = load_gpu_check()
    moe = check.moe_check(torch.device("cpu"), tmp_path)
    assert moe["exact"] and moe["decode_tokens"] == check.MOE_NEW_TOKENS - 1
    assert moe["expert_bytes_copied_per_token"] == moe["routed_bound_per_token"] < moe["experts_bytes"]
    assert moe["expert_bytes_read_per_token"] == moe["routed_bound_per_token"]  # no cache: every routed expert read
    (row,) = check.moe_rows({"moe": moe, "cuda": True})
    assert row.verdict == "FAIL", "the faked device is the CPU, not a GPU"
    (row,) = check.moe_rows({"moe": dict(moe, on_device=["cuda:0"]), "cuda": True})
    assert row.verdict == "PASS", row
    every_row = dict(moe, on_device=["cuda:0"], expert_bytes_copied_per_token=moe["experts_bytes"])
    (row,) = check.moe_rows({"moe": every_row, "cuda": True})
    assert row.verdict == "FAIL", row


@pytest.mark.parametrize("style", STYLES)
def test_a_list_of_expert_modules_equals_the_model_in_ram(checkpoints, offload_dir, device, style):  # noqa: F811
    """Remote code's lists of expert modules (test_expert_modules.py) on the device path: each call of an expert copies
    that expert's tensors, and its device buffer is freed when the call returns."""
    path, tokens, logits, _ = checkpoints[style]
    model = modules.load(path, offload_dir, expert_cache_bytes=0)
    hooks = modules.hooks_of(model, ExpertModuleHook)
    assert hooks and all(isinstance(hook.placement, DeviceExperts) for hook in hooks.values())
    after = []
    for name in hooks:
        model.get_submodule(name).register_forward_hook(lambda *_: after.append(device.live_buffers()))
    assert torch.equal(modules.generate(model), tokens)
    with torch.inference_mode():
        assert torch.equal(model(modules.IDS).logits, logits)
    assert after and after == [0] * len(after), "a device buffer outlived its expert's call"
    assert device.copied == [modules.EXPERT_BYTES] * len(after), "each call copies its expert's tensors, once"
