"""The lowest supported versions of peft, transformers and trl, read from pyproject.toml (``make test-compat``).

``python tests/lowest_versions.py`` prints them as pip pins (``peft==0.18.0 ...``), so the compatibility venv is built
from the floors the package declares and cannot drift from them.
"""

from __future__ import annotations

import re
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
TESTED = ("peft", "transformers", "trl")


def lowest_versions(text: str | None = None) -> dict[str, str]:
    """``{"peft": "0.18.0", ...}``: the ``>=`` floor of each tested dependency in ``[project] dependencies``."""
    text = PYPROJECT.read_text() if text is None else text
    floors = {}
    for name in TESTED:
        match = re.search(rf'"{name}>=([0-9][^,"]*)', text)
        if match is None:
            raise SystemExit(f"pyproject.toml declares no '{name}>=' floor; make test-compat needs one")
        floors[name] = match.group(1)
    return floors


if __name__ == "__main__":
    print(" ".join(f"{name}=={version}" for name, version in lowest_versions().items()))
