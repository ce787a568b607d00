"""A hooked module's arguments: what is already on the execution device reaches it as the same object."""

from collections import namedtuple

import torch
from torch import nn

import accel_nvme
from accel_nvme.arguments import send_to_device

CPU = torch.device("cpu")
Pair = namedtuple("Pair", "a b")


def test_containers_already_on_the_device_are_the_same_objects():
    t = torch.ones(2)
    cache, index = [t, None], [0]
    args = (cache, index, {"mask": t, "sizes": [1, 2]}, Pair(t, 3), "text")
    moved = send_to_device(args, CPU)
    assert moved is args
    assert all(a is b for a, b in zip(moved, args, strict=True))


def test_a_container_is_rebuilt_only_where_something_moved():
    """The device is meta here: a meta tensor is already there, a CPU one moves."""
    there, elsewhere = torch.empty(2, device="meta"), [torch.ones(1)]
    args = ({"there": there, "list": [there]}, [there], Pair(there, elsewhere))
    moved = send_to_device(args, "meta")
    assert moved is not args and moved[0] is args[0] and moved[1] is args[1]
    assert isinstance(moved[2], Pair) and moved[2].a is there
    assert moved[2].b is not elsewhere and moved[2].b[0].device.type == "meta"
    skipped = {"elsewhere": elsewhere}
    assert send_to_device(skipped, "meta", skip_keys="elsewhere") is skipped


class InPlace(nn.Module):
    """Appends to the list it is passed, as Wan's VAE blocks update ``feat_cache``."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x, cache: list, state: dict):
        cache.append(x)
        state["calls"] = state.get("calls", 0) + 1
        return self.linear(x)


def test_a_streamed_module_updates_list_and_dict_arguments_in_place(offload_dir):
    torch.manual_seed(0)
    model = nn.Sequential(InPlace(), InPlace())
    model = accel_nvme.dispatch_model(model, {"0": "nvme", "1": "nvme"}, offload_dir=offload_dir)
    cache, state, x = [], {}, torch.ones(1, 4)
    with torch.inference_mode():
        model[1](model[0](x, cache, state), cache, state)
    assert len(cache) == 2 and state == {"calls": 2}


class Probe(nn.Linear):
    """Notes what torch's matmul sees of its weight: it folds a non-contiguous 3-D input partly on
    ``weight.t().requires_grad``."""

    def forward(self, x):
        self.seen.append(self.weight.t().requires_grad)
        return super().forward(x)


def test_streamed_weights_keep_requires_grad_in_every_grad_mode(offload_dir):
    model = nn.Sequential(Probe(4, 4), Probe(4, 4))
    model[0].seen = model[1].seen = seen = []
    model[1].requires_grad_(False)
    model = accel_nvme.dispatch_model(model, {"0": "nvme", "1": "nvme"}, offload_dir=offload_dir)
    for mode in (torch.inference_mode, torch.no_grad, torch.enable_grad):
        with mode():
            model(torch.ones(2, 3, 4).transpose(0, 1))
    assert seen == [True, False] * 3, "as in RAM: the first asks for gradients, the second not"
