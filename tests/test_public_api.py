"""Every public name of accel_nvme has a docstring.

Public: the names in ``accel_nvme.__all__``; the functions and classes a listed module defines itself (not those it
imports) whose names do not start with ``_``; and the methods and properties such a class defines itself under a
public name. An override with no docstring of its own counts as documented when the method it overrides is
(``inspect.getdoc`` follows the inheritance). A failure lists every missing docstring of the module, not the first.
"""

import importlib
import inspect
import pkgutil

import pytest

import accel_nvme
import accel_nvme.bench
import accel_nvme.integrations

MODULES = [
    "accel_nvme",
    "accel_nvme.config",
    "accel_nvme.format",
    "accel_nvme.store",
    "accel_nvme.staging",
    "accel_nvme.io",
    "accel_nvme.schedule",
    "accel_nvme.transfer",
    "accel_nvme.stats",
    "accel_nvme.prefetch",
    "accel_nvme.hooks",
    "accel_nvme.devicemap",
    "accel_nvme.loading",
    "accel_nvme.planning",
    "accel_nvme.modelstate",
    "accel_nvme.dispatch",
    "accel_nvme.recasting",
    "accel_nvme.placement",
    "accel_nvme.residency",
    "accel_nvme.maintenance",
    "accel_nvme.integrations",
    *sorted(f"accel_nvme.integrations.{m.name}" for m in pkgutil.iter_modules(accel_nvme.integrations.__path__)),
    "accel_nvme.cli",
    "accel_nvme.bench",
    *sorted(f"accel_nvme.bench.{m.name}" for m in pkgutil.iter_modules(accel_nvme.bench.__path__)),
]


def documented(obj) -> bool:
    doc = inspect.getdoc(obj)
    return bool(doc and doc.strip())


def public_members(cls) -> list[tuple[str, object]]:
    """Methods (plain, static, class) and properties ``cls`` defines itself under a public name."""
    members = []
    for name, raw in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(raw, staticmethod | classmethod):
            members.append((name, raw.__func__))
        elif isinstance(raw, property):
            members.append((name, raw))
        elif inspect.isfunction(raw):
            members.append((name, getattr(cls, name)))
    return members


def missing_docstrings(module) -> list[str]:
    missing = [] if documented(module) else [f"{module.__name__} (module docstring)"]
    for name, obj in vars(module).items():
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # imported, checked where it is defined
        if not documented(obj):
            missing.append(f"{module.__name__}.{name}")
        if inspect.isclass(obj):
            missing += [f"{module.__name__}.{name}.{m}" for m, member in public_members(obj) if not documented(member)]
    return missing


def test_every_name_in_all_exists_and_is_documented():
    missing = [name for name in accel_nvme.__all__ if not documented(getattr(accel_nvme, name))]
    assert not missing, f"no docstring: {missing}"


@pytest.mark.parametrize("module_name", MODULES)
def test_public_functions_classes_and_methods_are_documented(module_name):
    missing = missing_docstrings(importlib.import_module(module_name))
    assert not missing, "no docstring:\n  " + "\n  ".join(missing)


def test_the_checker_notices_a_missing_docstring():
    class Documented:
        """Has one."""

        def method(self):
            pass

        @property
        def prop(self):
            """Has one."""

    assert [name for name, member in public_members(Documented) if not documented(member)] == ["method"]
