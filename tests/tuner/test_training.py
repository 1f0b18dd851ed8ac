"""Training an HFT model: exactly the selection learns, in its own dtype, with or without checkpointing."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import batch, clone_state, reference_pass_gradients, tiny_model, train_steps

from peft_hft import HFTConfig
from peft_hft.tuner.layer import find_ledger


def test_one_step_changes_exactly_the_selected_tensors():
    model = tiny_model("llama", layers=2)
    before = clone_state(model)
    peft_model = get_peft_model(model, HFTConfig(seed=0))
    selected = set(peft_model.peft_config["default"].selected_parameters)
    trainable = {n.removeprefix("base_model.model.") for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == selected

    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    inputs = batch()
    peft_model.train()
    peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()
    with_grad = {n.removeprefix("base_model.model.") for n, p in peft_model.named_parameters() if p.grad is not None}
    assert with_grad == selected
    optimizer.step()
    states = {id(p) for p in optimizer.state}
    assert states == {id(p) for p in peft_model.parameters() if p.requires_grad}

    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # lm_head is its own tensor in this llama; state_dict has no aliases to worry about
    assert changed == selected


def test_selected_half_of_the_parameters_is_trainable():
    model = tiny_model("llama", layers=4)
    peft_model = get_peft_model(model, HFTConfig(train_embeddings=False))
    trainable, total = peft_model.get_nb_trainable_parameters()
    block_params = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    assert 0.4 < trainable / block_params < 0.6
    assert total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("llama", layers=2)
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
        peft_model = get_peft_model(model, HFTConfig(seed=0))
        peft_model.train()
        inputs = batch()
        peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_train_in_their_own_dtype(dtype):
    model = tiny_model("llama", layers=2, dtype=dtype)
    peft_model = get_peft_model(model, HFTConfig(seed=0))
    ledger = find_ledger(peft_model)
    # no fp32 copy of anything: weights, originals and optimizer inputs stay in the model's dtype
    assert {p.dtype for p in peft_model.parameters()} == {dtype}
    assert {t.dtype for t in ledger._originals.values()} == {dtype}
    before = clone_state(model)
    train_steps(peft_model, steps=1, lr=1e-2)
    assert {p.dtype for p in peft_model.parameters()} == {dtype}
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= set(peft_model.peft_config["default"].selected_parameters)


def test_trained_values_survive_disable_and_enable_bit_exactly():
    model = tiny_model("llama", layers=2)
    base = clone_state(model)
    peft_model = get_peft_model(model, HFTConfig(seed=0))
    train_steps(peft_model, steps=2)
    tuned = clone_state(model)
    with peft_model.disable_adapter():
        assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
        assert not any(p.requires_grad for p in peft_model.parameters())
    assert all(torch.equal(v, tuned[k]) for k, v in model.state_dict().items())
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad}


def test_reference_pass_between_forward_and_backward_does_not_change_gradients():
    """DPO computes reference log-probs with adapters disabled between the policy forward and backward."""
    without, with_reference = reference_pass_gradients("cpu")
    assert without.keys() == with_reference.keys()
    for name in without:
        assert torch.equal(without[name], with_reference[name])


def test_gradients_survive_a_disable_round_trip_and_optimizer_cannot_touch_base_while_disabled():
    model = tiny_model("llama", layers=2)
    base = clone_state(model)
    peft_model = get_peft_model(model, HFTConfig(seed=0))
    peft_model.train()
    inputs = batch()
    peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()
    grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0)
    with peft_model.disable_adapter():
        optimizer.step()  # nothing to step: the grads are parked with the adapter
        assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    after = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
    assert after.keys() == grads.keys()
    assert all(torch.equal(after[n], grads[n]) for n in grads)


def test_originals_stay_off_the_training_device_by_default():
    model = tiny_model("llama", layers=2)
    peft_model = get_peft_model(model, HFTConfig())
    ledger = find_ledger(peft_model)
    assert {t.device.type for t in ledger._originals.values()} == {"cpu"}
    assert set(ledger._originals) == set(peft_model.peft_config["default"].selected_parameters)
    # the ledger adds nothing to the model's state dict
    assert set(peft_model.get_base_model().state_dict()) == set(tiny_model("llama").state_dict())
