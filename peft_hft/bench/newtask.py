"""The new task a model is fine-tuned on: data, fixed train/validation/test splits, prompts and training batches.

A task is a JSON-lines file in the OpenAI ``evals`` sample format, one ``{"input": [chat messages], "ideal": answer}``
per line, with a small set of possible answers (a classification task). The built-in ``sarcasm`` task is the
``evals`` wheel's 28,614 news headlines (The Onion vs. HuffPost) labelled ``1`` (sarcastic) or ``0``. Prompts are
rendered with the tokenizer's chat template when it has one (plain ``role: content`` lines otherwise), so the model
is trained and scored on exactly the same text, and the new-task score is lm-eval's accuracy over the answer set.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..resources import data
from .tasks import EvalSpec

BUILTIN_TASKS = {"sarcasm": "sarcasm/samples.jsonl"}
MAX_LABELS = 20
LOSS_MODES = ("completion", "full")
PROMPT_STYLES = ("chat", "compact")
# Fixed seed of the train/validation/test split: the split never depends on a run's seed.
SPLIT_SEED = 20240429


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass(frozen=True)
class NewTask:
    """A classification task split into train / validation (learning-rate choice) / test (reported score)."""

    name: str
    labels: tuple[str, ...]
    train: tuple[Example, ...]
    validation: tuple[Example, ...]
    test: tuple[Example, ...]
    target_delimiter: str  # between prompt and answer: "" after a chat template's assistant header, " " otherwise

    def eval_spec(self, split: str) -> EvalSpec:
        """lm-eval rows for ``split`` (``"validation"`` or ``"test"``): accuracy over the label set."""
        rows = [
            {"query": ex.prompt, "choices": list(self.labels), "gold": self.labels.index(ex.answer)}
            for ex in getattr(self, split)
        ]
        return EvalSpec(f"{self.name}_{split}", rows, "multiple_choice", self.target_delimiter)


def read_samples(task: str) -> tuple[str, list[dict[str, Any]]]:
    """The task's name and raw samples: a built-in name (see ``BUILTIN_TASKS``) or a path to a JSON-lines file."""
    if task in BUILTIN_TASKS:
        return task, data.load_jsonl("evals", BUILTIN_TASKS[task])
    path = Path(task)
    if not path.is_file():
        raise ValueError(
            f"--task {task!r} is neither a built-in task ({', '.join(BUILTIN_TASKS)}) nor an existing file. Pass a "
            'JSON-lines file with one {"input": [{"role": ..., "content": ...}, ...], "ideal": "<answer>"} per line.'
        )
    samples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number} is not valid JSON ({exc}).") from None
            if not isinstance(sample, dict) or not isinstance(sample.get("input"), list) or "ideal" not in sample:
                raise ValueError(
                    f'{path}:{number} must be an object with "input" (a list of chat messages) and "ideal" (the '
                    "answer), as in the OpenAI evals sample format."
                )
            samples.append(sample)
    return path.stem, samples


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], style: str = "chat") -> tuple[str, str]:
    """The prompt text the model sees and the delimiter before the answer.

    ``"chat"``: every message through the tokenizer's chat template, ending with the assistant header (answer
    follows directly), or ``Role: content`` lines when there is no template. ``"compact"``: only the last user
    message and ``Answer:`` (no instruction: the task is learned from the examples), the shortest sequences.
    """
    if style not in PROMPT_STYLES:
        raise ValueError(f"Unknown prompt style {style!r}; choose one of {PROMPT_STYLES}.")
    if style == "compact":
        users = [m["content"] for m in messages if m.get("role") == "user"]
        if not users:
            raise ValueError("The compact prompt style needs a user message in every sample.")
        return f"{users[-1].strip()}\nAnswer:", " "
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), ""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:", " "


def load_new_task(
    task: str,
    tokenizer: Any,
    validation_size: int,
    test_size: int,
    train_size: Optional[int] = None,
    prompt: str = "chat",
) -> NewTask:
    """Load ``task`` and split it once, with a fixed seed, into train / validation / test.

    Args:
        task: A built-in task name or a path to a JSON-lines file (see the module docstring).
        tokenizer: Renders the prompts (chat template when present).
        validation_size: Examples held out for choosing each method's learning rate.
        test_size: Examples held out for the reported new-task score.
        train_size: Cap on the training pool (None: everything left).
        prompt: Prompt style, ``"chat"`` or ``"compact"`` (see ``render_prompt``).
    """
    name, samples = read_samples(task)
    labels = sorted({str(s["ideal"]) for s in samples})
    if len(labels) < 2 or len(labels) > MAX_LABELS:
        raise ValueError(
            f"Task {name!r} has {len(labels)} distinct answers; the forgetting benchmark scores classification tasks "
            f"(2 to {MAX_LABELS} answers, scored by accuracy). Give each sample one of a few fixed answers."
        )
    if validation_size < 1 or test_size < 1:
        raise ValueError("validation_size and test_size must be at least 1.")
    if validation_size + test_size >= len(samples):
        raise ValueError(
            f"Task {name!r} has {len(samples)} samples, too few for {validation_size} validation and {test_size} "
            "test examples plus training data; lower --val-size/--test-size."
        )
    rendered = [render_prompt(tokenizer, s["input"], prompt) for s in samples]
    examples = [Example(text, str(s["ideal"])) for (text, _), s in zip(rendered, samples, strict=True)]
    random.Random(SPLIT_SEED).shuffle(examples)
    test, validation = examples[:test_size], examples[test_size : test_size + validation_size]
    train = examples[test_size + validation_size :]
    if train_size is not None:
        train = train[:train_size]
    return NewTask(name, tuple(labels), tuple(train), tuple(validation), tuple(test), rendered[0][1])


def answer_suffix(tokenizer: Any, chat: bool) -> str:
    """What follows the answer in training text: the end-of-turn (EOS) token, so the model learns to stop."""
    return (tokenizer.eos_token or "") if chat else "\n"


def training_batches(
    task: NewTask, tokenizer: Any, batch_size: int, steps: int, seed: int, loss: str, max_length: int
) -> list[dict[str, torch.Tensor]]:
    """``steps`` padded batches in an order fixed by ``seed`` alone, so every method sees the same data.

    Prompt and answer are tokenised separately and concatenated, exactly as lm-eval tokenises context and
    continuation when it scores the answer. ``loss="completion"`` trains on the answer (and end token) only;
    ``loss="full"`` trains on every token (the prompt's text too), which moves the model further from its
    pre-training distribution.
    """
    if loss not in LOSS_MODES:
        raise ValueError(f"Unknown loss mode {loss!r}; choose one of {LOSS_MODES}.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    suffix = answer_suffix(tokenizer, task.target_delimiter == "")
    order: list[int] = []
    rng = random.Random(seed)
    while len(order) < steps * batch_size:
        epoch = list(range(len(task.train)))
        rng.shuffle(epoch)
        order.extend(epoch)
    batches = []
    for step in range(steps):
        ids, labels = [], []
        for index in order[step * batch_size : (step + 1) * batch_size]:
            example = task.train[index]
            prompt = tokenizer(example.prompt, add_special_tokens=False).input_ids
            answer = tokenizer(task.target_delimiter + example.answer + suffix, add_special_tokens=False).input_ids
            prompt = prompt[-(max_length - len(answer)) :] if len(prompt) + len(answer) > max_length else prompt
            ids.append(prompt + answer)
            labels.append((prompt if loss == "full" else [-100] * len(prompt)) + answer)
        width = max(map(len, ids))
        batches.append(
            {
                "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
                "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
                "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
            }
        )
    return batches


GENERAL_TEXT = ("llamafactory", "data/c4_demo.jsonl")  # 300 English web documents (C4), no overlap with retention
GENERAL_TEXT_DOCUMENTS = 300


def held_out_general_texts(count: int) -> list[str]:
    """The last ``count`` C4 documents of ``GENERAL_TEXT``: general text that calibration (the first documents) never
    reads, for the benchmark's KL to the base."""
    return [row["text"] for row in data.load_jsonl(*GENERAL_TEXT)[-count:]]


def general_text_batches(
    tokenizer: Any, sequences: int, max_length: int, batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """The first ``sequences`` documents of C4 (``GENERAL_TEXT``), each cut to ``max_length`` tokens, as padded
    batches with an attention mask and no labels: general text for the importance strategies that measure what old
    knowledge needs (``peft_hft.calibrate``'s ``"wanda"`` and ``"fisher"``)."""
    rows = data.load_jsonl(*GENERAL_TEXT)[:sequences]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [tokenizer(r["text"], add_special_tokens=False).input_ids[:max_length] for r in rows]
    batches = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        width = max(map(len, chunk))
        batches.append(
            {
                "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in chunk]),
                "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk]),
            }
        )
    return batches
