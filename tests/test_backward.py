"""Backward through streamed weights: gradients equal the model in RAM, autograd keeps handles to the streamed weights
(no copy, no view of a staging buffer), groups are read again in reverse order, and peak RSS does not grow with the
number of streamed blocks."""

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_lm
from torch import nn
from torch.utils.checkpoint import checkpoint

import accel_nvme
from accel_nvme import NvmeConfig
from accel_nvme.schedule import SuccessorSchedule

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "backward_rss.py"
LAYERS = 4


def layers(trainable: bool) -> nn.Sequential:
    return nn.Sequential(*tiny_lm(depth=LAYERS).body.layers).requires_grad_(trainable)


def streamed_layers(offload_dir, trainable: bool, depth: int = 1) -> nn.Sequential:
    return accel_nvme.dispatch_model(
        layers(trainable),
        {str(i): "nvme" for i in range(LAYERS)},
        offload_dir=offload_dir,
        config=NvmeConfig(prefetch_depth=depth),
    )


def with_head(body: nn.Module) -> nn.Module:
    """An in-RAM head after the streamed body: its gradient must equal the one computed in RAM."""
    torch.manual_seed(1)
    return nn.Sequential(body, nn.Linear(32, 5))


class Saved:
    """Outer saved-tensor hooks that record what autograd keeps (ours pass on everything that is not streamed)."""

    def __init__(self):
        self.tensors = []

    def pack(self, tensor):
        self.tensors.append(tensor)
        return tensor

    def unpack(self, tensor):
        return tensor


def grads(model: nn.Module, x: torch.Tensor, retain: bool = False):
    x = x.clone().requires_grad_(True)
    loss = model(x).square().sum()
    loss.backward(retain_graph=retain)
    if retain:
        loss.backward()
    head = model[1]
    return loss.detach(), x.grad, head.weight.grad, head.bias.grad


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_gradients_equal_ram_and_autograd_keeps_nothing_streamed(offload_dir, trainable):
    x = torch.randn(3, 5, 32)
    reference = with_head(layers(trainable))
    model = with_head(streamed_layers(offload_dir, trainable))
    for expected, actual in zip(grads(reference, x), grads(model, x), strict=True):
        assert torch.equal(actual, expected)
    assert all(p.grad is None for p in model[0].parameters()), "streamed weights get no .grad"

    saved, x, seen = Saved(), x.clone().requires_grad_(True), []
    model[0][0].mlp[0].register_forward_pre_hook(lambda module, args: seen.append(module.weight.requires_grad))
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        loss = model(x).square().sum()
    assert seen == [trainable], "a streamed weight computes with the requires_grad it has in RAM (kernels look at it)"
    weights = list(reference[0].parameters())
    assert saved.tensors, "the outer hooks see what ours do not take"
    for tensor in saved.tensors:
        seen = (tensor, tensor.mT) if tensor.dim() == 2 else (tensor,)
        assert not any(t.shape == w.shape and torch.equal(t, w) for t in seen for w in weights), "a streamed weight"
        assert tensor.untyped_storage().data_ptr() not in model[0][0]._hf_hook.prefetcher.pool.pointers
    leaves, nodes = [], [loss.grad_fn]
    while nodes:
        node = nodes.pop()
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        nodes.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    in_ram = {id(x)} | {id(p) for p in model[1].parameters()}
    held = [leaf for leaf in leaves if id(leaf) not in in_ram and leaf.numel() > 1]
    assert not held, "autograd holds a streamed weight (or its device copy)"


def test_gradients_are_exact_after_every_staging_buffer_was_refilled_and_with_retain_graph(offload_dir):
    x = torch.randn(3, 32)
    reference = with_head(layers(False))
    model = with_head(streamed_layers(offload_dir, False))
    expected = grads(reference, x, retain=True)
    xs = x.clone().requires_grad_(True)
    loss = model(xs).square().sum()
    with torch.no_grad():
        for layer in reversed(model[0]):
            layer(torch.randn(3, 32))
    loss.backward(retain_graph=True)
    loss.backward()
    assert torch.equal(xs.grad, expected[1])
    assert torch.equal(model[1].weight.grad, expected[2])


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_around_streamed_blocks_is_exact(offload_dir, use_reentrant):
    x = torch.randn(3, 32)

    class Checkpointed(nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, h):
            for layer in self.body:
                h = checkpoint(layer, h, use_reentrant=use_reentrant)
            return h

    expected = grads(with_head(Checkpointed(layers(False))), x)
    actual = grads(with_head(Checkpointed(streamed_layers(offload_dir, False))), x)
    for e, a in zip(expected, actual, strict=True):
        assert torch.equal(a, e)


def test_backward_reads_groups_again_in_reverse_order_ahead(offload_dir):
    model = streamed_layers(offload_dir, False, depth=2)
    prefetcher = model[0]._hf_hook.prefetcher
    events = []
    start, acquire = prefetcher._start, prefetcher.acquire

    def started(index, buffer):
        events.append(("read", index))
        return start(index, buffer)

    def acquired(index, caller=None, backward=False):
        events.append(("backward" if backward else "forward", index))
        return acquire(index, caller, backward)

    prefetcher._start, prefetcher.acquire = started, acquired
    x = torch.randn(3, 32, requires_grad=True)
    for _ in range(2):
        events.clear()
        loss = model(x).sum()
        time.sleep(0.3)  # the forward's reads ahead finish (as when compute outlasts a read): buffers can be dropped
        loss.backward()
        turn = events.index(("backward", LAYERS - 1))
        backward = events[turn:]
        for now, following in itertools.pairwise(backward):
            assert following != ("read", now[1]), f"group {now[1]} was read only when backward asked for it"
        reads = [index for what, index in backward if what == "read"]
        assert reads and reads == sorted(reads, reverse=True), "backward reads groups it does not use next"


def test_backward_schedule_goes_in_reverse_and_a_forward_ends_its_run():
    forward, backward = SuccessorSchedule(4), SuccessorSchedule(4, reverse=True)
    assert backward.upcoming(3, 2) == [2, 1]
    assert backward.upcoming(0, 2) == [], "nothing is read ahead after the first group"
    for group in (3, 2, 1, 0):
        backward.learn(group)
    forward.learn(0, ending=backward)
    backward.learn(3)
    assert backward.successor[0] == 0, "the next backward's first group was learned as following the last one"


def peak_growth(blocks: int, trainable: bool) -> dict:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--blocks", str(blocks), "--json", *(["--trainable"] if trainable else [])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)[0]


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_peak_rss_of_forward_and_backward_does_not_grow_with_the_number_of_streamed_blocks(trainable):
    two, eight = peak_growth(2, trainable), peak_growth(8, trainable)
    assert two["input_grad_exact"] and eight["input_grad_exact"]
    grown = eight["peak_growth_bytes"] - two["peak_growth_bytes"]
    assert grown < two["block_bytes"], f"6 more streamed blocks of {two['block_bytes']} bytes grew the peak by {grown}"
