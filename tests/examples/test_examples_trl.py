"""The TRL examples run end to end (on a tiny local model instead of SmolLM2), in-process and under accelerate."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tiny_tokenizer import build_tokenizer, chat_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY_RUN = ["--max-steps", "2", "--train-size", "4", "--eval-size", "4", "--batch-size", "2", "--max-length", "256"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-chat-model")
    tokenizer = build_tokenizer()
    chat_model(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _example(name: str):
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))


def test_sft_then_dpo_examples_as_two_stages(tiny_model_dir, tmp_path):
    sft = _example("sft_hft").main([*TINY_RUN, "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "sft")])
    assert set(sft["before"]) == set(sft["after"]) >= {"eval_loss"}
    assert sft["after"]["eval_loss"] != sft["before"]["eval_loss"]
    assert json.loads((tmp_path / "sft" / "results.json").read_text())["after"] == sft["after"]

    dpo_example = _example("dpo_hft")
    with pytest.warns(UserWarning, match="fresh selection per stage"):  # stage 2 reusing stage 1's seed
        dpo_example.merge_stage(chat_model(build_tokenizer()), str(tmp_path / "sft"), seed=0)
    dpo_args = [*TINY_RUN, "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "dpo")]
    dpo = dpo_example.main([*dpo_args, "--sft-adapter", str(tmp_path / "sft"), "--seed", "1"])
    # before training the policy is the reference: every implicit reward is exactly zero
    assert dpo["before"]["eval_rewards/margins"] == 0 and dpo["before"]["eval_rewards/chosen"] == 0
    assert dpo["after"]["eval_rewards/margins"] != 0
    assert [(s["stage"], s["seed"]) for s in dpo["stages"]] == [("sft", 0), ("dpo", 1)]
    configs = [json.loads((tmp_path / s / "adapter_config.json").read_text()) for s in ("sft", "dpo")]
    assert configs[0]["selected_parameters"] != configs[1]["selected_parameters"]

    # stage 2's adapter applies on top of the merged stage 1
    base = PeftModel.from_pretrained(chat_model(build_tokenizer()), tmp_path / "sft").merge_and_unload()
    stage2 = PeftModel.from_pretrained(base, tmp_path / "dpo").eval()
    assert torch.isfinite(stage2(input_ids=torch.tensor([[1, 5, 9, 2]])).logits).all()


def test_sft_example_under_accelerate_launch(tiny_model_dir, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", str(EXAMPLES / "sft_hft.py"), *TINY_RUN, "--model", str(tiny_model_dir),
               "--output-dir", str(tmp_path / "out")]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["after"]["eval_loss"] != results["before"]["eval_loss"]
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    from peft_hft.utils import resolve_precision

    expected = resolve_precision("auto", "cpu")
    assert results["precision"] == expected.precision and str(expected) in done.stdout  # resolved, and said why
