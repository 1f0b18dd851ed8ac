"""``save_pretrained`` publishes an adapter in one step: readers never see half of a save, concurrent writers leave
one complete adapter, a failed save leaves the directory as it was."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_model

from peft_hft import HFTConfig
from peft_hft.format.keys import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from peft_hft.format.reader import read_adapter

TRIALS = 20


def adapter(seed: int):
    """Adapters of different selections and values, so a config of one with the weights of the other is refused."""
    return get_peft_model(tiny_model("llama"), HFTConfig(init_weights=False, seed=seed))


def saved_state(path: Path) -> tuple[list[str], dict[str, torch.Tensor]]:
    read = read_adapter(path)
    return read.config["selected_parameters"], read.diff_tensors()


def test_concurrent_saves_and_reads_see_only_complete_adapters(tmp_path):
    models = [adapter(0), adapter(1)]
    target = tmp_path / "adapter"
    expected = []
    for i, model in enumerate(models):
        model.save_pretrained(tmp_path / f"reference-{i}")
        expected.append(saved_state(tmp_path / f"reference-{i}"))
    assert expected[0][0] != expected[1][0]
    models[0].save_pretrained(target)
    errors: list[BaseException] = []
    reads = []
    done = threading.Event()

    def write(model):
        try:
            for _ in range(TRIALS):
                model.save_pretrained(target)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def read():
        while not done.is_set():
            try:
                reads.append(saved_state(target))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    writers = [threading.Thread(target=write, args=(m,)) for m in models]
    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    for t in readers:
        t.join()
    assert not errors, errors[:3]
    assert len(reads) > TRIALS // 2
    for selected, diffs in reads + [saved_state(target)]:
        match = [e for e in expected if e[0] == selected]
        assert match, "a read saw a selection that no writer saved"
        assert all(torch.equal(diffs[n], match[0][1][n]) for n in selected)
    assert sorted(p.name for p in target.iterdir()) == ["README.md", ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "reference-0", "reference-1"]


def test_concurrent_saves_from_two_processes_leave_one_complete_adapter(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from peft import get_peft_model
        from tiny_models import tiny_model
        from peft_hft import HFTConfig
        model = get_peft_model(tiny_model("llama"), HFTConfig(init_weights=False, seed=int(sys.argv[1])))
        for _ in range({TRIALS // 2}):
            model.save_pretrained(sys.argv[2])
    """)
    target = tmp_path / "adapter"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(seed), str(target)]) for seed in (0, 1)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    selected, diffs = saved_state(target)  # a consistent pair, or read_adapter would refuse it
    assert set(diffs) == set(selected)
    assert sorted(p.name for p in target.iterdir()) == ["README.md", ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_failed_save_leaves_the_previous_adapter(tmp_path, monkeypatch):
    model = adapter(0)
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    other = adapter(1)
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    monkeypatch.setattr("peft.peft_model.safe_save_file", broken, raising=False)
    with pytest.raises(OSError, match="disk full"):
        other.save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_save_keeps_other_files_and_a_hand_written_card(tmp_path):
    target = tmp_path / "checkpoint-10"
    target.mkdir()
    (target / "optimizer.pt").write_bytes(b"trainer state")
    model = adapter(0)
    model.save_pretrained(target)
    card = target / "README.md"
    card.write_text(card.read_text() + "\nMy own notes.\n")
    model.add_adapter("other", HFTConfig(init_weights=False, seed=2))
    model.save_pretrained(target)
    assert (target / "optimizer.pt").read_bytes() == b"trainer state"
    assert "My own notes." in card.read_text()
    assert json.loads((target / "other" / ADAPTER_CONFIG).read_text())["seed"] == 2
    assert sorted(p.name for p in target.iterdir()) == ["README.md", ADAPTER_CONFIG, ADAPTER_WEIGHTS, "optimizer.pt",
                                                        "other"]


def test_pickle_is_never_written(tmp_path):
    with pytest.warns(UserWarning, match="always saved as safetensors"):
        adapter(0).save_pretrained(tmp_path / "a", safe_serialization=False)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["README.md", ADAPTER_CONFIG, ADAPTER_WEIGHTS]
