"""The benchmark protocol: every setting that changes a number, fixed up front and stored with the results.

A results directory belongs to one protocol. Its ``protocol.json`` is written before the first run; a later
invocation with other settings refuses to mix its runs in (a silently mixed table would be wrong), while the same
settings resume where the last invocation stopped.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .tasks import RETENTION_TASKS

SCORERS = ("lm-eval", "packed")


@dataclass
class Protocol:
    """Settings of one forgetting benchmark (see ``docs/forgetting.md`` for the reasoning behind the defaults)."""

    model: str = "default"  # "default" (embedded SmolLM2-135M-Instruct), "tiny" (quick mode) or a local path
    task: str = "sarcasm"
    methods: list[str] = field(default_factory=lambda: ["fft", "hft", "hft_r0.25", "hft_r0.75", "hft_model", "lora"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # Learning-rate grids, two points half a decade apart. Full fine-tuning and HFT update base weights and share
    # one; LoRA trains freshly initialised low-rank factors (scaled by alpha/r = 0.5) and needs larger steps.
    full_lr_grid: list[float] = field(default_factory=lambda: [3e-5, 1e-4])
    lora_lr_grid: list[float] = field(default_factory=lambda: [3e-4, 1e-3])
    prompt: str = "compact"
    # 100 steps of 8 keep the full protocol within about two hours on 2 CPU cores (docs/forgetting.md, Budget).
    steps: int = 100
    batch_size: int = 8
    max_length: int = 96
    loss: str = "full"
    warmup: float = 0.1
    # "auto" (bf16 autocast where the hardware has native bf16, else fp32) is resolved before the protocol is bound:
    # protocol.json records the precision that ran, and a machine that resolves differently cannot resume it.
    precision: str = "auto"
    val_size: int = 150
    test_size: int = 300
    retention: list[str] = field(default_factory=lambda: list(RETENTION_TASKS))
    retention_limits: dict[str, Optional[int]] = field(
        default_factory=lambda: {"wikipedia": 150, "mmlu": 150, "socialiqa": 150}
    )
    eval_batch_size: int = 16
    # "lm-eval": lm-eval's own requests; "packed": the same metrics from the package's batched scorers (one forward
    # pass per multiple-choice item, lm-eval's perplexity windows batched by tokens; peft_hft.bench.evaluate, tested
    # against lm-eval), about half the scoring time. Older results directories ran lm-eval, the default.
    scorer: str = "lm-eval"
    # Calibration of the importance-ranked HFT methods (peft_hft.calibrate): this many sequences, as batches of
    # ``batch_size``: the first C4 documents of llamafactory's c4_demo.jsonl cut to ``calibration_max_length`` tokens
    # (general text: "wanda", "fisher"), or the run's own first training batches (the new task: "gradient").
    calibration_sequences: int = 32
    calibration_max_length: int = 128
    # Mean token KL(tuned || base) of every evaluated model (peft_hft.RetentionProbe, the RetentionCallback's helper):
    # on ``kl_texts`` held-out general texts (the last C4 documents of c4_demo.jsonl, never the calibration ones) at
    # every token, cut to ``kl_max_length`` tokens, and on the first ``kl_task_prompts`` test prompts of the new task
    # at the answer position; the base's top ``kl_top_k`` log-probabilities per position are kept (0: all, exact KL).
    kl_texts: int = 64
    kl_max_length: int = 128
    kl_task_prompts: int = 100
    kl_top_k: int = 256
    # The learn-forget frontier: every rate of the grids on every seed (no choice on validation), and for each run the
    # post-hoc interpolations base + alpha x diff for each of ``alphas`` (docs/forgetting.md, the frontier).
    sweep: bool = False
    alphas: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])

    def validate(self) -> None:
        """Reject settings that cannot give a meaningful benchmark, with the fix in the message."""
        from ..utils import PRECISIONS
        from .newtask import LOSS_MODES, PROMPT_STYLES

        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and non-empty, got {self.seeds}.")
        if self.steps < 1 or self.batch_size < 1 or self.max_length < 8:
            raise ValueError("steps and batch_size must be >= 1 and max_length >= 8.")
        if not self.full_lr_grid or not self.lora_lr_grid or min(self.full_lr_grid + self.lora_lr_grid) <= 0:
            raise ValueError("Learning-rate grids must be non-empty lists of positive numbers.")
        if self.prompt not in PROMPT_STYLES:
            raise ValueError(f"prompt must be one of {PROMPT_STYLES}, got {self.prompt!r}.")
        if self.loss not in LOSS_MODES:
            raise ValueError(f"loss must be one of {LOSS_MODES}, got {self.loss!r}.")
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {self.scorer!r}.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}.")
        if self.calibration_sequences < 1 or self.calibration_max_length < 8:
            raise ValueError("calibration_sequences must be >= 1 and calibration_max_length >= 8.")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a share of the steps in [0, 1), got {self.warmup}.")
        from .newtask import GENERAL_TEXT_DOCUMENTS

        if not 1 <= self.kl_texts <= GENERAL_TEXT_DOCUMENTS - self.calibration_sequences:
            raise ValueError(
                f"kl_texts must be between 1 and {GENERAL_TEXT_DOCUMENTS - self.calibration_sequences} (the C4 "
                f"documents left after the {self.calibration_sequences} calibration ones), got {self.kl_texts}."
            )
        if self.kl_task_prompts < 1 or self.kl_max_length < 8 or self.kl_top_k < 0:
            raise ValueError("kl_task_prompts must be >= 1, kl_max_length >= 8 and kl_top_k >= 0 (0: the exact KL).")
        if self.sweep and "wikipedia" not in self.retention:
            raise ValueError("The sweep plots the Wikipedia perplexity increase: keep 'wikipedia' in --retention.")
        if self.sweep and any(not 0 < a < 1 for a in self.alphas):
            raise ValueError(f"The sweep's interpolation factors lie strictly between 0 and 1, got {self.alphas}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Protocol:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def quick_protocol(**overrides: Any) -> Protocol:
    """A protocol that exercises every code path in seconds: tiny model, a few steps, tiny evaluation subsets."""
    settings: dict[str, Any] = dict(
        model="tiny",
        seeds=[0, 1],
        full_lr_grid=[1e-3, 1e-2],
        lora_lr_grid=[1e-2, 3e-2],
        steps=4,
        batch_size=4,
        max_length=64,
        precision="fp32",
        val_size=12,
        test_size=12,
        retention_limits={name: 12 for name in RETENTION_TASKS},
        eval_batch_size=32,
    )
    settings.update(overrides)
    return Protocol(**settings)


def sweep_protocol(**overrides: Any) -> Protocol:
    """The learn-forget frontier (docs/forgetting.md): FFT, HFT's random half, HFT ranked by spectral SNR and LoRA, each
    at four learning rates spanning "barely learns" to "learns most", 3 seeds, completion loss, interpolations at
    alpha 0.25 / 0.5 / 0.75, Wikipedia perplexity as the forgetting measure, scored by the packed scorers (each run is
    scored four times: the model and three interpolations)."""
    settings: dict[str, Any] = dict(
        methods=["fft", "hft", "hft_snr", "lora"],
        full_lr_grid=[1e-5, 3e-5, 1e-4, 3e-4],
        lora_lr_grid=[1e-4, 3e-4, 1e-3, 3e-3],
        loss="completion",
        retention=["wikipedia"],
        scorer="packed",
        sweep=True,
    )
    settings.update(overrides)
    return Protocol(**settings)


def bind(protocol: Protocol, output: Path) -> None:
    """Tie ``output`` to ``protocol``: write ``protocol.json`` or check that the stored one is the same.

    The precision recorded and compared is the resolved one (``"fp32"`` or ``"bf16"``; ``"auto"`` is resolved here
    for this machine's default device if the caller has not, see :func:`peft_hft.utils.resolve_precision`): results
    computed in one precision are never mixed with results of the other.
    """
    from ..utils import resolve_precision

    output.mkdir(parents=True, exist_ok=True)
    path = output / "protocol.json"
    wanted = json.loads(json.dumps(protocol.to_dict()))
    if wanted["precision"] == "auto":
        wanted["precision"] = resolve_precision("auto").precision
    if path.exists():
        stored = json.loads(path.read_text())
        # the methods are independent runs: running a subset, or adding one later, keeps the protocol
        stored["methods"] = wanted["methods"]
        # a setting added to Protocol after the file was written, left at its default, is the protocol it ran under
        defaults = {**json.loads(json.dumps(Protocol().to_dict())), "precision": wanted["precision"]}
        for key, value in wanted.items():
            if key not in stored and value == defaults.get(key):
                stored[key] = value
        if stored != wanted:
            diff = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
            if "precision" in diff:
                raise ValueError(
                    f"{output} holds results computed in {stored.get('precision')}, and this run resolves its "
                    f"precision to {wanted['precision']} (differs in: {', '.join(diff)}). Mixing them would compare "
                    f"runs under different arithmetic. Pass --precision {stored.get('precision')} to resume those "
                    "results on this machine, or use another --output directory for this precision."
                )
            raise ValueError(
                f"{output} holds results of a different protocol (differs in: {', '.join(diff)}). Use another "
                "--output directory, or pass the same settings to resume."
            )
        return
    from ..utils import atomic_write

    atomic_write(path, (json.dumps(wanted, indent=2) + "\n").encode())
