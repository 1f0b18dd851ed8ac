"""CUDA behaviour: training on the GPU with the originals in (pinned) host memory or beside the weights.

Skipped where there is no GPU (CI); run on a GPU machine with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import batch, clone_state, tiny_model

from peft_hft import HFTConfig
from peft_hft.layer import find_ledger

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_batch(seed=0):
    return {k: v.cuda() for k, v in batch(seed).items()}


def train(model, steps=3):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        inputs = cuda_batch(step)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


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
    train(peft_model)
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
    inputs = cuda_batch()
    grads = []
    for reference_pass in (False, True):
        model = get_peft_model(tiny_model("llama", layers=2).cuda(), HFTConfig())
        train(model, steps=1)
        model.train()
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        if reference_pass:
            with torch.no_grad(), model.disable_adapter():
                model(**inputs)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name])


def test_moving_the_model_after_injection_keeps_diffs_exact():
    model = tiny_model("llama", layers=2)
    base = clone_state(model)
    peft_model = get_peft_model(model, HFTConfig())
    peft_model.cuda()
    train(peft_model)
    diffs = find_ledger(peft_model).diffs("default")
    state = model.state_dict()
    for name, diff in diffs.items():
        assert torch.equal(diff, state[name].cpu() - base[name])
