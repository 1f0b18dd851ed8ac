"""Low-memory training (peft_hft/integrations/low_memory.py): the optimizer step fused into backward gives the update a
plain optimizer gives, refuses what it cannot do, and works with Trainer checkpoints, TRL SFT and DPO, gradient
checkpointing, torchao's low-bit AdamW and every master_weights option; the low-memory preset is one definition."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import batch, tiny_model

from peft_hft import (
    HFTConfig,
    apply_low_memory_preset,
    low_bit_adamw,
    low_memory_config,
    low_memory_preset,
    optimizer_in_backward,
)
from peft_hft.tuner.layer import find_ledger

BF16 = torch.bfloat16
LR = 1e-5
MODES = ["fp32", "fp32_offload", "kahan", "kahan8", "stochastic_rounding", "none"]


def base(dtype=BF16, **overrides):
    return tiny_model("llama", seed=0, **overrides).to(BF16).to(dtype)


def loop(model, optimizer, steps: int = 5) -> None:
    model.train()
    for step in range(steps):
        inputs = batch(step, size=4, length=16)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def trained_values(peft_model) -> dict[str, torch.Tensor]:
    ledger = find_ledger(peft_model)
    return {k: v.float() for k, v in ledger.diffs("default", torch.float32).items()}


@pytest.mark.parametrize("dtype,mode", [(torch.float32, "fp32"), (BF16, "fp32"), (BF16, "kahan"), (BF16, "none")])
def test_the_fused_step_gives_the_plain_optimizers_update(dtype, mode):
    fused = get_peft_model(base(dtype), HFTConfig(seed=0, master_weights=mode))
    plain = get_peft_model(base(dtype), HFTConfig(seed=0, master_weights=mode))
    optimizer = optimizer_in_backward(fused, torch.optim.AdamW, lr=LR, weight_decay=0.01)
    loop(fused, optimizer)
    loop(plain, torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=LR, weight_decay=0.01))
    got, expected = trained_values(fused), trained_values(plain)
    assert any(v.abs().max() > 0 for v in expected.values())
    for name in expected:  # per-tensor vs foreach AdamW: equal up to float rounding (one bf16 ulp at most)
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=2e-3 if dtype == BF16 else 1e-7)
    # the gradients are freed in backward: none is left for the step
    inputs = batch(9, size=4, length=16)
    fused(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.grad is None for p in fused.parameters())
    optimizer.step()


CHUNK = 4096  # the smallest slice; the tiny model below has 16384-element MLP matrices, stepped in 4 slices


def sliced_base(dtype=BF16):
    return base(dtype, hidden_size=64, intermediate_size=256)


@pytest.mark.parametrize("dtype,mode", [(torch.float32, "fp32"), (BF16, "fp32"), (BF16, "kahan"), (BF16, "none"),
                                        (BF16, "stochastic_rounding")])
def test_a_tensor_stepped_in_slices_gets_the_whole_tensors_step(dtype, mode):
    """chunk_elements: each slice steps its span of the master (or error buffer, or rounding) and writes it into the
    tensor's own storage; for an elementwise optimizer that is the step of the whole tensor, bit for bit (stochastic
    rounding draws its noise per slice: within one bf16 ulp)."""
    runs = {}
    for chunk in (None, CHUNK):
        model = get_peft_model(sliced_base(dtype), HFTConfig(seed=0, master_weights=mode))
        lr = 1e-2 if mode == "stochastic_rounding" else 1e-4  # updates far above the rounding noise
        optimizer = optimizer_in_backward(model, torch.optim.AdamW, chunk_elements=chunk, lr=lr, weight_decay=0.01)
        loop(model, optimizer)
        runs[chunk] = model, optimizer
    (whole, _), (sliced, optimizer) = runs[None], runs[CHUNK]
    counts = {p.numel(): len(inners) for p, inners in zip(optimizer.param_groups[0]["params"], optimizer.optimizers, strict=True)}
    # 16384 = 4 slices; 6400 (the embedding) = 4096 + a 2304 tail, which joins the slice before: one
    assert counts[16384] == 4 and counts[6400] == 1 and all(n == max(1, size // CHUNK) for size, n in counts.items())
    expected, got = trained_values(whole), trained_values(sliced)
    assert any(v.abs().max() > 0 for v in expected.values())
    for name in expected:
        if mode == "stochastic_rounding":  # the same update up to the rounding noise (one ulp of the weights)
            cosine = torch.nn.functional.cosine_similarity(got[name].flatten(), expected[name].flatten(), dim=0)
            assert cosine > 0.99, (name, float(cosine))
        else:
            assert torch.equal(got[name], expected[name]), name
    inputs = batch(9, size=4, length=16)
    sliced(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.grad is None for p in sliced.parameters())  # slices hand their gradients back after the step


def test_a_sliced_torchao_step_is_the_whole_tensors_step(eager):
    """Slices are multiples of 4096 elements, so torchao's quantized blocks fall where they fall in the whole tensor:
    AdamW4bit over slices gives the same weights and the same 4-bit state."""
    pytest.importorskip("torchao")
    results = []
    for chunk in (None, CHUNK):
        model = get_peft_model(sliced_base(), HFTConfig(seed=0, master_weights="kahan"))
        optimizer = optimizer_in_backward(model, low_bit_adamw(4), chunk_elements=chunk, lr=1e-3)
        loop(model, optimizer, steps=3)
        results.append((trained_values(model), optimizer))
    (expected, whole), (got, sliced) = results
    assert any(v.abs().max() > 0 for v in expected.values())
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    index = [p.numel() for p in sliced.param_groups[0]["params"]].index(16384)
    whole_codes = whole.optimizers[index][0].state_dict()["state"][0]["exp_avg"]
    slice_codes = [inner.state_dict()["state"][0]["exp_avg"] for inner in sliced.optimizers[index]]
    assert type(whole_codes).__name__ == type(slice_codes[0]).__name__ == "OptimState4bit"
    assert sum(s.numel() for s in slice_codes) == whole_codes.numel()


def test_a_sliced_optimizer_state_saves_and_resumes_in_its_slices():
    model = get_peft_model(sliced_base(), HFTConfig(seed=0, master_weights="kahan"))
    optimizer = optimizer_in_backward(model, torch.optim.AdamW, chunk_elements=CHUNK, lr=1e-4)
    loop(model, optimizer, steps=2)
    state = optimizer.state_dict()
    index = [p.numel() for p in optimizer.param_groups[0]["params"]].index(16384)
    assert len(state["state"][index]["slices"]) == 4
    assert state["state"][index]["slices"][1]["exp_avg"].shape == (CHUNK,)
    again = optimizer_in_backward(model, torch.optim.AdamW, chunk_elements=CHUNK, lr=1e-4)
    optimizer.remove_hooks()
    again.load_state_dict(state)
    reloaded = again.optimizers[index][2].state[again.optimizers[index][2].param_groups[0]["params"][0]]
    saved = state["state"][index]["slices"]  # torch casts loaded state to the (bf16) parameter's dtype
    assert torch.equal(reloaded["exp_avg"], saved[2]["exp_avg"].to(reloaded["exp_avg"].dtype))
    assert not torch.equal(reloaded["exp_avg"], saved[1]["exp_avg"].to(reloaded["exp_avg"].dtype))
    other = optimizer_in_backward(model, torch.optim.AdamW, chunk_elements=2 * CHUNK, lr=1e-4)
    with pytest.raises(ValueError, match="saved in 4 slice.*steps it in 2.*resume with the chunk_elements"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="saved in 4 slice.*steps it in 1"):
        optimizer_in_backward(model, torch.optim.AdamW, lr=1e-4).load_state_dict(state)


def test_slicing_refuses_sizes_off_the_block_grid_and_optimizers_that_are_not_elementwise():
    from transformers.optimization import Adafactor

    model = get_peft_model(sliced_base(), HFTConfig(seed=0))
    for wrong in (1000, 0, -4096, 4096.0, True):
        with pytest.raises(ValueError, match=rf"chunk_elements={wrong!r}: slices must hold a positive multiple of 4096"):
            optimizer_in_backward(model, torch.optim.AdamW, chunk_elements=wrong, lr=1e-4)
    with pytest.raises(ValueError, match="Adafactor is not known to be one.*Fix: chunk_elements=None"):
        optimizer_in_backward(model, Adafactor, chunk_elements=CHUNK, lr=1e-4)
    assert optimizer_in_backward(model, Adafactor, lr=1e-4, scale_parameter=False, relative_step=False)


@pytest.mark.parametrize("chunk", [None, CHUNK])
def test_clip_per_tensor_scales_each_tensors_gradient_before_its_step(chunk):
    """``clip_per_tensor``: each tensor's gradient is scaled to at most that norm (the whole tensor's norm, also when
    it is stepped in slices) before its step, which with SGD is ``-lr * clipped gradient`` exactly; ``grad_norm`` is the
    global norm of the step's gradients before clipping. The same model and batch without clipping shows that the bound
    bites (most tensors' gradients are above it)."""
    clip, lr = 0.05, 1e-2
    model = get_peft_model(sliced_base(torch.float32), HFTConfig(seed=0, master_weights="fp32"))
    reference = get_peft_model(sliced_base(torch.float32), HFTConfig(seed=0, master_weights="fp32"))
    optimizer = optimizer_in_backward(model, torch.optim.SGD, chunk_elements=chunk, clip_per_tensor=clip, lr=lr)
    assert optimizer.grad_norm is None
    inputs = batch(0, size=4, length=16)
    reference(**inputs, labels=inputs["input_ids"]).loss.backward()
    trained = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    norms = {n: float(p.grad.norm()) for n, p in trained.items()}
    assert sum(norm > clip for norm in norms.values()) > len(norms) / 2
    expected = {n: p.detach() - lr * p.grad * min(1.0, clip / (norms[n] + 1e-6)) for n, p in trained.items()}
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    got = dict(model.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(got[name].detach(), value, rtol=0, atol=1e-7)
    assert optimizer.grad_norm == pytest.approx(sum(n * n for n in norms.values()) ** 0.5, rel=1e-5)
    unclipped = optimizer_in_backward(reference, torch.optim.SGD, chunk_elements=chunk, lr=lr)
    reference.zero_grad(set_to_none=True)
    reference(**inputs, labels=inputs["input_ids"]).loss.backward()
    unclipped.step()
    assert unclipped.grad_norm is None  # unclipped steps compute no norms


def test_clip_per_tensor_on_a_bf16_model_clips_the_gradient_its_masters_step_with():
    """On a bf16 model with fp32 masters the clipping scales the bf16 gradient (by a factor rounded to bf16, as in
    ``clip_grad_norm_``) before the master steps: the saved update is ``-lr`` times that gradient, each tensor's
    below the bound up to bf16 rounding, and the bound bites (the unclipped update is larger)."""
    clip, lr = 0.05, 1e-2
    model = get_peft_model(sliced_base(BF16), HFTConfig(seed=0, master_weights="fp32"))
    reference = get_peft_model(sliced_base(BF16), HFTConfig(seed=0, master_weights="fp32"))
    optimizer = optimizer_in_backward(model, torch.optim.SGD, chunk_elements=CHUNK, clip_per_tensor=clip, lr=lr)
    inputs = batch(0, size=4, length=16)
    reference(**inputs, labels=inputs["input_ids"]).loss.backward()
    expected = {}
    for name, param in reference.named_parameters():
        if param.requires_grad:
            norm = torch.linalg.vector_norm(param.grad, dtype=torch.float32)
            factor = torch.clamp(clip / (norm + 1e-6), max=1.0).to(BF16)
            expected[name.removeprefix("base_model.model.")] = -lr * (param.grad * factor).float()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    got = trained_values(model)
    assert got.keys() == expected.keys()
    for name, diff in got.items():  # up to the fp32 rounding of master minus base (half an ulp of 1.0)
        torch.testing.assert_close(diff, expected[name], rtol=0, atol=6e-8)
        assert float(diff.norm()) <= lr * clip * (1 + 2**-7)
    assert sum(float(v.norm()) < lr * clip * 0.99 for v in got.values()) < len(got) / 2  # most were clipped


def test_the_clipping_norm_of_a_large_bf16_gradient_needs_no_float32_copy_of_it():
    """``gradient_norm`` of a bf16 gradient of twice the slice is its float64 norm to 1e-4, and allocates at most
    one float32 slice, never a float32 copy of the whole gradient (which ``vector_norm(dtype=torch.float32)`` makes:
    2.1 GB for an 8B model's embedding)."""
    from torch.profiler import ProfilerActivity, profile

    from peft_hft.integrations.low_memory import _NORM_SLICE, gradient_norm

    gradient = torch.randn(2 * _NORM_SLICE, generator=torch.Generator().manual_seed(0)).to(BF16)
    expected = float(gradient.double().norm())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        norm = gradient_norm(gradient)
    assert norm.dtype == torch.float32 and float(norm) == pytest.approx(expected, rel=1e-4)
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert 0 < largest <= 4 * _NORM_SLICE < 4 * gradient.numel()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.linalg.vector_norm(gradient, dtype=torch.float32)
    assert max(event.cpu_memory_usage for event in prof.events()) >= 4 * gradient.numel()  # what is avoided


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), True, "1.0"])
def test_clip_per_tensor_refuses_what_is_not_a_positive_finite_norm(bad):
    model = get_peft_model(base(), HFTConfig(seed=0))
    with pytest.raises(ValueError, match=r"clip_per_tensor=.*positive finite number\. Fix: e\.g\. clip_per_tensor=1\.0"):
        optimizer_in_backward(model, clip_per_tensor=bad, lr=LR)
    assert all(p.grad is None for p in model.parameters())  # nothing was hooked: a backward keeps its gradients
    inputs = batch(0, size=2, length=8)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_fused_step_refuses_accumulation_and_global_clipping(tmp_path):
    from transformers import Trainer, TrainingArguments

    peft_model = get_peft_model(base(), HFTConfig(seed=0))
    optimizer_in_backward(peft_model, lr=LR)
    inputs = batch(0, size=2, length=8)
    peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()
    with pytest.raises(RuntimeError, match="second gradient before optimizer.step.*gradient_accumulation_steps=1"):
        peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()
    kwargs = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match=r"max_grad_norm=1.0.*Fix: TrainingArguments\(max_grad_norm=0\).*clip_per_tensor"):
        optimizer_in_backward(peft_model, training_args=TrainingArguments(**kwargs))
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2 cannot work"):
        optimizer_in_backward(peft_model, training_args=TrainingArguments(
            gradient_accumulation_steps=2, max_grad_norm=0, **kwargs))
    # a Trainer built with the fused optimizer but the default max_grad_norm is refused at its first step
    fresh = get_peft_model(base(), HFTConfig(seed=0))
    args = TrainingArguments(max_steps=2, per_device_train_batch_size=2, **kwargs)
    trainer = Trainer(model=fresh, args=args, train_dataset=_Tokens(), optimizers=(
        optimizer_in_backward(fresh, lr=LR), None))
    with pytest.raises(ValueError, match="max_grad_norm=1.0"):
        trainer.train()


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, rows: int = 16):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 100, (rows, 16), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(16, dtype=torch.long), "labels": self.ids[i]}


def _args(tmp_path, **overrides):
    from transformers import TrainingArguments

    kwargs = dict(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=LR,
                  lr_scheduler_type="linear", report_to=[], save_strategy="steps", save_steps=2,
                  logging_strategy="no", use_cpu=True, bf16=True, disable_tqdm=True, seed=0, max_grad_norm=0.0,
                  gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


@pytest.mark.parametrize("mode", MODES)
def test_trainer_checkpoint_resume_with_the_fused_step_and_gradient_checkpointing(tmp_path, mode):
    """Every master option, the step in backward, gradient checkpointing and a linear schedule: resuming from the
    step-2 checkpoint ends where the uninterrupted run ended."""
    from transformers import Trainer

    def run(resume=None):
        model = base()
        peft_model = get_peft_model(model, HFTConfig(seed=0, master_weights=mode))
        args = _args(tmp_path)
        trainer = Trainer(model=peft_model, args=args, train_dataset=_Tokens(),
                          optimizers=(optimizer_in_backward(peft_model, lr=LR, training_args=args), None))
        trainer.train(resume_from_checkpoint=resume)
        return trainer, model

    trainer, model = run()
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    lrs = {float(o.param_groups[0]["lr"]) for inners in optimizer.optimizers for o in inners}
    assert len(lrs) == 1 and lrs.pop() == pytest.approx(LR / 4)  # the linear schedule reached every tensor
    assert all(len(o.state) == 1 for inners in optimizer.optimizers for o in inners)
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    start = base()
    assert any(not torch.equal(final[n], p) for n, p in start.named_parameters())
    _, resumed = run(str(tmp_path / "out" / "checkpoint-2"))
    for name, param in resumed.named_parameters():
        if mode == "stochastic_rounding":  # the random rounding draws differ after a resume
            torch.testing.assert_close(param, final[name], rtol=0, atol=float(final[name].abs().max()) * 2**-6)
        else:
            torch.testing.assert_close(param, final[name], rtol=0, atol=float(final[name].abs().max()) * 2**-7)


@pytest.mark.parametrize("mode", MODES)
def test_trl_sft_with_the_fused_step_for_every_option(tmp_path, mode):
    from tiny_tokenizer import build_tokenizer, chat_model
    from trl_helpers import changed, selection, sft_trainer, snapshot

    model = chat_model(build_tokenizer()).to(BF16)
    before = snapshot(model)
    trainer = sft_trainer(model, tmp_path, HFTConfig(seed=3, master_weights=mode), bf16=True, learning_rate=1e-3,
                          max_steps=2, max_grad_norm=0.0)
    optimizer_in_backward(trainer)  # TRL made the PeftModel: install into the trainer
    trainer.train()
    assert changed(before, model) <= selection(trainer.model)
    assert len(changed(before, model)) > 0.5 * len(selection(trainer.model))
    kept = find_ledger(trainer.model).masters.nbytes()
    assert (kept > 0) == (mode in ("fp32", "fp32_offload", "kahan", "kahan8"))


@pytest.fixture
def eager():
    """torchao compiles its step (about 40 s); eager steps keep the tests fast."""
    with torch.compiler.set_stance("force_eager"):
        yield


def test_the_low_memory_preset_is_one_definition_and_trains_with_trl_sft_and_dpo(tmp_path, monkeypatch, eager):
    pytest.importorskip("torchao")
    from tiny_tokenizer import build_tokenizer, chat_model
    from trl_helpers import changed, dpo_trainer, reference_passes_see, selection, sft_trainer, snapshot

    preset = low_memory_preset()
    assert preset["hft_config"] == {"master_weights": "stochastic_rounding"}
    assert preset["optimizer"] == {"class": "torchao.optim.AdamW4bit", "bits": 4}
    assert preset["training_arguments"]["max_grad_norm"] == 0.0 and preset["optimizer_in_backward"] is True
    assert preset["chunk_elements"] == 2**24 and preset["clip_per_tensor"] == 1.0
    assert low_bit_adamw(preset["optimizer"]["bits"]).__name__ == "AdamW4bit"
    assert low_memory_config(seed=3).master_weights == "stochastic_rounding"
    with pytest.raises(ValueError, match="8-bit and 4-bit"):
        low_bit_adamw(2)

    model = chat_model(build_tokenizer(), hidden_size=64, intermediate_size=256).to(BF16)
    before = snapshot(model)
    trainer = sft_trainer(model, tmp_path / "sft", low_memory_config(seed=3), learning_rate=1e-3, max_steps=2,
                          **preset["training_arguments"])
    optimizer = apply_low_memory_preset(trainer)
    assert optimizer.clip_per_tensor == 1.0 and optimizer.chunk_elements == 2**24
    trainer.train()
    assert 0 < len(changed(before, model)) and changed(before, model) <= selection(trainer.model)
    states = [o.state for inners in optimizer.optimizers for o in inners]
    assert any(type(s["exp_avg"]).__name__ == "OptimState4bit" for state in states for s in state.values())

    model = chat_model(build_tokenizer(), hidden_size=64, intermediate_size=256).to(BF16)
    before = snapshot(model)
    trainer = dpo_trainer(model, tmp_path / "dpo", low_memory_config(seed=1), learning_rate=1e-3, max_steps=2,
                          **preset["training_arguments"])
    apply_low_memory_preset(trainer)
    seen = reference_passes_see(monkeypatch, before, model)
    trainer.train()
    assert seen and all(seen)  # every reference pass ran on the bf16 base
    assert 0 < len(changed(before, model)) and changed(before, model) <= selection(trainer.model)
    wrong = dpo_trainer(chat_model(build_tokenizer()).to(BF16), tmp_path / "x", low_memory_config(seed=1),
                        bf16=True, max_steps=1)
    with pytest.raises(ValueError, match="differ from the low-memory preset"):
        apply_low_memory_preset(wrong)


def test_the_offloaded_preset_is_default_hft_with_masters_and_adamw_in_host_memory_with_trl_sft_and_dpo(
        tmp_path, monkeypatch):
    """``low_memory_preset(offload=True)``: fp32 masters in host memory stepped by the Trainer's own AdamW after
    backward (its global clipping and accumulation kept), gradient checkpointing; TRL's SFT (with gradient
    accumulation and the default max_grad_norm) and DPO (reference passes on the bf16 base) train with it; the
    AdamW state is created in host memory in fp32."""
    from tiny_tokenizer import build_tokenizer, chat_model
    from trl_helpers import changed, dpo_trainer, reference_passes_see, selection, sft_trainer, snapshot

    preset = low_memory_preset(offload=True)
    assert preset == {
        "hft_config": {"master_weights": "fp32_offload"},
        "optimizer": {"class": "torch.optim.AdamW", "bits": 32},
        "optimizer_in_backward": False, "chunk_elements": None, "clip_per_tensor": None,
        "training_arguments": {"bf16": True, "gradient_checkpointing": True,
                               "gradient_checkpointing_kwargs": {"use_reentrant": False}},
    }
    assert low_memory_config(offload=True, seed=3).master_weights == "fp32_offload"
    with pytest.raises(ValueError, match="bits=8, bits=4 or bits=32"):
        low_memory_preset(16)
    with pytest.raises(ValueError, match="offloaded preset steps torch's AdamW.*Fix"):
        low_memory_preset(8, offload=True)

    model = chat_model(build_tokenizer(), hidden_size=64, intermediate_size=256).to(BF16)
    before = snapshot(model)
    trainer = sft_trainer(model, tmp_path / "sft", low_memory_config(offload=True, seed=3), learning_rate=1e-3,
                          max_steps=2, gradient_accumulation_steps=2, **preset["training_arguments"])
    assert trainer.args.max_grad_norm == 1.0  # the Trainer's global clipping stays
    with pytest.raises(ValueError, match="clips by the global gradient norm.*Fix"):
        apply_low_memory_preset(trainer, offload=True, clip_per_tensor=0.5)
    with pytest.raises(ValueError, match="keeps the Trainer's own AdamW.*Fix"):
        apply_low_memory_preset(trainer, offload=True, lr=1e-4)
    optimizer = apply_low_memory_preset(trainer, offload=True)
    assert optimizer is trainer.optimizer and isinstance(optimizer, torch.optim.AdamW)
    trainer.train()
    assert 0 < len(changed(before, model)) and changed(before, model) <= selection(trainer.model)
    states = list(optimizer.state.values())
    assert states and {(s["exp_avg"].dtype, s["exp_avg"].device.type) for s in states} == {(torch.float32, "cpu")}
    masters = find_ledger(trainer.model).masters
    assert masters.names() and all(masters._masters[n].on_host for n in masters.names())

    model = chat_model(build_tokenizer(), hidden_size=64, intermediate_size=256).to(BF16)
    before = snapshot(model)
    trainer = dpo_trainer(model, tmp_path / "dpo", low_memory_config(offload=True, seed=1), learning_rate=1e-3,
                          max_steps=2, **preset["training_arguments"])
    apply_low_memory_preset(trainer, offload=True)
    seen = reference_passes_see(monkeypatch, before, model)
    trainer.train()
    assert seen and all(seen)
    assert 0 < len(changed(before, model)) and changed(before, model) <= selection(trainer.model)
    plain = apply_low_memory_preset(get_peft_model(base(), low_memory_config(offload=True, seed=0)), offload=True,
                                    lr=3e-4)
    assert type(plain) is torch.optim.AdamW and plain.param_groups[0]["lr"] == 3e-4


def test_the_offloaded_presets_optimizer_loads_a_checkpoints_state_into_host_memory(monkeypatch):
    """torch casts loaded state to each parameter's device; the offloaded preset's optimizer points each offloaded
    parameter at an empty host tensor for the cast (so the state is made in host memory, never on the accelerator)
    and at its own weight again after; the loaded state is the saved one, and training goes on from it."""
    model = get_peft_model(base(), low_memory_config(offload=True, seed=0))
    optimizer = apply_low_memory_preset(model, offload=True, lr=1e-4)
    loop(model, optimizer, steps=2)
    saved = optimizer.state_dict()
    fresh = apply_low_memory_preset(model, offload=True, lr=1e-4)
    params = fresh.param_groups[0]["params"]
    storage = [p.data_ptr() for p in params]
    cast_onto = []
    real = torch.optim.Optimizer._process_value_according_to_param_policy

    def recording(param, value, param_id, param_groups, key=None):
        cast_onto.append(param.numel())
        return real(param, value, param_id, param_groups, key)

    monkeypatch.setattr(torch.optim.Optimizer, "_process_value_according_to_param_policy", staticmethod(recording))
    fresh.load_state_dict(saved)
    assert cast_onto and set(cast_onto) == {0}  # every offloaded tensor's state was cast onto its host placeholder
    assert [p.data_ptr() for p in params] == storage  # the weights are back
    for index, param in enumerate(params):  # cast to the parameters' dtype, as torch casts it
        assert torch.equal(fresh.state[param]["exp_avg"], saved["state"][index]["exp_avg"].to(BF16))
    loop(model, fresh, steps=1)
    assert {s["exp_avg"].dtype for s in fresh.state.values()} == {torch.float32}


@pytest.mark.parametrize("mode", ["fp32", "fp32_offload"])
def test_loading_the_fused_steps_state_puts_offloaded_tensors_state_beside_their_masters_at_once(mode):
    """torch casts loaded state to the parameter's dtype and device; for offloaded masters each tensor's state is
    moved to host memory in fp32 as it is loaded (not at its next step, which would hold every tensor's moments on
    the accelerator meanwhile); the next steps continue from it."""
    def run(steps, state=None):
        model = get_peft_model(sliced_base(), HFTConfig(seed=0, master_weights=mode))
        optimizer = optimizer_in_backward(model, torch.optim.AdamW, chunk_elements=CHUNK, lr=1e-4)
        if state is not None:
            optimizer.load_state_dict(state)
            dtypes = {s["exp_avg"].dtype for inners in optimizer.optimizers for o in inners for s in o.state.values()}
            assert dtypes == ({torch.float32} if mode == "fp32_offload" else {BF16})
        loop(model, optimizer, steps=steps)
        return model, optimizer

    model, optimizer = run(2)
    assert len(optimizer.state_dict()["state"]) > 0
    run(1, optimizer.state_dict())


@pytest.mark.parametrize("bits", [4, 8])
def test_the_preset_optimizer_for_a_plain_loop_follows_the_one_definition(bits):
    """``apply_low_memory_preset(model)`` (no Trainer) returns the preset's optimizer for a loop of one's own: its
    bits, slices and per-tensor clipping; ``clip_per_tensor=None`` steps unclipped; the optimizer's own arguments
    pass through."""
    pytest.importorskip("torchao")
    model = get_peft_model(base(), low_memory_config(seed=0))
    optimizer = apply_low_memory_preset(model, bits, lr=3e-4, weight_decay=0.0)
    preset = low_memory_preset(bits)
    assert optimizer.clip_per_tensor == preset["clip_per_tensor"] == 1.0
    assert optimizer.chunk_elements == preset["chunk_elements"]
    assert type(optimizer.optimizers[0][0]).__name__ == preset["optimizer"]["class"].rpartition(".")[2]
    assert optimizer.param_groups[0]["lr"] == 3e-4 and optimizer.param_groups[0]["weight_decay"] == 0.0
    optimizer.remove_hooks()
    unclipped = apply_low_memory_preset(model, bits, clip_per_tensor=None, lr=3e-4)
    assert unclipped.clip_per_tensor is None
    unclipped.remove_hooks()


@pytest.mark.parametrize("mode", ["kahan", "stochastic_rounding"])
def test_transformers_torchao_optim_name_and_checkpoint_resume(tmp_path, mode, eager):
    """TrainingArguments(optim="adamw_torch_8bit") is transformers' own route to torchao's AdamW8bit: it steps on the
    masters, and its quantized state survives the checkpoint (torch.load(weights_only=True))."""
    pytest.importorskip("torchao")
    from transformers import Trainer

    def run(resume=None):
        model = base(hidden_size=64, intermediate_size=256)
        peft_model = get_peft_model(model, HFTConfig(seed=0, master_weights=mode))
        trainer = Trainer(model=peft_model, args=_args(tmp_path, optim="adamw_torch_8bit", lr_scheduler_type="constant",
                                                         gradient_checkpointing=False), train_dataset=_Tokens())
        trainer.train(resume_from_checkpoint=resume)
        return trainer, model

    trainer, model = run()
    assert type(trainer.optimizer.optimizer).__name__ == "AdamW8bit"
    assert any(type(s["exp_avg"]).__name__ == "OptimState8bit" for s in trainer.optimizer.optimizer.state.values())
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    resumed_trainer, resumed = run(str(tmp_path / "out" / "checkpoint-2"))
    assert any(type(s["exp_avg"]).__name__ == "OptimState8bit"
               for s in resumed_trainer.optimizer.optimizer.state.values())
    for name, param in resumed.named_parameters():
        torch.testing.assert_close(param, final[name], rtol=0, atol=float(final[name].abs().max()) * 2**-6)


def test_the_offloaded_preset_resumes_from_a_trainer_checkpoint_where_the_uninterrupted_run_ended(tmp_path):
    """The offloaded preset with the Trainer's own AdamW, its global clipping (max_grad_norm=1.0), gradient
    accumulation and gradient checkpointing: resuming from the step-2 checkpoint ends where the uninterrupted run
    ended, and the resumed state was loaded through the host-memory placeholders (fp32 in host memory after)."""
    from transformers import Trainer

    preset = low_memory_preset(offload=True)

    def run(resume=None):
        model = base()
        peft_model = get_peft_model(model, low_memory_config(offload=True, seed=0))
        args = _args(tmp_path, max_grad_norm=1.0, gradient_accumulation_steps=2, **preset["training_arguments"])
        trainer = Trainer(model=peft_model, args=args, train_dataset=_Tokens())
        apply_low_memory_preset(trainer, offload=True)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, model

    trainer, model = run()
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert any(not torch.equal(final[n], p) for n, p in base().named_parameters())
    resumed_trainer, resumed = run(str(tmp_path / "out" / "checkpoint-2"))
    states = list(resumed_trainer.optimizer.optimizer.state.values())
    assert states and {(s["exp_avg"].dtype, s["exp_avg"].device.type) for s in states} == {(torch.float32, "cpu")}
    for name, param in resumed.named_parameters():
        torch.testing.assert_close(param, final[name], rtol=0, atol=float(final[name].abs().max()) * 2**-7)
