"""The one translation between "nvme" and accelerate's "disk", and the device_map checks, on plain maps."""

import copy
import json
import pickle

import pytest
import torch

from accel_nvme.devicemap import (
    STREAMED,
    check_keys,
    check_values,
    device_of,
    execution_device,
    from_accelerate,
    has_nvme,
    refuse_mixed,
    to_accelerate,
)

MAP = {"embed": 0, "body.layers": "nvme", "body.final": "cpu", "head": torch.device("cpu")}


def test_nvme_travels_as_disk_and_comes_back():
    accelerate_map = to_accelerate(MAP)
    assert accelerate_map == {**MAP, "body.layers": "disk"}
    assert list(accelerate_map) == list(MAP), "order kept: accelerate takes the first GPU value as the main device"
    assert from_accelerate(accelerate_map) == MAP
    assert MAP["body.layers"] == "nvme", "the given map is not changed"


def test_a_streamed_entry_is_disk_to_the_libraries_and_shows_as_nvme():
    translated = to_accelerate(MAP)["body.layers"]
    assert translated is STREAMED
    assert translated == "disk" and "disk" in {translated} and translated in ["cpu", "disk"], "accelerate's checks"
    assert str(translated) == "disk" and json.dumps(translated) == '"disk"', "written out as accelerate's tier"
    assert translated == "nvme" and repr({"body.layers": translated}) == "{'body.layers': 'nvme'}", "what users see"
    assert translated != "cpu" and (translated != "disk") is False and (translated != "nvme") is False
    assert copy.deepcopy(translated) == pickle.loads(pickle.dumps(translated)) == "nvme"
    refuse_mixed({"a": translated, "b": "nvme"}, "caller")  # a map given back is not a mixed one


def test_has_nvme_only_for_a_dict_with_an_nvme_value():
    assert has_nvme(MAP)
    assert has_nvme(to_accelerate(MAP)), "a translated map given back (a model's hf_device_map) still streams"
    assert not has_nvme({"body": "disk"})
    assert not has_nvme("auto")
    assert not has_nvme(None)


def test_a_map_with_both_tiers_is_refused_naming_the_disk_entry():
    refuse_mixed(MAP, "caller")
    with pytest.raises(ValueError, match=r"caller: device_map mixes 'disk' and 'nvme' entries \('head' is 'disk'\)"):
        refuse_mixed({**MAP, "head": "disk"}, "caller")


def test_an_unknown_value_is_named():
    check_values({**MAP, "x": "disk", "y": "cuda:1"})
    with pytest.raises(ValueError, match=r"device_map\['head'\] is 'nvm': expected 'nvme', 'cpu'"):
        check_values({**MAP, "head": "nvm"})


def test_the_longest_entry_covers_a_tensor():
    device_map = {"": "cpu", "body": "nvme", "body.layers.0": 0}
    assert device_of("body.layers.0.mlp.weight", device_map) == 0
    assert device_of("body.layers.1.mlp.weight", device_map) == "nvme"
    assert device_of("bodyx.weight", device_map) == "cpu"
    assert device_of("head.weight", {"body": "nvme"}) is None


def test_execution_device_is_a_full_torch_device():
    assert execution_device("cpu") == torch.device("cpu")
    assert execution_device(1) == torch.device("cuda", 1)
    assert execution_device("cuda:2") == torch.device("cuda", 2)


class SavesBadly(torch.nn.Linear):
    """A module whose state_dict hook changes it (as bitsandbytes' unpacks repacked 4-bit weights in place)."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise AssertionError("state_dict() was called")


def test_check_keys_lists_tensors_without_calling_state_dict():
    model = torch.nn.Sequential(SavesBadly(2, 2), torch.nn.Linear(2, 2))
    model[1].register_buffer("kept", torch.zeros(1))
    model[1].register_buffer("scratch", torch.zeros(1), persistent=False)
    check_keys(model, {"0": "nvme", "1": "cpu"})
    check_keys(model, {"0": "nvme", "1.weight": "cpu", "1.bias": "cpu", "1.kept": "cpu"})  # scratch: not saved
    with pytest.raises(ValueError, match=r"does not give any device for the following parameters: 1\.bias, 1\.kept"):
        check_keys(model, {"0": "nvme", "1.weight": "cpu"})
