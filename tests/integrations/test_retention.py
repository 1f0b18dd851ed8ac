"""RetentionProbe / RetentionCallback: the KL to the starting model and the probe perplexity, computed by hand here."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_tokenizer import build_tokenizer, chat_model
from transformers import TrainerCallback
from trl_helpers import dpo_trainer, sft_trainer

from peft_hft import HFTConfig, RetentionCallback
from peft_hft.integrations.retention import PREFIX, RetentionProbe, summarise_log_probs, token_kl

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "Write a short poem about the sea.",
]


def _hand_metrics(start, model, tokenizer, texts=TEXTS):
    """Full-vocabulary mean token KL(model || start) over every text token, and the token perplexity, text by text."""
    kl_sum, positions, nll, count = 0.0, 0, 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
        with torch.no_grad():
            p = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0].double()
            q = torch.log_softmax(start(input_ids=ids).logits.float(), -1)[0].double()
        kl_sum += float((p.exp() * (p - q)).sum())
        positions += ids.shape[1]
        nll -= float(p[:-1].gather(-1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
    return kl_sum / positions, math.exp(nll / count)


def _perturb(model, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_kl_is_zero_for_the_start_and_matches_a_hand_computation(dtype):
    tokenizer = build_tokenizer()
    model = chat_model(tokenizer).to(dtype)
    start = copy.deepcopy(model)
    probe = RetentionProbe(tokenizer, TEXTS, batch_size=2, top_k=None)
    probe.reference(model)
    before = probe.measure(model)
    assert before.kl_to_base == 0.0 and before.ppl_increase_pct == 0.0
    _perturb(model)
    after = probe.measure(model)
    kl, ppl = _hand_metrics(start, model, tokenizer)
    assert kl > 1e-3
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: batching/padding changes the rounding of the forward
    assert after.kl_to_base == pytest.approx(kl, rel=tol)
    assert after.ppl == pytest.approx(ppl, rel=tol)
    assert after.ppl_increase_pct == pytest.approx(100 * (after.ppl / probe.base_ppl - 1), rel=1e-12)


def test_top_k_kl_is_the_coarsened_kl_a_lower_bound_and_exact_with_the_whole_vocabulary():
    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(5, 50, generator=g) * 2, -1)
    q = torch.log_softmax(torch.randn(5, 50, generator=g) * 2, -1)
    full = (p.exp() * (p - q)).sum(-1)
    k = 7
    index = q.topk(k, -1).indices
    head_p, head_q = p.gather(-1, index), q.gather(-1, index)
    tail_p = torch.log1p(-head_p.exp().sum(-1))
    tail_q = torch.log1p(-head_q.exp().sum(-1))
    hand = (head_p.exp() * (head_p - head_q)).sum(-1) + tail_p.exp() * (tail_p - tail_q)
    coarse = token_kl(p, summarise_log_probs(q, k))
    torch.testing.assert_close(coarse, hand, rtol=1e-5, atol=1e-6)
    assert (coarse <= full + 1e-6).all() and (coarse < full).any()
    torch.testing.assert_close(token_kl(p, summarise_log_probs(q, 50)), full)
    torch.testing.assert_close(token_kl(q, summarise_log_probs(q, k)), torch.zeros(5), rtol=0, atol=1e-6)
    assert summarise_log_probs(q, k).nbytes == 5 * (8 * k + 4)


def test_last_position_kl_covers_the_answer_distribution_only():
    tokenizer = build_tokenizer()
    model = chat_model(tokenizer)
    start = copy.deepcopy(model)
    probe = RetentionProbe(tokenizer, TEXTS, top_k=None, kl_positions="last")
    probe.reference(model)
    _perturb(model)
    hand = 0.0
    for text in TEXTS:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
        with torch.no_grad():
            p = torch.log_softmax(model(input_ids=ids).logits, -1)[0, -1]
            q = torch.log_softmax(start(input_ids=ids).logits, -1)[0, -1]
        hand += float((p.exp() * (p - q)).sum()) / len(TEXTS)
    assert probe.measure(model).kl_to_base == pytest.approx(hand, rel=1e-5)


@pytest.mark.parametrize("kind", ["plain", "hft", "lora"])
def test_plain_loop_methods_restore_the_mode_and_plot(tmp_path, kind):
    from peft import LoraConfig, get_peft_model

    tokenizer = build_tokenizer()
    model = chat_model(tokenizer)
    if kind == "hft":
        model = get_peft_model(model, HFTConfig(seed=0))
    elif kind == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.train()
    retention = RetentionCallback(every=2, texts=TEXTS, top_k=16)
    first = retention.begin(model, tokenizer)
    # LoRA with random B is not the base either: the reference is the model when training begins
    assert first[PREFIX + "kl_to_base"] == 0.0 and model.training
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([tokenizer(TEXTS[0]).input_ids])
    logged = []
    for step in range(1, 4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        logged.append(retention.step(model, step, loss.item(), last=step == 3))
        assert model.training
    assert logged[0] is None and logged[1] is not None and logged[2] is not None
    assert [h["step"] for h in retention.history] == [0, 2, 3]
    assert retention.history[-1][PREFIX + "kl_to_base"] > 0
    assert len(retention.losses) == 3 and len(retention.seconds) == 2
    path = retention.end(tmp_path)
    assert path == tmp_path / "retention.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _Recorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))


def test_sft_trainer_logs_reach_log_history_and_equal_a_hand_computation(tmp_path):
    tokenizer = build_tokenizer()
    model = chat_model(tokenizer)
    start = copy.deepcopy(model)
    callback = RetentionCallback(every=2, texts=TEXTS, top_k=None)
    # a callback ahead of it in the list, as the Trainer puts its reporting integrations (TensorBoard, W&B, ...)
    reporter = _Recorder()
    trainer = sft_trainer(model, tmp_path, HFTConfig(seed=0, task_type="CAUSAL_LM"), callbacks=[reporter, callback],
                          max_steps=3)
    trainer.train()
    assert [s for s, logs in reporter.logs if PREFIX + "kl_to_base" in logs] == [2, 3]
    assert callback.history[0]["step"] == 0 and callback.history[0][PREFIX + "kl_to_base"] == 0.0
    logged = {h["step"]: h for h in trainer.state.log_history if PREFIX + "kl_to_base" in h}
    assert sorted(logged) == [2, 3]
    assert "loss" in logged[2]  # the same log entry as the training loss of that step
    kl, ppl = _hand_metrics(start, trainer.model, trainer.processing_class)
    assert kl > 0
    assert logged[3][PREFIX + "kl_to_base"] == pytest.approx(kl, rel=1e-5)
    assert logged[3][PREFIX + "ppl"] == pytest.approx(ppl, rel=1e-5)
    assert logged[3][PREFIX + "ppl_increase_pct"] == pytest.approx(100 * (ppl / callback.probe.base_ppl - 1), abs=1e-3)
    assert (tmp_path / "out" / "retention.png").is_file()


def test_dpo_trainer_logs_retention(tmp_path):
    tokenizer = build_tokenizer()
    callback = RetentionCallback(every=1, texts=TEXTS)
    trainer = dpo_trainer(chat_model(tokenizer), tmp_path, HFTConfig(seed=0, task_type="CAUSAL_LM"),
                          callbacks=[callback], max_steps=2)
    trainer.train()
    logged = [h for h in trainer.state.log_history if PREFIX + "ppl" in h]
    assert [h["step"] for h in logged] == [1, 2]
    assert logged[-1][PREFIX + "kl_to_base"] > 0
    assert callback.probe.base_ppl == pytest.approx(logged[0][PREFIX + "ppl"] / (1 + logged[0][PREFIX + "ppl_increase_pct"] / 100))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="every"):
        RetentionCallback(every=0)
    with pytest.raises(ValueError, match="top_k"):
        RetentionProbe(build_tokenizer(), TEXTS, top_k=0)
    with pytest.raises(RuntimeError, match="reference"):
        RetentionProbe(build_tokenizer(), TEXTS).measure(chat_model(build_tokenizer()))


def test_the_benchmark_training_loop_drives_the_callback_like_a_trainer(tmp_path):
    from transformers import TrainingArguments

    from peft_hft.bench.train import train

    tokenizer = build_tokenizer()
    model = chat_model(tokenizer)
    for p in model.parameters():
        p.requires_grad_(True)
    retention = RetentionCallback(every=2, texts=TEXTS, tokenizer=tokenizer)
    ids = torch.tensor([tokenizer(TEXTS[1]).input_ids])
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, report_to=[], save_strategy="no")
    run = train(model, [{"input_ids": ids, "labels": ids}] * 3, lr=1e-2, callbacks=[retention], training_args=args)
    assert (tmp_path / "retention.png").is_file()
    assert [s for s, _ in retention.losses] == [1, 2, 3] and [v for _, v in retention.losses] == run["loss"]
    assert [h["step"] for h in retention.history] == [0, 2, 3]  # every 2 steps and the last
