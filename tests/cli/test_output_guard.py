"""No ``peft-hft`` command can replace, alter, contain or delete one of its inputs (issue 19, row 1).

:data:`WRITES` says, for every command in ``peft_hft.cli.main.SUBCOMMANDS``, what it writes: the command line with an
output path ``OUT`` in it, the inputs that command line names, and the flag that allows replacing ``OUT`` (``None``
when the command has none). The generic test runs each writer with ``OUT`` equal to, inside and containing each of
its inputs, with and without that flag, and checks that the command is refused in one line before anything is
written: every byte under the inputs' directory (an unrelated file there included) is unchanged, and nothing new
appears. A command added to SUBCOMMANDS without a row here fails :func:`test_every_command_says_what_it_writes`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch
from peft import get_peft_model
from test_commands import peft_hft_cli
from tiny_models import tiny_model, train_steps

import peft_hft
from peft_hft.cli.main import SUBCOMMANDS


@dataclass(frozen=True)
class Writer:
    """One way a command writes: ``argv(paths, out)`` is its command line, ``inputs`` the names (keys of ``paths``)
    of the inputs that command line reads, ``overwrite`` its flag for replacing OUT (or ``None``)."""

    argv: Callable[[dict[str, Path], str], list[str]]
    inputs: tuple[str, ...]
    overwrite: Optional[str] = "--overwrite"


def _paths(p: dict[str, Path], *names: str) -> list[str]:
    return [str(p[n]) for n in names]


# command -> its writers; an empty list: the command writes nothing.
WRITES: dict[str, list[Writer]] = {
    "merge": [Writer(lambda p, out: ["merge", *_paths(p, "base", "adapter"), out, "--quiet"], ("base", "adapter"))],
    "diff": [
        Writer(lambda p, out: ["diff", *_paths(p, "tuned", "base"), out, "--quiet"], ("tuned", "base")),
        Writer(lambda p, out: ["diff", *_paths(p, "tuned", "base"), out, "--parameters-file", str(p["names"])],
               ("names",)),
    ],
    "half-reset": [
        Writer(lambda p, out: ["half-reset", *_paths(p, "tuned", "base"), out, "--quiet"], ("tuned", "base")),
        Writer(lambda p, out: ["half-reset", *_paths(p, "tuned", "base"), str(p["fresh"]), "--merged", out],
               ("tuned", "base")),
    ],
    "to-lora": [Writer(lambda p, out: ["to-lora", str(p["adapter"]), out, "--rank", "4", "--base", str(p["base"]),
                                       "--quiet"], ("adapter", "base"))],
    "inspect": [Writer(lambda p, out: ["inspect", str(p["adapter"]), "--base", str(p["base"]), "--plot", out],
                       ("adapter", "base"), overwrite=None)],
    "bench": [
        Writer(lambda p, out: ["bench", "forgetting", "--model", str(p["base"]), "--task", str(p["task"]),
                               "--output", out], ("base", "task"), overwrite=None),
        Writer(lambda p, out: ["bench", "combine", str(p["results"]), "--output", out], ("results",), overwrite=None),
    ],
    "compress": [Writer(lambda p, out: ["compress", str(p["adapter"]), out, "--encoding", "int8"], ("adapter",))],
    "estimate-memory": [],
    "scale": [Writer(lambda p, out: ["scale", str(p["adapter"]), out, "--alpha", "0.5"], ("adapter",))],
    "sft": [Writer(lambda p, out: ["sft", "--model_name_or_path", str(p["base"]), "--dataset_name", str(p["data"]),
                                   "--output_dir", out, "--use_cpu", "true"], ("base", "data"), overwrite=None)],
    "dpo": [Writer(lambda p, out: ["dpo", "--model_name_or_path", str(p["base"]), "--dataset_name", str(p["data"]),
                                   "--output_dir", out, "--use_cpu", "true"], ("base", "data"), overwrite=None)],
}


def test_every_command_says_what_it_writes():
    assert set(WRITES) == set(SUBCOMMANDS), "add a row to WRITES for every new command (an empty list: writes nothing)"


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Path:
    """Every kind of input a command reads, in one directory ``par`` with an unrelated file beside them."""
    par = tmp_path_factory.mktemp("guard") / "par"
    tiny_model("llama", layers=2).save_pretrained(par / "base")
    peft_model = get_peft_model(tiny_model("llama", layers=2), peft_hft.HFTConfig(seed=1))
    train_steps(peft_model, steps=1, lr=5e-2)
    peft_model.save_pretrained(par / "adapter")
    tuned = tiny_model("llama", layers=2)
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(0.01)
    tuned.save_pretrained(par / "tuned")
    (par / "names.txt").write_text("model.layers.0.mlp.up_proj.weight\n")
    (par / "task.jsonl").write_text(json.dumps({"input": [{"role": "user", "content": "hi"}], "ideal": "yes"}) + "\n")
    (par / "results").mkdir()
    (par / "results" / "results.json").write_text("{}\n")
    (par / "data").mkdir()
    (par / "data" / "train.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    (par / "notes.txt").write_text("an unrelated file that must survive\n")
    return par


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` (and ``root``'s parent listing) with the SHA-256 of each file."""
    files = {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
             for p in sorted(root.rglob("*"))}
    files["<parent>"] = ",".join(sorted(p.name for p in root.parent.iterdir()))
    return files


CASES = [
    (command, index, name, relation, overwrite)
    for command, writers in WRITES.items()
    for index, writer in enumerate(writers)
    for name in writer.inputs
    for relation in ("is", "lies inside", "contains")
    for overwrite in ((False, True) if writer.overwrite else (False,))
]


@pytest.mark.parametrize("command, index, name, relation, overwrite", CASES)
def test_no_command_writes_over_into_or_around_an_input(originals, tmp_path, command, index, name, relation,
                                                        overwrite):
    par = tmp_path / "par"
    shutil.copytree(originals, par)
    paths = {child.stem if child.is_file() else child.name: child for child in par.iterdir()}
    paths["fresh"] = tmp_path / "fresh-output"
    target = paths[name]
    out = {"is": target, "lies inside": target / "sub", "contains": target.parent}[relation]
    writer = WRITES[command][index]
    argv = writer.argv(paths, str(out)) + ([writer.overwrite] if overwrite else [])
    before = snapshot(par)
    result = peft_hft_cli(*argv)
    assert result.returncode == 1, (argv, result.stdout, result.stderr[-2000:])
    assert f" {relation} the " in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert snapshot(par) == before
    assert not paths["fresh"].exists()  # refused before the first output was started


def test_half_reset_refuses_merged_equal_to_or_around_out_before_writing(originals, tmp_path):
    out = tmp_path / "h"
    for merged in (out, out / "inner", tmp_path):
        result = peft_hft_cli("half-reset", str(originals / "tuned"), str(originals / "base"), str(out),
                              "--merged", str(merged), "--quiet")
        assert result.returncode == 1 and "written over each other" in result.stderr, result.stderr
        assert not out.exists()
    (tmp_path / "m").mkdir()
    result = peft_hft_cli("half-reset", str(originals / "tuned"), str(originals / "base"), str(out),
                          "--merged", str(tmp_path / "m"), "--quiet")
    assert result.returncode == 1 and "already exists" in result.stderr and not out.exists()
