"""Every ``peft-hft`` subcommand, run on tiny checkpoints: in process through ``peft_hft.cli.main.main`` (what the
console script calls), and once through ``python -m peft_hft`` in a subprocess.

The library functions behind the commands have their own tests (tests/ops/, tests/bench/); these check the command
line itself: arguments, exit codes, what is printed and written. A guard fails when a subcommand has no test here.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from tiny_models import tiny_model, train_steps

import peft_hft
from peft_hft.cli.main import SUBCOMMANDS, main
from peft_hft.format.keys import parameter_name_of

TESTED = {"merge", "inspect", "diff", "half-reset", "bench", "to-lora", "scale", "compress", "sft", "dpo",
          "estimate-memory"}


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def peft_hft_cli(*args: str) -> Result:
    """``peft-hft ARGS`` in this process: exit status (argparse's SystemExit included) and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A base checkpoint, an HFT adapter trained on it, and a fully fine-tuned checkpoint of the same base."""
    root = tmp_path_factory.mktemp("cli")
    base = tiny_model("llama", layers=2)
    base.save_pretrained(root / "base")
    peft_model = get_peft_model(tiny_model("llama", layers=2), peft_hft.HFTConfig(seed=1))
    train_steps(peft_model, steps=2, lr=5e-2)
    peft_model.save_pretrained(root / "adapter")
    tuned = tiny_model("llama", layers=2)
    for param in tuned.parameters():
        param.requires_grad_(True)
    train_steps(tuned, steps=2, lr=1e-2)
    tuned.save_pretrained(root / "tuned")
    return root


def test_every_subcommand_has_a_test_here():
    assert set(SUBCOMMANDS) == TESTED


@pytest.mark.parametrize("command", sorted(TESTED))
def test_help_names_the_command(command):
    result = peft_hft_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"peft-hft {command}" in result.stdout


def test_no_command_prints_usage_and_fails():
    result = peft_hft_cli()
    assert result.returncode == 2 and "COMMAND" in result.stderr


def test_merge_writes_base_plus_diffs(checkpoints, tmp_path):
    # once through the module entry point in a fresh interpreter, as a user runs it
    args = ["merge", str(checkpoints / "base"), str(checkpoints / "adapter"), str(tmp_path / "m"), "--quiet"]
    result = subprocess.run([sys.executable, "-m", "peft_hft", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "base verified" in result.stdout
    base = load_file(checkpoints / "base" / "model.safetensors")
    merged = load_file(tmp_path / "m" / "model.safetensors")
    diffs = {parameter_name_of(k): v for k, v in load_file(checkpoints / "adapter" / "adapter_model.safetensors").items()}
    for name, tensor in base.items():
        expected = tensor + diffs[name] if name in diffs else tensor
        assert torch.allclose(merged[name], expected, atol=1e-6), name
    again = peft_hft_cli("merge", str(checkpoints / "base"), str(checkpoints / "adapter"), str(tmp_path / "m"),
                         "--quiet")
    assert again.returncode == 1 and "already exists" in again.stderr


def test_scale_writes_alpha_times_the_diffs(checkpoints, tmp_path):
    out = tmp_path / "half"
    result = peft_hft_cli("scale", str(checkpoints / "adapter"), str(out), "--alpha", "0.5", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "by 0.5" in result.stdout
    diffs = load_file(checkpoints / "adapter" / "adapter_model.safetensors")
    scaled = load_file(out / "adapter_model.safetensors")
    assert set(scaled) == set(diffs) and all(torch.equal(scaled[k], diffs[k] * 0.5) for k in diffs)
    assert json.loads((out / "adapter_config.json").read_text())["scaling"]["alpha"] == 0.5
    inside = peft_hft_cli("scale", str(checkpoints / "adapter"), str(checkpoints / "adapter" / "x"), "--alpha", "2")
    assert inside.returncode == 1 and "inside" in inside.stderr
    again = peft_hft_cli("scale", str(checkpoints / "adapter"), str(out), "--alpha", "0.5", "--quiet")
    assert again.returncode == 1 and "already exists" in again.stderr


def test_inspect_reports_the_selection(checkpoints):
    result = peft_hft_cli("inspect", str(checkpoints / "adapter"), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    config = json.loads((checkpoints / "adapter" / "adapter_config.json").read_text())
    assert info["selected_tensors"] == len(config["selected_parameters"]) > 0
    assert info["fingerprint"]["tensors"] == info["selected_tensors"]
    missing = peft_hft_cli("inspect", str(checkpoints / "no-such-adapter"))
    assert missing.returncode == 1 and "error:" in missing.stderr


def test_compress_re_encodes_and_inspect_reports_it(checkpoints, tmp_path):
    out = tmp_path / "int4"
    result = peft_hft_cli("compress", str(checkpoints / "adapter"), str(out), "--encoding", "int4", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "'int4'" in result.stdout and "bytes per trained parameter" in result.stdout
    assert json.loads((out / "adapter_config.json").read_text())["diff_encoding"] == "int4"
    info = json.loads(peft_hft_cli("inspect", str(out), "--base", str(checkpoints / "base"), "--json").stdout)
    plain = json.loads(peft_hft_cli("inspect", str(checkpoints / "adapter"), "--json").stdout)
    assert info["encoding"] == "int4" and not info["lossless"] and plain["encoding"] == "float" and plain["lossless"]
    assert info["selected_parameters"] == plain["selected_parameters"]
    assert 0.5 < info["bytes_per_parameter"] < 0.6 and plain["bytes_per_parameter"] == 4.0
    assert info["tensor_bytes"] < 0.15 * plain["tensor_bytes"]
    assert info["size_ratio"] == pytest.approx(info["tensor_bytes"] / info["base_bytes"])
    merged = peft_hft_cli("merge", str(checkpoints / "base"), str(out), str(tmp_path / "m"), "--quiet")
    assert merged.returncode == 0, merged.stderr
    # the output guard: OUT inside the input is refused before anything is written; an unknown encoding too
    inside = peft_hft_cli("compress", str(checkpoints / "adapter"), str(checkpoints / "adapter" / "x"), "--encoding",
                          "int8")
    assert inside.returncode == 1 and "ADAPTER directory" in inside.stderr
    assert not (checkpoints / "adapter" / "x").exists()
    bad = peft_hft_cli("compress", str(checkpoints / "adapter"), str(tmp_path / "b"), "--encoding", "int3")
    assert bad.returncode == 1 and "Unknown diff_encoding" in bad.stderr and not (tmp_path / "b").exists()


def test_diff_extracts_every_changed_tensor(checkpoints, tmp_path):
    result = peft_hft_cli("diff", str(checkpoints / "tuned"), str(checkpoints / "base"), str(tmp_path / "d"), "--quiet")
    assert result.returncode == 0, result.stderr
    base = load_file(checkpoints / "base" / "model.safetensors")
    tuned = load_file(checkpoints / "tuned" / "model.safetensors")
    diffs = {parameter_name_of(k): v for k, v in load_file(tmp_path / "d" / "adapter_model.safetensors").items()}
    assert set(diffs) == {n for n in base if not torch.equal(base[n], tuned[n])}
    for name, diff in diffs.items():
        assert torch.equal(diff, tuned[name] - base[name]), name


def test_half_reset_keeps_the_selected_half(checkpoints, tmp_path):
    result = peft_hft_cli("half-reset", str(checkpoints / "tuned"), str(checkpoints / "base"), str(tmp_path / "h"),
                          "--seed", "2", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "tensors keep their fine-tuned values" in result.stdout
    config = json.loads((tmp_path / "h" / "adapter_config.json").read_text())
    diffs = {parameter_name_of(k) for k in load_file(tmp_path / "h" / "adapter_model.safetensors")}
    assert diffs == set(config["selected_parameters"])
    assert 0 < len(diffs) < len(load_file(checkpoints / "base" / "model.safetensors"))


def test_bench_rejects_bad_values_before_any_work(tmp_path):
    result = peft_hft_cli("bench", "forgetting", "--seeds", "a,b", "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and "expected comma-separated integers" in result.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# to-lora, sft, dpo (issue 15)
# ---------------------------------------------------------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "trl_cli"


def test_to_lora_writes_a_plain_lora_adapter(checkpoints, tmp_path):
    from peft import PeftModel
    from tiny_models import batch

    out = tmp_path / "lora"
    args = ["to-lora", str(checkpoints / "adapter"), str(out), "--rank", "64", "--base", str(checkpoints / "base")]
    result = peft_hft_cli(*args, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "relative error 0.0000 overall" in result.stdout
    inputs = batch()
    with torch.no_grad():
        hft = PeftModel.from_pretrained(tiny_model("llama", layers=2), checkpoints / "adapter")(**inputs).logits
        lora = PeftModel.from_pretrained(tiny_model("llama", layers=2), out)
        assert lora.peft_config["default"].peft_type.value == "LORA"
        torch.testing.assert_close(lora(**inputs).logits, hft, rtol=0, atol=1e-5)
    again = peft_hft_cli(*args)
    assert again.returncode == 1 and "already exists" in again.stderr


@pytest.fixture(scope="module")
def trl_inputs(tmp_path_factory):
    """A tiny chat model with its tokenizer, and SFT / preference datasets as local JSON-lines directories."""
    from tiny_tokenizer import build_tokenizer, chat_model
    from trl_helpers import preference_rows, sft_rows

    root = tmp_path_factory.mktemp("trl-cli")
    tokenizer = build_tokenizer()
    chat_model(tokenizer).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for name, rows in (("sft", sft_rows()), ("dpo", preference_rows())):
        (root / name).mkdir()
        (root / name / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def tiny_run(trl_inputs, stage: str, output: Path) -> list[str]:
    """Overrides of the example YAML for two offline CPU steps on the tiny model."""
    return ["--config", str(EXAMPLES / f"{stage}_hft.yaml"), "--model_name_or_path", str(trl_inputs / "model"),
            "--dataset_name", str(trl_inputs / stage), "--output_dir", str(output), "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-2",
            "--max_length", "128", "--use_cpu", "true", "--logging_steps", "1000", "--hft_seed", "3"]


def assert_hft_adapter(output: Path, base_dir: Path, seed: int) -> None:
    """``output`` holds a normal HFT adapter with the command line's settings that changes the base model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((output / "adapter_config.json").read_text())
    assert config["peft_type"] == "HFT" and config["seed"] == seed and config["ratio"] == 0.5
    diffs = load_file(output / "adapter_model.safetensors")
    assert diffs and all(parameter_name_of(k) for k in diffs)
    assert any(d.abs().max() > 0 for d in diffs.values())
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    loaded = PeftModel.from_pretrained(base, output)
    changed = {n.removeprefix("base_model.model.") for n, p in loaded.named_parameters()
               if not torch.equal(p, before[n.removeprefix("base_model.model.")])}
    assert changed and changed <= set(config["selected_parameters"])


def test_sft_trains_from_the_example_yaml_under_accelerate_launch(trl_inputs, tmp_path):
    import os

    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "peft_hft", "sft", *tiny_run(trl_inputs, "sft", tmp_path / "out")]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_hft_adapter(tmp_path / "out", trl_inputs / "model", seed=3)


def test_dpo_trains_from_the_example_yaml_and_logs_retention(trl_inputs, tmp_path, monkeypatch):
    import trl

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    texts = tmp_path / "probe.txt"
    texts.write_text("The quick brown fox jumps over the lazy dog.\n\nParis is the capital of France.\n")
    trainer_class = trl.DPOTrainer
    result = peft_hft_cli("dpo", *tiny_run(trl_inputs, "dpo", tmp_path / "out"), "--retention_steps", "1",
                          "--retention_texts", str(texts))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_hft_adapter(tmp_path / "out", trl_inputs / "model", seed=3)
    assert (tmp_path / "out" / "retention.png").read_bytes()[:4] == b"\x89PNG"
    assert "retention/kl_to_base" in result.stdout + result.stderr  # the trainer's console logs carry the values
    assert trl.DPOTrainer is trainer_class  # put back
    assert "get_peft_config" not in vars(trl) or trl.get_peft_config.__module__.startswith("trl")  # put back


def test_sft_refuses_lora_options_and_lists_hft_options(trl_inputs, tmp_path):
    result = peft_hft_cli("sft", "--use_peft", "--model_name_or_path", str(trl_inputs / "model"),
                          "--dataset_name", str(trl_inputs / "sft"), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true")
    assert result.returncode == 1 and "--use_peft" in result.stderr and "--hft_ratio" in result.stderr
    assert not (tmp_path / "out").exists()
    helped = peft_hft_cli("sft", "--help")
    assert helped.returncode == 0
    assert all(flag in helped.stdout for flag in ("--hft_ratio", "--hft_seed", "--hft_strategy", "--learning_rate",
                                                  "--model_name_or_path", "--retention_steps", "--retention_texts"))
    assert "--hft_selected_parameters" not in helped.stdout and "--hft_base_fingerprint" not in helped.stdout


# ---------------------------------------------------------------------------------------------------------------------
# Every command checks its arguments before it starts work and fails in one line (issue 19)
# ---------------------------------------------------------------------------------------------------------------------


def one_line_error(result: Result, *needles: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].count("error:") == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("bad_base, message", [("adapter", "is an adapter directory"), ("nowhere", "does not exist"),
                                               ("empty", "not a model directory")])
def test_to_lora_refuses_a_bad_base_in_one_line(checkpoints, tmp_path, bad_base, message):
    (tmp_path / "empty").mkdir()
    base = checkpoints / "adapter" if bad_base == "adapter" else tmp_path / bad_base
    result = peft_hft_cli("to-lora", str(checkpoints / "adapter"), str(tmp_path / "out"), "--rank", "4",
                          "--base", str(base), "--quiet")
    one_line_error(result, message, "--base")
    assert not (tmp_path / "out").exists()


def test_to_lora_on_another_base_is_refused_and_no_verify_converts(checkpoints, tmp_path):
    tiny_model("llama", layers=2, seed=9).save_pretrained(tmp_path / "other")
    args = ["to-lora", str(checkpoints / "adapter"), str(tmp_path / "out"), "--rank", "4", "--base",
            str(tmp_path / "other"), "--quiet"]
    refused = peft_hft_cli(*args)
    assert refused.returncode == 1 and "--no-verify" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "out").exists()
    done = peft_hft_cli(*args, "--no-verify")  # the fix the error names is an option of to-lora
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_to_lora_says_a_lora_input_is_lora_already(checkpoints, tmp_path):
    from peft import LoraConfig

    lora = get_peft_model(tiny_model("llama", layers=2), LoraConfig(target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    result = peft_hft_cli("to-lora", str(tmp_path / "lora"), str(tmp_path / "out"), "--rank", "4",
                          "--base", str(checkpoints / "base"))
    one_line_error(result, "is a LORA adapter, not an HFT adapter", "LoRA already")


def test_to_lora_refuses_an_existing_out_before_loading_or_converting(checkpoints, tmp_path, monkeypatch):
    import peft_hft.ops.to_lora as to_lora

    def never(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(to_lora, "_load_base", never)
    monkeypatch.setattr(to_lora, "_factorise", never)
    (tmp_path / "out").mkdir()
    result = peft_hft_cli("to-lora", str(checkpoints / "adapter"), str(tmp_path / "out"), "--rank", "4",
                          "--base", str(checkpoints / "base"))
    one_line_error(result, "already exists")


def test_sft_refuses_target_modules_that_match_nothing(trl_inputs, tmp_path, monkeypatch):
    """Issue 19, row 4, on the command line: a typo in --hft_target_modules is refused in one line, nothing saved."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    result = peft_hft_cli("sft", *tiny_run(trl_inputs, "sft", tmp_path / "out"), "--hft_target_modules", "q_prj",
                          "v_prj")
    assert result.returncode == 1, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and "Target modules ['q_prj', 'v_prj'] not found" in error[0] and "q_proj" in error[0]
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_diff_with_a_directory_as_parameters_file_fails_in_one_line(checkpoints, tmp_path):
    (tmp_path / "names").mkdir()
    result = peft_hft_cli("diff", str(checkpoints / "tuned"), str(checkpoints / "base"), str(tmp_path / "d"),
                          "--parameters-file", str(tmp_path / "names"))
    one_line_error(result, "Is a directory")
    assert not (tmp_path / "d").exists()


def test_estimate_memory_prints_json_per_method_and_writes_nothing(checkpoints, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = peft_hft_cli("estimate-memory", str(checkpoints / "base" / "config.json"), "--json", "--batch-size", "2",
                          "--seq-len", "16", "--methods", "fft,lora,freeze,hft", "--lora-rank", "2")
    assert result.returncode == 0, result.stderr
    methods = json.loads(result.stdout)["methods"]
    assert list(methods) == ["fft", "lora", "freeze", "hft"]
    assert all(m["total_bytes"] == sum(m["components"].values()) > 0 for m in methods.values())
    assert methods["freeze"]["total_bytes"] < methods["hft"]["total_bytes"] < methods["fft"]["total_bytes"]
    assert methods["lora"]["total_bytes"] < methods["fft"]["total_bytes"]
    assert list(tmp_path.iterdir()) == []
    table = peft_hft_cli("estimate-memory", str(checkpoints / "base"), "--seq-len", "16", "--unit", "MiB")
    assert table.returncode == 0 and "hft-low-memory" in table.stdout and "hft / fft" in table.stdout
    bad = peft_hft_cli("estimate-memory", str(checkpoints / "base"), "--methods", "qlora")
    assert bad.returncode == 1 and "Unknown method" in bad.stderr and "hft-low-memory" in bad.stderr
