"""The packed perplexity scorer computes lm-eval's rolling log-likelihoods and perplexities, window for window; and
the token-budget batching both packed scorers use."""

from __future__ import annotations

import pytest
import torch

from peft_hft.bench import tasks
from peft_hft.bench.batching import token_batches
from peft_hft.bench.evaluate import evaluate
from peft_hft.bench.perplexity import document_loglikelihoods, perplexity_scores
from peft_hft.bench.quick import tiny_model_and_tokenizer


@pytest.fixture(scope="module")
def paragraphs():
    rows = tasks.subsample(tasks.wikipedia_rows(), 6, seed=5)
    rows.append({"text": " ".join(row["text"] for row in rows)})  # longer than the context below: several windows
    model, tokenizer = tiny_model_and_tokenizer([row["text"] for row in rows])
    model.config.max_position_embeddings = 96  # the context lm-eval reads from the config: rolling windows of 96
    return model, tokenizer, tasks.EvalSpec("wikipedia", rows, "perplexity")


def _lm_eval_rolling(model, tokenizer, spec, precision):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3,
              mixed_precision_dtype=torch.bfloat16 if precision == "bf16" else None)
    requests = [Instance("loglikelihood_rolling", row, (row["text"],), 0) for row in spec.rows]
    return lm.loglikelihood_rolling(requests, disable_tqdm=True)


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-3), ("bf16", 2.0)])
def test_document_loglikelihoods_equal_lm_evals(paragraphs, precision, tolerance):
    model, tokenizer, spec = paragraphs
    assert len(tokenizer.encode(spec.rows[-1]["text"])) > 2 * 96  # the long document really rolls
    ours = document_loglikelihoods(model, tokenizer, spec, batch_size=2, precision=precision)
    theirs = _lm_eval_rolling(model, tokenizer, spec, precision)
    assert ours == pytest.approx(theirs, abs=tolerance, rel=1e-5 if precision == "fp32" else 1e-2)
    assert all(ll < 0 for ll in ours)


def test_perplexities_equal_lm_evals_through_evaluate(paragraphs):
    model, tokenizer, spec = paragraphs
    reference = evaluate(model, tokenizer, [spec], batch_size=3, precision="fp32")["wikipedia"]
    ours = evaluate(model, tokenizer, [spec], batch_size=3, precision="fp32", packed=True)["wikipedia"]
    assert ours == pytest.approx({k: reference[k] for k in ("word_perplexity", "byte_perplexity", "bits_per_byte")},
                                 rel=1e-5)
    assert perplexity_scores(model, tokenizer, spec, 3, "fp32") == pytest.approx(ours, rel=1e-9)
    with pytest.raises(ValueError, match="for perplexity sets"):
        document_loglikelihoods(model, tokenizer, tasks.EvalSpec("mc", [], "multiple_choice"))


def test_token_batches_keep_long_items_apart_and_short_ones_together():
    lengths = [450, 60, 440, 70, 300, 65, 62, 61]
    batches = token_batches(lengths, max_rows=4, max_tokens=900)
    assert batches == [[0, 2], [4, 3, 5], [6, 7, 1]]  # longest first; rows x longest <= 900, at most 4 rows
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert token_batches([5000, 10], 4, 900) == [[0], [1]]  # too long for the budget: alone
    assert token_batches([], 4, 900) == []
    with pytest.raises(ValueError, match="must be positive"):
        token_batches([1], 0, 10)
