"""Dispatch is all-or-nothing: an exception at any point of ours or accelerate's, or a KeyboardInterrupt at a random
moment, leaves the model exactly as it was (same tensors, no hooks, same forward) and a later dispatch works."""

import gc
import random
import sys
import threading

import accelerate.big_modeling
import accelerate.hooks
import pytest
import torch
from helpers import tiny_llama

import accel_nvme
import accel_nvme.dispatch
import accel_nvme.modelstate
from accel_nvme import NvmeAlignDevicesHook

IDS = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
MAPS = {
    "whole": {"": "nvme"},
    "mixed": {
        "model.embed_tokens": "cpu",
        "model.layers.0": "nvme",
        "model.layers.1": "cpu",
        "model.layers.2": "nvme",
        "model.layers.3": "nvme",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "nvme",
    },
}


def logits(model):
    with torch.inference_mode():
        return model(IDS).logits


def snapshot(model):
    """Everything dispatch may change: which tensor object sits where, each module's attributes, and the bytes."""
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {
        "objects": {name: id(t) for name, t in tensors},
        "attributes": [(name, sorted(m.__dict__)) for name, m in model.named_modules()],
        "values": {name: t.detach().clone() for name, t in tensors},
        "threads": {t.ident for t in threading.enumerate()},
    }


def assert_unchanged(model, before, expected):
    after = snapshot(model)
    assert after["objects"] == before["objects"], "a tensor was replaced and not put back"
    assert after["attributes"] == before["attributes"], "a hook or attribute was left behind"
    assert all(torch.equal(after["values"][k], v) for k, v in before["values"].items())
    assert not [m for m in model.modules() if hasattr(m, "_hf_hook")]
    assert torch.is_grad_enabled(), "the caller's grad mode was left off"
    assert torch.equal(logits(model), expected)
    new_threads = [t for t in threading.enumerate() if t.ident not in before["threads"]]
    assert not [t for t in new_threads if t.name.startswith("accel-nvme")], "reader threads left running"


class Injected(RuntimeError):
    pass


def fail_on_call(function, call):
    """``function``, raising ``Injected`` at its ``call``-th call (after the earlier calls did their work)."""
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == call:
            raise Injected(f"injected failure in {function.__name__}")
        return function(*args, **kwargs)

    return wrapper


def fail_after(function):
    """``function`` runs to the end, then raises: everything it changed must be undone by the caller."""

    def wrapper(*args, **kwargs):
        function(*args, **kwargs)
        raise Injected(f"injected failure after {function.__name__}")

    return wrapper


FAULTS = {
    "materialize": lambda mp: mp.setattr(
        accel_nvme.dispatch, "materialize", fail_on_call(accel_nvme.dispatch.materialize, 1)
    ),
    "leave_meta": lambda mp: mp.setattr(
        accel_nvme.modelstate,
        "set_module_tensor_to_device",
        fail_on_call(accel_nvme.modelstate.set_module_tensor_to_device, 2),
    ),
    "accelerate_attach": lambda mp: mp.setattr(
        accelerate.hooks, "add_hook_to_module", fail_on_call(accelerate.hooks.add_hook_to_module, 3)
    ),
    "accelerate_retie": lambda mp: mp.setattr(
        accelerate.big_modeling, "retie_parameters", fail_after(accelerate.big_modeling.retie_parameters)
    ),
    "accelerate_dispatch": lambda mp: mp.setattr(
        accel_nvme.dispatch, "_accelerate_dispatch_model", fail_after(accel_nvme.dispatch._accelerate_dispatch_model)
    ),
    "nvme_hook_init": lambda mp: mp.setattr(
        NvmeAlignDevicesHook, "init_hook", fail_on_call(NvmeAlignDevicesHook.init_hook, 3)
    ),
    "attach_nvme_hook": lambda mp: mp.setattr(
        accel_nvme.dispatch, "attach_nvme_hook", fail_on_call(accel_nvme.dispatch.attach_nvme_hook, 4)
    ),
}


@pytest.mark.parametrize("shape", sorted(MAPS))
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_an_exception_anywhere_leaves_the_model_as_it_was(offload_dir, monkeypatch, fault, shape):
    model = tiny_llama()
    expected = logits(model)
    before = snapshot(model)
    with monkeypatch.context() as mp:
        FAULTS[fault](mp)
        with pytest.raises(Injected):
            accel_nvme.dispatch_model(model, MAPS[shape], offload_dir=offload_dir)
    assert_unchanged(model, before, expected)
    dispatched = accel_nvme.dispatch_model(model, MAPS[shape], offload_dir=offload_dir)
    assert torch.equal(logits(dispatched), expected)


def line_events(call):
    """Run ``call`` under a tracer; the number of Python line events it took."""
    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return local

    sys.settrace(lambda frame, event, arg: local)
    try:
        call()
    finally:
        sys.settrace(None)
    return count


def interrupt_at(target, call):
    """Run ``call``, raising KeyboardInterrupt at its ``target``-th line event; whether it fired."""
    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
            if count == target:
                raise KeyboardInterrupt
        return local

    sys.settrace(lambda frame, event, arg: local)
    try:
        call()
    except KeyboardInterrupt:
        return True
    finally:
        sys.settrace(None)
    return False


@pytest.mark.parametrize("shape", sorted(MAPS))
def test_ctrl_c_at_30_random_moments_of_dispatch_leaves_the_model_as_it_was(offload_dir, shape):
    expected = logits(tiny_llama())
    accel_nvme.dispatch_model(tiny_llama(), MAPS[shape], offload_dir=offload_dir)  # group files exist: reuse path
    total = min(
        line_events(lambda m=m: accel_nvme.dispatch_model(m, MAPS[shape], offload_dir=offload_dir))
        for m in (tiny_llama(), tiny_llama())
    )
    model = tiny_llama()
    before = snapshot(model)
    # A dispatch's line count varies between runs (what earlier tests imported or cached): draw a few more moments
    # than needed and require 30 of them to land inside a dispatch.
    moments = sorted(random.Random(f"ctrl-c-{shape}").sample(range(1, int(total * 0.95)), 36))
    fired = 0
    for moment in moments:
        gc.collect()  # readers of earlier models close their files when collected: not inside the traced dispatch
        if interrupt_at(moment, lambda m=model: accel_nvme.dispatch_model(m, MAPS[shape], offload_dir=offload_dir)):
            fired += 1
            assert_unchanged(model, before, expected)
        else:  # the dispatch finished before its moment: go on with an undispatched model
            model = tiny_llama()
            before = snapshot(model)
    assert fired >= 30, f"only {fired} of {len(moments)} Ctrl-Cs landed inside a dispatch ({total} line events)"
    dispatched = accel_nvme.dispatch_model(model, MAPS[shape], offload_dir=offload_dir)
    assert torch.equal(logits(dispatched), expected)
