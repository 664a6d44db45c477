"""Every module declares its public names, and the package exports its public classes."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import pmhub


def all_modules() -> list[str]:
    return sorted(
        info.name for info in pkgutil.walk_packages(pmhub.__path__, prefix=f"{pmhub.__name__}.")
    )


@pytest.mark.parametrize("name", ["pmhub", *all_modules()])
def test_module_has_all_and_every_name_exists(name: str) -> None:
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    assert len(module.__all__) == len(set(module.__all__)), f"{name}.__all__ has duplicates"
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names missing attributes {missing}"


def test_package_all_is_sorted() -> None:
    assert pmhub.__all__ == sorted(pmhub.__all__)


def public_classes(module: ModuleType) -> set[str]:
    return {n for n in module.__all__ if inspect.isclass(getattr(module, n))}


# The modules whose every class is part of the top-level API.
API_MODULES = [
    "pmhub.auth",
    "pmhub.connection",
    "pmhub.errors",
    "pmhub.hub",
    "pmhub.metrics",
    "pmhub.policy",
    "pmhub.store",
    "pmhub.stores",
]


def test_package_all_is_complete_for_the_public_classes() -> None:
    expected = {"Message", "Conversation", "Broker", "InProcessBroker", "Limits"}
    for name in API_MODULES:
        expected |= public_classes(importlib.import_module(name))
    exported = set(pmhub.__all__)
    assert expected <= exported, f"not exported from pmhub: {sorted(expected - exported)}"


def test_package_exports_are_the_modules_objects() -> None:
    for name in pmhub.__all__:
        if name == "__version__":
            continue
        value = getattr(pmhub, name)
        assert value.__module__.startswith("pmhub."), name
        module = importlib.import_module(value.__module__)
        assert getattr(module, name) is value, name


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from pmhub import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(pmhub.__all__)


def test_version_is_a_string() -> None:
    assert isinstance(pmhub.__version__, str)
