"""transformers' own ``test_disk_offload_bin`` / ``test_disk_offload_safetensors`` over the conformance suite's classes.

The transformers sdist ships ``tests/test_modeling_common.py`` (``ModelTesterMixin``, where the two tests live) but
not ``tests/models/*`` (the per-model testers): each class here gets a tester built from the tiny configs of
``tests/conformance_models.py``. ``scripts/peer_tests.sh`` runs this file from the unpacked sdist.
"""

import unittest

import torch
from conformance_models import SPECS
from tests.test_modeling_common import ModelTesterMixin

CLASSES = [name for name, spec in SPECS.items() if spec.library == "transformers"]


class _Tester:
    """What ``ModelTesterMixin``'s offload tests ask of a model tester: a config and the inputs of a forward."""

    def __init__(self, name: str):
        self.spec = SPECS[name]
        self.batch_size = 1

    def prepare_config_and_inputs_for_common(self):
        return self.spec.build().config, self.spec.inputs()

    def get_config(self):
        return self.spec.build().config


def _check_device_map_on_cpu(self, model, device_map):
    """Without a GPU, "cpu" entries are where the model runs and keep real tensors; "disk" ones are on meta.

    transformers' check assumes a GPU (then "cpu" entries are offloaded too, and on meta); with one, it is kept.
    """
    if torch.cuda.is_available():
        return ModelTesterMixin.check_device_map_is_respected(self, model, device_map)
    for name, param in model.named_parameters():
        entry = name
        while entry and entry not in device_map:
            entry = entry.rpartition(".")[0]
        self.assertIn(entry, device_map, f"device_map has no entry covering {name!r}")
        expected = "meta" if device_map[entry] == "disk" else "cpu"
        self.assertEqual(param.device.type, expected, f"{name!r} mapped to {device_map[entry]!r}")


def _test_case(name: str) -> type:
    model_class = type(SPECS[name].build())

    def setUp(self):
        self.model_tester = _Tester(name)

    return type(
        f"{model_class.__name__}DiskOffloadTest",
        (ModelTesterMixin, unittest.TestCase),
        {
            "all_model_classes": (model_class,),
            "setUp": setUp,
            "check_device_map_is_respected": _check_device_map_on_cpu,
            "__module__": __name__,
        },
    )


globals().update({case.__name__: case for case in map(_test_case, CLASSES)})
