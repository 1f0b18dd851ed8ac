"""The docs match the code: CONTRIBUTING's module map names every module, every ``peft_hft.X`` the user docs name
exists, and the docs describe the software and its measurements only."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "peft_hft"
USER_DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
DOTTED = re.compile(r"\bpeft_hft(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
# Sentences about how the docs were produced rather than about the software: who had which machine, sessions, ...
NOT_ABOUT_THE_SOFTWARE = re.compile(
    r"\bsessions?\b|\blent\b|\blend(?:s|ing)?\b|was not drawn|\bnot drawn\b|\bagents?'?\b|\bhelpers? (?:session|agent)",
    re.IGNORECASE,
)


def module_map(text: str) -> set[str]:
    """The files named in CONTRIBUTING's layout block under ``peft_hft/``, as paths (``peft_hft/tuner/model.py``)."""
    block = text.split("```\npeft_hft/\n", 1)[1].split("```", 1)[0]
    named: set[str] = set()
    stack: list[tuple[int, str]] = [(-1, "peft_hft")]
    for line in block.splitlines():
        stripped = line.lstrip()
        if not stripped:
            continue
        indent = len(line) - len(stripped)
        if indent == 0:  # tests/, examples/, ...: outside the package
            break
        words = []
        for word in stripped.split():
            if not (word.endswith(".py") or word.endswith("/")):
                break
            words.append(word)
        if not words:
            continue  # a continuation line of a description
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = "/".join(name for _, name in stack)
        for word in words:
            named.add(f"{parent}/{word.rstrip('/')}")
        if len(words) == 1 and words[0].endswith("/"):
            stack.append((indent, words[0].rstrip("/")))
    return named


def package_modules() -> set[str]:
    """Every module file of the package, except the ``__init__.py`` of sub-packages (the package itself is named)."""
    modules = set()
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(REPO).as_posix()
        if path.name == "__init__.py" and path.parent != PACKAGE:
            relative = path.parent.relative_to(REPO).as_posix()
        modules.add(relative)
        if path.parent != PACKAGE:
            modules.add(path.parent.relative_to(REPO).as_posix())
    return modules


def test_contributing_names_every_module_and_only_real_ones():
    named = module_map((REPO / "CONTRIBUTING.md").read_text())
    modules = package_modules()
    assert not modules - named, f"modules missing from CONTRIBUTING.md's layout: {sorted(modules - named)}"
    assert not named - modules, f"CONTRIBUTING.md's layout names modules that do not exist: {sorted(named - modules)}"


def test_module_map_parser_sees_a_missing_module():
    text = "```\npeft_hft/\n  tuner/      the tuner\n    model.py    HFTModel\n    a.py b.py   two\n  utils.py  x\n```"
    assert module_map(text) == {"peft_hft/tuner", "peft_hft/tuner/model.py", "peft_hft/tuner/a.py",
                                "peft_hft/tuner/b.py", "peft_hft/utils.py"}


def resolve(dotted: str) -> object:
    """Import the longest module prefix of ``dotted`` and getattr the rest; raises if any part does not exist."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as exc:
            if exc.name is not None and not ".".join(parts[:cut]).startswith(exc.name):
                raise  # the module exists but imports something missing
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def dotted_names() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in USER_DOCS:
        for name in DOTTED.findall(path.read_text(encoding="utf-8")):
            found.setdefault(name.rstrip("."), []).append(path.relative_to(REPO).as_posix())
    return found


def test_every_dotted_name_in_the_docs_exists():
    names = dotted_names()
    assert len(names) > 20  # the docs do name the API
    missing = {}
    for name, where in sorted(names.items()):
        try:
            resolve(name)
        except (ImportError, AttributeError) as exc:
            missing[name] = (sorted(set(where)), f"{type(exc).__name__}: {exc}")
    assert not missing, missing


def test_resolve_fails_for_a_name_that_does_not_exist():
    assert resolve("peft_hft.tuner.summary.memory_report") is importlib.import_module("peft_hft").memory_report
    with pytest.raises(AttributeError):
        resolve("peft_hft.precision.memory_report")
    with pytest.raises((ImportError, AttributeError)):
        resolve("peft_hft.no_such_module.thing")


def doc_texts() -> list[Path]:
    paths = [REPO / "README.md", *(REPO / "docs").rglob("*.md")]
    for folder in ("examples", "benchmarks"):
        paths += [p for p in (REPO / folder).rglob("*") if p.suffix in {".py", ".sh", ".md", ".yaml", ".json"}]
    return [p for p in paths if p.is_file() and "results" not in p.relative_to(REPO).parts]


def test_docs_speak_of_the_software_only():
    offending = []
    for path in doc_texts():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if NOT_ABOUT_THE_SOFTWARE.search(line):
                offending.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offending, "\n".join(offending)
    assert NOT_ABOUT_THE_SOFTWARE.search("no GPU was lent to this session")  # the check can fail


def test_no_second_contributors_guide():
    assert not (REPO / "DEVELOPERS.md").exists()  # CONTRIBUTING.md is the contributors' guide


def test_earlier_public_names_still_work():
    import peft_hft
    from peft_hft.continual import weight_fingerprint, weights_digest
    from peft_hft.integrations.distributed import selection_digest, selection_fingerprint

    assert weight_fingerprint is weights_digest and selection_fingerprint is selection_digest
    assert peft_hft.allow_non_finite is importlib.import_module("peft_hft.format.reader").allow_non_finite
