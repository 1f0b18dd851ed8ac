"""Other PEFT methods see PEFT unchanged: the startup hook puts peft-hft into every process that imports peft, so
its patches must be invisible to a LoRA user.

Each test runs the same thing twice in fresh interpreters, once with the hook (installed exactly as
``peft_hft-autoload.pth`` does) and once with ``PEFT_HFT_NO_AUTOLOAD=1`` (PEFT alone), and compares:

* a subset of PEFT's own ``tests/test_custom_models.py`` LoRA rows (from the installed peft version's sdist): the same
  outcome for every test;
* broken LoRA adapters (not JSON, no ``peft_type``, no weights, ...) through every entry point peft-hft patches: the
  same exception type and message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from peft_upstream import load_custom_models, tests_root

REPO = Path(__file__).resolve().parents[2]
HOOKED = "import _peft_hft_autoload; _peft_hft_autoload.install()\n"  # what peft_hft-autoload.pth runs
# LoRA rows of PEFT's TEST_CASES: linear layers, modules_to_save, embedding + transformers Conv1D, Conv2d
ROWS = ("Vanilla MLP 1 LoRA", "Vanilla MLP 5 LoRA", "Embedding + transformers Conv1D 3 LoRA", "Conv2d 1 LoRA")


def run_both(script: str, args: list[str], extra_env: dict[str, str] | None = None, cwd: Path | None = None,
             timeout: int = 600) -> dict[str, str]:
    """stdout of ``python -c script *args`` with the hook ('hook') and with PEFT alone ('plain'); each must exit 0.
    ``{mode}`` in an ``extra_env`` value is replaced by the mode."""
    outputs = {}
    for mode in ("hook", "plain"):
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        env.update({k: v.format(mode=mode) for k, v in (extra_env or {}).items()})
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
        env.pop("PEFT_HFT_NO_AUTOLOAD", None)
        if mode == "plain":
            env["PEFT_HFT_NO_AUTOLOAD"] = "1"
        code = (HOOKED if mode == "hook" else "") + script
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                              timeout=timeout, cwd=cwd)
        assert done.returncode == 0, (mode, done.stdout[-3000:], done.stderr[-3000:])
        outputs[mode] = done.stdout
    return outputs


def test_peft_custom_model_lora_rows_give_the_same_outcomes_with_the_hook(tmp_path):
    load_custom_models()  # extract PEFT's test files (cached)
    root = tests_root()
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    args = ["-c", str(tmp_path / "pytest.ini"), "--rootdir", str(root), "-p", "upstream_probe", "-p", "no:cacheprovider",
            "-q", str(root / "peft_upstream_tests" / "test_custom_models.py")]
    probe = {"PEFT_HFT_PROBE_ROWS": "|".join(ROWS), "PEFT_HFT_PROBE_OUT": str(tmp_path / "probe-{mode}.json")}
    run_both("import sys, pytest; sys.exit(pytest.main(sys.argv[1:]))", args, probe, cwd=tmp_path)
    hook, plain = (json.loads((tmp_path / f"probe-{mode}.json").read_text()) for mode in ("hook", "plain"))
    assert hook["hft_registered"] and hook["peft_hft_imported"]  # the hook really was active
    assert not plain["hft_registered"] and not plain["peft_hft_imported"]  # and really was off
    assert sum(o == "passed" for o in plain["outcomes"].values()) >= 100, plain["outcomes"]  # the rows were found
    differing = {k: (hook["outcomes"].get(k), v) for k, v in plain["outcomes"].items() if hook["outcomes"].get(k) != v}
    assert hook["outcomes"].keys() == plain["outcomes"].keys() and not differing, differing


BROKEN_LORA = textwrap.dedent(
    """
    import json, shutil, sys
    from pathlib import Path
    import torch
    from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = Path(sys.argv[1])

    def base():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=64))

    good = root / "good"
    if not good.exists():
        get_peft_model(base(), LoraConfig(target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(good)
    text = (good / "adapter_config.json").read_text()
    broken = {}
    def copy(name):
        target = root / name
        if not target.exists():
            shutil.copytree(good, target)
        broken[name] = target
        return target
    (copy("not-json") / "adapter_config.json").write_text(text[: len(text) // 2])
    config = json.loads(text); config.pop("peft_type")
    (copy("no-peft-type") / "adapter_config.json").write_text(json.dumps(config))
    (copy("list") / "adapter_config.json").write_text("[1, 2]")
    (copy("unknown-type") / "adapter_config.json").write_text(json.dumps({**json.loads(text), "peft_type": "NOPE"}))
    missing = copy("no-weights") / "adapter_model.safetensors"
    if missing.exists():
        missing.unlink()
    broken["no-directory"] = root / "does-not-exist"
    broken["hub-id-offline"] = "nobody-here/no-such-adapter"

    def outcome(call):
        try:
            call()
            return "ok"
        except BaseException as exc:
            return f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"

    lora = PeftModel.from_pretrained(base(), good)
    results = {}
    for name, path in broken.items():
        results[name] = {
            "PeftModel.from_pretrained": outcome(lambda: PeftModel.from_pretrained(base(), path)),
            "PeftModel.load_adapter": outcome(lambda: lora.load_adapter(path, adapter_name="other")),
            "PeftConfig.from_pretrained": outcome(lambda: PeftConfig.from_pretrained(path)),
            "transformers load_adapter": outcome(lambda: base().load_adapter(str(path))),
        }
    results["good"] = {"logits": lora(torch.arange(8)[None]).logits.sum().item()}
    print(json.dumps(results, indent=1, sort_keys=True))
    """
)


def test_broken_lora_adapters_raise_peft_own_errors(tmp_path):
    outputs = run_both(BROKEN_LORA, [str(tmp_path)])
    hook, plain = json.loads(outputs["hook"]), json.loads(outputs["plain"])
    assert hook == plain
    # the cases really are broken, and failed in PEFT's or transformers' code
    for name, calls in plain.items():
        for call, result in calls.items():
            legal = name == "good" or (name == "no-weights" and call == "PeftConfig.from_pretrained")
            assert legal or result != "ok", (name, call, result)
    assert "peft_hft" not in outputs["hook"]
