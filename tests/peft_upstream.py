"""Fetch PEFT's own generic test suite (``tests/testing_common.py`` and ``tests/test_custom_models.py`` of the
installed peft version's sdist) so that its checks can run against HFT. The files are extracted into the peft-hft
cache, never into this repository."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import sys
import tarfile
import types
from pathlib import Path

from _pytest.mark.structures import ParameterSet
from upstream_probe import stub_diffusers

from peft_hft.resources.data import Archive, cache_dir, fetch_archive

PACKAGE = "peft_upstream_tests"
FILES = ("testing_common.py", "testing_utils.py", "test_custom_models.py")


def tests_root() -> Path:
    """The directory holding the ``peft_upstream_tests`` package of the installed peft version (once extracted)."""
    return cache_dir() / "peft-tests" / importlib.metadata.version("peft")


def load_testing_common() -> types.ModuleType:
    """Import ``testing_common`` from the sdist of the installed peft version (downloaded and cached once)."""
    version = importlib.metadata.version("peft")
    root = tests_root()
    package = root / PACKAGE
    if not all((package / f).exists() for f in FILES):
        sdist = fetch_archive(Archive("peft", f"peft-{version}.tar.gz"))
        package.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist, "r:gz") as tf:
            for name in FILES:
                member = tf.extractfile(f"peft-{version}/tests/{name}")
                tmp = package / f".{name}.tmp"
                tmp.write_bytes(member.read())
                tmp.replace(package / name)
        (package / "__init__.py").write_text("")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    stub_diffusers()
    return importlib.import_module(f"{PACKAGE}.testing_common")


def load_custom_models() -> types.ModuleType:
    """Import ``test_custom_models`` (its small custom models and their checks) from the same sdist."""
    load_testing_common()
    return importlib.import_module(f"{PACKAGE}.test_custom_models")


def generic_checks(cls: type, parameter: str) -> list[str]:
    """The ``test_*`` methods of ``cls`` parametrized by a config (they take ``parameter``): the method-generic ones."""
    return sorted(
        name for name, function in inspect.getmembers(cls, inspect.isfunction)
        if name.startswith("test_") and parameter in inspect.signature(function).parameters
    )


def upstream_checks(module: types.ModuleType) -> list[str]:
    """Names of the generic checks (``_test_*`` methods) PeftCommonTester offers in this peft version."""
    return sorted(n.removeprefix("_test_") for n in dir(module.PeftCommonTester) if n.startswith("_test_"))


ROW_ARGUMENTS = ("test_name", "model_id", "config_cls", "config_kwargs")


def upstream_parameters(function) -> tuple[set[str], dict[str, list]]:
    """How PEFT parametrizes one of its checks, read off its ``pytest.mark.parametrize`` marks: the model ids of the
    rows it runs (its row table may be a subset of TEST_CASES, e.g. the Conv2d rows only) and the values of every
    other argument, so that the HFT rows run with exactly PEFT's values."""
    models: set[str] = set()
    values: dict[str, list] = {}
    for mark in getattr(function, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names = [n.strip() for n in mark.args[0].split(",")] if isinstance(mark.args[0], str) else list(mark.args[0])
        if tuple(names) == ROW_ARGUMENTS:
            models |= {(case.values if isinstance(case, ParameterSet) else case)[1] for case in mark.args[1]}
        elif len(names) == 1:
            values[names[0]] = [case.values[0] if isinstance(case, ParameterSet) else case for case in mark.args[1]]
        else:
            raise ValueError(f"{function.__name__}: a parametrization of {names} together is not handled here.")
    return models, values


__all__ = ["generic_checks", "load_custom_models", "load_testing_common", "tests_root", "upstream_checks",
           "upstream_parameters"]
