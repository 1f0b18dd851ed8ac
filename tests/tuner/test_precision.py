"""fp32 master values for the trained half of bf16/fp16 models (peft_hft/precision.py): a bf16 run learns what an fp32
run learns, while the model keeps computing, saving, merging and disabling in bf16; the opt-out trains as before."""

from __future__ import annotations

import contextlib
import gc
import json
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import batch, tiny_model

from peft_hft import HFTConfig, memory_report, selection_summary
from peft_hft.tuner import precision
from peft_hft.tuner.layer import find_ledger

STEPS, LR = 20, 1e-5
BF16 = torch.bfloat16


def base(dtype: torch.dtype = BF16, seed: int = 0):
    """The tiny Llama, rounded to bf16 once, so fp32 and bf16 runs start from the same values."""
    return tiny_model("llama", seed=seed).to(BF16).to(dtype)


def train(model, steps: int = STEPS, lr: float = LR, autocast: bool = False, seed: int = 0, optimizer=None):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(params, lr=lr)
    for step in range(steps):
        inputs = batch(seed + step, size=4, length=16)
        context = torch.autocast("cpu", dtype=BF16) if autocast else contextlib.nullcontext()
        with context:
            loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return optimizer


def saved_diffs(peft_model, tmp_path, name: str = "adapter") -> dict[str, torch.Tensor]:
    peft_model.save_pretrained(tmp_path / name, diff_encoding="float")  # plain diffs (the default for bf16: exact steps)
    return {k: v.float() for k, v in load_file(tmp_path / name / "adapter_model.safetensors").items()}


def changed_and_norm(diffs: dict[str, torch.Tensor]) -> tuple[int, float]:
    return sum(int((d != 0).sum()) for d in diffs.values()), float(torch.sqrt(sum((d**2).sum() for d in diffs.values())))


@pytest.fixture(scope="module")
def fp32_diffs(tmp_path_factory):
    peft_model = get_peft_model(base(torch.float32), HFTConfig(seed=0))
    train(peft_model)
    return saved_diffs(peft_model, tmp_path_factory.mktemp("fp32"))


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
def test_bf16_run_learns_what_the_fp32_run_learns(fp32_diffs, tmp_path, autocast):
    model = base()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_peft_model(model, HFTConfig(seed=0))
    selected = set(peft_model.peft_config["default"].selected_parameters)
    train(peft_model, autocast=autocast)
    diffs = saved_diffs(peft_model, tmp_path)
    assert diffs.keys() == fp32_diffs.keys()
    changed, norm = changed_and_norm(diffs)
    changed_fp32, norm_fp32 = changed_and_norm(fp32_diffs)
    assert changed >= 0.9 * changed_fp32
    assert abs(norm / norm_fp32 - 1) < 0.15
    norms = [k for k in diffs if "norm" in k]
    assert norms and all((diffs[k] != 0).any() for k in norms)  # the norms learn too (they did not without masters)
    # the model stays bf16: trained tensors hold the master rounded to bf16, frozen tensors are bit-identical
    assert {p.dtype for p in model.parameters()} == {BF16}
    ledger = find_ledger(peft_model)
    for name, param in model.named_parameters():
        if name in selected:
            assert torch.equal(param.data, ledger.masters.value(name, param).to(BF16))
        else:
            assert torch.equal(param.data, frozen_before[name]), name


def test_opt_out_reproduces_in_place_bf16_training_and_warns(fp32_diffs, tmp_path):
    config = HFTConfig(seed=0, fp32_master_weights=False)
    peft_model = get_peft_model(base(), config)
    selected = peft_model.peft_config["default"].selected_parameters
    with pytest.warns(UserWarning, match=r"without master values.*master_weights=.kahan."):
        train(peft_model)
    # today's behaviour: plain requires_grad freezing of the same tensors, trained in bf16
    plain = base()
    for name, param in plain.named_parameters():
        param.requires_grad_(name in selected)
    train(plain)
    for name in selected:
        assert torch.equal(peft_model.get_base_model().get_parameter(name), plain.get_parameter(name)), name
    assert find_ledger(peft_model).masters.nbytes() == 0
    changed, _ = changed_and_norm(saved_diffs(peft_model, tmp_path))
    assert changed < 0.5 * changed_and_norm(fp32_diffs)[0]  # most updates rounded away
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["fp32_master_weights"] is False


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
def test_fp32_models_get_no_masters_and_train_as_before(autocast):
    """fp32 weights (with bf16 autocast: the forgetting benchmark's --precision bf16) are their own masters."""
    model = base(torch.float32)
    peft_model = get_peft_model(model, HFTConfig(seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        train(peft_model, steps=2, autocast=autocast)
    assert find_ledger(peft_model).masters.nbytes() == 0
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_reload_and_merge_round_trips_stay_bf16(tmp_path):
    peft_model = get_peft_model(base(), HFTConfig(seed=0))
    train(peft_model)
    inputs = batch(99)
    with torch.no_grad():
        tuned = peft_model(**inputs).logits
    trained = {n: p.detach().clone() for n, p in peft_model.get_base_model().named_parameters()}
    peft_model.save_pretrained(tmp_path / "adapter", diff_encoding="float")
    loaded = PeftModel.from_pretrained(base(), tmp_path / "adapter")
    # the float diff of a bf16 tensor with a master is float32 (master - original): the reload is bit-exact
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["diff_dtype"] is None
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.float32}
    for name, param in loaded.get_base_model().named_parameters():
        assert torch.equal(param, trained[name]), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, tuned, rtol=0, atol=0.05)
    # a trainable reload continues from the saved fp32 masters, not from the rounded weights
    resumed = PeftModel.from_pretrained(base(), tmp_path / "adapter", is_trainable=True)
    ledger, resumed_ledger = find_ledger(peft_model), find_ledger(resumed)
    assert sorted(resumed_ledger.masters.names()) == sorted(ledger.masters.names())
    for name in ledger.masters.names():
        torch.testing.assert_close(
            resumed_ledger.masters.value(name, resumed.get_base_model().get_parameter(name)),
            ledger.masters.value(name, peft_model.get_base_model().get_parameter(name)), rtol=1e-6, atol=1e-9,
        )
    assert find_ledger(loaded).masters.nbytes() == 0  # an inference load keeps none
    merged = peft_model.merge_and_unload()
    assert {p.dtype for p in merged.parameters()} == {BF16}
    for name, param in merged.named_parameters():
        assert torch.equal(param, trained[name]), name  # the active adapter is already in the weights


def test_disable_adapter_gives_the_bf16_base_exactly_and_keeps_the_masters():
    model = base()
    reference = base()
    peft_model = get_peft_model(model, HFTConfig(seed=0))
    optimizer = train(peft_model, steps=3)
    ledger = find_ledger(peft_model)
    masters = {n: ledger.masters.value(n, model.get_parameter(n)).clone() for n in ledger.masters.names()}
    inputs = batch(99)
    with torch.no_grad(), peft_model.disable_adapter():
        disabled = peft_model(**inputs).logits
        expected = reference(**inputs).logits
    assert torch.equal(disabled, expected)
    for name, master in masters.items():  # the masters survive the reference pass ...
        assert torch.equal(ledger.masters.value(name, model.get_parameter(name)), master)
    # ... and a reference pass between forward and backward (DPO) leaves training on the masters
    peft_model.train()
    inputs = batch(5, size=4, length=16)
    loss = peft_model(**inputs, labels=inputs["input_ids"]).loss
    with torch.no_grad(), peft_model.disable_adapter():
        peft_model(**inputs)
    loss.backward()
    optimizer.step()
    per_element = precision.MASTER_BYTES_PER_ELEMENT[HFTConfig().master_weights]
    assert ledger.masters.nbytes() == sum(m.numel() * per_element for m in masters.values())
    assert any(not torch.equal(ledger.masters.value(n, model.get_parameter(n)), m) for n, m in masters.items())


def test_several_adapters_each_train_from_their_own_values():
    model = base()
    peft_model = get_peft_model(model, HFTConfig(seed=0))
    peft_model.add_adapter("other", HFTConfig(seed=1))
    ledger = find_ledger(peft_model)
    shared = sorted(set(ledger.hft_adapters["default"].params) & set(ledger.hft_adapters["other"].params))
    assert shared
    train(peft_model, steps=5, lr=1e-3)
    after_default = {n: model.get_parameter(n).detach().clone() for n in shared}
    peft_model.set_adapter("other")
    assert all(torch.equal(model.get_parameter(n), ledger.original(n)) for n in shared)
    train(peft_model, steps=1, lr=1e-5)
    # "other" started from the base: its master was rebuilt from the base values, not left from "default"
    diffs = ledger.diffs("other", torch.float32)
    assert all(diffs[n].abs().max() < 1e-3 for n in shared)
    peft_model.set_adapter("default")
    assert all(torch.equal(model.get_parameter(n), after_default[n]) for n in shared)
    train(peft_model, steps=1, lr=1e-5)
    moved = {n: (model.get_parameter(n).float() - after_default[n].float()).abs().max() for n in shared}
    assert all(m < 1e-2 for m in moved.values())  # continues from its own values
    assert {p.dtype for p in model.parameters()} == {BF16}


def test_gradient_checkpointing_trains_on_the_masters(fp32_diffs, tmp_path):
    model = base()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, HFTConfig(seed=0))
    train(peft_model)
    changed, norm = changed_and_norm(saved_diffs(peft_model, tmp_path))
    changed_fp32, norm_fp32 = changed_and_norm(fp32_diffs)
    assert changed >= 0.9 * changed_fp32 and abs(norm / norm_fp32 - 1) < 0.15


def test_optimizer_state_is_fp32_and_a_reloaded_state_is_upcast():
    model = base()
    peft_model = get_peft_model(model, HFTConfig(seed=0))
    optimizer = train(peft_model, steps=2)
    states = [s for s in optimizer.state.values() if "exp_avg" in s]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    saved = optimizer.state_dict()
    fresh = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=LR)
    fresh.load_state_dict(saved)  # torch casts the state to the parameters' dtype (bf16) here ...
    assert {s["exp_avg"].dtype for s in fresh.state.values()} == {BF16}
    train(peft_model, steps=1, optimizer=fresh)
    assert {s["exp_avg"].dtype for s in fresh.state.values()} == {torch.float32}  # ... and the next step upcasts it


@pytest.mark.parametrize(("mode", "per_element"), [(None, 2), ("fp32", 4), ("kahan", 2), ("kahan8", 1)])
def test_memory_report_counts_the_masters(mode, per_element):
    model = base()
    peft_model = get_peft_model(model, HFTConfig(seed=0, master_weights=mode))  # None: the default, Kahan
    selected = peft_model.peft_config["default"].selected_parameters
    numel = sum(model.get_parameter(n).numel() for n in selected)
    report = memory_report(peft_model)
    assert report["master_bytes"] == 0 and report["master_bytes_when_training"] == per_element * numel
    assert report["originals_host_bytes"] == 2 * numel
    train(peft_model, steps=1)
    report = memory_report(peft_model)
    assert report["master_bytes"] == per_element * numel
    assert "master values" in selection_summary(peft_model)
    off = memory_report(get_peft_model(base(), HFTConfig(seed=0, fp32_master_weights=False)))
    assert off["master_bytes_when_training"] == 0


def test_unload_frees_the_masters_and_dead_models_leave_no_work():
    model = base()
    peft_model = get_peft_model(model, HFTConfig(seed=0))
    train(peft_model, steps=1)
    ledger = find_ledger(peft_model)
    masters = ledger.masters
    peft_model.unload()
    assert masters.nbytes() == 0
    tracked = precision.tracked_models()
    del peft_model, model, ledger, masters
    gc.collect()
    assert precision.tracked_models() < tracked


def test_fp16_models_warn_about_grad_scaler_and_closures_skip_masters():
    with pytest.warns(UserWarning, match="GradScaler"):
        peft_model = get_peft_model(base(torch.float16), HFTConfig(seed=0))
    train(peft_model, steps=1)  # a plain loop without a scaler works, on masters
    assert find_ledger(peft_model).masters.nbytes() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        get_peft_model(base(torch.float16), HFTConfig(seed=0, inference_mode=True))
    model = get_peft_model(base(), HFTConfig(seed=0))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    inputs = batch(0)

    def closure():
        optimizer.zero_grad()
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        return loss

    closure()
    with pytest.warns(UserWarning, match="closure"):
        optimizer.step(closure)
    assert find_ledger(model).masters.nbytes() == 0


def test_config_validates_and_saves_the_opt_out(tmp_path):
    with pytest.raises(ValueError, match="fp32_master_weights must be None, True or False"):
        HFTConfig(fp32_master_weights="yes")
    assert HFTConfig().fp32_master_weights is False  # the default is Kahan; the old boolean reads == "fp32"
    assert HFTConfig(fp32_master_weights=True).master_weights == "fp32"
    config = HFTConfig(fp32_master_weights=False)
    config.save_pretrained(tmp_path)
    assert HFTConfig.from_pretrained(tmp_path).fp32_master_weights is False


# ----------------------------------------------------------------------------------------------------------------------
# Trainers (bf16=True on a bf16 model): nothing to change for the user
# ----------------------------------------------------------------------------------------------------------------------


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, seed: int = 0, rows: int = 16):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 100, (rows, 16), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(16, dtype=torch.long), "labels": self.ids[i]}


def _trainer_args(tmp_path, **overrides):
    from transformers import TrainingArguments

    kwargs = dict(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=LR,
                  lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_strategy="no",
                  use_cpu=True, bf16=True, disable_tqdm=True, seed=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def _assert_trained_on_masters(peft_model, before: dict[str, torch.Tensor], optimizer=None) -> None:
    ledger = find_ledger(peft_model)
    selected = peft_model.peft_config["default"].selected_parameters
    assert sorted(ledger.masters.names()) == sorted(selected)
    assert {p.dtype for p in peft_model.parameters()} == {BF16}
    model = peft_model.get_base_model()
    for name in selected:  # the masters moved, by much less than a bf16 ulp in most elements
        if "embed_tokens" in name:
            continue  # rows of tokens the batches never contain get no gradient
        master = ledger.masters.value(name, model.get_parameter(name))
        assert (master != before[name].float()).float().mean() > 0.9, name
    for name, param in model.named_parameters():
        if name not in selected:
            assert torch.equal(param, before[name]), name
    if optimizer is not None:
        assert {s["exp_avg"].dtype for s in optimizer.state.values()} == {torch.float32}


def test_transformers_trainer_with_bf16_and_checkpoint_resume(tmp_path):
    from transformers import Trainer

    model = base()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_peft_model(model, HFTConfig(seed=0))
    args = _trainer_args(tmp_path, save_strategy="steps", save_steps=2)
    trainer = Trainer(model=peft_model, args=args, train_dataset=_Tokens())
    trainer.train()
    _assert_trained_on_masters(peft_model, before, trainer.optimizer)
    final = {n: p.detach().clone() for n, p in model.named_parameters()}

    # resume from the step-2 checkpoint: the adapter (fp32 diffs) restores the masters, the optimizer state is fp32
    model2 = base()
    peft_model2 = get_peft_model(model2, HFTConfig(seed=0))
    trainer2 = Trainer(model=peft_model2, args=args, train_dataset=_Tokens())
    trainer2.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    _assert_trained_on_masters(peft_model2, before, trainer2.optimizer)
    for name, param in model2.named_parameters():  # the resumed run ends where the uninterrupted one did
        torch.testing.assert_close(param, final[name], rtol=0, atol=float(final[name].abs().max()) * 2**-7)
    # (not bit-exact: torch's load_state_dict rounds the fp32 Adam moments to the bf16 parameters' dtype once)


def test_trl_sft_trainer_with_bf16(tmp_path):
    from tiny_tokenizer import build_tokenizer, chat_model
    from trl import SFTConfig
    from trl_helpers import sft_trainer

    model = chat_model(build_tokenizer()).to(BF16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = sft_trainer(model, tmp_path, HFTConfig(seed=3), bf16=True, learning_rate=LR, max_steps=3)
    assert isinstance(trainer.args, SFTConfig)
    trainer.train()
    _assert_trained_on_masters(trainer.model, before, trainer.optimizer)


def test_trl_dpo_trainer_with_bf16_reference_is_the_bf16_base(tmp_path, monkeypatch):
    from tiny_tokenizer import build_tokenizer, chat_model
    from trl_helpers import dpo_trainer, reference_passes_see

    model = chat_model(build_tokenizer()).to(BF16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = dpo_trainer(model, tmp_path, HFTConfig(seed=1), bf16=True, learning_rate=LR, max_steps=3)
    seen = reference_passes_see(monkeypatch, before, model)
    trainer.train()
    assert seen and all(seen)  # every reference pass ran on the bf16 base, bit for bit
    _assert_trained_on_masters(trainer.model, before, trainer.optimizer)


def test_continual_stages_on_bf16_train_on_masters_and_rebuild_exactly(tmp_path):
    from peft_hft.continual import ContinualHFT, StageHistory

    model = base()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    continual = ContinualHFT(model, HFTConfig(seed=0), tmp_path / "h", policy="complementary")
    learned = []
    for k in range(2):
        with continual.stage(f"t{k}") as peft_model:
            train(peft_model, steps=5, seed=10 * k)
            learned.append(find_ledger(peft_model).masters.nbytes())
    assert all(learned)
    fresh = base()
    fresh.load_state_dict(start)
    rebuilt = StageHistory(tmp_path / "h").load(fresh).state_dict()
    assert all(rebuilt[n].dtype == BF16 and torch.equal(rebuilt[n], t) for n, t in model.state_dict().items())


# ----------------------------------------------------------------------------------------------------------------------
# HFTConfig(master_weights=...): fp32 masters, Kahan-compensated bf16, stochastic rounding, none
# ----------------------------------------------------------------------------------------------------------------------


def _cosine(diffs: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    flat = torch.cat([diffs[k].flatten().double() for k in sorted(reference)])
    flat_ref = torch.cat([reference[k].flatten().double() for k in sorted(reference)])
    return torch.nn.functional.cosine_similarity(flat, flat_ref, dim=0).item()


def _own_diffs(peft_model) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in find_ledger(peft_model).diffs("default", torch.float32).items()}


@pytest.fixture(scope="module")
def plain_bf16_diffs():
    plain = get_peft_model(base(), HFTConfig(seed=0, master_weights="none"))
    with pytest.warns(UserWarning, match="without master values"):
        train(plain)
    return _own_diffs(plain)


@pytest.mark.parametrize("mode", ["kahan", "kahan8", "stochastic_rounding"])
def test_each_option_learns_the_fp32_update_or_is_measurably_lossy(fp32_diffs, plain_bf16_diffs, mode):
    """Kahan learns what fp32 learns (cosine >= 0.95 after 20 steps at lr 1e-5) with 2 bytes per element, Kahan in 1
    byte too; stochastic rounding keeps no bytes and is lossy at this short horizon (documented in
    docs/benchmarks.md): it keeps far more of the update than plain bf16, but adds noise."""
    reference = {k.replace("base_model.model.", "").replace(".hft_diff.", "."): v for k, v in fp32_diffs.items()}
    model = base()
    peft_model = get_peft_model(model, HFTConfig(seed=0, master_weights=mode))
    train(peft_model)
    diffs = _own_diffs(peft_model)
    assert diffs.keys() == reference.keys()
    numel = sum(d.numel() for d in diffs.values())
    assert {p.dtype for p in model.parameters()} == {BF16}
    cosine = _cosine(diffs, reference)
    cosine_plain = _cosine(plain_bf16_diffs, reference)
    if mode in ("kahan", "kahan8"):
        assert cosine >= (0.99 if mode == "kahan" else 0.95)
        assert find_ledger(peft_model).masters.nbytes() == precision.MASTER_BYTES_PER_ELEMENT[mode] * numel
        ledger = find_ledger(peft_model)
        for name in ledger.masters.names():  # weight + error: the weight is the exact value rounded to nearest
            param = model.get_parameter(name)
            assert torch.equal(ledger.masters.value(name, param).to(BF16), param.data)
    else:
        assert 0.3 < cosine < 0.95  # lossy at 20 steps; the noise averages out over longer runs
        assert cosine > cosine_plain + 0.1
        assert find_ledger(peft_model).masters.nbytes() == 0


def test_stochastic_rounding_is_unbiased_and_exact_on_bf16_values():
    value = torch.full((200_000,), 1.0 + 2**-9)  # bf16 spacing at 1.0 is 2**-7: a quarter of an ulp above 1.0
    rounded = precision.stochastic_round(value, torch.Generator().manual_seed(0))
    assert rounded.dtype == BF16 and set(rounded.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(rounded.float().mean().item() - value[0].item()) < 2e-5  # unbiased: about a quarter round up
    exact = torch.randn(1000).to(BF16).float()
    assert torch.equal(precision.stochastic_round(exact), exact.to(BF16))  # representable values never move
    special = torch.tensor([float("inf"), -float("inf"), 3.0e38])
    assert precision.stochastic_round(special)[:2].isinf().all()


def test_kahan_and_stochastic_rounding_reload_and_resume(tmp_path):
    """With float diffs, Kahan saves float32 diffs (weight + error) and a trainable reload continues from them;
    stochastic rounding saves bf16 diffs of the weights, which reload bit-exactly where they fit. (The default
    "exact" encoding stores the bf16 weights only: resuming from it restarts the compensation at zero.)"""
    peft_model = get_peft_model(base(), HFTConfig(seed=0, master_weights="kahan", diff_encoding="float"))
    train(peft_model, steps=3)
    ledger = find_ledger(peft_model)
    peft_model.save_pretrained(tmp_path / "kahan")
    saved = load_file(tmp_path / "kahan" / "adapter_model.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.float32}
    assert json.loads((tmp_path / "kahan" / "adapter_config.json").read_text())["master_weights"] == "kahan"
    resumed = PeftModel.from_pretrained(base(), tmp_path / "kahan", is_trainable=True)
    resumed_ledger = find_ledger(resumed)
    assert resumed.peft_config["default"].master_weights == "kahan"
    assert sorted(resumed_ledger.masters.names()) == sorted(ledger.masters.names())
    for name in ledger.masters.names():
        torch.testing.assert_close(
            resumed_ledger.masters.value(name, resumed.get_base_model().get_parameter(name)),
            ledger.masters.value(name, peft_model.get_base_model().get_parameter(name)), rtol=1e-6, atol=1e-9,
        )
    stochastic = get_peft_model(base(), HFTConfig(seed=0, master_weights="stochastic_rounding", diff_encoding="float"))
    train(stochastic, steps=3)
    stochastic.save_pretrained(tmp_path / "sr")
    assert {v.dtype for v in load_file(tmp_path / "sr" / "adapter_model.safetensors").values()} == {BF16}


def test_master_weights_config_and_the_old_boolean(tmp_path):
    assert HFTConfig().master_weights == "kahan" and HFTConfig().fp32_master_weights is False
    assert HFTConfig(fp32_master_weights=True).master_weights == "fp32"
    assert HFTConfig(fp32_master_weights=False).master_weights == "none"
    kahan = HFTConfig(master_weights="kahan")
    assert kahan.fp32_master_weights is False
    with pytest.raises(ValueError, match="master_weights must be None or one of 'fp32', 'fp32_offload', 'kahan'"):
        HFTConfig(master_weights="bf16")
    with pytest.warns(UserWarning, match="contradict each other; master_weights wins"):
        assert HFTConfig(master_weights="kahan", fp32_master_weights=True).master_weights == "kahan"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        kahan.save_pretrained(tmp_path)  # both fields saved, consistent: no warning on reading
        assert HFTConfig.from_pretrained(tmp_path).master_weights == "kahan"
    with pytest.raises(ValueError, match="rounds to bfloat16.*kahan"):
        get_peft_model(base(torch.float16), HFTConfig(seed=0, master_weights="stochastic_rounding"))
    report = memory_report(get_peft_model(base(), HFTConfig(seed=0, master_weights="kahan")))
    assert report["master_bytes_when_training"] == report["originals_host_bytes"]  # 2 bytes per bf16 element


# ----------------------------------------------------------------------------------------------------------------------
# The global optimizer-step hooks exist only while a model needs them (issue 22)
# ----------------------------------------------------------------------------------------------------------------------


def test_optimizer_hooks_only_while_a_model_needs_them():
    gc.collect()
    assert precision.tracked_models() == 0 and precision.tracked_hooks() == 0
    fp32 = get_peft_model(base(torch.float32), HFTConfig(seed=0))
    train(fp32, steps=1)
    none = get_peft_model(base(), HFTConfig(seed=0, master_weights="none"))
    with pytest.warns(UserWarning, match="without master values"):
        train(none, steps=1)
    loaded = get_peft_model(base(), HFTConfig(seed=0, inference_mode=True))
    assert precision.tracked_hooks() == 0  # fp32, no masters, inference: nothing installed
    bf16 = get_peft_model(base(), HFTConfig(seed=0, master_weights="kahan"))
    assert precision.tracked_hooks() == 2 and precision.tracked_models() == 1
    train(bf16, steps=1)
    bf16.unload()
    assert precision.tracked_hooks() == 0
    # delete_adapter of the last adapter with masters, and garbage collection
    other = get_peft_model(base(), HFTConfig(seed=0))
    other.add_adapter("second", HFTConfig(seed=1, master_weights="none"))
    train(other, steps=1)
    assert precision.tracked_hooks() == 2
    other.set_adapter("second")
    other.delete_adapter("default")
    assert precision.tracked_hooks() == 0
    dropped = get_peft_model(base(), HFTConfig(seed=0))
    train(dropped, steps=1)
    assert precision.tracked_hooks() == 2
    del dropped
    gc.collect()
    assert precision.tracked_models() == 0 and precision.tracked_hooks() == 0
    # a model cast to bf16 after the adapter was added installs them at its first gradient
    cast = get_peft_model(base(torch.float32), HFTConfig(seed=0))
    assert precision.tracked_hooks() == 0
    cast.to(BF16)
    train(cast, steps=1)
    assert precision.tracked_hooks() == 2 and find_ledger(cast).masters.nbytes() > 0
    del cast, fp32, none, loaded, bf16, other
    gc.collect()
    assert precision.tracked_hooks() == 0


def test_an_optimizer_stepping_a_flat_buffer_of_the_trained_tensors_is_refused():
    """An engine that flattens parameters into one buffer and steps it (FSDP1's FlatParameter) would step around the
    masters; HFT refuses instead of silently training without them."""
    model = base()
    peft_model = get_peft_model(model, HFTConfig(seed=0))
    selected = peft_model.peft_config["default"].selected_parameters
    params = [model.get_parameter(n) for n in selected]
    flat = torch.nn.Parameter(torch.cat([p.detach().flatten() for p in params]))
    offset = 0
    for p in params:
        p.data = flat.data[offset: offset + p.numel()].view(p.shape)
        offset += p.numel()
    optimizer = torch.optim.AdamW([flat], lr=LR)
    inputs = batch(0)
    peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()
    flat.grad = torch.cat([p.grad.flatten() for p in params])
    with pytest.raises(RuntimeError, match="shares its storage with the HFT-trained"):
        optimizer.step()


def test_a_slice_of_a_trained_tensor_steps_its_span_of_the_master_where_a_plain_view_is_refused():
    """slice_parameter: the hooks give the slice its span of the fp32 master and write the stepped span into the
    tensor's own storage; elements outside the span keep their weight and master. A view made otherwise is refused."""
    model = base()
    peft_model = get_peft_model(model, HFTConfig(seed=0))
    name = max(peft_model.peft_config["default"].selected_parameters, key=lambda n: model.get_parameter(n).numel())
    param = model.get_parameter(name)
    train(peft_model, steps=1)  # the master exists
    masters = find_ledger(peft_model).masters
    master_before = masters.value(name, param).clone()
    weight_before = param.detach().clone()
    span = (param.numel() // 4, param.numel() // 2)
    view = precision.slice_parameter(param, *span)
    view.grad = torch.ones_like(view)
    torch.optim.SGD([view], lr=1e-3).step()
    master = masters.value(name, param)
    assert master is not None  # still describes the weight: the slice wrote both
    inside = slice(*span)
    torch.testing.assert_close(master.view(-1)[inside], master_before.view(-1)[inside] - 1e-3)
    assert torch.equal(param.detach().view(-1)[inside], master.view(-1)[inside].to(BF16))
    outside = torch.ones(param.numel(), dtype=torch.bool)
    outside[inside] = False
    assert torch.equal(param.detach().view(-1)[outside], weight_before.view(-1)[outside])
    assert torch.equal(master.view(-1)[outside], master_before.view(-1)[outside])
    assert view.dtype == BF16 and view.data_ptr() == param.view(-1)[inside].data_ptr() and view.grad.dtype == BF16
    plain = torch.nn.Parameter(param.data.view(-1)[inside])
    plain.grad = torch.ones_like(plain)
    with pytest.raises(RuntimeError, match="shares its storage with the HFT-trained"):
        torch.optim.SGD([plain], lr=1e-3).step()
    with pytest.raises(ValueError, match=r"slice \[0, 0\) does not lie"):
        precision.slice_parameter(param, 0, 0)


def test_torchao_low_bit_adamw_steps_on_the_masters():
    """A third-party optimizer (torchao's 8-bit AdamW, run eagerly: no compile) on the masters: the same update as on
    an fp32 model with the same optimizer, and quantized state."""
    torchao_optim = pytest.importorskip("torchao.optim")

    def run(dtype, **config):
        model = tiny_model("llama", seed=0, hidden_size=64, intermediate_size=256).to(BF16).to(dtype)
        peft_model = get_peft_model(model, HFTConfig(seed=0, **config))
        optimizer = torchao_optim.AdamW8bit([p for p in peft_model.parameters() if p.requires_grad], lr=LR)
        with torch.compiler.set_stance("force_eager"):
            train(peft_model, steps=6, optimizer=optimizer)
        return peft_model, optimizer

    reference, _ = run(torch.float32)
    # the embedding is left out: rows no batch contains have zero gradients, where the dequantized 8-bit moments of
    # torchao give noisy updates of their own, on fp32 models too (for 8-bit Adam, bitsandbytes recommends a 32-bit
    # optimizer for embeddings)
    expected = {k: v for k, v in _own_diffs(reference).items() if "embed_tokens" not in k}
    for mode in ("fp32", "kahan", "kahan8"):
        peft_model, optimizer = run(BF16, master_weights=mode)
        assert _cosine(_own_diffs(peft_model), expected) >= 0.99, mode
        assert any(type(s["exp_avg"]).__name__ == "OptimState8bit" for s in optimizer.state.values())
        assert find_ledger(peft_model).masters.nbytes() > 0


# ----------------------------------------------------------------------------------------------------------------------
# An elementwise optimizer is stepped one trained tensor at a time (the step's fp32 copies exist for one tensor)
# ----------------------------------------------------------------------------------------------------------------------


class _NotElementwiseAdamW(torch.optim.AdamW):
    """AdamW under another class name: not in ELEMENTWISE_OPTIMIZERS, so stepped with every tensor's copies at once
    (the reference the one-at-a-time step must equal)."""


@pytest.mark.parametrize("mode", ["fp32", "fp32_offload", "kahan", "kahan8", "stochastic_rounding"])
@pytest.mark.parametrize("optimizer_kwargs", [{"foreach": True}, {"foreach": False}, {"fused": True}])
def test_one_tensor_at_a_time_is_the_same_step_bit_for_bit(mode, optimizer_kwargs, monkeypatch):
    models, swapped_at_once = [], []
    real_step_alone = precision._step_alone

    def counting_step_alone(optimizer, param):
        ledger = find_ledger(models[-1])
        fp32_now = [n for n, (p, _) in ledger.master_modes().items() if p.dtype == torch.float32]
        swapped_at_once.append(len(fp32_now))
        real_step_alone(optimizer, param)

    monkeypatch.setattr(precision, "_step_alone", counting_step_alone)
    results = []
    for cls in (torch.optim.AdamW, _NotElementwiseAdamW):
        peft_model = get_peft_model(base(), HFTConfig(seed=0, master_weights=mode))
        models.append(peft_model)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        train(peft_model, steps=3, lr=1e-3, optimizer=cls(params, lr=1e-3, weight_decay=0.1, **optimizer_kwargs))
        ledger = find_ledger(peft_model)
        weights = {n: p.detach().clone() for n, (p, _) in ledger.master_modes().items()}
        exact = {n: ledger.masters.value(n, p) for n, (p, _) in ledger.master_modes().items()}
        results.append((weights, exact))
        assert all(p.grad is None for p in params)  # zero_grad after the step: nothing held back is left over
    (weights, exact), (reference_weights, reference_exact) = results
    trained = len(reference_weights)
    assert trained > 1 and swapped_at_once == [1] * (3 * trained)  # one tensor swapped at a time, every tensor
    for name in reference_weights:
        assert weights[name].dtype == BF16
        assert torch.equal(weights[name], reference_weights[name]), name
        if reference_exact[name] is not None:
            assert torch.equal(exact[name], reference_exact[name]), name


def test_one_tensor_at_a_time_keeps_schedules_state_and_the_optimizer_hooks():
    """The scheduler's lr reaches every tensor's step, the optimizer's state and param groups are the same objects
    afterwards, its own step hooks run once per step, and tensors without masters (fp32 ones) are stepped by its
    own step as usual."""
    model = base()
    peft_model = get_peft_model(model, HFTConfig(seed=0))
    trained = [p for p in peft_model.parameters() if p.requires_grad]
    extra = torch.nn.Parameter(torch.ones(3))  # an fp32 tensor beside them: no master, stepped by AdamW's own step
    optimizer = torch.optim.AdamW([{"params": trained}, {"params": [extra], "lr": 0.5}], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0 if step >= 1 else 1.0)
    calls = []
    optimizer.register_step_pre_hook(lambda *args: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *args: calls.append("post"))
    groups = optimizer.param_groups
    before = {id(p): p.detach().clone() for p in trained}
    for step in range(2):
        inputs = batch(step, size=2, length=8)
        (peft_model(**inputs, labels=inputs["input_ids"]).loss + extra.sum()).backward()
        optimizer.step()
        scheduler.step()
        if step == 0:
            after_first = {id(p): p.detach().clone() for p in trained}
            assert extra.detach().lt(1).all()  # stepped by AdamW itself
        optimizer.zero_grad()
    assert calls == ["pre", "post"] * 2
    assert optimizer.param_groups is groups and groups[0]["params"] == trained and groups[1]["params"] == [extra]
    assert all(p in optimizer.state and int(optimizer.state[p]["step"]) == 2 for p in trained)
    assert any(not torch.equal(after_first[id(p)], before[id(p)]) for p in trained)
    # lr 0 in the second step: only the decoupled weight decay... which lr 0 also turns off: nothing moves
    assert all(torch.equal(p.detach(), after_first[id(p)]) for p in trained)


# ----------------------------------------------------------------------------------------------------------------------
# "kahan" on bf16: the compensation is the lower half of the fp32 pattern, so weight + compensation is the fp32 master
# ----------------------------------------------------------------------------------------------------------------------


def _ties_rounded_down(exact: torch.Tensor) -> torch.Tensor:
    """Where ``exact`` lies exactly half-way between two bf16 values and rounding to even rounds it down."""
    bits = exact.view(torch.int32)
    return ((bits & 0xFFFF) == 0x8000) & (exact.to(BF16).view(torch.int16).to(torch.int32) == (bits >> 16))


def test_split_exact_gives_the_fp32_value_back_bit_for_bit():
    """The weight is ``exact.to(bf16)``; weight + compensation is the fp32 value bit for bit, except at ties that
    rounding to even rounds down, which come back one fp32 ulp below (and still round to the weight)."""
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(200_000, generator=g) * scale for scale in (1e-38, 1e-3, 1.0, 1e3, 1e37)])
    bits = values.view(torch.int32)
    ties = ((bits & ~0xFFFF) | 0x8000).view(torch.float32)  # exactly half-way between two bf16 values
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-45, -1e-45, 3.3e38, -3.3e38])
    for exact in (values, -values, ties, -ties, special):
        weight, compensation = precision.split_exact(exact, BF16)
        assert weight.dtype == BF16 and compensation.dtype == torch.int16
        assert torch.equal(weight.view(torch.int16), exact.to(BF16).view(torch.int16))
        back = precision.join_exact(weight, compensation)
        down = _ties_rounded_down(exact)
        expected = exact.view(torch.int32) - down.to(torch.int32)
        assert torch.equal(back.view(torch.int32), expected)
        assert torch.equal(back.to(BF16).view(torch.int16), weight.view(torch.int16))
    assert 0 < int(_ties_rounded_down(ties).sum()) < ties.numel()  # both kinds of tie were exercised
    nan_weight, _ = precision.split_exact(torch.tensor([float("nan")]), BF16)
    assert nan_weight.isnan().all()


def test_kahan_on_bf16_steps_the_fp32_masters_values():
    """From the same start the Kahan weight is the fp32 masters' weight and weight + compensation their master bit
    for bit after a step (but one fp32 ulp at ties rounded down), and the two stay on the same update."""
    runs = {}
    for mode in ("fp32", "kahan"):
        peft_model = get_peft_model(base(), HFTConfig(seed=0, master_weights=mode))
        train(peft_model, steps=1, lr=1e-4)
        ledger = find_ledger(peft_model)
        runs[mode] = (peft_model, {n: ledger.masters.value(n, p) for n, (p, _) in ledger.master_modes().items()})
    for name, value in runs["fp32"][1].items():
        expected = value.view(torch.int32) - _ties_rounded_down(value).to(torch.int32)
        assert torch.equal(runs["kahan"][1][name].view(torch.int32), expected), name
        kahan_weight = runs["kahan"][0].get_base_model().get_parameter(name)
        fp32_weight = runs["fp32"][0].get_base_model().get_parameter(name)
        assert torch.equal(kahan_weight.view(torch.int16), fp32_weight.view(torch.int16)), name
    assert find_ledger(runs["kahan"][0]).masters.nbytes() * 2 == find_ledger(runs["fp32"][0]).masters.nbytes()
    for peft_model, _ in runs.values():
        train(peft_model, steps=19, lr=1e-5, seed=1)
    cosine = _cosine(_own_diffs(runs["kahan"][0]), _own_diffs(runs["fp32"][0]))
    assert cosine > 0.99999


@pytest.mark.parametrize("mode", ["kahan", "kahan8", "stochastic_rounding"])
def test_write_back_in_pieces_changes_no_bit(monkeypatch, mode):
    """The write-back splits (or rounds) a stepped tensor piece by piece, so its scratch is one piece, not 4 bytes per
    element of the tensor: the weights and compensations are those of writing each tensor back whole."""
    def run(chunk: int):
        monkeypatch.setattr(precision, "WRITE_BACK_CHUNK", chunk)
        peft_model = get_peft_model(base(), HFTConfig(seed=0, master_weights=mode))
        train(peft_model, steps=3, lr=1e-4)
        ledger = find_ledger(peft_model)
        weights = {n: p.detach().clone() for n, (p, _) in ledger.master_modes().items()}
        exact = {n: ledger.masters.value(n, p) for n, (p, _) in ledger.master_modes().items()}
        return weights, exact

    whole_weights, whole_exact = run(1 << 30)
    piece_weights, piece_exact = run(37)  # no tensor of the tiny model is a multiple of 37 elements
    assert max(p.numel() for p in whole_weights.values()) > 37 * 4
    for name, weight in whole_weights.items():
        assert torch.equal(weight.view(torch.int16), piece_weights[name].view(torch.int16)), name
        if mode in ("kahan", "kahan8"):
            assert torch.equal(whole_exact[name].view(torch.int32), piece_exact[name].view(torch.int32)), name
        else:
            assert whole_exact[name] is None and piece_exact[name] is None  # stochastic rounding keeps nothing


def test_split_exact_in_pieces_equals_the_whole_split(monkeypatch):
    g = torch.Generator().manual_seed(1)
    exact = torch.randn(1001, generator=g) * torch.logspace(-30, 30, 1001)
    for dtype in (BF16, torch.float16):
        whole = precision.split_exact(exact, dtype)
        monkeypatch.setattr(precision, "WRITE_BACK_CHUNK", 64)
        pieces = precision.split_exact(exact, dtype)
        monkeypatch.setattr(precision, "WRITE_BACK_CHUNK", 1 << 20)
        for a, b in zip(whole, pieces, strict=True):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16))
        weight, compensation = torch.empty(1001, dtype=dtype), torch.empty(1001, dtype=whole[1].dtype)
        precision.split_exact_into(exact, weight, compensation)  # into given tensors: the same split
        assert torch.equal(weight.view(torch.int16), whole[0].view(torch.int16))
        assert torch.equal(compensation.view(torch.int16), whole[1].view(torch.int16))


def test_kahan8_keeps_the_value_to_24_bits_and_rounds_it_without_bias():
    """``"kahan8"``: weight and int8 hold the value on the 24-bit grid (15 mantissa bits) within one unit of it, the
    weight is that value's nearest bf16 (so a float32 diff of it reloads the same weight; the value's own nearest but
    at near-ties), the rounding to the grid is unbiased with a generator and to nearest without one, values on the
    grid come back bit for bit, and non-finite values keep their bf16 rounding with nothing beside it."""
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(100_000, generator=g) * torch.logspace(-20, 20, 100_000)
    weight, compensation = torch.empty(exact.shape, dtype=BF16), torch.empty(exact.shape, dtype=torch.int8)
    precision.split_rounded_into(exact, weight, compensation)
    joined = precision.join_exact(weight, compensation)
    assert torch.equal(weight, joined.to(BF16))
    assert (weight == exact.to(BF16)).float().mean() > 0.99
    assert bool((joined.view(torch.int32) & 255).eq(0).all())  # on the 24-bit grid
    unit = 2.0 ** (torch.floor(torch.log2(exact.abs())) - 15)  # one 24-bit ulp of each value
    # to nearest (half a unit), but for the grid's bf16 midpoints that round down to even (1 in 512 grid points):
    # the int8 lacks +128, and those are kept one unit below, where they still round to the weight
    assert bool(((joined - exact).abs() <= 1.5 * unit).all())
    assert ((joined - exact).abs() <= unit / 2).float().mean() > 0.99
    again_weight, again = torch.empty_like(weight), torch.empty_like(compensation)
    precision.split_rounded_into(joined, again_weight, again, g)  # a value on the grid: no rounding left to do
    assert torch.equal(precision.join_exact(again_weight, again), joined)

    value = torch.full((400_000,), 1.0 + 0.3 * 2**-15)  # 0.3 of a 24-bit ulp above 1.0
    weight, compensation = torch.empty(value.shape, dtype=BF16), torch.empty(value.shape, dtype=torch.int8)
    precision.split_rounded_into(value, weight, compensation, g)
    rounded = precision.join_exact(weight, compensation)
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-15}
    assert abs((rounded > 1.0).float().mean().item() - 0.3) < 0.005  # up with probability 0.3: unbiased

    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-40])
    weight, compensation = torch.empty(special.shape, dtype=BF16), torch.empty(special.shape, dtype=torch.int8)
    precision.split_rounded_into(special, weight, compensation, g)
    assert torch.equal(compensation[:3], torch.zeros(3, dtype=torch.int8))
    assert weight[:2].isinf().all() and weight[2].isnan() and bool((precision.join_exact(weight, compensation)[3:5] == 0).all())


def test_kahan8_resumes_from_float32_diffs_and_is_refused_on_fp16(tmp_path):
    """With float diffs, a kahan8 adapter saves its 24-bit values as float32 diffs and a trainable reload continues
    from exactly them; on an fp16 model, which it cannot round to, it is refused with the fix."""
    peft_model = get_peft_model(base(), HFTConfig(seed=0, master_weights="kahan8", diff_encoding="float"))
    train(peft_model, steps=3, lr=1e-4)
    ledger = find_ledger(peft_model)
    peft_model.save_pretrained(tmp_path / "kahan8")
    assert {v.dtype for v in load_file(tmp_path / "kahan8" / "adapter_model.safetensors").values()} == {torch.float32}
    resumed = PeftModel.from_pretrained(base(), tmp_path / "kahan8", is_trainable=True)
    resumed_ledger = find_ledger(resumed)
    assert sorted(resumed_ledger.masters.names()) == sorted(ledger.masters.names()) and ledger.masters.names()
    for name in ledger.masters.names():
        assert torch.equal(resumed_ledger.masters.value(name, resumed.get_base_model().get_parameter(name)),
                           ledger.masters.value(name, peft_model.get_base_model().get_parameter(name))), name
    with pytest.raises(ValueError, match=r"master_weights='kahan8'\) rounds to bfloat16.*Fix"):
        get_peft_model(base(torch.float16), HFTConfig(seed=0, master_weights="kahan8"))


# ----------------------------------------------------------------------------------------------------------------------
# "fp32_offload": the fp32 master (and so the optimizer's state) in host memory
# ----------------------------------------------------------------------------------------------------------------------


def _counting_host_copies(monkeypatch) -> list[tuple[int, ...]]:
    """Record the shape of every copy made into host memory for an offloaded master (the master or a gradient)."""
    copies, real = [], precision._host_fp32

    def counting(tensor):
        copies.append(tuple(tensor.shape))
        return real(tensor)

    monkeypatch.setattr(precision, "_host_fp32", counting)
    return copies


def test_fp32_offload_steps_what_fp32_masters_step_and_keeps_the_master_and_state_in_host_memory(monkeypatch):
    """The offloaded master is the fp32 master stepped elsewhere: on the CPU, where host and device are one memory,
    the very same weights and masters bit for bit; the master, each step's gradient copy and the optimizer's state
    are made in host memory (one copy of the master per tensor, one gradient copy per tensor and step)."""
    steps = 3
    results = {}
    for mode in ("fp32", "fp32_offload"):
        copies = _counting_host_copies(monkeypatch)
        peft_model = get_peft_model(base(), HFTConfig(seed=0, master_weights=mode))
        optimizer = train(peft_model, steps=steps, lr=1e-3)
        ledger = find_ledger(peft_model)
        modes = ledger.master_modes()
        results[mode] = ({n: p.detach().clone() for n, (p, _) in modes.items()},
                         {n: ledger.masters.value(n, p) for n, (p, _) in modes.items()})
        masters = [ledger.masters._masters[n] for n in ledger.masters.names()]
        assert masters and all(m.on_host == (mode == "fp32_offload") for m in masters)
        assert all(s["exp_avg"].device.type == "cpu" and s["exp_avg"].dtype == torch.float32
                   for s in optimizer.state.values())
        if mode == "fp32_offload":
            shapes = [tuple(p.shape) for p, _ in modes.values()]
            assert sorted(copies) == sorted(shapes * (steps + 1))  # the master once, the gradient every step
        else:
            assert copies == []
        report = memory_report(peft_model)
        numel = sum(p.numel() for p, _ in modes.values())
        on_host = mode == "fp32_offload"
        assert report["master_bytes_when_training"] == (0 if on_host else 4 * numel)
        assert report["master_host_bytes_when_training"] == (4 * numel if on_host else 0)
    (weights, exact), (reference_weights, reference_exact) = results["fp32_offload"], results["fp32"]
    for name in reference_weights:
        assert weights[name].dtype == BF16 and torch.equal(weights[name], reference_weights[name]), name
        assert torch.equal(exact[name], reference_exact[name]), name


def test_fp32_offload_resumes_from_float32_diffs_and_moves_loaded_state_beside_the_master(tmp_path):
    """A trainable reload seeds the offloaded masters (in host memory) from the float32 diffs; optimizer state that
    ``load_state_dict`` cast to the parameter's dtype and device is moved beside the master and upcast."""
    peft_model = get_peft_model(base(), HFTConfig(seed=0, master_weights="fp32_offload", diff_encoding="float"))
    optimizer = train(peft_model, steps=3, lr=1e-4)
    peft_model.save_pretrained(tmp_path / "offload")
    assert {v.dtype for v in load_file(tmp_path / "offload" / "adapter_model.safetensors").values()} == {torch.float32}
    ledger = find_ledger(peft_model)
    resumed = PeftModel.from_pretrained(base(), tmp_path / "offload", is_trainable=True)
    resumed_ledger = find_ledger(resumed)
    assert sorted(resumed_ledger.masters.names()) == sorted(ledger.masters.names()) and ledger.masters.names()
    for name in ledger.masters.names():  # base + (master - base) in fp32: the master to an fp32 rounding
        assert resumed_ledger.masters._masters[name].on_host
        torch.testing.assert_close(resumed_ledger.masters.value(name, resumed.get_base_model().get_parameter(name)),
                                   ledger.masters.value(name, peft_model.get_base_model().get_parameter(name)),
                                   rtol=2**-21, atol=2**-36)
    fresh = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-4)
    fresh.load_state_dict(optimizer.state_dict())
    assert {s["exp_avg"].dtype for s in fresh.state.values()} == {BF16}  # torch cast it to the parameters' dtype
    train(resumed, steps=1, optimizer=fresh)
    assert {(s["exp_avg"].dtype, s["exp_avg"].device.type) for s in fresh.state.values()} == {(torch.float32, "cpu")}
