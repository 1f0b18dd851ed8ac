"""The learn-forget sweep: interpolations base + alpha x diff, the frontier report on synthetic results, and a quick
sweep on the tiny model (KL records, resuming)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_model, train_steps

from peft_hft import HFTConfig
from peft_hft.bench import frontier, runner
from peft_hft.bench.interpolate import interpolations
from peft_hft.bench.protocol import Protocol, sweep_protocol
from peft_hft.cli import bench as cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["fft", "hft", "lora"])
def test_interpolations_are_base_plus_alpha_times_the_change(tmp_path, kind):
    base = tiny_model("llama")
    model = copy.deepcopy(base)
    if kind == "hft":
        model = get_peft_model(model, HFTConfig(seed=0))
    elif kind == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    train_steps(model, steps=2, lr=5e-2)
    tuned = (copy.deepcopy(model).merge_and_unload() if kind != "fft" else model).state_dict()
    start = base.state_dict()
    ids = torch.tensor([[1, 5, 9, 40, 77, 12, 2]])
    before = _logits(model, ids)
    seen = []
    for alpha, mixed in interpolations(base, model, [0.25, 0.5], tmp_path / "work"):
        hand = copy.deepcopy(base)
        hand.load_state_dict({k: start[k] + alpha * (tuned[k] - start[k]) for k in start})
        torch.testing.assert_close(_logits(mixed, ids), _logits(hand, ids), rtol=1e-4, atol=1e-5)
        seen.append(alpha)
    assert seen == [0.25, 0.5]
    assert not (tmp_path / "work").exists()
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=0)  # the trained model is left as it was


def test_pareto_frontier_cost_at_and_spearman():
    points = [(50, 0), (60, 10), (55, 20), (70, 15), (80, 100), (75, 200)]
    assert frontier.pareto_frontier(points) == [(50, 0), (60, 10), (70, 15), (80, 100)]
    f = frontier.pareto_frontier(points)
    assert frontier.cost_at(f, 65) == pytest.approx(12.5)
    assert frontier.cost_at(f, 40) == 0 and frontier.cost_at(f, 81) is None
    assert frontier.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert frontier.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take their mean rank: x ranks 1, 2.5, 2.5, 4; y ranks 1, 2, 3, 4
    rx, ry = [1, 2.5, 2.5, 4], [1, 2, 3, 4]
    mx = my = 2.5
    hand = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True)) / math.sqrt(
        sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    assert frontier.spearman([1, 5, 5, 9], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(hand)
    assert frontier.spearman([1, 2], [1, 2]) is None


def _scores(acc, ppl, task="sarcasm"):
    return {f"{task}_test": {"acc": acc}, "wikipedia": {"word_perplexity": ppl}}


def synthetic_results():
    """Two methods, two rates, two seeds, one interpolation each; 'cheap' forgets half as much as 'costly'."""
    runs = {}
    for method, cost in (("costly", 2.0), ("cheap", 1.0)):
        records = []
        for lr, gain in ((1e-4, 0.2), (3e-4, 0.3)):
            for seed in (0, 1):
                acc = 0.5 + gain + 0.01 * seed
                records.append({
                    "run": f"{method}_{lr}_{seed}", "method": method, "lr": lr, "seed": seed, "diverged": False,
                    "scores": _scores(acc, 10 * (1 + cost * gain)), "kl": {"general": cost * gain, "task": gain},
                    "interpolations": [{"alpha": 0.5, "scores": _scores(0.5 + gain / 2, 10 * (1 + cost * gain / 4)),
                                        "kl": {"general": cost * gain / 4, "task": gain / 4}}],
                })
        runs[method] = records
    records.append({"run": "cheap_x", "method": "cheap", "lr": 1e-2, "seed": 0, "diverged": True})
    return {"base": {"scores": _scores(0.5, 10.0)}, "runs": runs}


def test_sweep_summary_on_synthetic_results(tmp_path):
    summary = frontier.summarise_sweep(synthetic_results(), "sarcasm", {"costly": "Costly", "cheap": "Cheap"})
    assert len(summary["points"]) == 2 * 4 * 2
    assert summary["methods"]["cheap"]["diverged_runs"] == ["cheap_x"]
    # per seed the frontier is base (50, 0), then alpha 0.5 of lr 3e-4 ... every point lies on a line of slope cost
    top = min(f[-1][0] for m in summary["methods"].values() for f in m["per_seed_frontier"].values())
    assert top == pytest.approx(80.0)
    assert summary["targets"] == pytest.approx([65.0, 72.5, 80.0])
    for name, cost in (("costly", 2.0), ("cheap", 1.0)):
        matched = summary["methods"][name]["matched"]
        # seed 0: points (60, 5c), (65, 7.5c), (70, 20c), (80, 30c) -> frontier is all of them, plus the base
        # seed 1: the trained points sit one point of accuracy higher at the same cost
        seed0 = [frontier.cost_at([(50, 0), (60, 5 * cost), (65, 7.5 * cost), (70, 20 * cost), (80, 30 * cost)], t)
                 for t in summary["targets"]]
        seed1 = [frontier.cost_at([(50, 0), (60, 5 * cost), (65, 7.5 * cost), (71, 20 * cost), (81, 30 * cost)], t)
                 for t in summary["targets"]]
        for cell, a, b in zip(matched, seed0, seed1, strict=True):
            assert cell["values"] == pytest.approx([a, b]) and cell["n"] == 2
    # perplexity increase is exactly proportional to the general KL within a method, and rank-correlated across
    assert summary["kl_correlation"]["general"]["spearman"] > 0.95
    assert summary["kl_correlation"]["general"]["n"] == 16
    paths = frontier.write_sweep_outputs(summary, tmp_path)
    for key in ("frontier_plot", "kl_plot"):
        assert paths[key].read_bytes()[:8] == PNG_SIGNATURE
    text = paths["markdown"].read_text()
    assert "| Cheap |" in text and "at 65.0% accuracy" in text and "Spearman rho +" in text
    assert json.loads(paths["json"].read_text())["targets"] == pytest.approx([65.0, 72.5, 80.0])


def test_sweep_protocol_is_fixed_and_validated():
    p = sweep_protocol()
    p.validate()
    assert p.sweep and p.methods == ["fft", "hft", "hft_snr", "lora"] and p.loss == "completion"
    assert len(p.full_lr_grid) >= 3 and len(p.lora_lr_grid) >= 3 and p.seeds == [0, 1, 2]
    assert p.alphas == [0.25, 0.5, 0.75]
    assert p.scorer == "packed" and Protocol().scorer == "lm-eval"  # results written before the field ran lm-eval
    with pytest.raises(ValueError, match="scorer must be one of"):
        Protocol(scorer="fast").validate()
    with pytest.raises(ValueError, match="wikipedia"):
        sweep_protocol(retention=["mmlu"]).validate()
    with pytest.raises(ValueError, match="strictly between"):
        sweep_protocol(alphas=[1.5]).validate()
    with pytest.raises(ValueError, match="kl_texts"):
        Protocol(kl_texts=290).validate()


def test_quick_sweep_records_kl_and_interpolations_and_resumes(tmp_path, monkeypatch):
    args = ["forgetting", "--quick", "--sweep", "--seeds", "0,1", "--methods", "fft,hft,lora", "--lr-grid", "1e-3",
            "--lora-lr-grid", "1e-2", "--alphas", "0.5", "--kl-texts", "8", "--output", str(tmp_path)]
    assert cli.main(args) == 0
    protocol = json.loads((tmp_path / "protocol.json").read_text())
    assert protocol["sweep"] is True and protocol["alphas"] == [0.5] and protocol["scorer"] == "packed"
    records = sorted((tmp_path / "runs" / "sweep").glob("*.json"))
    assert len(records) == 3 * 2
    for path in records:
        record = json.loads(path.read_text())
        assert set(record["kl"]) == {"general", "task", "general_ppl"} and record["kl"]["general"] > 0
        (mix,) = record["interpolations"]
        assert mix["alpha"] == 0.5 and set(mix["scores"]) == {"sarcasm_test", "wikipedia"}
        assert 0 < mix["kl"]["general"] < record["kl"]["general"]  # half the change, less divergence
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert len(summary["points"]) == 3 * 2 * 2 and set(summary["methods"]) == {"fft", "hft", "lora"}
    assert (tmp_path / "frontier.png").read_bytes()[:8] == PNG_SIGNATURE
    before = {p: p.read_text() for p in records}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runner, "train", no_training)
    assert cli.main(args) == 0
    assert {p: p.read_text() for p in records} == before


def test_quick_sweep_uses_the_sweep_methods():
    args = cli.build_parser().parse_args(["forgetting", "--quick", "--sweep"])
    p = cli.protocol_from_args(args)
    assert p.sweep and p.methods == ["fft", "hft", "hft_snr", "lora"] and p.model == "tiny" and p.loss == "completion"
    assert p.scorer == "packed"
    assert cli.protocol_from_args(cli.build_parser().parse_args(["forgetting", "--sweep"])).model == "default"
