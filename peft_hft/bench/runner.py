"""Run the forgetting benchmark: base evaluation, a learning-rate grid per method, then the remaining seeds.

Every finished run is written to ``<output>/runs/<run>.json`` at once (atomically) and skipped when the benchmark is
started again, so an interrupted benchmark resumes where it stopped. The learning rate of each method is chosen on
the new task's *validation* split only (best accuracy of the first seed; ties go to the smaller rate), and the other
seeds are trained at that rate.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..utils import atomic_write, resolve_precision
from .evaluate import evaluate
from .methods import Method, default_methods, select_methods
from .newtask import NewTask, general_text_batches, load_new_task, training_batches
from .protocol import Protocol, bind
from .tasks import EvalSpec, retention_specs
from .train import train

logger = logging.getLogger(__name__)


@dataclass
class Bench:
    """Everything a run needs, loaded once: the pristine base model, its tokenizer, the task and the eval sets."""

    protocol: Protocol
    output: Path
    base_model: nn.Module
    tokenizer: Any
    task: NewTask
    specs: list[EvalSpec]  # validation, test, then the retention sets
    methods: list[Method]
    device: torch.device
    general_text: list[dict[str, torch.Tensor]] = dataclasses.field(default_factory=list)  # calibration batches
    probes: dict[str, Any] = dataclasses.field(default_factory=dict)  # name -> RetentionProbe with the base's reference

    @property
    def runs_dir(self) -> Path:
        return self.output / "runs"

    def lr_grid(self, method: Method) -> list[float]:
        return list(self.protocol.lora_lr_grid if method.adapter_grid else self.protocol.full_lr_grid)

    def calibration_batches(self, method: Method, seed: int) -> Optional[list[dict[str, torch.Tensor]]]:
        """What ``method``'s calibration pass reads: general text, or the run's own first training batches."""
        p = self.protocol
        if method.calibration_data == "general":
            if not self.general_text:
                self.general_text = general_text_batches(
                    self.tokenizer, p.calibration_sequences, p.calibration_max_length, p.batch_size
                )
            return self.general_text
        if method.calibration_data == "task":
            steps = max(1, p.calibration_sequences // p.batch_size)
            return training_batches(self.task, self.tokenizer, p.batch_size, steps, seed, p.loss, p.max_length)
        return None


    def kl_to_base(self, model: nn.Module) -> dict[str, float]:
        """Mean token KL(model || base) on held-out general text (every token) and on the new task's test prompts
        (the answer position), with the probes' perplexity: ``{"general", "task", "general_ppl"}``.

        The probes summarise the base model once, on first use (peft_hft.RetentionProbe, the helper the
        RetentionCallback measures with)."""
        from ..integrations.retention import RetentionProbe
        from .newtask import held_out_general_texts
        from .train import autocast

        p = self.protocol
        if not self.probes:
            top_k = p.kl_top_k or None
            texts = {
                "general": (held_out_general_texts(p.kl_texts), "all", p.kl_max_length),
                "task": ([ex.prompt for ex in self.task.test[: p.kl_task_prompts]], "last", p.max_length),
            }
            for name, (rows, positions, length) in texts.items():
                probe = RetentionProbe(self.tokenizer, rows, length, p.eval_batch_size, top_k, kl_positions=positions)
                probe.reference(self.base_model, autocast(p.precision, self.device))
                self.probes[name] = probe
        measured = {name: probe.measure(model, autocast(p.precision, self.device))
                    for name, probe in self.probes.items()}
        return {"general": measured["general"].kl_to_base, "task": measured["task"].kl_to_base,
                "general_ppl": measured["general"].ppl}


def run_name(method: str, lr: float, seed: int) -> str:
    return f"{method}_lr{lr:g}_seed{seed}"


def load_model(spec: str, task_texts: Callable[[], list[str]]) -> tuple[nn.Module, Any]:
    """The base model and tokenizer: ``"default"`` (SmolLM2-135M-Instruct), ``"tiny"`` or a local checkpoint path."""
    if spec == "default":
        from ..resources.default_model import load_default_model

        return load_default_model()
    if spec == "tiny":
        from .quick import tiny_model_and_tokenizer

        return tiny_model_and_tokenizer(task_texts())
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(
            f"--model {spec!r} is not a directory. Pass 'default' (the embedded SmolLM2-135M-Instruct) or a local "
            "transformers checkpoint saved with save_pretrained (this benchmark never downloads models)."
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def prepare(protocol: Protocol, output: Path, device: Optional[str] = None) -> Bench:
    """Validate the protocol, bind ``output`` to it, and load the model, the task and the evaluation sets."""
    protocol.validate()
    methods = select_methods(default_methods(), protocol.methods)
    retention = retention_specs(tuple(protocol.retention), protocol.retention_limits)

    def texts() -> list[str]:  # what the quick mode's tokenizer is trained on
        from .newtask import read_samples

        _, samples = read_samples(protocol.task)
        rows = [m["content"] for s in samples[:2000] for m in s["input"]]
        for spec in retention:
            rows += [r.get("text") or r["query"] + " " + " ".join(r["choices"]) for r in spec.rows]
        return rows

    model, tokenizer = load_model(protocol.model, texts)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    choice = resolve_precision(protocol.precision, target)
    logger.info("%s", choice)
    protocol.precision = choice.precision  # what runs is what protocol.json records, never "auto"
    model.to(target).eval()
    task = load_new_task(protocol.task, tokenizer, protocol.val_size, protocol.test_size, prompt=protocol.prompt)
    specs = [task.eval_spec("validation"), task.eval_spec("test"), *retention]
    bind(protocol, output)  # only once every input has been checked: a bad --task leaves no results directory
    return Bench(protocol, output, model, tokenizer, task, specs, methods, target)


def _load_run(path: Path) -> Optional[dict[str, Any]]:
    return json.loads(path.read_text()) if path.exists() else None


def _save_run(path: Path, record: dict[str, Any]) -> None:
    atomic_write(path, (json.dumps(record, indent=1) + "\n").encode())


def _evaluate(bench: Bench, model: nn.Module, specs: list[EvalSpec]) -> tuple[dict[str, dict[str, float]], dict]:
    """Scores of ``model`` on ``specs`` and the wall and CPU seconds they took."""
    start, cpu_start = time.perf_counter(), time.process_time()
    p = bench.protocol
    scores = evaluate(model, bench.tokenizer, specs, p.eval_batch_size, p.precision, packed=p.scorer == "packed")
    return scores, {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start}


def run_base(bench: Bench) -> dict[str, Any]:
    """The base model's scores (what "forgetting" is measured against); cached like every run."""
    path = bench.runs_dir / "base.json"
    if (record := _load_run(path)) is not None:
        return record
    logger.info("Evaluating the base model")
    scores, timing = _evaluate(bench, bench.base_model, bench.specs)
    record = {"run": "base", "method": "base", "scores": scores, "eval": timing}
    _save_run(path, record)
    return record


def _train(bench: Bench, method: Method, lr: float, seed: int) -> tuple[dict[str, Any], Optional[nn.Module]]:
    """Train ``method`` at ``lr`` with ``seed`` from a fresh copy of the base model; the model is None if the loss
    diverged (a diverged grid point is a result, the worst possible one, not a crash)."""
    p = bench.protocol
    name = run_name(method.name, lr, seed)
    torch.manual_seed(seed)  # LoRA's initialisation; HFT's selection uses HFTConfig.seed
    start = time.perf_counter()
    model = method.wrap(copy.deepcopy(bench.base_model), seed, bench.calibration_batches(method, seed))
    batches = training_batches(bench.task, bench.tokenizer, p.batch_size, p.steps, seed, p.loss, p.max_length)
    record: dict[str, Any] = {"run": name, "method": method.name, "lr": lr, "seed": seed}
    config = getattr(model, "peft_config", {}).get("default")
    if getattr(config, "calibration", None) is not None:
        # seconds: copying the base model, the calibration pass and wrapping it, together
        record["calibration"] = {**config.calibration, "seconds": time.perf_counter() - start,
                                 "selected_parameters": list(config.selected_parameters)}
    try:
        optimizer = method.make_optimizer(model, lr)
        record["train"] = train(model, batches, lr, warmup=p.warmup, precision=p.precision, desc=name,
                                optimizer=optimizer, max_grad_norm=0.0 if optimizer is not None else 1.0)
    except FloatingPointError as exc:
        logger.warning("%s diverged: %s", name, exc)
        record.update(diverged=True, scores={})
        return record, None
    record["diverged"] = False
    return record, method.for_evaluation(model, bench.base_model)


def _finish(bench: Bench, record: dict[str, Any], model: nn.Module, path: Path) -> dict[str, Any]:
    """Evaluate a trained model on every set and save its record."""
    record = dict(record)
    record["scores"], record["eval"] = _evaluate(bench, model, bench.specs)
    record["kl"] = bench.kl_to_base(model)
    _save_run(path, record)
    return record


def run_seed(bench: Bench, method: Method, lr: float, seed: int) -> dict[str, Any]:
    """A final run: train at the chosen ``lr`` with ``seed``, evaluate on every set (cached)."""
    path = bench.runs_dir / f"{run_name(method.name, lr, seed)}.json"
    if (record := _load_run(path)) is not None:
        return record
    record, model = _train(bench, method, lr, seed)
    if model is None:
        _save_run(path, record)
        return record
    return _finish(bench, record, model, path)


def _grid_key(record: dict[str, Any], task: str) -> tuple[float, float]:
    """Selection order of grid points: validation accuracy, then the smaller learning rate; diverged ones last."""
    if record["diverged"]:
        return (-1.0, -record["lr"])
    return (record["scores"][f"{task}_validation"]["acc"], -record["lr"])


def run_grid(bench: Bench, method: Method, progress: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The learning-rate grid of ``method`` on the first seed, scored on the validation split only; then the
    chosen point's model is evaluated on every set and becomes that seed's final run.

    The best model so far is kept in memory, so the chosen point is not trained twice; only if the benchmark was
    interrupted between the grid and that evaluation is it trained again (same seed, same batches).
    """
    seed = bench.protocol.seeds[0]
    validation = [bench.specs[0]]
    records, best, best_model = [], None, None
    for lr in bench.lr_grid(method):
        path = bench.runs_dir / "grid" / f"{run_name(method.name, lr, seed)}.json"
        record, model = _load_run(path), None
        if record is None:
            record, model = _train(bench, method, lr, seed)
            if model is not None:
                record["scores"], record["eval"] = _evaluate(bench, model, validation)
            _save_run(path, record)
        progress.update()
        records.append(record)
        if best is None or _grid_key(record, bench.task.name) > _grid_key(best, bench.task.name):
            best, best_model = record, model
        del model
    if best["diverged"]:
        raise RuntimeError(
            f"Every learning rate of {method.name} diverged; give that method a grid with smaller rates."
        )
    path = bench.runs_dir / f"{run_name(method.name, best['lr'], seed)}.json"
    if (final := _load_run(path)) is None:
        if best_model is None:
            logger.info("Retraining %s (its model was not kept across restarts) to evaluate it", best["run"])
            retrained, best_model = _train(bench, method, best["lr"], seed)
            if best_model is None:
                raise RuntimeError(f"{best['run']} diverged when retrained; it did not before. Rerun the benchmark.")
            best = {**best, "train": retrained["train"]}
        final = _finish(bench, {k: v for k, v in best.items() if k not in ("scores", "eval")}, best_model,
                        path)
    return records, final


def run_benchmark(bench: Bench) -> dict[str, Any]:
    """All runs of the protocol (skipping finished ones); returns base, grid, chosen rates and final runs."""
    from tqdm.auto import tqdm

    seeds = bench.protocol.seeds
    total = sum(len(bench.lr_grid(m)) + len(seeds) - 1 for m in bench.methods)
    base = run_base(bench)
    grid: dict[str, list[dict[str, Any]]] = {}
    finals: dict[str, list[dict[str, Any]]] = {}
    with tqdm(total=total, desc="forgetting benchmark (training runs)", position=0) as progress:
        for method in bench.methods:  # phase 1: learning-rate grid on the first seed
            grid[method.name], first = run_grid(bench, method, progress)
            finals[method.name] = [first]
        for method in bench.methods:  # phase 2: the other seeds at the chosen rate
            lr = finals[method.name][0]["lr"]
            for seed in seeds[1:]:
                finals[method.name].append(run_seed(bench, method, lr, seed))
                progress.update()
    chosen = {name: records[0]["lr"] for name, records in finals.items()}
    return {"base": base, "grid": grid, "chosen": chosen, "finals": finals}


def run_sweep(bench: Bench) -> dict[str, Any]:
    """The learn-forget frontier (``Protocol.sweep``): every rate of the method's grid on every seed, each trained
    model scored on the test split and the retention sets with its KL to the base, then each interpolation
    base + alpha x diff (``Protocol.alphas``) scored the same way.

    A run and its interpolations are one record, ``runs/sweep/<run>.json``, written once all of them are scored: a
    resumed sweep skips finished records and redoes at most the one it was in.
    """
    from tqdm.auto import tqdm

    from .interpolate import interpolations

    p = bench.protocol
    base = run_base(bench)
    specs = bench.specs[1:]  # the test split and the retention sets; no rate is chosen, so no validation
    runs: dict[str, list[dict[str, Any]]] = {method.name: [] for method in bench.methods}
    total = sum(len(bench.lr_grid(m)) for m in bench.methods) * len(p.seeds)
    # Seed-major: a sweep stopped part-way has whole frontiers of its first seeds rather than some methods on all.
    grid = [(seed, method, lr) for seed in p.seeds for method in bench.methods for lr in bench.lr_grid(method)]
    with tqdm(total=total, desc="forgetting sweep (training runs)", position=0) as progress:
        for seed, method, lr in grid:
            name = run_name(method.name, lr, seed)
            path = bench.runs_dir / "sweep" / f"{name}.json"
            record = _load_run(path)
            if record is None:
                record, model = _train(bench, method, lr, seed)
                if model is not None:
                    record["scores"], record["eval"] = _evaluate(bench, model, specs)
                    record["kl"] = bench.kl_to_base(model)
                    record["interpolations"] = []
                    workdir = bench.output / ".interpolation"
                    for alpha, mixed in interpolations(bench.base_model, model, p.alphas, workdir):
                        scores, timing = _evaluate(bench, mixed, specs)
                        record["interpolations"].append(
                            {"alpha": alpha, "scores": scores, "eval": timing, "kl": bench.kl_to_base(mixed)}
                        )
                del model
                _save_run(path, record)
            runs[method.name].append(record)
            progress.update()
    if "kl" not in base:
        base = {**base, "kl": {"general": 0.0, "task": 0.0}}
    return {"base": base, "runs": runs}
