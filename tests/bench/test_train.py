"""The benchmark's training loop: the precision it resolves and runs, and TrainerCallbacks plugged into it."""

from __future__ import annotations

import pytest
import torch
from tiny_models import batch, tiny_model
from transformers import TrainerCallback

import peft_hft
import peft_hft.utils
from peft_hft.bench.train import train


def _batches(n: int) -> list[dict[str, torch.Tensor]]:
    return [{**b, "labels": b["input_ids"]} for b in (batch(seed=i, size=2, length=8) for i in range(n))]


def _autocast_seen(model) -> list[bool]:
    seen: list[bool] = []
    model.model.layers[0].register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    return seen


@pytest.mark.parametrize("native, expected", [(False, "fp32"), (True, "bf16")])
def test_auto_precision_is_resolved_from_the_cpu_and_recorded(monkeypatch, native, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(peft_hft.utils, "cpu_bf16_support", lambda: "amx" if native else "emulated")
    model = tiny_model("llama", layers=2)
    seen = _autocast_seen(model)
    run = train(model, _batches(2), lr=1e-3)
    assert run["precision"] == expected and seen == [expected == "bf16"] * 2
    assert len(run["loss"]) == 2 and all(torch.isfinite(torch.tensor(run["loss"])))


def test_trainer_callbacks_see_every_step_and_can_stop_the_run():
    class Recorder(TrainerCallback):
        def __init__(self):
            self.events, self.logs = [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.events.append("begin")

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            assert model is not None and isinstance(optimizer, torch.optim.AdamW)
            self.events.append(state.global_step)
            if state.global_step == 3:
                control.should_training_stop = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(logs)

        def on_train_end(self, args, state, control, **kwargs):
            self.events.append("end")

    recorder = Recorder()
    run = train(tiny_model("llama", layers=2), _batches(5), lr=1e-3, precision="fp32", callbacks=[recorder])
    assert recorder.events == ["begin", 1, 2, 3, "end"] and len(run["loss"]) == 3
    assert [log["loss"] for log in recorder.logs] == pytest.approx(run["loss"])
    assert [log["step"] for log in recorder.logs] == [1, 2, 3] and recorder.logs[0]["learning_rate"] > 0


def _answer_only(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right-padded rows of different lengths whose last two real tokens are the only labels (completion loss)."""
    labels = torch.full_like(b["input_ids"], -100)
    mask = torch.ones_like(b["input_ids"])
    for row, length in enumerate([8, 6, 7][: len(labels)]):
        labels[row, length - 2 : length] = b["input_ids"][row, length - 2 : length]
        mask[row, length:] = 0
    return {**b, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("arch, overrides, adapter", [
    ("llama", {}, None),
    ("llama", {}, "hft"),
    ("llama", {}, "lora"),
    ("gemma2", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                    final_logit_softcapping=5.0), None),  # a soft cap after the LM head must still apply
])
def test_answer_only_loss_skips_the_other_positions_of_the_lm_head_with_the_same_loss_and_gradients(
        arch, overrides, adapter):
    from peft import LoraConfig, get_peft_model

    from peft_hft.bench.train import _few_labels, _label_logits_loss

    if arch == "gemma2":
        from tiny_models import VOCAB
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma2", num_hidden_layers=2, vocab_size=VOCAB,
                                                                      **overrides))
    else:
        model = tiny_model(arch, layers=2)
    if adapter == "hft":
        model = get_peft_model(model, peft_hft.HFTConfig(ratio=0.5, seed=0))
    elif adapter == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    b = _answer_only(batch(seed=3, size=3, length=8))
    assert _few_labels(b) and not _few_labels({**b, "labels": b["input_ids"]})
    seen = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda _m, _a, out: seen.append(out.shape[:-1]))
    params = [p for p in model.parameters() if p.requires_grad]
    reference = model(**b).loss
    expected = torch.autograd.grad(reference, params)
    loss = _label_logits_loss(model, b)
    grads = torch.autograd.grad(loss, params)
    assert seen == [torch.Size([3, 8]), torch.Size([1, 6])]  # 6 labelled tokens went through the head, not 24
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert not head._forward_pre_hooks  # the hook lives for one forward only


def test_an_optimizer_stepping_in_backward_trains_like_the_loops_adamw_and_refuses_clipping():
    """``train(optimizer=...)``: the low-memory preset's run passes its optimizer fused into backward; without
    clipping it gives the loop's own AdamW update (same lr schedule through the placeholder's param group), and a
    clipping norm is refused, since the gradients are gone before the loop could clip them."""
    from peft_hft import optimizer_in_backward

    batches = _batches(3)
    loop = tiny_model("llama", layers=2)
    fused = tiny_model("llama", layers=2)
    fused.load_state_dict(loop.state_dict())
    train(loop, batches, lr=1e-3, precision="fp32", max_grad_norm=0.0)
    run = train(fused, batches, lr=1e-3, precision="fp32", max_grad_norm=0.0,
                optimizer=optimizer_in_backward(fused, torch.optim.AdamW, lr=1e-3, weight_decay=0.0))
    base = tiny_model("llama", layers=2).state_dict()
    for name, value in loop.state_dict().items():
        assert torch.allclose(fused.state_dict()[name], value, atol=1e-6), name
    assert any(not torch.equal(base[n], v) for n, v in fused.state_dict().items())  # it did train
    assert len(run["loss"]) == 3
    other = tiny_model("llama", layers=2)
    with pytest.raises(ValueError, match="max_grad_norm=0"):
        train(other, batches, lr=1e-3, precision="fp32", optimizer=optimizer_in_backward(other, lr=1e-3))
