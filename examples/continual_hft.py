"""Continual learning on real tasks: sequential full fine-tuning vs HFT (random re-draw, Wanda-ranked) vs LoRA.

SmolLM2-135M-Instruct (the embedded default model) learns four tasks from the ``evals`` wheel one after another:
sarcasm headlines -> heart-disease records -> the language of a word -> is it food. It learns each of them (at least
15 points above chance after its stage). Every method gets the same batches and the same number of optimizer steps
per stage, for each of three paired seeds. After the base model and after every stage, each task is scored by
log-likelihood accuracy on held-out items (the answer option with the highest log-probability wins). The example
writes the task-by-stage matrices, the OP/BWT/FWT/forgetting table over seeds with paired differences against FFT,
and PNG plots into ``docs/continual.md`` and ``docs/continual/``. The older sequence (QuaRTz, SocialIQA, MedMCQA) and
the complementary and replay variants stay available through ``--tasks`` and ``--methods``.

Every method keeps its stages on disk (HFT and FFT as a peft-hft stage history, LoRA as one adapter per stage), so an
interrupted run picks up at the first unfinished stage when started again with the same arguments.

    python examples/continual_hft.py            # the defaults (about 1.5 hours on 2 CPU cores)
    python examples/continual_hft.py --quick    # a few minutes: 2 tasks, a few steps, small evaluation sets, 1 seed

Precision follows the CPU (``--precision auto``): bf16 autocast where it computes bf16 natively, fp32 elsewhere (bf16
autocast is emulated there, 7-28x slower). The resolved precision is one of the settings a resumed run must share.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm

import peft_hft
from peft_hft import HFTConfig
from peft_hft.bench.train import warmup_linear_decay
from peft_hft.continual import (
    AccuracyMatrix,
    ContinualHFT,
    ReplayBuffer,
    mean_matrix,
    own_stage_scores,
    plot_accuracy_matrix,
    plot_task_curves,
    seed_summary,
    seed_summary_table,
)
from peft_hft.resources.data import load_jsonl
from peft_hft.resources.default_model import load_default_model
from peft_hft.utils import PRECISIONS, autocast, resolve_precision

REPO = Path(__file__).resolve().parent.parent
P_GOLD = ":p_gold"  # metric-name suffix of the gold-option probability
RESULTS_START, RESULTS_END = "<!-- continual-results:start -->", "<!-- continual-results:end -->"


# ------------------------------------------------------------------------------------------------------------------
# Tasks: prompts with a single-token answer, scored by the log-probability of each option
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    name: str
    member: str  # path inside evals/registry/data
    instruction: str
    options: tuple[str, ...]  # answer labels; the gold one is label(row)
    label: Callable[[dict], str]
    text: Optional[Callable[[dict], str]] = None  # the item as shown to the model (default: the user message)
    rows: Optional[Callable[[], list[dict]]] = None  # builds the items (default: the evals file ``member``)

    def item(self, row: dict) -> str:
        return (self.text or _user)(row)


def _user(row: dict) -> str:
    return next(m["content"] for m in row["input"] if m["role"] == "user").strip()


LANGUAGES = {"Spanish": "spanish-lexicon", "French": "french-lexicon", "Irish": "irish-lexicon",
             "Portuguese": "brazilian-lexicon"}


def _language_rows(per_language: int = 4000) -> list[dict]:
    """Word -> language items from the evals lexicon files (real words of each language, every file lists only words
    of its own language): up to ``per_language`` distinct words each, a fixed sample."""
    rows = []
    for language, name in LANGUAGES.items():
        words = sorted({_user(r) for r in load_jsonl("evals", f"{name}/samples.jsonl")})
        random.Random(f"language:{language}").shuffle(words)
        rows += [{"input": [{"role": "user", "content": w}], "ideal": language} for w in words[:per_language]]
    random.Random("language").shuffle(rows)
    return rows


def _expression(row: dict) -> str:
    """The bare expression of a formal-logic item (its user message wraps it in a long fixed instruction)."""
    match = re.search(r"The expression is: (.*?) which evaluates to", _user(row), flags=re.S)
    if match is None:
        raise ValueError(f"formal_logic item without an expression: {_user(row)[:120]!r}")
    return match.group(1).strip()


TASKS = {
    "sarcasm": Task(
        "sarcasm", "sarcasm/samples.jsonl", "Is this news headline sarcastic? Answer 1 for sarcastic, 0 for not.",
        ("0", "1"), lambda row: row["ideal"].strip(),
    ),
    "quartz": Task(
        "quartz", "quartz/samples.jsonl", "Answer the science question with the letter of the correct option.",
        ("A", "B"), lambda row: row["ideal"].strip(),
    ),
    "socialiqa": Task(
        "socialiqa", "theory_of_mind/socialiqa/test.jsonl",
        "Answer the question about the situation with the letter of the most likely option.",
        ("A", "B", "C"), lambda row: row["ideal"].strip(),
    ),
    "medmcqa": Task(
        "medmcqa", "medmcqa/samples.jsonl", "Answer the medical exam question with the letter of the correct option.",
        ("a", "b", "c", "d"), lambda row: row["ideal"].strip()[0],
    ),
    # Tasks with a learnable signal at this scale (issue 14: each must end its own stage 15 points above chance)
    "formal_logic": Task(
        "formal_logic", "formal_logic/formal_logic_expressions.jsonl", "Is this Boolean expression true or false?",
        ("true", "false"), lambda row: row["ideal"].strip(), _expression,
    ),
    "diabetes": Task(
        "diabetes", "diabetes/samples.jsonl",
        "Is this patient likely to have diabetes or prediabetes? Answer 1 for yes, 0 for no.",
        ("0", "1"), lambda row: row["ideal"].strip(),
    ),
    "heart_disease": Task(
        "heart_disease", "heart-disease/samples.jsonl",
        "Is this patient likely to have heart disease? Answer 1 for yes, 0 for no.",
        ("0", "1"), lambda row: row["ideal"].strip(),
    ),
    "language": Task(
        "language", "", "Which language is this word from: Spanish, French, Irish or Portuguese?",
        tuple(LANGUAGES), lambda row: row["ideal"], rows=_language_rows,
    ),
    "food": Task(
        "food", "food/samples.jsonl", "Is this a food item or related to food? Answer Yes or No.",
        ("Yes", "No"), lambda row: row["ideal"].strip(), lambda row: _user(row).split("food?")[-1].strip(),
    ),
    "crepe": Task(
        "crepe", "crepe/samples.jsonl",
        "How does the event change the likelihood? Answer more, less or equally (likely).",
        ("more", "less", "equally"), lambda row: row["ideal"].strip().split()[0],
    ),
}


@dataclass
class Encoded:
    """A task's items as token ids: ``prompt`` ends where the options differ; ``target`` indexes ``option_ids``."""

    prompts: list[list[int]]
    targets: list[int]
    option_ids: list[int]


def encode(task: Task, rows: list[dict], tokenizer) -> Encoded:
    """Prompt ids plus the tokens all options share (e.g. a space before a digit); options must then differ in
    exactly one token, so one forward pass scores all of them."""
    option_tokens = [tokenizer(" " + o, add_special_tokens=False)["input_ids"] for o in task.options]
    shared = os.path.commonprefix(option_tokens)
    if any(len(t) != len(shared) + 1 for t in option_tokens):
        raise ValueError(f"The options of {task.name} are not single tokens after a shared prefix: {option_tokens}.")
    prompts, targets = [], []
    for row in rows:
        gold = task.label(row)
        if gold not in task.options:
            raise ValueError(f"{task.name}: answer {gold!r} is not one of {task.options}.")
        text = f"{task.instruction}\n\n{task.item(row)}\nAnswer:"
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"] + list(shared))
        targets.append(task.options.index(gold))
    return Encoded(prompts, targets, [t[-1] for t in option_tokens])


def split(task: Task, eval_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """A held-out set with the same number of items per answer option (so constant answers score exactly chance),
    and the remaining items for training."""
    rows = task.rows() if task.rows is not None else load_jsonl("evals", task.member)
    random.Random(f"{task.name}:{seed}").shuffle(rows)
    per_option = eval_size // len(task.options)
    held_out, train_rows, counts = [], [], dict.fromkeys(task.options, 0)
    for row in rows:
        gold = task.label(row)
        if counts.get(gold, per_option) < per_option:
            held_out.append(row)
            counts[gold] += 1
        else:
            train_rows.append(row)
    if min(counts.values()) < per_option or len(train_rows) < 50:
        raise ValueError(f"{task.name} has {len(rows)} items: too few for {eval_size} balanced held-out items.")
    return train_rows, held_out


def collate(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left padding, so the last position of every row is its prompt's last token."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def last_logits(model, batch: dict[str, torch.Tensor], precision: str = "fp32") -> torch.Tensor:
    """Logits at the last position; ``precision="bf16"`` computes under bf16 autocast (weights stay fp32)."""
    with autocast(precision, torch.device("cpu")):
        return model(**batch, logits_to_keep=1).logits[:, -1, :].float()


@torch.inference_mode()
def score(model, data: Encoded, pad_id: int, batch_size: int, precision: str = "fp32") -> tuple[float, float]:
    """Log-likelihood accuracy (the option with the highest log-probability wins) and the mean probability of the
    gold option among the options (a smoother view of the same thing)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(data.prompts)), key=lambda i: len(data.prompts[i]))  # little padding
    correct, gold_probability = 0, 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        logits = last_logits(model, collate([data.prompts[i] for i in idx], pad_id), precision)[:, data.option_ids]
        targets = torch.tensor([data.targets[i] for i in idx])
        correct += int((logits.argmax(-1) == targets).sum())
        gold_probability += float(logits.softmax(-1).gather(1, targets[:, None]).sum())
    model.train(was_training)
    return correct / len(order), gold_probability / len(order)


def make_batches(items: list[tuple[list[int], int]], steps: int, batch_size: int, seed: str,
                 balanced: bool = False) -> list[list]:
    """``steps`` batches drawn epoch by epoch from a seeded permutation (the same for every method).

    ``balanced``: every batch position cycles through the answers, each drawn from its own seeded permutation, so
    each answer fills the same share of the batches. A few dozen steps on skewed data (e.g. 77% of the diabetes
    items say 0) otherwise teach the majority answer, which scores exactly chance on the balanced held-out items.
    """
    rng = random.Random(seed)
    groups = [items] if not balanced else [
        [item for item in items if item[1] == answer] for answer in sorted({item[1] for item in items})
    ]
    pools: list[list] = [[] for _ in groups]
    batches = []
    for step in range(steps):
        batch = []
        for position in range(batch_size):
            g = (step * batch_size + position) % len(groups)
            if not pools[g]:
                pools[g] = list(groups[g])
                rng.shuffle(pools[g])
            batch.append(pools[g].pop())
        rng.shuffle(batch)
        batches.append(batch)
    return batches


def train(model, batches: list[list], pad_id: int, lr: float, desc: str, precision: str = "fp32",
          warmup: float = 0.0) -> dict[str, float]:
    """AdamW on the trainable parameters; cross-entropy (over the vocabulary) of the answer token given the prompt.
    ``batches`` hold (prompt ids, answer token id) pairs. ``warmup > 0``: the forgetting benchmark's schedule (linear
    warm-up over that share of the steps, then linear decay to 0); 0: a constant rate."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = warmup_linear_decay(optimizer, len(batches), warmup) if warmup > 0 else None
    model.train()
    losses, start = [], time.perf_counter()
    for batch in tqdm(batches, desc=desc, leave=False):
        inputs = collate([prompt for prompt, _ in batch], pad_id)
        loss = F.cross_entropy(last_logits(model, inputs, precision), torch.tensor([target for _, target in batch]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    seconds = time.perf_counter() - start
    tail = losses[-max(1, len(losses) // 4):]
    return {"train_loss_last_quarter": sum(tail) / len(tail), "train_seconds": seconds,
            "seconds_per_step": seconds / max(1, len(batches)), "trainable_parameters": sum(p.numel() for p in params)}


# ------------------------------------------------------------------------------------------------------------------
# Methods
# ------------------------------------------------------------------------------------------------------------------

METHODS = ("fft", "hft-random", "hft-complementary", "hft-wanda", "lora", "hft-random+replay")
LABELS = {
    "fft": "sequential FFT",
    "hft-random": "HFT (random re-draw)",
    "hft-complementary": "HFT (complementary)",
    "hft-wanda": "HFT (Wanda-ranked per stage)",
    "lora": "LoRA",
    "hft-random+replay": "HFT (random) + replay",
}
POLICY = {"fft": "fixed", "hft-random": "random", "hft-complementary": "complementary", "hft-wanda": "calibrated",
          "hft-random+replay": "random"}
CALIBRATION_SEQUENCES, CALIBRATION_LENGTH = 32, 128  # general text (C4 demo) for the Wanda-ranked stages


class Experiment:
    """One seed of the run: the held-out split is the same for every seed (``--split-seed``); the seed draws the
    batches, the HFT masks and LoRA's initialisation, the same for every method, so seeds pair up across methods."""

    def __init__(self, args: argparse.Namespace, seed: int) -> None:
        self.args = args
        self.seed = seed
        self.work = Path(args.work_dir) / f"seed{seed}"
        self.work.mkdir(parents=True, exist_ok=True)
        model, self.tokenizer = load_default_model()
        self.total_parameters = sum(p.numel() for p in model.parameters())
        del model
        self.pad_id = self.tokenizer.pad_token_id
        self.tasks = [TASKS[t] for t in args.tasks]
        self.train_items: dict[str, list[tuple[list[int], int]]] = {}  # (prompt ids, answer token id)
        self.eval_data: dict[str, Encoded] = {}
        for task in self.tasks:
            train_rows, eval_rows = split(task, args.eval_size, args.split_seed)
            train_rows = train_rows[: args.train_pool]
            encoded = encode(task, train_rows, self.tokenizer)
            # training pairs: (prompt ids, vocabulary id of the gold option's token)
            pairs = zip(encoded.prompts, encoded.targets, strict=True)
            self.train_items[task.name] = [(prompt, encoded.option_ids[target]) for prompt, target in pairs]
            self.eval_data[task.name] = encode(task, eval_rows, self.tokenizer)

    def evaluate(self, model) -> dict[str, float]:
        """``{task: accuracy, task + P_GOLD: mean gold-option probability}`` on the held-out items."""
        metrics = {}
        for name, data in tqdm(self.eval_data.items(), desc="Evaluating", leave=False):
            metrics[name], metrics[name + P_GOLD] = score(
                model, data, self.pad_id, self.args.eval_batch_size, self.args.precision
            )
        return metrics

    def base_metrics(self) -> dict[str, float]:
        path = self.work / "base_metrics.json"
        if path.exists():
            return json.loads(path.read_text())
        model, _ = load_default_model()
        metrics = self.evaluate(model)
        path.write_text(json.dumps(metrics, indent=1))
        return metrics

    def stage_batches(self, k: int, replay: ReplayBuffer | None) -> list[list]:
        task = self.tasks[k].name
        items = self.train_items[task] if replay is None else replay.mix(self.train_items[task])
        return make_batches(items, self.args.steps, self.args.batch_size, f"{task}:{self.seed}", self.args.balanced)

    def matrices(self, stage_metrics: list[dict[str, float]]) -> tuple[AccuracyMatrix, AccuracyMatrix]:
        """The accuracy matrix and the gold-option-probability matrix of a method."""
        tasks = [t.name for t in self.tasks]
        stage_tasks = tasks[: len(stage_metrics)]

        def p_gold(metrics: dict[str, float]) -> dict[str, float]:
            return {k.removesuffix(P_GOLD): v for k, v in metrics.items() if k.endswith(P_GOLD)}

        base = self.base_metrics()
        return (
            AccuracyMatrix.from_records(stage_tasks, stage_metrics, base, tasks=tasks),
            AccuracyMatrix.from_records(stage_tasks, [p_gold(m) for m in stage_metrics], p_gold(base), tasks=tasks),
        )

    def run_hft(self, method: str) -> tuple[AccuracyMatrix, AccuracyMatrix]:
        """FFT (``ratio=1.0``: every tensor trains, in place) and HFT share the stage runner and its history."""
        args = self.args
        config = HFTConfig(ratio=1.0 if method == "fft" else 0.5, seed=self.seed)
        model, _ = load_default_model()
        calibrate = self.wanda_calibration(config) if POLICY[method] == "calibrated" else None
        continual = ContinualHFT(model, config, self.work / method, policy=POLICY[method], resume=True,
                                 calibrate=calibrate)
        if not continual.history.base_metrics:
            continual.log_metrics(self.base_metrics(), stage="base")
        replay = ReplayBuffer(args.replay, seed=self.seed) if method.endswith("+replay") else None
        lr = args.lr
        for k, task in enumerate(self.tasks):
            if k >= continual.num_stages:
                batches = self.stage_batches(k, replay)
                with continual.stage(task.name, steps=args.steps, batch_size=args.batch_size, lr=lr) as peft_model:
                    continual.record_info(**train(peft_model, batches, self.pad_id, lr, f"{method} {task.name}",
                                                  args.precision, args.warmup))
            if not continual.history.stages[k].metrics:
                continual.log_metrics(self.evaluate(continual.model), stage=k)
            self.progress(method, k, continual.history.stages[k].metrics)
            if replay is not None:
                replay.add(task.name, self.train_items[task.name])
        return self.matrices([s.metrics for s in continual.history.stages])

    def run_lora(self) -> tuple[AccuracyMatrix, AccuracyMatrix]:
        """Sequential LoRA: a fresh adapter per stage, merged into the model after the stage."""
        args = self.args
        root = self.work / "lora"
        root.mkdir(exist_ok=True)
        record_path = root / "stages.json"
        records = json.loads(record_path.read_text()) if record_path.exists() else []
        model, _ = load_default_model()
        lora_config = lambda: LoraConfig(  # noqa: E731  (a fresh config per stage: get_peft_model fills it in)
            r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )
        for k, task in enumerate(self.tasks):
            adapter_dir = root / f"stage_{k:02d}_{task.name}"
            if k < len(records):  # finished earlier: re-apply the saved adapter
                model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
            else:
                torch.manual_seed(1000 * self.seed + k)  # LoRA's initialisation, per seed and stage
                peft_model = get_peft_model(model, lora_config())
                info = train(peft_model, self.stage_batches(k, None), self.pad_id, args.lora_lr, f"lora {task.name}",
                             args.precision, args.warmup)
                peft_model.save_pretrained(adapter_dir)
                model = peft_model.merge_and_unload()
                records.append({"task": task.name, "info": info, "metrics": self.evaluate(model)})
                record_path.write_text(json.dumps(records, indent=1))
            self.progress("lora", k, records[k]["metrics"])
        return self.matrices([r["metrics"] for r in records])

    def wanda_calibration(self, config: HFTConfig) -> Callable:
        """Each stage's mask by Wanda importance on general text, scored on the running model when the stage starts:
        the stage trains the tensors that what the model knows by then needs least (the setting-2 strategy of
        docs/forgetting.md with the least Wikipedia forgetting)."""
        from peft_hft.bench.newtask import general_text_batches

        batches = general_text_batches(self.tokenizer, CALIBRATION_SEQUENCES, CALIBRATION_LENGTH, self.args.batch_size)

        def calibrate(model, k: int) -> HFTConfig:
            return peft_hft.calibrate(model, batches, strategy="wanda", ratio=config.ratio, seed=config.seed + k)

        return calibrate

    def progress(self, method: str, k: int, metrics: dict[str, float]) -> None:
        scores = "  ".join(f"{t}={100 * v:.1f}" for t, v in metrics.items() if not t.endswith(P_GOLD))
        print(f"[{method} seed {self.seed}] after stage {k} ({self.tasks[k].name}): {scores}", flush=True)

    def seconds_per_step(self, method: str) -> float:
        if method == "lora":
            records = json.loads((self.work / "lora" / "stages.json").read_text())
            infos = [r["info"] for r in records]
        else:
            manifest = json.loads((self.work / method / "manifest.json").read_text())
            infos = [s["info"] for s in manifest["stages"]]
        return sum(i["seconds_per_step"] for i in infos) / len(infos)

    def trainable_share(self, method: str) -> float:
        total = self.total_parameters
        if method == "lora":
            info = json.loads((self.work / "lora" / "stages.json").read_text())[0]["info"]
        else:
            info = json.loads((self.work / method / "manifest.json").read_text())["stages"][0]["info"]
        return info["trainable_parameters"] / total


# ------------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------------


Results = dict[str, list[tuple[AccuracyMatrix, AccuracyMatrix]]]  # label -> per seed (accuracy, gold probability)


def learned_table(experiment: Experiment, accuracy: dict[str, list[AccuracyMatrix]]) -> str:
    """Each task's held-out accuracy right after its own stage (mean over seeds) against chance: was it learned?"""
    tasks = experiment.tasks
    lines = ["| method | " + " | ".join(f"{t.name} (chance {100 / len(t.options):.0f})" for t in tasks) + " |",
             "|" + "---|" * (len(tasks) + 1)]
    for label, matrices in accuracy.items():
        own = [own_stage_scores(m) for m in matrices]
        cells = [f"{100 * sum(o[t.name] for o in own) / len(own):.1f}" for t in tasks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(experiments: list[Experiment], results: Results, command: str, wall: float) -> None:
    experiment, args = experiments[0], experiments[0].args
    accuracy = {label: [pair[0] for pair in runs] for label, runs in results.items()}
    p_gold = {label: [pair[1] for pair in runs] for label, runs in results.items()}
    mean_accuracy = {label: mean_matrix(m) for label, m in accuracy.items()}
    mean_p_gold = {label: mean_matrix(m) for label, m in p_gold.items()}
    reference = LABELS["fft"] if LABELS["fft"] in results else None
    plots = Path(args.plots_dir)
    seeds_note = f" (mean over {len(experiments)} seeds)" if len(experiments) > 1 else ""
    heatmap = plot_accuracy_matrix(mean_accuracy, plots / "matrices.png",
                                   title=f"Held-out accuracy (%) after each stage{seeds_note}")
    curves = plot_task_curves(
        mean_accuracy, plots / "task_curves.png", title=f"Held-out accuracy (%) of each task across the stages"
        f"{seeds_note} (shaded: the stage that trains it)"
    )
    p_curves = plot_task_curves(
        mean_p_gold, plots / "task_curves_p_gold.png",
        title=f"Mean probability (%) of the gold option across the stages{seeds_note}"
    )
    docs = Path(args.docs)
    rel = lambda p: os.path.relpath(p, docs.parent)  # noqa: E731
    steps_table = ["| method | trainable share | s/step (mean over stages and seeds) |", "|---|---|---|"]
    for method in args.methods:
        per_step = sum(e.seconds_per_step(method) for e in experiments) / len(experiments)
        steps_table.append(f"| {LABELS[method]} | {100 * experiment.trainable_share(method):.1f}% | {per_step:.2f} |")
    chance = ", ".join(f"{t.name} {100 / len(t.options):.0f}" for t in experiment.tasks)
    seeds = ", ".join(str(e.seed) for e in experiments)
    accuracy_summary = seed_summary(accuracy, reference)
    p_gold_summary = seed_summary(p_gold, reference)
    lines = [
        RESULTS_START,
        f"Run on {datetime.date.today().isoformat()}, {platform.machine()} CPU VM with {os.cpu_count()} cores, torch "
        f"{torch.__version__}; wall time {wall / 60:.0f} min for what this invocation computed (finished stages of "
        "an interrupted run are reused).",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Tasks in order: {' -> '.join(t.name for t in experiment.tasks)}. Every method: {args.steps} steps x batch "
        f"{args.batch_size} per stage, the same batches per seed"
        f"{' (each answer equally often)' if args.balanced else ''}; loss on the answer token only; "
        f"{f'warm-up over {args.warmup:.0%} of the steps then linear decay' if args.warmup else 'constant lr'}; "
        "FFT/HFT lr "
        f"{args.lr}, LoRA lr {args.lora_lr} (r={args.lora_r}, alpha {args.lora_alpha}); "
        f"{args.precision} "
        f"{'autocast (fp32 weights)' if args.precision != 'fp32' else ''}; {args.eval_size} held-out items per task "
        f"with the same number per answer option (split seed {args.split_seed}, the same for every seed), so "
        f"answering at random or always the same option scores chance ({chance}); seeds {seeds} (a seed draws the "
        "batches, the HFT masks and LoRA's initialisation, the same for every method)."
        + (f" Replay share {args.replay}." if any(m.endswith("+replay") for m in args.methods) else ""),
        "",
        "### Was each task learned? Held-out accuracy (%) right after its own stage, mean over seeds",
        "",
        learned_table(experiment, accuracy),
        "",
        "### Summary: held-out accuracy (points), mean [95% t-interval] (per seed)",
        "",
        seed_summary_table(accuracy_summary),
        "",
    ]
    if reference is not None:
        lines += [
            f"### Paired against {reference}: method minus FFT on the same seed (points), mean [95% t-interval] "
            "(per seed)",
            "",
            seed_summary_table(accuracy_summary, paired=True),
            "",
        ]
    lines += [
        "### Summary: mean probability of the gold option among the options (points)",
        "",
        "The same measures on a smoother score: small gains and losses that do not flip an answer still count.",
        "",
        seed_summary_table(p_gold_summary),
        "",
        "OP: mean over the tasks after the last stage. BWT: mean change of each earlier task from right after it was "
        "trained to the end (negative = forgetting). FWT: mean score of each task just before it is trained minus "
        "the base model's. Forgetting: mean drop from each earlier task's best score to its final one.",
        "",
        "\n".join(steps_table),
        "",
        f"![task-by-stage accuracy matrices]({rel(heatmap)})",
        "",
        f"![per-task accuracy curves]({rel(curves)})",
        "",
        f"![per-task gold-option probability curves]({rel(p_curves)})",
        "",
        f"### Accuracy matrices (%, rows: after each stage; columns: evaluated task){seeds_note}",
        "",
    ]
    for method, matrix in mean_accuracy.items():
        lines += [f"**{method}**", "", matrix.to_markdown(), ""]
    lines.append(RESULTS_END)
    block = "\n".join(lines)
    text = docs.read_text() if docs.exists() else f"# Continual learning with HFT\n\n{RESULTS_START}\n{RESULTS_END}\n"
    if RESULTS_START not in text:
        text = text.rstrip() + f"\n\n## Results\n\n{RESULTS_START}\n{RESULTS_END}\n"
    text = re.sub(re.escape(RESULTS_START) + ".*?" + re.escape(RESULTS_END), lambda _: block, text, flags=re.S)
    docs.parent.mkdir(parents=True, exist_ok=True)
    tmp = docs.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, docs)
    work = Path(args.work_dir)
    (work / "summary.md").write_text(block + "\n")
    raw = {
        "precision": args.precision,
        "seeds": [e.seed for e in experiments],
        "accuracy": {label: [dataclasses.asdict(m) for m in ms] for label, ms in accuracy.items()},
        "p_gold": {label: [dataclasses.asdict(m) for m in ms] for label, ms in p_gold.items()},
        "summary": {"accuracy": accuracy_summary, "p_gold": p_gold_summary},
    }
    (work / "results.json").write_text(json.dumps(raw, indent=1) + "\n")
    print(seed_summary_table(accuracy_summary))
    print(f"Wrote {docs}, the plots in {plots} and {work / 'results.json'}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a few minutes: 2 tasks, 6 steps per stage, 32 held-out items per task"
    )
    parser.add_argument("--methods", default="fft,hft-random,hft-wanda,lora",
                        help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--tasks", default="sarcasm,heart_disease,language,food", help=f"from {','.join(TASKS)}")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per stage (every method)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4, help="learning rate of FFT and HFT")
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=8,
                        help="LoRA alpha (PEFT's default, as in the forgetting benchmark whose grid chose --lora-lr)")
    parser.add_argument("--replay", type=float, default=0.2, help="replay share for the +replay method")
    parser.add_argument("--eval-size", type=int, default=96, help="held-out items per task (balanced)")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--train-pool", type=int, default=2000, help="training items kept per task")
    parser.add_argument("--warmup", type=float, default=0.1,
                        help="share of each stage's steps for linear warm-up, then linear decay (0: constant lr)")
    parser.add_argument("--balanced", action=argparse.BooleanOptionalAction, default=True,
                        help="every batch holds each answer equally often (skewed tasks otherwise teach the majority)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated; every method runs every seed (paired)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the held-out split (the same for all seeds)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto: bf16 autocast (weights stay fp32) where the CPU has native bf16, else fp32")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch threads (default: torch's choice); use 1 on a machine shared with other jobs, where extra "
        "threads wait on each other (5x slower per step measured on a busy 2-core VM)",
    )
    parser.add_argument("--work-dir", default=str(REPO / "outputs" / "continual_hft"),
                        help="stage histories and results (resumable)")
    parser.add_argument("--docs", default=str(REPO / "docs" / "continual.md"), help="Markdown file to update")
    parser.add_argument("--plots-dir", default=str(REPO / "docs" / "continual"), help="where the PNG plots go")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.steps, args.eval_size, args.train_pool, args.seeds = "sarcasm,food", 6, 32, 200, "0"
        if args.work_dir == parser.get_default("work_dir"):
            args.work_dir = str(REPO / "outputs" / "continual_hft_quick")
        if args.docs == parser.get_default("docs"):
            args.docs = str(Path(args.work_dir) / "continual.md")
            args.plots_dir = str(Path(args.work_dir) / "plots")
    args.precision_requested = args.precision
    choice = resolve_precision(args.precision, "cpu")  # the example trains on the CPU
    args.precision, args.precision_reason = choice.precision, choice.reason  # resolved: what run.json records
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.seeds = [int(x) for x in str(args.seeds).split(",") if x.strip()]
    unknown = [m for m in args.methods if m not in METHODS] + [t for t in args.tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown method(s)/task(s) {unknown}; methods: {METHODS}, tasks: {tuple(TASKS)}")
    return args


# Arguments that change what a stage trains or how it is scored: a resumed run must use the same ones.
_RUN_DEFINING = ("tasks", "steps", "batch_size", "lr", "lora_lr", "lora_r", "lora_alpha", "replay", "eval_size",
                 "train_pool", "split_seed", "precision", "warmup", "balanced")


def check_resumable(args: argparse.Namespace) -> None:
    """Refuse to continue a work directory that was started with other training or evaluation settings."""
    path = Path(args.work_dir) / "run.json"
    wanted = {k: getattr(args, k) for k in _RUN_DEFINING}
    if path.exists():
        found = json.loads(path.read_text())
        different = {k: (found.get(k), v) for k, v in wanted.items() if found.get(k) != v}
        if different:
            hint = (f" Its precision was {found['precision']} and this machine resolves {args.precision_requested!r} "
                    f"to {args.precision}: pass --precision {found['precision']} to resume it."
                    if "precision" in different else "")
            raise SystemExit(
                f"{args.work_dir} holds a run with other settings ({different}, as (there, here)).{hint} Use the same "
                "arguments to resume it, or pass another --work-dir."
            )
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(wanted, indent=1))


def main(argv=None) -> None:
    args = parse_args(argv)
    print(f"precision {args.precision}: {args.precision_reason}", flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    check_resumable(args)
    experiments = [Experiment(args, seed) for seed in args.seeds]
    results: Results = {LABELS[m]: [] for m in args.methods}
    for experiment in experiments:  # seed by seed, so an interrupted run has whole seeds to report
        for method in args.methods:
            pair = experiment.run_lora() if method == "lora" else experiment.run_hft(method)
            results[LABELS[method]].append(pair)
    command = "python examples/continual_hft.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_report(experiments, results, command.strip(), time.perf_counter() - start)


if __name__ == "__main__":
    main()
