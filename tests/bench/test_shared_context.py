"""The shared-context multiple-choice scorer computes lm-eval's log-likelihoods, acc and acc_norm, item for item."""

from __future__ import annotations

import pytest
import torch

from peft_hft.bench import tasks
from peft_hft.bench.evaluate import evaluate
from peft_hft.bench.quick import tiny_model_and_tokenizer
from peft_hft.bench.shared_context import choice_loglikelihoods, encode_pair, multiple_choice_scores


@pytest.fixture(scope="module")
def items():
    mmlu = tasks.subsample(tasks.mmlu_rows(), 12, seed=3)
    headlines = ["local man wins the lottery again", "senate passes the budget bill", "area dog named ceo"]
    sarcasm = [{"query": f"{h}\nAnswer:", "choices": ["0", "1"], "gold": i % 2} for i, h in enumerate(headlines)]
    texts = [r["query"] + " " + " ".join(r["choices"]) for r in mmlu + sarcasm] * 3
    model, tokenizer = tiny_model_and_tokenizer(texts)
    specs = [tasks.EvalSpec("mmlu", mmlu, "multiple_choice"),
             tasks.EvalSpec("sarcasm", sarcasm, "multiple_choice"),
             tasks.EvalSpec("chat", [{**r, "query": r["query"] + " "} for r in sarcasm], "multiple_choice", "")]
    return model, tokenizer, specs


def _lm_eval_loglikelihoods(model, tokenizer, spec, precision):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4,
              mixed_precision_dtype=torch.bfloat16 if precision == "bf16" else None)
    requests = [Instance("loglikelihood", row, (row["query"], spec.target_delimiter + choice), i)
                for row in spec.rows for i, choice in enumerate(row["choices"])]
    lls = iter(ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True))
    return [[next(lls) for _ in row["choices"]] for row in spec.rows]


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("bf16", 0.15)])
def test_loglikelihoods_equal_lm_evals_on_the_same_items(items, precision, tolerance):
    model, tokenizer, specs = items
    for spec in specs:
        ours = choice_loglikelihoods(model, tokenizer, spec, batch_size=5, precision=precision)
        theirs = _lm_eval_loglikelihoods(model, tokenizer, spec, precision)
        assert [len(x) for x in ours] == [len(row["choices"]) for row in spec.rows]
        for mine, reference in zip(ours, theirs, strict=True):
            assert mine == pytest.approx(reference, abs=tolerance, rel=tolerance), spec.name


def test_acc_and_acc_norm_equal_lm_evals(items):
    model, tokenizer, specs = items
    mmlu = specs[0]
    reference = evaluate(model, tokenizer, [mmlu], batch_size=4, precision="fp32")["mmlu"]
    assert multiple_choice_scores(model, tokenizer, mmlu, 4, "fp32") == pytest.approx(
        {"acc": reference["acc"], "acc_norm": reference["acc_norm"]}, abs=1e-9)
    both = evaluate(model, tokenizer, [mmlu, specs[1]], batch_size=4, precision="fp32", packed=True)
    assert both["mmlu"] == pytest.approx({"acc": reference["acc"], "acc_norm": reference["acc_norm"]}, abs=1e-9)
    assert list(both) == ["mmlu", "sarcasm"]


def test_one_forward_pass_per_item(items):
    model, tokenizer, specs = items
    calls = []
    handle = model.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        choice_loglikelihoods(model, tokenizer, specs[0], batch_size=1, precision="fp32")
    finally:
        handle.remove()
    assert len(calls) == len(specs[0].rows)  # lm-eval: one pass per answer (2-4 per MMLU item)


def test_trailing_spaces_of_the_context_move_to_the_continuation_as_in_lm_eval(items):
    _, tokenizer, _ = items
    context, continuation = encode_pair(tokenizer, "the answer is ", "mat")
    assert context == tokenizer("the answer is", add_special_tokens=False).input_ids
    assert context + continuation == tokenizer("the answer is mat", add_special_tokens=False).input_ids
    with pytest.raises(ValueError, match="multiple choice only"):
        choice_loglikelihoods(None, tokenizer, tasks.EvalSpec("ppl", [{"text": "x"}], "perplexity"))
