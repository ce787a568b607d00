"""Where accel_nvme meets accelerate, transformers, diffusers and peft: patches applied when each module is imported.

accelerate's ``dispatch_model`` is bound by name in several modules, and ``from_pretrained`` lives in transformers
and diffusers, which are heavy to import: each patch is applied to a module as soon as it is imported (or now, if it
already is), so ``import accel_nvme`` stays cheap and the import order does not matter.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType

from .. import dispatch
from . import accelerate, casting, diffusers, peft, single_file, transformers
from .patching import patch, restore_all

DISPATCH_MODEL_BOUND_IN = (
    "accelerate",
    "accelerate.big_modeling",
    "transformers.integrations.accelerate",
    "diffusers.models.modeling_utils",
    "diffusers.pipelines.pipeline_loading_utils",
)


def _patch_dispatch_model(module: ModuleType) -> None:
    patch(module, "dispatch_model", lambda _: dispatch.dispatch_model, only_if=dispatch._accelerate_dispatch_model)


PATCHES: dict[str, list[Callable[[ModuleType], None]]] = {
    name: [_patch_dispatch_model] for name in DISPATCH_MODEL_BOUND_IN
}
for _name, _patch in (
    *accelerate.PATCHES.items(),
    *transformers.PATCHES.items(),
    *diffusers.PATCHES.items(),
    *casting.PATCHES.items(),
    *single_file.PATCHES.items(),
    *peft.PATCHES.items(),
):
    PATCHES.setdefault(_name, []).append(_patch)


def _apply(module: ModuleType) -> None:
    for apply in PATCHES.get(module.__name__, ()):
        apply(module)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Applies the patches of a module right after it is first imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _apply(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    """Patch every module that is imported already, and the others when they are; safe to call twice."""
    for name in PATCHES:
        if name in sys.modules:
            _apply(sys.modules[name])
    if not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def uninstall() -> None:
    """Undo ``install()``: every patched function and binding gets its original back; modules imported later stay
    unpatched until ``install()`` is called again."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _PatchOnImport)]
    restore_all()
