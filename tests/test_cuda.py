"""The CUDA path: side-stream copies from pinned staging buffers, placement on the GPU, stream ordering.

Skipped without a CUDA device; ``scripts/gpu_check.sh`` runs them on a GPU machine.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import IDS_SEED, run_dit, tiny_dit_pipeline, tiny_llama, tiny_lm

import accel_nvme
from accel_nvme import NvmeConfig

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


GPU_CHECK = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


def load_gpu_check():
    """scripts/gpu_check.py as a module (it imports examples/gpu_bench.py as ``gpu_bench``)."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


def ids():
    return torch.randint(0, 97, (4, 9), generator=torch.Generator().manual_seed(IDS_SEED))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "device_map",
    [
        {"": "nvme"},
        {
            "embed": 0,
            "body.layers.0": "nvme",
            "body.layers.1": "nvme",
            "body.layers.2": 0,
            "body.layers.3": "nvme",
            "body.final": 0,
            "head": "nvme",
        },
        {"embed": 0, "body.layers": "nvme", "body.final": "cpu", "head": 0},
    ],
    ids=["all_nvme", "nvme_between_gpu", "nvme_gpu_cpu"],
)
def test_cuda_outputs_equal_no_offload_with_wrap_around(offload_dir, dtype, device_map):
    expected = tiny_lm(dtype).to("cuda:0")
    with torch.inference_mode():
        expected = expected(ids().to("cuda:0")).cpu()
    model = accel_nvme.dispatch_model(
        tiny_lm(dtype), device_map, offload_dir=offload_dir, main_device=0, config=NvmeConfig(prefetch_depth=1)
    )
    with torch.inference_mode():
        for _ in range(5):
            assert torch.equal(model(ids().to("cuda:0")).cpu(), expected)
    prefetcher = next(
        m._hf_hook.prefetcher for m in model.modules() if hasattr(m, "_hf_hook") and hasattr(m._hf_hook, "prefetcher")
    )
    assert all(buffer.pinned for buffer in prefetcher.pool.buffers)


def nvme_prefetcher(model):
    return next(hook.prefetcher for hook in nvme_hooks(model))


@pytest.mark.parametrize("resident_budget", [0, 4 * (17 << 20)], ids=["streamed", "half_resident_in_ram"])
@pytest.mark.parametrize("spin", [0, 5_000_000], ids=["prompt", "gpu_behind"])
def test_cuda_device_memory_is_bounded_by_depth(offload_dir, resident_budget, spin):
    # 8 layers of 16 MB (fp32, width 1024): the stream must hold 3 device buffers (depth 2 + 1), never 8 layers
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    device_map = {"embed": 0, "body.layers": "nvme", "body.final": 0, "head": 0}
    config = NvmeConfig(prefetch_depth=2, resident_budget=resident_budget)
    model = accel_nvme.dispatch_model(
        tiny_lm(width=1024, depth=8), device_map, offload_dir=offload_dir, main_device=0, config=config
    )
    prefetcher = nvme_prefetcher(model)
    if resident_budget:
        assert len(prefetcher.resident) == 4 and prefetcher.resident_on_device() == []
    handles = [layer.register_forward_pre_hook(lambda m, a: torch.cuda._sleep(spin)) for layer in model.body.layers]
    layer_bytes = sum(p.nbytes for p in tiny_lm(width=1024, depth=8).body.layers[0].parameters())  # buffers stay
    kept = sum(p.nbytes for name, p in model.named_parameters() if not name.startswith("body.layers"))
    assert 3 * layer_bytes <= prefetcher.device_buffer_bytes() <= 3 * (layer_bytes + (16 << 10))
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        outputs = [model(ids().to("cuda:0")) for _ in range(3)]  # no synchronize: the CPU may run ahead
    torch.cuda.synchronize()
    for handle in handles:
        handle.remove()
    peak = torch.cuda.max_memory_allocated() - before
    assert peak <= kept + prefetcher.device_buffer_bytes() + (4 << 20), (peak, prefetcher.device_buffer_bytes())
    assert 8 * layer_bytes > kept + prefetcher.device_buffer_bytes() + (4 << 20)  # the bound could fail
    expected = tiny_lm(width=1024, depth=8).to("cuda:0")
    with torch.inference_mode():
        assert all(torch.equal(output, expected(ids().to("cuda:0"))) for output in outputs)


def test_every_streamed_tensor_on_the_device_is_aligned_to_256_bytes(offload_dir):
    from torch.overrides import TorchFunctionMode

    model = accel_nvme.dispatch_model(
        tiny_lm(torch.bfloat16), {"": "nvme"}, offload_dir=offload_dir, main_device=0, config=NvmeConfig()
    )
    seen = []

    class Record(TorchFunctionMode):  # every weight a kernel gets, as it gets it (inside the hooks)
        def __torch_function__(self, func, types, args=(), kwargs=None):
            for arg in [*args, *(kwargs or {}).values()]:
                if isinstance(arg, torch.nn.Parameter):
                    seen.append((arg.device.type, arg.data_ptr() % 256))
            return func(*args, **(kwargs or {}))

    with torch.inference_mode(), Record():
        model(ids().to("cuda:0"))
    assert len(seen) >= 10 and all(where == ("cuda", 0) for where in seen), seen


def test_close_after_a_cuda_forward_loads_back_to_the_gpu(offload_dir):
    with torch.inference_mode():
        expected = tiny_lm().to("cuda:0")(ids().to("cuda:0"))
    model = accel_nvme.dispatch_model(tiny_lm(), {"": "nvme"}, offload_dir=offload_dir, main_device=0)
    with torch.inference_mode():
        assert torch.equal(model(ids().to("cuda:0")), expected)
        accel_nvme.close(model)
        assert all(p.device == torch.device("cuda", 0) for p in model.parameters())
        assert torch.equal(model(ids().to("cuda:0")), expected)


def test_stats_on_cuda_count_gpu_idle_time_waiting_for_copies(offload_dir):
    model = accel_nvme.dispatch_model(
        tiny_lm(width=1024, depth=4), {"": "nvme"}, offload_dir=offload_dir, main_device=0
    )
    prefetcher = nvme_prefetcher(model)
    copy = prefetcher._copy_to_device

    def slow_copy(slot):
        with torch.cuda.stream(prefetcher._side_stream):
            torch.cuda._sleep(20_000_000)
        return copy(slot)

    prefetcher._copy_to_device = slow_copy
    with torch.inference_mode():
        model(ids().to("cuda:0"))
    torch.cuda.synchronize()
    assert accel_nvme.stats(model).total.stall_seconds > 0.005


# ---------------------------------------------------------------- placement on the GPU (issue 11)


@pytest.fixture
def deterministic():
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    pytest.importorskip("diffusers")
    path = tmp_path_factory.mktemp("dit") / "pipe"
    tiny_dit_pipeline().save_pretrained(path)
    return path


def nvme_hooks(module):
    return [
        m._hf_hook
        for m in module.modules()
        if isinstance(getattr(m, "_hf_hook", None), accel_nvme.NvmeAlignDevicesHook)
    ]


def expected_dit(device="cuda:0"):
    return run_dit(tiny_dit_pipeline().to(device))


@pytest.mark.parametrize("device_map", ["cuda", "cuda:0", 0, None])
def test_pipeline_computes_every_component_on_the_gpu(dit, offload_dir, deterministic, device_map):
    from diffusers import DiffusionPipeline

    kwargs = {} if device_map is None else {"device_map": device_map}
    pipe = DiffusionPipeline.from_pretrained(dit, offload_backend="nvme", offload_folder=offload_dir, **kwargs)
    hooks = nvme_hooks(pipe.transformer)
    assert hooks and all(hook.execution_device == torch.device("cuda", 0) for hook in hooks)
    assert hooks[0].prefetcher.device.type == "cuda"
    assert pipe.vae.device == torch.device("cuda", 0)  # placed whole
    assert pipe._execution_device.type == "cuda"
    assert pipe.to("cuda") is pipe  # the device it computes on already: moves the others (here: nothing to move)
    assert np.array_equal(run_dit(pipe), expected_dit())


@pytest.mark.parametrize("budget_kwarg", ["max_memory", "nvme_device_resident_budget"])
def test_pipeline_gpu_budget_keeps_the_denoiser_resident_first(dit, offload_dir, deterministic, budget_kwarg):
    from diffusers import DiffusionPipeline

    built = tiny_dit_pipeline()
    sizes = {name: sum(t.nbytes for t in getattr(built, name).state_dict().values()) for name in ("transformer", "vae")}
    budget = sizes["transformer"] + sizes["vae"] // 2
    pipe = DiffusionPipeline.from_pretrained(
        dit,
        device_map="cuda",
        **({budget_kwarg: {0: budget}} if budget_kwarg == "max_memory" else {budget_kwarg: budget}),
        nvme_components=["transformer", "vae"],
        offload_backend="nvme",
        offload_folder=offload_dir,
    )
    transformer, vae = accel_nvme.stats(pipe.transformer), accel_nvme.stats(pipe.vae)
    assert len(transformer.resident) == transformer.groups
    assert 0 < len(vae.resident) < vae.groups
    prefetcher = nvme_hooks(pipe.vae)[0].prefetcher
    assert prefetcher.resident_on_device() == prefetcher.resident  # on the GPU, not RAM
    for _ in range(2):
        assert np.array_equal(run_dit(pipe), expected_dit())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_pipeline_on_the_second_gpu(dit, offload_dir, deterministic):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(
        dit, device_map="cuda:1", offload_backend="nvme", offload_folder=offload_dir
    )
    assert all(hook.execution_device == torch.device("cuda", 1) for hook in nvme_hooks(pipe.transformer))
    assert pipe.vae.device == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="pass device_map='cuda:0'"):
        pipe.to("cuda:0")
    assert np.array_equal(run_dit(pipe), expected_dit("cuda:1"))


def test_auto_device_map_fills_the_gpu_then_the_cpu_then_streams_on_the_first_gpu(tmp_path, offload_dir):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(layers=6)
    model.save_pretrained(tmp_path / "llama")
    layer = sum(t.nbytes for t in model.model.layers[0].state_dict().values())
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.inference_mode():
        expected = model.to("cuda:0")(ids.to("cuda:0")).logits.cpu()
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "llama",
        device_map="auto",
        max_memory={0: 3 * layer, "cpu": 2 * layer},
        offload_backend="nvme",
        offload_folder=offload_dir,
    )
    tiers = set(loaded.hf_device_map.values())
    assert {0, "disk"} <= tiers, loaded.hf_device_map  # "disk" entries are the nvme ones
    hooks = nvme_hooks(loaded)
    assert hooks and all(hook.execution_device == torch.device("cuda", 0) for hook in hooks)
    with torch.inference_mode():
        for _ in range(2):
            assert torch.equal(loaded(ids.to("cuda:0")).logits.cpu(), expected)


def test_stream_ordering_under_slow_copies_and_slow_compute_with_negative_controls(tmp_path):
    check = load_gpu_check()
    bench = sys.modules["gpu_bench"]
    settings = bench.Settings(
        blocks=4,
        hidden=512,
        tokens=256,
        steps=1,
        device=torch.device("cuda", 0),
        modes=bench.MODES,
        offload_folder=tmp_path,
        dry_run=False,
        prefetch_depth=1,
    )
    result = check.ordering_check(settings, read_delay=0.02)
    for phase in ("copies", "compute"):
        run = result[phase]
        assert run["exact"], run
        assert run["host_resident_groups"] == 2 and run["groups_read"] >= 2  # 4 blocks: 2 resident, 2 streamed
        assert run["vram_extra_bytes"] <= run["ring_bytes"] * 1.25 + result["activation_bytes"], run
    assert result["copies"]["stall_s"] > 0  # the GPU waited for copies: their events were waited on
    assert not result["without_wait_event"]["exact"], "removing the wait on copies must break the outputs"
    assert not result["without_consumed"]["exact"], "removing the ring's wait on compute must break the outputs"


# ---------------------------------------------------------------- MoE: only the routed experts go to the GPU (issue 22)


def moe_reference(ids_on_gpu):
    """A tiny Qwen3-MoE on the GPU: the model, its greedy tokens and its logits."""
    from test_experts import build

    reference = build("qwen3_moe", experts_implementation="eager").to("cuda:0")  # fp32: not every GPU groups fp32
    with torch.inference_mode():
        tokens = reference.generate(
            ids_on_gpu, attention_mask=torch.ones_like(ids_on_gpu), max_new_tokens=6, do_sample=False
        )
        logits = reference(ids_on_gpu).logits
    return reference, tokens, logits


def moe_on_nvme(offload_dir, cache=0):
    """The same model, every module streamed, its fused experts read per expert, computing on cuda:0 (the GPU check
    runs a bf16 one with transformers' default grouped experts)."""
    from test_experts import build

    model = build("qwen3_moe", experts_implementation="eager")
    config = NvmeConfig(expert_cache_bytes=cache)
    return accel_nvme.dispatch_model(model, {"": "nvme"}, offload_dir=offload_dir, main_device=0, config=config)


def experts_modules(model):
    from accel_nvme.experts import ExpertsHook

    return {name: m for name, m in model.named_modules() if isinstance(getattr(m, "_hf_hook", None), ExpertsHook)}


@pytest.mark.parametrize("cache", [0, 1 << 30], ids=["no_cache", "cache"])
def test_moe_copies_only_the_routed_experts_to_the_gpu_and_equals_the_model_there(offload_dir, cache, monkeypatch):
    from test_experts import IDS, routed_experts
    from torch.multiprocessing.reductions import StorageWeakRef

    from accel_nvme.expert_transfer import DeviceExperts
    from accel_nvme.transfer import DEVICE_ALIGNMENT

    ids_on_gpu = IDS.to("cuda:0")
    reference, tokens, logits = moe_reference(ids_on_gpu)
    model = moe_on_nvme(offload_dir, cache)
    modules = experts_modules(model)
    seen = routed_experts(model)
    assert len(modules) == 2
    names = {m._hf_hook.placement: name for name, m in modules.items()}
    assert all(isinstance(p, DeviceExperts) and p.device == torch.device("cuda", 0) for p in names)
    place, buffers, after = DeviceExperts.place, [], []

    def checked_place(self, host, spans):
        before, module = self.bytes_copied, modules[names[self]]
        tensors = place(self, host, spans)
        wanted = set(seen[module])  # the experts top_k_index routed to: only their rows are copied
        assert self.bytes_copied - before == len(wanted) * sum(t.row_bytes for t in module._hf_hook.tensors)
        weights = reference.get_submodule(names[self])
        for t in self.tensors:
            value = tensors[t.name]  # read on the compute stream, which waited for the copy
            assert value.is_cuda and value.data_ptr() % DEVICE_ALIGNMENT == 0
            for e in range(t.shape[0]):
                if e in wanted:
                    assert torch.equal(value[e], getattr(weights, t.name)[e]), (names[self], t.name, e)
                else:
                    assert not value[e].any(), f"{names[self]}.{t.name}: expert {e} is not routed, yet not zeros"
        buffers.append(StorageWeakRef(tensors[self.tensors[0].name].untyped_storage()))
        return tensors

    monkeypatch.setattr(DeviceExperts, "place", checked_place)
    for module in modules.values():
        module.register_forward_hook(lambda *_: after.append(sum(not ref.expired() for ref in buffers)))
    with torch.inference_mode():
        assert torch.equal(
            model.generate(ids_on_gpu, attention_mask=torch.ones_like(ids_on_gpu), max_new_tokens=6, do_sample=False),
            tokens,
        )
        assert torch.equal(model(ids_on_gpu).logits, logits)
    assert len(after) == 2 * 7 and after == [0] * len(after), "a device buffer outlived its module's forward"
    decode = accel_nvme.stats(model).forwards[1:6]
    assert all(f.expert_cache_hits + f.expert_cache_misses == 2 * 2 for f in decode)


@pytest.mark.parametrize("control", [None, "wait_on_copy", "wait_on_zeroing"])
def test_moe_stream_ordering_under_slow_copies_and_slow_zeroing(offload_dir, control, monkeypatch):
    """Copies queued behind a spin on the side stream, and the zeroing behind a spin on the compute stream: exact with
    both waits; with either removed (negative controls) the experts compute on zeros or get their rows wiped."""
    from test_experts import IDS

    from accel_nvme import expert_transfer
    from accel_nvme.expert_transfer import DeviceExperts

    ids_on_gpu = IDS.to("cuda:0")
    _, _, logits = moe_reference(ids_on_gpu)
    model = moe_on_nvme(offload_dir)
    copy_runs, aligned_empty, place = expert_transfer.copy_runs, expert_transfer.aligned_empty, DeviceExperts.place

    def slow_copy(data, host, layout):  # on the side stream
        torch.cuda._sleep(20_000_000)
        return copy_runs(data, host, layout)

    def slow_zeroing(nbytes, device):  # on the compute stream, before the zeroing: longer than the copy's spin
        data = aligned_empty(nbytes, device)
        torch.cuda._sleep(100_000_000)
        return data

    def place_without_waiting_for_the_zeroing(self, host, runs):
        side = self.prefetcher.side_stream
        side.wait_event = lambda event: None
        try:
            return place(self, host, runs)
        finally:
            del side.wait_event

    monkeypatch.setattr(expert_transfer, "copy_runs", slow_copy)
    monkeypatch.setattr(expert_transfer, "aligned_empty", slow_zeroing)
    if control == "wait_on_copy":  # the experts' copies only: the block groups still wait for theirs
        prefetcher = next(iter(experts_modules(model).values()))._hf_hook.prefetcher
        monkeypatch.setattr(prefetcher, "to_compute", lambda data, copied, asked: data)
    elif control == "wait_on_zeroing":
        monkeypatch.setattr(DeviceExperts, "place", place_without_waiting_for_the_zeroing)
    with torch.inference_mode():
        exact = torch.equal(model(ids_on_gpu).logits, logits)
    assert exact == (control is None), f"control {control} removed: outputs {'equal' if exact else 'differ'}"


@pytest.mark.parametrize("style", ["deepseek", "mixtral"])
def test_moe_lists_of_expert_modules_on_the_gpu_equal_the_model_there(tmp_path, offload_dir, style):
    """Remote code's lists of expert modules: each expert called copies its own tensors to the GPU."""
    from test_expert_modules import IDS, save
    from transformers import AutoModelForCausalLM

    from accel_nvme.expert_modules import ExpertModuleHook
    from accel_nvme.expert_transfer import DeviceExperts

    save(tmp_path / "checkpoint", style)
    ids_on_gpu = IDS.to("cuda:0")
    mask = torch.ones_like(ids_on_gpu)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint", trust_remote_code=True).eval()
    with torch.inference_mode():
        tokens = reference.to("cuda:0").generate(ids_on_gpu, attention_mask=mask, max_new_tokens=6, do_sample=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint", trust_remote_code=True).eval()
    model = accel_nvme.dispatch_model(model, {"": "nvme"}, offload_dir=offload_dir, main_device=0)
    hooks = [m._hf_hook for m in model.modules() if isinstance(getattr(m, "_hf_hook", None), ExpertModuleHook)]
    assert hooks and all(isinstance(hook.placement, DeviceExperts) for hook in hooks)
    with torch.inference_mode():
        assert torch.equal(model.generate(ids_on_gpu, attention_mask=mask, max_new_tokens=6, do_sample=False), tokens)
    assert sum(hook.placement.bytes_copied for hook in hooks) > 0
