"""The forgetting benchmark: task parsing, training data, lm-eval scoring, the resumable runner and the quick mode."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from peft_hft.bench import newtask, report, runner, tasks
from peft_hft.bench.protocol import Protocol, bind
from peft_hft.bench.quick import tiny_model_and_tokenizer
from peft_hft.cli import bench as cli

REPO = Path(__file__).resolve().parents[2]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METHODS = ["fft", "hft", "hft_r0.25", "hft_r0.75", "hft_model", "lora"]


# ---------------------------------------------------------------------------------------------------- the data


def test_mmlu_questions_become_cloze_items_including_multi_line_options():
    rows = tasks.mmlu_rows()
    assert len(rows) == 1000
    assert all(len(r["choices"]) == 4 and 0 <= r["gold"] < 4 for r in rows)
    first = rows[0]
    assert first["query"].startswith("Question: Which life-style factors") and first["query"].endswith("\nAnswer:")
    assert first["choices"] == ["Smoking habit", "Social class/position", "Physical activity", "Age"]
    assert first["gold"] == 3
    code = next(r for r in rows if "newList" in r["query"])  # options spanning several lines
    assert code["choices"][0].count("\n") == 2 and code["choices"][3].startswith("listl ← RemoveDuplicates")


def test_socialiqa_and_quartz_options_are_split_from_the_prompt():
    siqa = tasks.socialiqa_rows()[0]
    assert siqa["choices"] == ["talk to the family", "hate bailey", "thank bailey"] and siqa["gold"] == 2
    assert "What will happen to Others?" in siqa["query"]
    quartz = tasks.quartz_rows()[0]
    assert quartz["choices"] == ["increases", "decreases"] and quartz["gold"] == 0


def test_subsets_are_fixed_and_perplexity_rows_sorted_by_length():
    (wiki,) = tasks.retention_specs(("wikipedia",), {"wikipedia": 30})
    again = tasks.retention_specs(("wikipedia",), {"wikipedia": 30})[0]
    assert wiki.rows == again.rows and len(wiki.rows) == 30
    lengths = [len(r["text"]) for r in wiki.rows]
    assert lengths == sorted(lengths)
    with pytest.raises(ValueError, match="Unknown retention task"):
        tasks.retention_specs(("hellaswag",), {})


def test_new_task_split_is_fixed_disjoint_and_uses_the_chat_template(tmp_path):
    _, tokenizer = tiny_model_and_tokenizer(["some text to learn a vocabulary from"] * 4)
    task = newtask.load_new_task("sarcasm", tokenizer, validation_size=20, test_size=30)
    assert task.labels == ("0", "1") and len(task.validation) == 20 and len(task.test) == 30
    assert len(task.train) == 28614 - 50
    assert not {e.prompt for e in task.test} & {e.prompt for e in task.validation}
    assert task.target_delimiter == " "  # no chat template: plain "Role: content" lines
    assert task.test[0].prompt.startswith("System: Respond with only a 1 or 0") and task.test[0].prompt.endswith(
        "\nAssistant:"
    )
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    chat = newtask.load_new_task("sarcasm", tokenizer, validation_size=20, test_size=30)
    assert chat.target_delimiter == "" and chat.test[0].prompt.endswith("<assistant>")
    assert [e.answer for e in chat.test] == [e.answer for e in task.test]  # same split either way
    compact = newtask.load_new_task("sarcasm", tokenizer, validation_size=20, test_size=30, prompt="compact")
    assert compact.target_delimiter == " " and [e.answer for e in compact.test] == [e.answer for e in task.test]
    headline = task.test[0].prompt.split("\nUser: ")[1].removesuffix("\nAssistant:")
    assert compact.test[0].prompt == f"{headline}\nAnswer:"
    with pytest.raises(ValueError, match="Unknown prompt style"):
        newtask.load_new_task("sarcasm", tokenizer, validation_size=20, test_size=30, prompt="fancy")


def test_user_task_files_are_checked(tmp_path):
    _, tokenizer = tiny_model_and_tokenizer(["vocabulary"] * 4)
    with pytest.raises(ValueError, match="neither a built-in task"):
        newtask.load_new_task(str(tmp_path / "missing.jsonl"), tokenizer, 1, 1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1 must be an object with \"input\""):
        newtask.load_new_task(str(bad), tokenizer, 1, 1)
    free = tmp_path / "free.jsonl"
    free.write_text("".join(json.dumps({"input": [{"role": "user", "content": "q"}], "ideal": f"a{i}"}) + "\n"
                            for i in range(30)))
    with pytest.raises(ValueError, match="30 distinct answers"):
        newtask.load_new_task(str(free), tokenizer, 1, 1)
    good = tmp_path / "mine.jsonl"
    good.write_text("".join(json.dumps({"input": [{"role": "user", "content": f"q{i}"}], "ideal": "yes" if i % 2
                                        else "no"}) + "\n" for i in range(10)))
    task = newtask.load_new_task(str(good), tokenizer, 2, 3)
    assert task.name == "mine" and task.labels == ("no", "yes") and len(task.train) == 5


def test_training_batches_share_one_order_per_seed_and_mask_the_prompt_for_completion_loss():
    _, tokenizer = tiny_model_and_tokenizer(["Respond with only a 1 or 0 sarcasm headline"] * 4)
    task = newtask.load_new_task("sarcasm", tokenizer, validation_size=5, test_size=5, train_size=40)
    full = newtask.training_batches(task, tokenizer, batch_size=4, steps=12, seed=3, loss="full", max_length=512)
    again = newtask.training_batches(task, tokenizer, batch_size=4, steps=12, seed=3, loss="full", max_length=512)
    other = newtask.training_batches(task, tokenizer, batch_size=4, steps=12, seed=4, loss="full", max_length=512)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(full, again, strict=True))
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(full, other, strict=True))
    completion = newtask.training_batches(task, tokenizer, 4, 12, seed=3, loss="completion", max_length=512)
    for f, c in zip(full, completion, strict=True):
        assert torch.equal(f["input_ids"], c["input_ids"])
        real = f["attention_mask"].bool()
        assert torch.equal(f["labels"][real], f["input_ids"][real]) and (f["labels"][~real] == -100).all()
        for row, labels in zip(c["input_ids"], c["labels"], strict=True):
            # only the answer as lm-eval scores it (delimiter + label), then the end of the turn
            assert tokenizer.decode(row[labels != -100].tolist()) in {" 0\n", " 1\n"}
    # 12 steps x 4 = 48 > 40 examples: the second epoch starts over in a new order, covering every example once
    rows = [(r, m) for b in full[:10] for r, m in zip(b["input_ids"], b["attention_mask"], strict=True)]
    first_epoch = {tuple(r[m.bool()].tolist()) for r, m in rows}
    assert len(first_epoch) == 40
    with pytest.raises(ValueError, match="Unknown loss mode"):
        newtask.training_batches(task, tokenizer, 4, 1, seed=0, loss="prompt", max_length=64)


# ---------------------------------------------------------------------------------------------- lm-eval scoring


def test_lm_eval_scores_match_a_direct_computation_and_never_load_a_dataset(monkeypatch):
    import datasets

    from peft_hft.bench.evaluate import evaluate

    def no_download(*args, **kwargs):
        raise AssertionError("the benchmark must not load datasets from the Hub or disk")

    monkeypatch.setattr(datasets, "load_dataset", no_download)
    model, tokenizer = tiny_model_and_tokenizer(["the cat sat on the mat", "a dog ran in the park"] * 10)
    text = "the cat sat on the mat"
    spec_ppl = tasks.EvalSpec("ppl", [{"text": text}], "perplexity")
    choices = ["mat", "park", "sat"]
    spec_mc = tasks.EvalSpec("mc", [{"query": "the cat sat on the", "choices": choices, "gold": 0}], "multiple_choice")
    scores = evaluate(model, tokenizer, [spec_ppl, spec_mc], batch_size=4, precision="fp32")

    ids = [tokenizer.bos_token_id] + tokenizer(text).input_ids  # lm-eval's rolling windows start with the prefix
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
    total = logprobs.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
    assert scores["ppl"]["word_perplexity"] == pytest.approx(math.exp(-total / len(text.split())), rel=1e-4)

    context = tokenizer("the cat sat on the").input_ids
    lls = []
    for choice in choices:
        continuation = tokenizer("the cat sat on the " + choice).input_ids[len(context):]
        full = torch.tensor([context + continuation])
        with torch.no_grad():
            lp = torch.log_softmax(model(full).logits[0, :-1], -1)
        positions = range(len(context) - 1, len(context) + len(continuation) - 1)
        lls.append(sum(lp[p, t].item() for p, t in zip(positions, continuation, strict=True)))
    assert scores["mc"]["acc"] == float(max(range(3), key=lls.__getitem__) == 0)


# ------------------------------------------------------------------------------------------- report arithmetic


def test_forgetting_signs_and_lr_choice():
    base = {"t_test": {"acc": 0.5}, "t_validation": {"acc": 0.5}, "wiki": {"word_perplexity": 20.0},
            "mmlu": {"acc": 0.3, "acc_norm": 0.4}}
    after = {"t_test": {"acc": 0.8}, "t_validation": {"acc": 0.7}, "wiki": {"word_perplexity": 22.0},
             "mmlu": {"acc": 0.3, "acc_norm": 0.35}}
    m = report.metrics_of(after, base, "t")
    assert m["wiki_ppl_increase_pct"] == pytest.approx(10.0)
    assert m["mmlu_forgetting_pts"] == pytest.approx(5.0) and m["mean_mc_forgetting_pts"] == pytest.approx(5.0)
    assert m["new_task_acc"] == 0.8
    records = [{"lr": 1e-4, "diverged": False, "scores": {"t_validation": {"acc": 0.7}}},
               {"lr": 1e-5, "diverged": False, "scores": {"t_validation": {"acc": 0.7}}},
               {"lr": 1e-3, "diverged": True, "scores": {}}]
    best = max(records, key=lambda r: runner._grid_key(r, "t"))
    assert best["lr"] == 1e-5  # a tie goes to the smaller rate; a diverged point never wins


def test_a_results_directory_refuses_another_protocol(tmp_path):
    bind(Protocol(), tmp_path)
    bind(Protocol(methods=["fft"]), tmp_path)  # a subset of methods is the same protocol
    with pytest.raises(ValueError, match=r"different protocol \(differs in: steps\)"):
        bind(Protocol(steps=7), tmp_path)
    with pytest.raises(ValueError, match="loss must be one of"):
        Protocol(loss="prompt").validate()


def test_paired_differences_against_fft_with_a_t_interval():
    fft = {s: {"new_task_acc": 0.6, "wikipedia_ppl_increase_pct": v} for s, v in ((0, 10.0), (1, 20.0), (2, 30.0))}
    hft = {0: {"new_task_acc": 0.7, "wikipedia_ppl_increase_pct": 5.0},
           1: {"new_task_acc": 0.6, "wikipedia_ppl_increase_pct": 12.0},
           2: {"new_task_acc": 0.8, "wikipedia_ppl_increase_pct": 15.0}}
    paired = report.paired_differences({"fft": fft, "hft": hft, "lora": {1: hft[1]}})
    entry = paired["hft"]
    assert entry["seeds"] == [0, 1, 2] and "mean_mc_forgetting_pts" not in entry
    ppl = entry["wikipedia_ppl_increase_pct"]
    assert ppl["values"] == pytest.approx([-5.0, -8.0, -15.0]) and ppl["mean"] == pytest.approx(-28 / 3)
    half = 4.303 * ppl["std"] / 3 ** 0.5  # Student's t, 2 degrees of freedom
    assert ppl["ci95"] == pytest.approx([ppl["mean"] - half, ppl["mean"] + half])
    assert entry["new_task_acc"]["values"] == pytest.approx([10.0, 0.0, 20.0])  # in points
    assert entry["wikipedia_ppl_increase_ratio"]["values"] == pytest.approx([0.5, 0.6, 0.5])
    assert paired["lora"]["seeds"] == [1] and paired["lora"]["new_task_acc"]["ci95"] is None  # one pair: no interval
    assert "fft" not in paired and report.paired_differences({"hft": hft}) == {}


def test_settings_added_later_at_their_default_keep_an_older_results_directory(tmp_path):
    bind(Protocol(), tmp_path)
    stored = json.loads((tmp_path / "protocol.json").read_text())
    del stored["calibration_sequences"]  # written before that setting existed
    (tmp_path / "protocol.json").write_text(json.dumps(stored))
    bind(Protocol(), tmp_path)
    with pytest.raises(ValueError, match="calibration_sequences"):
        bind(Protocol(calibration_sequences=8), tmp_path)
    del stored["scorer"]  # results written before the packed scorer existed were scored by lm-eval
    (tmp_path / "protocol.json").write_text(json.dumps(stored))
    bind(Protocol(), tmp_path)
    with pytest.raises(ValueError, match="scorer"):
        bind(Protocol(scorer="packed"), tmp_path)


# ---------------------------------------------------------------------------------------------- the quick mode


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    output = tmp_path_factory.mktemp("forgetting")
    assert cli.main(["forgetting", "--quick", "--output", str(output)]) == 0
    return output


def test_quick_mode_reports_every_method_and_metric(quick_results):
    summary = json.loads((quick_results / "results.json").read_text())
    assert list(summary["methods"]) == METHODS
    expected = {"new_task_acc", "new_task_val_acc", "wikipedia_ppl", "wikipedia_ppl_increase_pct", "mmlu_acc",
                "mmlu_forgetting_pts", "socialiqa_acc", "socialiqa_forgetting_pts", "mean_mc_forgetting_pts"}
    for name, method in summary["methods"].items():
        assert set(method["metrics"]) == expected, name
        assert method["seeds"] == [0, 1]
        for stat in method["metrics"].values():
            assert stat["n"] == 2 and len(stat["values"]) == 2 and math.isfinite(stat["mean"]) and stat["std"] >= 0
        assert method["lr"] in summary["protocol"]["lora_lr_grid" if name == "lora" else "full_lr_grid"]
        assert len(summary["grid"][name]) == 2
    assert summary["methods"]["fft"]["trainable_parameters"] > summary["methods"]["hft"]["trainable_parameters"]
    table = (quick_results / "results.md").read_text()
    for label in ("Full fine-tuning", "HFT (category, 0.5)", "Random half (model-level)", "LoRA (r=16, all linear)"):
        assert label in table


def test_quick_mode_writes_valid_pngs(quick_results):
    import matplotlib.image

    for name in ("forgetting_vs_new_task.png", "retention_per_ratio.png", "paired_differences.png"):
        path = quick_results / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 400


def test_quick_mode_resumes_without_training_again(quick_results, monkeypatch):
    before = {p: p.read_text() for p in (quick_results / "runs").rglob("*.json")}
    assert len(before) == 1 + 6 * 2 + 6 * 2  # base, the grid points, the final runs of both seeds

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runner, "train", no_training)
    assert cli.main(["forgetting", "--quick", "--output", str(quick_results)]) == 0
    assert {p: p.read_text() for p in (quick_results / "runs").rglob("*.json")} == before
    with pytest.raises(ValueError, match="different protocol"):
        cli.main(["forgetting", "--quick", "--steps", "5", "--output", str(quick_results)])


def test_quick_mode_runs_the_importance_ranked_methods(tmp_path):
    methods = "fft,hft_snr,hft_wanda,hft_fisher,hft_grad"
    assert cli.main(["forgetting", "--quick", "--seeds", "0", "--methods", methods, "--output", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "results.json").read_text())
    assert list(summary["methods"]) == methods.split(",") and set(summary["paired"]) == set(methods.split(",")[1:])
    selections = {}
    for name, strategy in (("hft_snr", "snr"), ("hft_wanda", "wanda"), ("hft_fisher", "fisher"),
                           ("hft_grad", "gradient")):
        lr = summary["methods"][name]["lr"]
        record = json.loads((tmp_path / "runs" / f"{runner.run_name(name, lr, 0)}.json").read_text())
        calibration = record["calibration"]
        assert calibration["strategy"] == strategy and calibration["structure"] == "category"
        assert calibration["batches"] == (0 if strategy == "snr" else 8)  # 32 sequences in batches of 4
        selections[name] = tuple(calibration["selected_parameters"])
    assert len(set(selections.values())) > 1  # the scores choose different tensors
    assert "Paired differences against full fine-tuning" in (tmp_path / "results.md").read_text()


def test_cli_rejects_bad_values_before_writing_anything(tmp_path):
    output = tmp_path / "out"
    with pytest.raises(SystemExit):
        cli.main(["forgetting", "--seeds", "a,b"])
    with pytest.raises(ValueError, match="Unknown method"):
        cli.main(["forgetting", "--quick", "--methods", "fft,adapterx", "--output", str(output)])
    with pytest.raises(ValueError, match="neither a built-in task"):
        cli.main(["forgetting", "--quick", "--task", str(tmp_path / "nope.jsonl"), "--output", str(output)])
    with pytest.raises(ValueError, match="not a directory"):
        cli.main(["forgetting", "--model", str(tmp_path / "no-model"), "--output", str(output)])
    assert not output.exists()


def _split_summary(summary, names):
    """The part of a results.json that a run of only ``names`` would have written."""
    part = copy.deepcopy(summary)
    part["methods"] = {n: m for n, m in part["methods"].items() if n in names}
    part["grid"] = {n: g for n, g in part["grid"].items() if n in names}
    part["protocol"]["methods"] = list(names)
    return part


def test_combining_runs_of_one_protocol_recomputes_the_paired_differences(tmp_path):
    recorded = json.loads((REPO / "docs" / "forgetting" / "completion" / "results.json").read_text())
    first, later = _split_summary(recorded, ["fft", "hft"]), _split_summary(recorded, ["hft_wanda", "hft_grad"])
    assert list(report.combine_summaries([first])["paired"]) == ["hft"]
    combined = report.combine_summaries([first, later])
    assert list(combined["methods"]) == ["fft", "hft", "hft_wanda", "hft_grad"]
    for name in ("hft", "hft_wanda", "hft_grad"):  # the same numbers as the run that had every method at once
        for key, stat in recorded["paired"][name].items():
            if key == "seeds":
                assert combined["paired"][name]["seeds"] == stat
            else:
                assert combined["paired"][name][key]["values"] == pytest.approx(stat["values"])
                assert combined["paired"][name][key]["ci95"] == pytest.approx(stat["ci95"])
    # the command writes the usual outputs
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(first))
    (tmp_path / "b" / "results.json").write_text(json.dumps(later))
    assert cli.main(["combine", str(tmp_path / "a"), str(tmp_path / "b" / "results.json"), "--output",
                     str(tmp_path / "c")]) == 0
    text = (tmp_path / "c" / "results.md").read_text()
    assert "HFT, least Wanda importance on C4 | 0,1,2 | -2.3 [-8.6, +3.9]" in text
    assert (tmp_path / "c" / "paired_differences.png").read_bytes()[:4] == b"\x89PNG"


def test_combining_refuses_other_protocols_other_base_scores_and_conflicting_methods(tmp_path):
    recorded = json.loads((REPO / "docs" / "forgetting" / "completion" / "results.json").read_text())
    first, later = _split_summary(recorded, ["fft", "hft"]), _split_summary(recorded, ["hft_wanda"])
    other = copy.deepcopy(later)
    other["protocol"]["steps"] = 200
    with pytest.raises(ValueError, match=r"different protocols \(they differ in \['steps'\]\)"):
        report.combine_summaries([first, other])
    other = copy.deepcopy(later)
    other["base"]["wikipedia_ppl"] *= 1.01
    with pytest.raises(ValueError, match="base model scored differently"):
        report.combine_summaries([first, other])
    other = _split_summary(recorded, ["hft"])
    other["methods"]["hft"]["lr"] = 1.0
    with pytest.raises(ValueError, match="'hft' appears in two"):
        report.combine_summaries([first, other])
    with pytest.raises(FileNotFoundError, match="results directory"):
        cli.main(["combine", str(tmp_path / "missing"), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ precision


def _cpu_bf16(monkeypatch, native: bool) -> None:
    import peft_hft.utils

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(peft_hft.utils, "cpu_bf16_support", lambda: "amx" if native else "emulated")


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_the_protocol_records_the_resolved_precision_never_auto(tmp_path, monkeypatch, native, expected):
    from peft_hft.bench.protocol import quick_protocol

    _cpu_bf16(monkeypatch, native)
    bench = runner.prepare(quick_protocol(precision="auto", test_size=4, val_size=4), tmp_path)
    assert bench.protocol.precision == expected
    assert json.loads((tmp_path / "protocol.json").read_text())["precision"] == expected
    assert Protocol().precision == "auto"


def test_a_machine_that_resolves_another_precision_refuses_to_resume(tmp_path, monkeypatch):
    _cpu_bf16(monkeypatch, True)
    bind(Protocol(), tmp_path)  # recorded on a CPU with native bf16
    assert json.loads((tmp_path / "protocol.json").read_text())["precision"] == "bf16"
    _cpu_bf16(monkeypatch, False)  # resumed on one without: "auto" is fp32 there
    with pytest.raises(ValueError, match=r"computed in bf16.*resolves its precision to fp32.*--precision bf16"):
        bind(Protocol(), tmp_path)
    with pytest.warns(UserWarning, match="7-28x slower"):
        from peft_hft.utils import resolve_precision

        forced = resolve_precision("bf16", "cpu").precision
    bind(Protocol(precision=forced), tmp_path)  # the fix the message names: the same precision, explicitly


def test_recorded_tables_state_their_precision():
    for directory in ("forgetting", "forgetting/completion"):
        precision = json.loads((REPO / "docs" / directory / "protocol.json").read_text())["precision"]
        summary = json.loads((REPO / "docs" / directory / "results.json").read_text())
        assert summary["protocol"]["precision"] == precision == "bf16"
        assert report.precision_note(summary) in (REPO / "docs" / directory / "results.md").read_text()
    assert report.precision_note({"protocol": {"precision": "fp32"}}).startswith("Precision: fp32")


@pytest.mark.parametrize(("name", "bits", "optimizer_class", "clip"), [
    ("hft_preset", 4, "AdamW4bit", 1.0), ("hft_preset8", 8, "AdamW8bit", 1.0),
    ("hft_preset_unclipped", 4, "AdamW4bit", None), ("hft_preset8_unclipped", 8, "AdamW8bit", None)])
def test_the_low_memory_preset_method_trains_the_preset(name, bits, optimizer_class, clip):
    """``hft_preset`` (``hft_preset8``: at 8 bits; ``_unclipped``: without the preset's per-tensor clipping): the
    model in bf16 with gradient checkpointing, the preset's HFTConfig fields with the run's seed, and the preset's
    optimizer (low-bit AdamW in backward, the preset's slices and clipping); the other methods keep the loop's
    AdamW."""
    from tiny_models import tiny_model

    from peft_hft import OptimizerInBackward, low_memory_preset
    from peft_hft.bench.methods import default_methods

    methods = {m.name: m for m in default_methods()}
    preset = methods[name]
    model = preset.wrap(tiny_model("llama", layers=2), seed=3)
    config = model.peft_config["default"]
    assert config.master_weights == low_memory_preset()["hft_config"]["master_weights"] and config.seed == 3
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.base_model.model.is_gradient_checkpointing
    assert methods["hft"].make_optimizer(model, 1e-3) is None
    if importlib.util.find_spec("torchao") is None:
        pytest.skip("the preset's optimizer needs torchao (the dev extra has it)")
    optimizer = preset.make_optimizer(model, 1e-3)
    assert isinstance(optimizer, OptimizerInBackward)
    assert optimizer.chunk_elements == low_memory_preset()["chunk_elements"]
    assert low_memory_preset(bits)["optimizer"]["class"].endswith(optimizer_class)
    assert type(optimizer.optimizers[0][0]).__name__ == optimizer_class and optimizer.param_groups[0]["lr"] == 1e-3
    assert optimizer.param_groups[0]["weight_decay"] == 0.0  # as the loop's AdamW
    assert optimizer.clip_per_tensor == clip
    assert (clip is None) == (name.endswith("_unclipped")) and low_memory_preset(bits)["clip_per_tensor"] == 1.0
    optimizer.remove_hooks()


def test_the_offloaded_preset_methods_train_the_offloaded_masters_after_and_in_backward():
    """``hft_preset_offload``: ``low_memory_preset(offload=True)``: a bf16 model with gradient checkpointing, fp32
    masters in host memory, the loop's AdamW (globally clipped); ``hft_offload_in_backward``: the same masters
    stepped by torch's AdamW in backward, in the preset's slices and per-tensor clipping."""
    from tiny_models import tiny_model

    from peft_hft import OptimizerInBackward, low_memory_preset
    from peft_hft.bench.methods import default_methods

    methods = {m.name: m for m in default_methods()}
    preset = low_memory_preset(offload=True)
    for name in ("hft_preset_offload", "hft_offload_in_backward"):
        model = methods[name].wrap(tiny_model("llama", layers=2), seed=3)
        assert model.peft_config["default"].master_weights == preset["hft_config"]["master_weights"]
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        assert model.base_model.model.is_gradient_checkpointing
        optimizer = methods[name].make_optimizer(model, 1e-3)
        if name == "hft_preset_offload":
            assert optimizer is None  # the loop's AdamW, clipped by the global norm
            continue
        assert isinstance(optimizer, OptimizerInBackward)
        assert optimizer.chunk_elements == low_memory_preset()["chunk_elements"]
        assert type(optimizer.optimizers[0][0]) is torch.optim.AdamW
        assert optimizer.clip_per_tensor == low_memory_preset()["clip_per_tensor"]
        optimizer.remove_hooks()


def test_the_nf4_preset_method_trains_against_nf4_and_is_scored_on_the_full_precision_base():
    """``hft_preset8_nf4``: the 8-bit preset with the frozen half held in NF4 while training; for scoring, its
    adapter is applied to the full-precision base (what a user loads): the frozen tensors are the base's own values
    in the trained dtype, the trained ones what training made of them."""
    pytest.importorskip("torchao")
    from tiny_models import batch, tiny_model

    from peft_hft.bench.methods import default_methods

    method = {m.name: m for m in default_methods()}["hft_preset8_nf4"]
    base = tiny_model("llama", layers=2)
    model = method.wrap(copy.deepcopy(base), seed=3)
    quantized = {n for n, p in model.get_base_model().named_parameters() if type(p).__name__ == "NF4Tensor"}
    assert quantized and all(".layers." in n for n in quantized)
    optimizer = method.make_optimizer(model, 1e-3)
    model.train()
    inputs = batch(0, size=2, length=8)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    optimizer.remove_hooks()
    trained = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters() if p.requires_grad}
    scored = method.for_evaluation(model, base)
    assert scored is not model and {type(p).__name__ for p in scored.parameters()} == {"Parameter"}
    values = dict(scored.get_base_model().named_parameters())
    original = dict(base.named_parameters())
    for name in quantized:
        assert torch.equal(values[name], original[name].to(torch.bfloat16))
    assert any(not torch.equal(values[n], original[n].to(torch.bfloat16)) for n in trained)
    for name, value in trained.items():
        assert torch.equal(values[name], value)
    plain = {m.name: m for m in default_methods()}["hft_preset8"]
    assert not plain.frozen_nf4 and plain.for_evaluation(model, base) is model


def test_the_ablation_methods_each_replace_one_part_of_the_preset():
    """What each part of the preset costs is measured by methods that change one part: ``hft_bf16`` is default HFT
    on a bf16 model (Kahan masters, the loop's clipped AdamW, no checkpointing), ``hft_preset8_kahan`` the 8-bit preset
    with Kahan masters instead of stochastic rounding, ``hft_preset_fp32_moments`` the preset with torch's AdamW
    (fp32 moments) in backward instead of a low-bit one."""
    pytest.importorskip("torchao")
    from tiny_models import tiny_model

    from peft_hft import OptimizerInBackward, low_memory_preset
    from peft_hft.bench.methods import default_methods

    methods = {m.name: m for m in default_methods()}
    bf16 = methods["hft_bf16"].wrap(tiny_model("llama", layers=2), seed=3)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert bf16.peft_config["default"].master_weights == "kahan" and bf16.peft_config["default"].seed == 3
    assert not bf16.base_model.model.is_gradient_checkpointing
    assert methods["hft_bf16"].make_optimizer(bf16, 1e-3) is None  # the loop's AdamW, clipped globally

    kahan = methods["hft_preset8_kahan"]
    model = kahan.wrap(tiny_model("llama", layers=2), seed=3)
    assert model.peft_config["default"].master_weights == "kahan"
    optimizer = kahan.make_optimizer(model, 1e-3)
    assert type(optimizer.optimizers[0][0]).__name__ == "AdamW8bit" and optimizer.clip_per_tensor == 1.0
    optimizer.remove_hooks()

    moments = methods["hft_preset_fp32_moments"]
    model = moments.wrap(tiny_model("llama", layers=2), seed=3)
    assert model.peft_config["default"].master_weights == low_memory_preset()["hft_config"]["master_weights"]
    assert model.base_model.model.is_gradient_checkpointing
    optimizer = moments.make_optimizer(model, 1e-3)
    assert isinstance(optimizer, OptimizerInBackward) and type(optimizer.optimizers[0][0]) is torch.optim.AdamW
    assert optimizer.chunk_elements == low_memory_preset()["chunk_elements"] and optimizer.clip_per_tensor == 1.0
    assert optimizer.param_groups[0]["weight_decay"] == 0.0
    optimizer.remove_hooks()
