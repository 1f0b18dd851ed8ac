"""TRL's training scripts with HFT: ``peft-hft sft`` / ``peft-hft dpo``.

``trl sft ... --use_peft`` can only build a ``LoraConfig``. These commands take exactly TRL's arguments (TRL's
``TrlParser`` over ``ScriptArguments``, ``SFTConfig``/``DPOConfig``, ``ModelConfig`` and ``DatasetMixtureConfig``, with
YAML files through ``--config``) plus the fields of :class:`~peft_hft.HFTConfig` as ``--hft_<field>`` (``hft_ratio``,
``hft_seed``, ...; the prefix keeps ``seed`` apart from the trainer's), then run TRL's own script
(``trl.scripts.sft.main`` / ``trl.scripts.dpo.main``) with an ``HFTConfig`` where TRL would put its LoRA config. Dataset
loading, evaluation, saving and ``push_to_hub`` are TRL's; the output directory holds a normal HFT adapter.

``--retention_steps N`` adds :class:`~peft_hft.RetentionCallback` to TRL's trainer: every N steps the KL to the starting
model and the perplexity on a general-text probe (``--retention_texts FILE``, one text per line; default: 16 Wikipedia
paragraphs from ``peft_hft.resources``) go into the trainer's logs, and ``retention.png`` into the output directory.

The HFT arguments are derived from ``HFTConfig``'s own dataclass fields, so a new config field becomes a flag without a
second definition. Multi-process runs go through accelerate as usual: ``accelerate launch -m peft_hft sft --config
...``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import typing
from collections.abc import Iterator, Sequence
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig

from ..tuner.config import HFTConfig
from ..utils import refuse_output_overlap

PREFIX = "hft_"
SCRIPTS = {"sft": "SFTConfig", "dpo": "DPOConfig"}
# HFTConfig fields that are not user settings for a training run (written by HFT or TRL, or for tests).
NOT_FLAGS = ("selected_parameters", "base_fingerprint", "trainable_token_indices", "modules_to_save", "init_weights")
_SIMPLE = (bool, int, float, str)


def _flag_type(hint: Any) -> Optional[Any]:
    """The type HfArgumentParser should parse for an HFTConfig field, or ``None`` if it cannot be a flag."""
    optional = False
    if typing.get_origin(hint) is Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        lists = [a for a in args if typing.get_origin(a) is list]
        if lists and all(a is str or typing.get_origin(a) is list for a in args):
            hint, optional = lists[0], True  # "a list of names or one regex": the list form on the command line
        elif len(args) == 1:
            hint = args[0]
        else:
            return None
    origin = typing.get_origin(hint)
    simple = hint in _SIMPLE or origin is Literal or (origin is list and typing.get_args(hint)[0] in _SIMPLE)
    if not simple:
        return None
    return Optional[hint] if optional else hint


def hft_arguments_class() -> type:
    """A dataclass with one ``hft_<field>`` per user-settable ``HFTConfig`` field (same defaults and help)."""
    hints = typing.get_type_hints(HFTConfig)
    base = {f.name for f in dataclasses.fields(PeftConfig)}
    specs = []
    for f in dataclasses.fields(HFTConfig):
        if f.name in base or f.name in NOT_FLAGS or not f.init:
            continue
        flag_type = _flag_type(hints[f.name])
        if flag_type is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            specs.append((PREFIX + f.name, flag_type, dataclasses.field(default_factory=f.default_factory,
                                                                         metadata=dict(f.metadata))))
        else:
            specs.append((PREFIX + f.name, flag_type, dataclasses.field(default=default, metadata=dict(f.metadata))))
    return dataclasses.make_dataclass("HFTArguments", specs)


def hft_config(hft_args: Any, model_args: Any) -> HFTConfig:
    """The ``HFTConfig`` of a run (``task_type`` CAUSAL_LM, as TRL's LoRA config uses)."""
    if getattr(model_args, "use_peft", False):
        raise ValueError(
            "--use_peft makes TRL build a LoRA adapter; peft-hft trains an HFT adapter. Fix: drop --use_peft and the "
            "--lora_* options (HFT's options are --hft_ratio, --hft_seed, ...), or use `trl` itself for LoRA."
        )
    kwargs = {f.name.removeprefix(PREFIX): getattr(hft_args, f.name) for f in dataclasses.fields(hft_args)}
    return HFTConfig(task_type="CAUSAL_LM", **kwargs)


@dataclasses.dataclass
class RetentionArguments:
    """``--retention_*``: watch forgetting while training (:class:`~peft_hft.RetentionCallback`)."""

    retention_steps: int = dataclasses.field(default=0, metadata={
        "help": "Log retention/kl_to_base, retention/ppl and retention/ppl_increase_pct on a general-text probe every "
                "this many steps, and write retention.png to the output directory (0: off)."})
    retention_texts: Optional[str] = dataclasses.field(default=None, metadata={
        "help": "Text file of probe texts, one per line (default: 16 Wikipedia paragraphs, no Hub access)."})
    retention_top_k: int = dataclasses.field(default=256, metadata={
        "help": "Reference log-probabilities kept per probe token (0: the full vocabulary, the exact KL)."})


def retention_callback(args: RetentionArguments) -> Optional[Any]:
    """The callback ``args`` ask for, or None when ``--retention_steps`` is 0."""
    if args.retention_steps < 0:
        raise ValueError(f"--retention_steps must be 0 (off) or a number of steps, got {args.retention_steps}.")
    if args.retention_steps == 0:
        return None
    from pathlib import Path

    from .retention import RetentionCallback

    texts = None
    if args.retention_texts is not None:
        path = Path(args.retention_texts)
        if not path.is_file():
            raise FileNotFoundError(f"--retention_texts {path} does not exist; pass a text file, one text a line.")
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return RetentionCallback(every=args.retention_steps, texts=texts, top_k=args.retention_top_k or None)


@contextlib.contextmanager
def _trainer_with_callback(script: str, callback: Optional[Any]) -> Iterator[None]:
    """Let TRL's script build its trainer with ``callback`` added (it imports the trainer class from ``trl``)."""
    if callback is None:
        yield
        return
    import trl

    name = {"sft": "SFTTrainer", "dpo": "DPOTrainer"}[script]
    original = getattr(trl, name)

    class WithRetention(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), callback]
            super().__init__(*args, **kwargs)

    WithRetention.__name__ = WithRetention.__qualname__ = name
    setattr(trl, name, WithRetention)
    try:
        yield
    finally:
        setattr(trl, name, original)


def make_parser(script: str, prog: Optional[str] = None):
    """TRL's parser of ``trl <script>`` (``sft`` or ``dpo``) with HFT's arguments added."""
    import trl

    if script not in SCRIPTS:
        raise ValueError(f"Unknown TRL script {script!r}; peft-hft runs {sorted(SCRIPTS)}.")
    dataclass_types = (
        trl.ScriptArguments, getattr(trl, SCRIPTS[script]), trl.ModelConfig, trl.DatasetMixtureConfig,
        hft_arguments_class(), RetentionArguments,
    )
    return trl.TrlParser(dataclass_types, prog=prog or f"peft-hft {script}")


@contextlib.contextmanager
def _peft_config_for_trl(config: HFTConfig) -> Iterator[None]:
    """Let TRL's script find ``config`` where it asks ``trl.get_peft_config(model_args)`` for its LoRA config."""
    import trl

    had = "get_peft_config" in vars(trl)
    previous = vars(trl).get("get_peft_config")
    trl.get_peft_config = lambda model_args: config
    try:
        yield
    finally:
        if had:
            trl.get_peft_config = previous
        else:
            del trl.get_peft_config


def run(script: str, argv: Sequence[str]) -> int:
    """Parse ``argv`` like ``trl <script>`` (plus ``--hft_*``) and run TRL's script with an HFT adapter."""
    parser = make_parser(script)
    parsed = parser.parse_args_and_config(list(argv))
    script_args, training_args, model_args, dataset_args, hft_args, retention_args = parsed
    # the trainer writes its checkpoints, adapter and card into output_dir (and deletes old checkpoint-* there)
    if training_args.output_dir:
        refuse_output_overlap(training_args.output_dir, {
            "--model_name_or_path": model_args.model_name_or_path, "--dataset_name": script_args.dataset_name,
        })
    config = hft_config(hft_args, model_args)
    callback = retention_callback(retention_args)
    module = importlib.import_module(f"trl.scripts.{script}")
    with _peft_config_for_trl(config), _trainer_with_callback(script, callback):
        module.main(script_args, training_args, model_args, dataset_args)
    return 0
