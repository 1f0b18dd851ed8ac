"""A continual run: stages trained with a plain loop or transformers.Trainer, folded into the running model, kept in a
stage history that rebuilds every stage bit for bit, re-weights stages and exports plain checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tiny_models import VOCAB, batch, clone_state, tiny_model, train_steps

from peft_hft import HFTConfig
from peft_hft.continual import ContinualHFT, StageHistory, apply_diffs, weights_digest

TASKS = ("alpha", "beta", "gamma")


def fake_scores(model):
    """A deterministic 'evaluation' that depends on the weights."""
    with torch.no_grad():
        logits = model(**batch(99)).logits
    return {t: float(logits[0, i, 3 + i].sigmoid()) for i, t in enumerate(TASKS)}


@pytest.fixture
def run(tmp_path):
    """Three complementary stages with a plain loop; snapshots of the running model after each stage."""
    model = tiny_model("llama", layers=2)
    base = clone_state(model)
    continual = ContinualHFT(model, HFTConfig(seed=0), tmp_path / "history", policy="complementary",
                             evaluate=fake_scores)
    snapshots = []
    for k, task in enumerate(TASKS):
        with continual.stage(task, steps=2) as peft_model:
            before = clone_state(model)
            train_steps(peft_model, steps=2, seed=10 * k)
        snapshots.append(clone_state(continual.model))
        changed = {n for n in base if not torch.equal(before[n], snapshots[-1][n])}
        assert changed == set(continual.history.stages[-1].selected_parameters)  # the stage touched its mask only
    return continual, base, snapshots, tmp_path / "history"


def fresh_base(state):
    """A new tiny llama holding ``state`` (the base weights, or a snapshot)."""
    model = tiny_model("llama", layers=2)
    model.load_state_dict(state)
    return model


def test_history_rebuilds_every_stage_bit_for_bit(run):
    continual, base, snapshots, path = run
    history = StageHistory(path)
    assert history.tasks == list(TASKS)
    for k in range(len(TASKS)):
        rebuilt = history.load(fresh_base(base), upto=k).state_dict()
        assert all(torch.equal(rebuilt[n], snapshots[k][n]) for n in snapshots[k]), f"stage {k} differs"
    by_task = history.load(fresh_base(base), upto="beta").state_dict()
    assert all(torch.equal(by_task[n], snapshots[1][n]) for n in snapshots[1])
    # between stages the running model is plain, with the requires_grad flags it came with
    assert not hasattr(continual.model, "hft") and not hasattr(continual.model, "peft_config")
    assert {n for n, p in continual.model.named_parameters() if p.requires_grad} == {
        n for n, p in tiny_model("llama", layers=2).named_parameters() if p.requires_grad
    }


def test_each_stage_is_a_normal_hft_adapter_on_the_previous_stage(run):
    _, base, snapshots, path = run
    history = StageHistory(path)
    for k in range(len(TASKS)):
        start = fresh_base(base) if k == 0 else history.load(fresh_base(base), upto=k - 1)
        loaded = PeftModel.from_pretrained(start, history.stage_dir(k))
        assert loaded.peft_config["default"].selected_parameters == history.stages[k].selected_parameters
        merged = loaded.merge_and_unload().state_dict()
        assert all(torch.equal(merged[n], snapshots[k][n]) for n in snapshots[k])


def test_manifest_records_order_seeds_masks_tasks_and_metrics(run):
    continual, base, snapshots, path = run
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["policy"] == "complementary"
    assert [s["task"] for s in manifest["stages"]] == list(TASKS)
    assert [s["index"] for s in manifest["stages"]] == [0, 1, 2]
    assert [s["seed"] for s in manifest["stages"]] == [0, 1, 2]
    assert [s["adapter"] for s in manifest["stages"]] == ["stage_00_alpha", "stage_01_beta", "stage_02_gamma"]
    assert all(s["info"] == {"steps": 2} for s in manifest["stages"])
    assert manifest["stages"][1]["start_fingerprint"] == manifest["stages"][0]["end_fingerprint"]
    assert manifest["base_fingerprint"] == weights_digest(fresh_base(base))
    # evaluate() ran on the base and after every stage, on the running model
    assert manifest["base_metrics"] == pytest.approx(fake_scores(fresh_base(base)))
    for k, stage in enumerate(manifest["stages"]):
        assert stage["metrics"] == pytest.approx(fake_scores(fresh_base(snapshots[k])))
    matrix = continual.history.accuracy_matrix()
    assert matrix.stages == TASKS and matrix.tasks == TASKS
    assert matrix.score(2, "alpha") == pytest.approx(manifest["stages"][2]["metrics"]["alpha"])
    continual.log_metrics({"extra": 0.25})
    assert StageHistory(path).stages[-1].metrics["extra"] == 0.25


def test_dropping_and_reweighting_stages_is_task_arithmetic(run, tmp_path):
    _, base, _, path = run
    history = StageHistory(path)
    diffs = [history.diffs(k) for k in range(3)]

    def expected(weights):
        out = {n: t.clone() for n, t in base.items()}
        for w, stage_diffs in zip(weights, diffs[: len(weights)], strict=True):
            for name, diff in stage_diffs.items():
                out[name] = out[name] + w * diff
        return out

    for weights, spec in [
        ([1.0, 0.0, 1.0], {"beta": 0.0}),
        ([0.5, 1.0, -1.0], [0.5, 1.0, -1.0]),
        ([1.0, 0.3], {1: 0.3}),
    ]:
        model = history.load(fresh_base(base), upto=len(weights) - 1, weights=spec).state_dict()
        target = expected(weights)
        for name in base:
            torch.testing.assert_close(model[name], target[name], rtol=0, atol=1e-6)
    dropped = history.load(fresh_base(base), weights={"beta": 0.0}).state_dict()
    for name in set(diffs[1]) - set(diffs[0]) - set(diffs[2]):  # tensors only stage 1 trained are back to base
        assert torch.equal(dropped[name], base[name])

    out = history.export(fresh_base(base), tmp_path / "export", weights={"gamma": 0.0})
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    reference = history.load(fresh_base(base), upto=1).state_dict()
    assert all(torch.equal(exported[n], reference[n]) for n in reference)
    with pytest.raises(FileExistsError, match="already exists"):
        history.export(fresh_base(base), out)


def test_export_never_writes_over_into_or_around_the_history(run):
    """Issue 19, row 1: export(..., overwrite=True) into the history (or around it) would delete its stages."""
    _, base, _, path = run
    history = StageHistory(path)
    files = {p: p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}
    for where, output in (("is", Path(path)), ("lies inside", Path(path) / "merged"), ("contains", Path(path).parent)):
        for overwrite in (False, True):
            with pytest.raises(ValueError, match=f"{where} the stage history"):
                history.export(fresh_base(base), output, overwrite=overwrite)
    assert {p: p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()} == files


def test_bad_loads_are_refused(run):
    _, base, _, path = run
    history = StageHistory(path)
    with pytest.raises(ValueError, match="not the base this stage history was trained from"):
        history.load(tiny_model("llama", layers=2, seed=1))
    with pytest.raises(ValueError, match="one weight per stage"):
        history.load(fresh_base(base), weights=[1.0, 1.0])
    with pytest.raises(KeyError, match="No stage trained task 'delta'"):
        history.load(fresh_base(base), upto="delta")
    with pytest.raises(IndexError, match="has 3 stage"):
        history.load(fresh_base(base), upto=3)
    # a changed adapter file is caught by the fingerprint recorded after the stage
    from safetensors.torch import load_file, save_file

    weights_file = history.stage_dir(1) / "adapter_model.safetensors"
    tensors = load_file(weights_file)
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, weights_file)
    with pytest.raises(RuntimeError, match="changed after the run"):
        history.load(fresh_base(base), upto=2)
    with pytest.raises(FileNotFoundError, match="not a stage history"):
        StageHistory(path / "stage_00_alpha")


def test_stages_train_with_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    class Tokens(torch.utils.data.Dataset):
        def __init__(self, seed):
            g = torch.Generator().manual_seed(seed)
            self.ids = torch.randint(3, VOCAB, (8, 8), generator=g)

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.ids[i]}

    model = tiny_model("llama", layers=2)
    base = clone_state(model)
    continual = ContinualHFT(model, HFTConfig(seed=0), tmp_path / "history", policy="random")
    snapshots = []
    for k, task in enumerate(("alpha", "beta")):
        args = TrainingArguments(
            output_dir=str(tmp_path / f"trainer{k}"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
            report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
        )
        before = clone_state(model)
        with continual.stage(task) as peft_model:
            result = Trainer(model=peft_model, args=args, train_dataset=Tokens(k)).train()
            continual.record_info(train_loss=result.training_loss)
        snapshots.append(clone_state(continual.model))
        changed = {n for n in base if not torch.equal(before[n], snapshots[-1][n])}
        assert changed == set(continual.history.stages[-1].selected_parameters)
    history = StageHistory(tmp_path / "history")
    for k in range(2):
        rebuilt = history.load(fresh_base(base), upto=k).state_dict()
        assert all(torch.equal(rebuilt[n], snapshots[k][n]) for n in base)
    assert history.stages[1].info["train_loss"] > 0 and not history.stages[1].metrics


def test_a_failed_stage_leaves_model_and_history_as_they_were(tmp_path):
    model = tiny_model("llama", layers=2)
    continual = ContinualHFT(model, HFTConfig(seed=0), tmp_path / "h")
    with continual.stage("alpha") as peft_model:
        train_steps(peft_model, steps=1)
    after_first = clone_state(model)
    manifest = (tmp_path / "h" / "manifest.json").read_text()
    with pytest.raises(RuntimeError, match="diverged"):
        with continual.stage("beta") as peft_model:
            train_steps(peft_model, steps=1)
            raise RuntimeError("loss diverged")
    assert all(torch.equal(model.state_dict()[n], t) for n, t in after_first.items())
    assert (tmp_path / "h" / "manifest.json").read_text() == manifest
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["manifest.json", "stage_00_alpha"]
    with continual.stage("beta") as peft_model:  # the run goes on
        train_steps(peft_model, steps=1)
    assert continual.history.tasks == ["alpha", "beta"]


def test_resume_rebuilds_the_running_model_and_continues_the_masks(tmp_path):
    def run(path, stages, resume=False, model=None):
        model = model if model is not None else tiny_model("llama", layers=3)
        continual = ContinualHFT(model, HFTConfig(seed=4), path, policy="complementary", resume=resume)
        for k in range(continual.num_stages, stages):
            with continual.stage(f"t{k}") as peft_model:
                train_steps(peft_model, steps=1, seed=k)
        return continual

    full = run(tmp_path / "full", 3)
    run(tmp_path / "cut", 2)
    (tmp_path / "cut" / "stage_02_t2").mkdir()  # a run that died after saving stage 2, before recording it
    (tmp_path / "cut" / "stage_02_t2" / "junk").write_text("x")
    resumed = run(tmp_path / "cut", 3, resume=True)
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == [
        "manifest.json", "stage_00_t0", "stage_01_t1", "stage_02_t2"
    ]
    assert [s.selected_parameters for s in resumed.history.stages] == [
        s.selected_parameters for s in full.history.stages
    ]
    assert all(torch.equal(resumed.model.state_dict()[n], t) for n, t in full.model.state_dict().items())
    with pytest.raises(ValueError, match="policy='complementary', not 'random'"):
        ContinualHFT(tiny_model("llama", layers=3), HFTConfig(seed=4), tmp_path / "cut", policy="random", resume=True)
    with pytest.raises(ValueError, match="another HFTConfig .*ratio"):
        ContinualHFT(tiny_model("llama", layers=3), HFTConfig(seed=4, ratio=0.25), tmp_path / "cut",
                     policy="complementary", resume=True)
    with pytest.raises(FileExistsError, match="pass resume=True"):
        ContinualHFT(tiny_model("llama", layers=3), HFTConfig(seed=4), tmp_path / "cut", policy="complementary")
    with pytest.raises(ValueError, match="not the base"):
        run(tmp_path / "cut", 4, resume=True, model=tiny_model("llama", layers=3, seed=5))


def test_bad_inputs_are_refused_with_a_fix(tmp_path):
    model = tiny_model("llama", layers=2)
    with pytest.raises(ValueError, match="Unknown policy 'alternate'"):
        ContinualHFT(model, HFTConfig(), tmp_path / "a", policy="alternate")
    with pytest.raises(ValueError, match="use policy='fixed'|Use policy='fixed'"):
        ContinualHFT(model, HFTConfig(selected_parameters=["lm_head.weight"]), tmp_path / "b", policy="random")
    with pytest.raises(TypeError, match="HFTConfig"):
        ContinualHFT(model, object(), tmp_path / "c")
    from peft import LoraConfig, get_peft_model

    with pytest.raises(ValueError, match="plain model without adapters"):
        ContinualHFT(get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj"])), HFTConfig(),
                     tmp_path / "d")
    continual = ContinualHFT(model, HFTConfig(), tmp_path / "e")
    with pytest.raises(RuntimeError, match="No stage is open"):
        continual.end_stage()
    with pytest.raises(ValueError, match="log the base model's scores with stage='base'"):
        continual.log_metrics({"a": 1.0})
    continual.start_stage("alpha")
    with pytest.raises(RuntimeError, match="still open"):
        continual.start_stage("beta")
    continual.abort_stage()
    with pytest.raises(ValueError, match="non-empty string"):
        continual.start_stage("")
    with pytest.raises(ValueError, match="live HFT adapters"):
        apply_diffs(continual.start_stage("alpha"), {})


def word_tokenizer():
    """A tiny offline word-level tokenizer whose ids fit the tiny models' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "task", "example", "with", "some", "words", "a", "b"]
    words += [str(i) for i in range(16)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )


def test_stages_train_with_trl_sft_trainer(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = word_tokenizer()
    model = tiny_model("llama", layers=2, pad_token_id=0)
    base = clone_state(model)
    continual = ContinualHFT(model, HFTConfig(seed=0), tmp_path / "history", policy="complementary")
    for k, task in enumerate(("a", "b")):
        data = Dataset.from_dict({"text": [f"task {task} example {i} with some words" for i in range(16)]})
        args = SFTConfig(
            output_dir=str(tmp_path / f"sft{k}"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
            report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
        )
        before = clone_state(model)
        with continual.stage(task) as peft_model:
            SFTTrainer(model=peft_model, args=args, train_dataset=data, processing_class=tokenizer).train()
        changed = {n for n in base if not torch.equal(before[n], model.state_dict()[n])}
        assert changed == set(continual.history.stages[-1].selected_parameters)
    rebuilt = StageHistory(tmp_path / "history").load(fresh_base(base)).state_dict()
    assert all(torch.equal(rebuilt[n], t) for n, t in model.state_dict().items())


def test_bf16_history_is_exact_even_with_lossy_bf16_diffs(tmp_path):
    """bf16 diffs round the update; the running model takes the rounded update, so the rebuild still matches."""
    model = tiny_model("llama", layers=2, dtype=torch.bfloat16)
    base = clone_state(model)
    continual = ContinualHFT(model, HFTConfig(seed=0), tmp_path / "h", policy="random")
    for k in range(2):
        with continual.stage(f"t{k}") as peft_model:
            train_steps(peft_model, steps=2, seed=k)
    fresh = tiny_model("llama", layers=2, dtype=torch.bfloat16)
    fresh.load_state_dict(base)
    rebuilt = StageHistory(tmp_path / "h").load(fresh).state_dict()
    assert all(rebuilt[n].dtype == torch.bfloat16 and torch.equal(rebuilt[n], t) for n, t in model.state_dict().items())
    with pytest.raises(ValueError, match="in bfloat16"):
        StageHistory(tmp_path / "h").load(tiny_model("llama", layers=2))  # the same base in float32 is refused


def test_a_failed_save_keeps_the_stage_open(tmp_path, monkeypatch):
    model = tiny_model("llama", layers=2)
    continual = ContinualHFT(model, HFTConfig(seed=0), tmp_path / "h")
    peft_model = continual.start_stage("alpha")
    train_steps(peft_model, steps=1)
    trained = clone_state(model)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(type(peft_model), "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        continual.end_stage()
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["manifest.json"]  # nothing half-written
    assert continual.peft_model is peft_model and all(torch.equal(model.state_dict()[n], t) for n, t in trained.items())
    monkeypatch.undo()
    continual.end_stage()  # the training was not lost
    assert continual.history.tasks == ["alpha"]
    for name, value in trained.items():  # folded as start + (trained - start): equal up to float32 rounding
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=1e-6)


def _wanda_per_stage(calls):
    """A calibrate callback (peft_hft.calibrate, Wanda on fixed batches) that records the model state it was given."""
    import peft_hft

    batches = [batch(s) for s in (1, 2)]

    def calibrate(model, k):
        calls.append((k, clone_state(model)))
        return peft_hft.calibrate(model, batches, strategy="wanda", ratio=0.5, seed=k, progress=False)

    return calibrate


def test_calibrated_policy_scores_the_running_model_at_each_stage_and_records_it(tmp_path):
    import peft_hft

    calls = []
    model = tiny_model("llama", layers=2)
    continual = ContinualHFT(model, HFTConfig(seed=0), tmp_path / "h", policy="calibrated",
                             calibrate=_wanda_per_stage(calls))
    for k, task in enumerate(TASKS[:2]):
        with continual.stage(task) as peft_model:
            train_steps(peft_model, steps=2, seed=k)
        stage = continual.history.stages[-1]
        # the mask is exactly what calibrate() picks on the model as the stage started (once per stage)
        expected = peft_hft.calibrate(fresh_base(calls[k][1]), [batch(1), batch(2)], strategy="wanda", ratio=0.5,
                                      seed=k, progress=False)
        assert stage.selected_parameters == list(expected.selected_parameters) and stage.seed == k
        saved = json.loads((continual.history.path / stage.adapter / "adapter_config.json").read_text())
        assert saved["calibration"]["strategy"] == "wanda" and saved["selected_parameters"] == stage.selected_parameters
    assert [k for k, _ in calls] == [0, 1]
    # stage 1 calibrated on the model stage 0 produced, not on the base
    assert any(not torch.equal(calls[0][1][n], calls[1][1][n]) for n in calls[0][1])
    # a resumed run re-uses the recorded masks and calibrates only the stage it has not run yet
    resumed_calls = []
    resumed = ContinualHFT(tiny_model("llama", layers=2), HFTConfig(seed=0), tmp_path / "h", policy="calibrated",
                           calibrate=_wanda_per_stage(resumed_calls), resume=True)
    assert resumed.draw_mask(1) == (1, continual.history.stages[1].selected_parameters) and resumed_calls == []
    with resumed.stage(TASKS[2]) as peft_model:
        train_steps(peft_model, steps=1)
    assert [k for k, _ in resumed_calls] == [2]


def test_calibrated_policy_needs_a_calibrate_callback_and_a_resolved_config(tmp_path):
    with pytest.raises(ValueError, match="policy='calibrated' needs calibrate="):
        ContinualHFT(tiny_model("llama"), HFTConfig(), tmp_path / "a", policy="calibrated")
    with pytest.raises(ValueError, match="only used by policy='calibrated'"):
        ContinualHFT(tiny_model("llama"), HFTConfig(), tmp_path / "b", policy="random", calibrate=lambda m, k: None)
    continual = ContinualHFT(tiny_model("llama"), HFTConfig(), tmp_path / "c", policy="calibrated",
                             calibrate=lambda model, k: HFTConfig(ratio=0.5))
    with pytest.raises(TypeError, match="without selected_parameters"):
        continual.start_stage("alpha")
    assert continual.num_stages == 0 and not any(p.name.startswith("stage_") for p in (tmp_path / "c").iterdir())
