"""The continual-learning example's pieces that do not need the real model: the batches every method shares, the
task items it builds, and the settings a resumed run must agree on."""

from __future__ import annotations

import argparse
import collections
import importlib.util
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def example():
    path = Path(__file__).resolve().parents[2] / "examples" / "continual_hft.py"
    spec = importlib.util.spec_from_file_location("continual_hft", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _skewed_items():
    # 90 items answering token 7, 10 answering token 9 (like the diabetes file's 77/23 split, more extreme)
    return [([i], 7) for i in range(90)] + [([100 + i], 9) for i in range(10)]


def test_balanced_batches_hold_every_answer_equally_often(example):
    batches = example.make_batches(_skewed_items(), steps=10, batch_size=8, seed="t:0", balanced=True)
    counts = collections.Counter(answer for batch in batches for _, answer in batch)
    assert counts == {7: 40, 9: 40} and all(len(b) == 8 for b in batches)
    minority = [prompt[0] for batch in batches for prompt, answer in batch if answer == 9]
    assert collections.Counter(minority) == {100 + i: 4 for i in range(10)}  # epoch by epoch over the 10 items
    again = example.make_batches(_skewed_items(), steps=10, batch_size=8, seed="t:0", balanced=True)
    assert again == batches  # the same for every method of a seed
    assert example.make_batches(_skewed_items(), steps=10, batch_size=8, seed="t:1", balanced=True) != batches
    plain = example.make_batches(_skewed_items(), steps=10, batch_size=8, seed="t:0")
    assert collections.Counter(a for b in plain for _, a in b)[9] < 20  # unbalanced: about the data's 10%


def test_formal_logic_items_show_the_bare_expression(example):
    row = {"input": [{"role": "user", "content": "Determine whether ... The expression is: (true and not false) "
                                                 "which evaluates to:"}], "ideal": "true"}
    assert example.TASKS["formal_logic"].item(row) == "(true and not false)"
    with pytest.raises(ValueError, match="without an expression"):
        example.TASKS["formal_logic"].item({"input": [{"role": "user", "content": "true or false?"}]})
    food = {"input": [{"role": "user", "content": "Is the following string a food item or related to food? 15 bean "
                                                  "soup"}], "ideal": "Yes"}
    assert example.TASKS["food"].item(food) == "15 bean soup"


def test_a_resumed_run_must_use_the_same_training_settings(example, tmp_path):
    args = example.parse_args(["--work-dir", str(tmp_path), "--warmup", "0.1", "--balanced", "--seeds", "0,1"])
    assert args.seeds == [0, 1] and args.balanced and args.warmup == 0.1
    example.check_resumable(args)
    example.check_resumable(example.parse_args(["--work-dir", str(tmp_path), "--warmup", "0.1", "--balanced",
                                                "--seeds", "0,1,2"]))  # more seeds: the same run, extended
    with pytest.raises(SystemExit, match="balanced"):
        example.check_resumable(example.parse_args(["--work-dir", str(tmp_path), "--warmup", "0.1", "--no-balanced"]))
    defaults = example.parse_args([])  # the defaults are the documented four-task run
    assert (defaults.tasks, defaults.steps, defaults.lr, defaults.lora_lr, defaults.lora_alpha, defaults.seeds) == (
        ["sarcasm", "heart_disease", "language", "food"], 30, 3e-4, 1e-3, 8, [0, 1, 2])
    from peft_hft.utils import resolve_precision

    assert defaults.methods == ["fft", "hft-random", "hft-wanda", "lora"]
    assert defaults.precision == resolve_precision("auto").precision  # this machine's, never "auto"
    with pytest.raises(SystemExit):
        example.parse_args(["--methods", "hft-bogus"])
    assert isinstance(args, argparse.Namespace)


def _cpu(monkeypatch, native: bool) -> None:
    import peft_hft.utils

    monkeypatch.setattr(peft_hft.utils, "cpu_bf16_support", lambda: "amx" if native else "emulated")


@pytest.mark.parametrize("native, expected", [(False, "fp32"), (True, "bf16")])
def test_quick_mode_runs_fp32_on_a_cpu_without_native_bf16(example, tmp_path, monkeypatch, native, expected):
    import torch
    from tiny_models import tiny_model

    _cpu(monkeypatch, native)
    args = example.parse_args(["--quick", "--work-dir", str(tmp_path)])
    assert args.precision == expected and args.precision_requested == "auto" and args.steps == 6
    # the quick mode's training and scoring run under exactly that precision
    model = tiny_model("llama", layers=2)
    seen = []
    model.model.layers[0].register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    items = [([5, 6, 7 + i % 3], 10 + i % 2) for i in range(16)]
    batches = example.make_batches(items, steps=2, batch_size=4, seed="t:0")
    info = example.train(model, batches, pad_id=0, lr=1e-3, desc="t", precision=args.precision)
    data = example.Encoded([p for p, _ in items], [a - 10 for _, a in items], [10, 11])
    accuracy, p_gold = example.score(model, data, pad_id=0, batch_size=8, precision=args.precision)
    assert info["seconds_per_step"] > 0 and 0 <= accuracy <= 1 and 0 < p_gold < 1
    assert seen and set(seen) == {expected == "bf16"}


def test_a_run_of_another_precision_is_not_resumed_and_the_fix_is_named(example, tmp_path, monkeypatch):
    _cpu(monkeypatch, True)
    example.check_resumable(example.parse_args(["--work-dir", str(tmp_path)]))  # recorded in bf16
    _cpu(monkeypatch, False)
    with pytest.raises(SystemExit, match=r"precision was bf16 .* resolves 'auto' to fp32: pass --precision bf16"):
        example.check_resumable(example.parse_args(["--work-dir", str(tmp_path)]))
    with pytest.warns(UserWarning, match="7-28x slower"):
        forced = example.parse_args(["--work-dir", str(tmp_path), "--precision", "bf16"])
    example.check_resumable(forced)
