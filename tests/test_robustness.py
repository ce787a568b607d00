"""Streaming never changes what is computed: autograd through frozen streamed weights, outputs that view a weight,
forwards that raise midway, models whose group order changes between calls, and the signature transformers reads."""

import inspect

import pytest
import torch
from torch import nn

import accel_nvme
from accel_nvme import NvmeConfig


class Flaky(nn.Linear):
    """A Linear that can be told to raise in the middle of a forward."""

    fail = False

    def forward(self, x):
        if self.fail:
            raise KeyboardInterrupt("simulated Ctrl-C")
        return super().forward(x)


class Stack(nn.Module):
    def __init__(self, n=4, width=16):
        super().__init__()
        self.layers = nn.ModuleList(Flaky(width, width) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def stack(seed=0):
    torch.manual_seed(seed)
    return Stack().eval().requires_grad_(False)


def test_input_gradients_through_frozen_streamed_weights_are_exact(offload_dir):
    x = torch.randn(3, 16, requires_grad=True)
    stack()(x).sum().backward()
    expected, x.grad = x.grad.clone(), None
    model = accel_nvme.dispatch_model(
        stack(), {"layers": "nvme"}, offload_dir=offload_dir, config=NvmeConfig(prefetch_depth=1)
    )
    model(x).sum().backward()
    assert torch.equal(x.grad, expected)


class Positions(nn.Module):
    """Returns a slice of its own weight: a view of whatever buffer holds it."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(8, 16), requires_grad=False)

    def forward(self, n):
        return self.table[:n]


class UsesPositions(nn.Module):
    def __init__(self):
        super().__init__()
        self.positions = Positions()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))

    def forward(self, n):
        p = self.positions(n)
        h = p
        for layer in self.layers:
            h = layer(h)
        return h + p


def test_an_output_that_views_a_streamed_weight_stays_valid(offload_dir):
    torch.manual_seed(0)
    model = UsesPositions().eval()
    expected = model(5).detach()
    model = accel_nvme.dispatch_model(
        model, {"positions": "nvme", "layers": "nvme"}, offload_dir=offload_dir, config=NvmeConfig(prefetch_depth=1)
    )
    with torch.inference_mode():
        for _ in range(3):
            assert torch.equal(model(5), expected)


def test_forwards_that_raise_midway_leave_the_model_usable(offload_dir):
    x = torch.randn(3, 16)
    expected = stack()(x)
    model = accel_nvme.dispatch_model(
        stack(), {"layers": "nvme"}, offload_dir=offload_dir, config=NvmeConfig(prefetch_depth=1)
    )
    prefetcher = model.layers[0]._hf_hook.prefetcher
    with torch.inference_mode():
        for bad in (3, 2, 1, 3):
            model.layers[bad].fail = True
            with pytest.raises(KeyboardInterrupt):
                model(x)
            model.layers[bad].fail = False
            assert not prefetcher.holders()
        for _ in range(2):
            assert torch.equal(model(x), expected)


class EncoderDecoder(nn.Module):
    """The first call runs encoder and decoder, later calls only the decoder (like generate)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.decoder = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))

    def forward(self, x, memory=None):
        if memory is None:
            memory = x
            for layer in self.encoder:
                memory = layer(memory)
        for layer in self.decoder:
            x = layer(x) + memory
        return x, memory


def test_the_prefetch_schedule_follows_the_groups_actually_used(offload_dir):
    torch.manual_seed(0)
    reference = EncoderDecoder().eval()
    torch.manual_seed(0)
    model = EncoderDecoder().eval()
    x = torch.randn(2, 16)
    model = accel_nvme.dispatch_model(
        model,
        {"encoder": "nvme", "decoder": "nvme"},
        offload_dir=offload_dir,
        config=NvmeConfig(prefetch_depth=2),
    )
    prefetcher = model.decoder[0]._hf_hook.prefetcher
    with torch.inference_mode():
        y, memory = model(x)
        expected, expected_memory = reference(x)
        assert torch.equal(y, expected) and torch.equal(memory, expected_memory)
        for _ in range(2):
            y, _ = model(y, memory)
            expected, _ = reference(expected, expected_memory)
            assert torch.equal(y, expected)
        before = prefetcher.stats.groups_read
        for _ in range(3):
            y, _ = model(y, memory)
    assert prefetcher.stats.groups_read - before <= 3 * 3 + 1, "decoder steps read encoder groups they never use"


def test_signature_keeps_accelerates_parameters():
    import accelerate

    ours = inspect.signature(accel_nvme.dispatch_model).parameters
    for name in inspect.signature(
        accelerate.big_modeling.dispatch_model.__wrapped__
        if hasattr(accelerate.big_modeling.dispatch_model, "__wrapped__")
        else accel_nvme.dispatch._accelerate_dispatch_model
    ).parameters:
        assert name in ours
    assert "skip_keys" in ours and "force_hooks" in ours
