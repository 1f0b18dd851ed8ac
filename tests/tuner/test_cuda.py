"""CUDA behaviour: training on the GPU with the originals in (pinned) host memory or beside the weights.

Skipped where there is no GPU (CI); run on a GPU machine with ``pytest tests/tuner/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import batch, clone_state, reference_pass_gradients, tiny_model, train_steps

from peft_hft import HFTConfig
from peft_hft.tuner.layer import find_ledger

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_batch(seed=0):
    return batch(seed, device="cuda")


@pytest.mark.parametrize("originals_device", ["cpu", "device"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_train_disable_save_reload_on_cuda(tmp_path, originals_device, dtype):
    model = tiny_model("llama", layers=2, dtype=dtype).cuda()
    base = clone_state(model)
    peft_model = get_peft_model(model, HFTConfig(originals_device=originals_device))
    ledger = find_ledger(peft_model)
    expected_store = "cpu" if originals_device == "cpu" else "cuda"
    assert {t.device.type for t in ledger._originals.values()} == {expected_store}
    if originals_device == "cpu":
        assert all(t.is_pinned() for t in ledger._originals.values())
    train_steps(peft_model, steps=3)
    assert {p.device.type for p in peft_model.parameters()} == {"cuda"}
    assert {p.dtype for p in peft_model.parameters()} == {dtype}
    tuned = clone_state(model)
    with torch.no_grad():
        tuned_logits = peft_model(**cuda_batch()).logits
        with peft_model.disable_adapter():
            assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
        assert all(torch.equal(v, tuned[k]) for k, v in model.state_dict().items())
    peft_model.save_pretrained(tmp_path)
    fresh = tiny_model("llama", layers=2, dtype=dtype).cuda()
    fresh.load_state_dict(base)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        gap = (loaded(**cuda_batch()).logits.float() - tuned_logits.float()).abs().max().item()
    assert gap <= (1e-5 if dtype == torch.float32 else 5e-2)


def test_reference_pass_keeps_gradients_on_cuda():
    without, with_reference = reference_pass_gradients("cuda")
    assert without.keys() == with_reference.keys()
    for name in without:
        assert torch.equal(without[name], with_reference[name])


def test_moving_the_model_after_injection_keeps_diffs_exact():
    model = tiny_model("llama", layers=2)
    base = clone_state(model)
    peft_model = get_peft_model(model, HFTConfig())
    peft_model.cuda()
    train_steps(peft_model, steps=3)
    diffs = find_ledger(peft_model).diffs("default")
    state = model.state_dict()
    for name, diff in diffs.items():
        assert torch.equal(diff, state[name].cpu() - base[name])
