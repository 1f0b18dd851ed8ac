"""The package's layout rules (CONTRIBUTING.md): few top-level modules, and no module importing another's private name.

The direction of dependencies and the absence of import cycles are checked by import-linter (``make lint``, contracts in
pyproject.toml); :func:`test_import_contracts_hold` runs it here too, so CI enforces them.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "peft_hft"


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_module(node: ast.ImportFrom, path: Path) -> str:
    if not node.level:
        return node.module or ""
    package = _module_of(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def private_imports() -> list[str]:
    """``file:line imports _name from other.module`` for every private name taken from another module."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                source = _imported_module(node, path)
                for alias in node.names:
                    if alias.name.startswith("_") and source != _module_of(path) and alias.name != "__version__":
                        found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {alias.name} from {source}")
    return found


def test_no_module_imports_another_modules_private_name():
    assert private_imports() == []


def test_private_import_check_can_fail(tmp_path):
    """The checker itself sees a private import (so an empty list above means something)."""
    global PACKAGE
    saved = PACKAGE
    PACKAGE = tmp_path / "pkg"
    try:
        (PACKAGE / "sub").mkdir(parents=True)
        (PACKAGE / "__init__.py").write_text("")
        (PACKAGE / "sub" / "__init__.py").write_text("")
        (PACKAGE / "sub" / "a.py").write_text("def _helper():\n    pass\n")
        (PACKAGE / "b.py").write_text("from .sub.a import _helper\n")
        assert private_imports() == ["pkg/b.py:1 imports _helper from pkg.sub.a"]
    finally:
        PACKAGE = saved


def test_top_level_has_at_most_eight_modules():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 8, modules


@pytest.mark.skipif(shutil.which("lint-imports", path=str(Path(sys.executable).parent)) is None,
                    reason="import-linter is not installed (pip install -e '.[dev]')")
def test_import_contracts_hold():
    lint = str(Path(shutil.which("lint-imports", path=str(Path(sys.executable).parent))))
    result = subprocess.run([lint], capture_output=True, text=True, cwd=PACKAGE.parent, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
