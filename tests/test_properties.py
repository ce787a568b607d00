"""Property: for any small model and any mix of "cpu"/"nvme" entries, streaming changes where bytes live, never what
is computed. Random depth, widths, dtypes, buffers, weight tying, nesting, device maps, prefetch depth and grouping."""

import tempfile
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import accel_nvme
from accel_nvme import NvmeAlignDevicesHook, NvmeConfig

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class Inner(nn.Module):
    """A Linear with optional persistent (``scale``) and non-persistent (``shift``) buffers, one level down."""

    def __init__(self, width_in: int, width_out: int, bias: bool, scale: bool, shift: bool):
        super().__init__()
        self.lin = nn.Linear(width_in, width_out, bias=bias)
        if scale:
            self.register_buffer("scale", torch.rand(width_out) + 0.5)
        if shift:
            self.register_buffer("shift", torch.rand(width_out), persistent=False)

    def forward(self, x):
        x = self.lin(x)
        if hasattr(self, "scale"):
            x = x * self.scale
        if hasattr(self, "shift"):
            x = x + self.shift
        return x


class Block(nn.Module):
    """``inner`` (nested Linear + buffers), an optional LayerNorm, then GELU; no tensors of its own."""

    def __init__(self, width_in: int, width_out: int, bias: bool, scale: bool, shift: bool, norm: bool):
        super().__init__()
        self.inner = Inner(width_in, width_out, bias, scale, shift)
        self.norm = nn.LayerNorm(width_out) if norm else None

    def forward(self, x):
        x = self.inner(x)
        if self.norm is not None:
            x = self.norm(x)
        return nn.functional.gelu(x)


class Net(nn.Module):
    def __init__(self, widths: list[int], features: list[tuple[bool, bool, bool, bool]]):
        super().__init__()
        self.blocks = nn.ModuleList(Block(widths[i], widths[i + 1], *features[i]) for i in range(len(widths) - 1))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@dataclass
class Case:
    widths: list[int]
    features: list[tuple[bool, bool, bool, bool]]
    tie: tuple[int, int] | None
    dtype: torch.dtype
    device_map: dict[str, str]
    prefetch_depth: int
    group_bytes: int
    offload_buffers: bool
    seed: int

    def model(self) -> Net:
        torch.manual_seed(self.seed)
        net = Net(self.widths, self.features)
        if self.tie is not None:
            a, b = self.tie
            net.blocks[b].inner.lin.weight = net.blocks[a].inner.lin.weight
        return net.to(self.dtype).eval().requires_grad_(False)


@st.composite
def cases(draw) -> Case:
    depth = draw(st.integers(1, 5))
    widths = draw(st.lists(st.integers(1, 24), min_size=depth + 1, max_size=depth + 1))
    tie = None
    if depth >= 2 and draw(st.booleans()):
        a, b = sorted(draw(st.lists(st.integers(0, depth - 1), min_size=2, max_size=2, unique=True)))
        widths[b] = widths[a]  # make Linear b the same shape as Linear a (b == a + 1 gives three equal widths)
        widths[b + 1] = widths[a + 1]
        tie = (a, b)
    features = [draw(st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans())) for _ in range(depth)]
    device_map = {}
    for i, (_, _, _, norm) in enumerate(features):
        if norm and draw(st.booleans()):  # split a block into its children
            device_map[f"blocks.{i}.inner"] = draw(st.sampled_from(["cpu", "nvme"]))
            device_map[f"blocks.{i}.norm"] = draw(st.sampled_from(["cpu", "nvme"]))
        else:
            device_map[f"blocks.{i}"] = draw(st.sampled_from(["cpu", "nvme"]))
    if "nvme" not in device_map.values():
        device_map[draw(st.sampled_from(sorted(device_map)))] = "nvme"
    return Case(
        widths=widths,
        features=features,
        tie=tie,
        dtype=draw(st.sampled_from(DTYPES)),
        device_map=device_map,
        prefetch_depth=draw(st.integers(1, 3)),
        group_bytes=draw(st.sampled_from([0, 0, 256, 4096])),
        offload_buffers=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_streamed_outputs_equal_resident_outputs(case):
    x = torch.randn(3, case.widths[0], generator=torch.Generator().manual_seed(case.seed)).to(case.dtype)
    with torch.inference_mode():
        expected = case.model()(x)
    with tempfile.TemporaryDirectory(prefix="accel-nvme-prop-") as offload_dir:
        model = accel_nvme.dispatch_model(
            case.model(),
            case.device_map,
            offload_dir=offload_dir,
            main_device="cpu",
            offload_buffers=case.offload_buffers,
            config=NvmeConfig(prefetch_depth=case.prefetch_depth, group_bytes=case.group_bytes),
        )
        assert any(isinstance(getattr(m, "_hf_hook", None), NvmeAlignDevicesHook) for m in model.modules())
        with torch.inference_mode():
            for _ in range(3):
                out = model(x)
                assert out.dtype == expected.dtype and out.shape == expected.shape
                assert torch.equal(out, expected), case
