"""Configuration of Half Fine-Tuning (HFT) adapters."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig

from ..format.encoding import EncodingError, parse_encoding
from ..utils import FLOAT_DTYPES
from .peft_type import hft_peft_type
from .precision import MASTER_WEIGHTS, resolve_master_weights

STRATEGIES = ("category", "layer", "model", "param_count")
ORIGINALS_DEVICES = ("cpu", "device")
DIFF_DTYPES = FLOAT_DTYPES
# Task types for which PEFT wraps the task head in a ModulesToSaveWrapper (PeftModelForSequenceClassification etc.).
_WRAPPED_HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")

# Fields given as collections: sets and tuples are accepted and stored as lists (adapter_config.json is JSON).
_SEQUENCE_FIELDS = ("target_modules", "exclude_modules", "modules_to_save", "selected_parameters")


@dataclass(frozen=True)
class FieldRule:
    """What one ``HFTConfig`` field accepts: ``accepts(value)`` and the words for the error message."""

    accepts: Callable[[Any], bool]
    expected: str

    def message(self, name: str, value: Any) -> str:
        return f"HFTConfig.{name} must be {self.expected}, got {value!r} ({type(value).__name__})."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and not (isinstance(value, float) and math.isnan(value))


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_indices(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(item) for item in value)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and value in choices


def _choices(choices: tuple[str, ...]) -> str:
    return ", ".join(map(repr, choices))


# The one table of what each HFTConfig field accepts (checked in this order when a config is created, also when one
# is read from adapter_config.json). A new field is one line here; tests/tuner/test_config.py fails for a field
# without one.
FIELD_RULES: dict[str, FieldRule] = {
    "ratio": FieldRule(_is_number, "a number in (0, 1] (the share of tensors to train; 0.5 is the paper's)"),
    "strategy": FieldRule(_one_of(STRATEGIES), f"one of {_choices(STRATEGIES)} ('category' is the paper's method)"),
    "seed": FieldRule(_is_int, "an int"),
    "train_embeddings": FieldRule(lambda v: isinstance(v, bool), "True or False"),
    "target_modules": FieldRule(
        _optional(lambda v: isinstance(v, str) or _is_names(v)),
        "None, a list of module names or suffixes, or one regex string",
    ),
    "exclude_modules": FieldRule(
        _optional(lambda v: isinstance(v, str) or _is_names(v)),
        "None, a list of module names or suffixes, or one regex string",
    ),
    "layers_pattern": FieldRule(_optional(lambda v: isinstance(v, str)), "None or the name of one nn.ModuleList"),
    "selected_parameters": FieldRule(
        _optional(_is_names),
        "a list of parameter names such as 'model.layers.0.self_attn.q_proj.weight' (or None: the strategy chooses)"
    ),
    "calibration": FieldRule(
        _optional(lambda v: isinstance(v, dict)), "None or a dict (it is written by peft_hft.calibrate)"
    ),
    "originals_device": FieldRule(_one_of(ORIGINALS_DEVICES), "'cpu' or 'device'"),
    "diff_dtype": FieldRule(_optional(_one_of(DIFF_DTYPES)), f"None (the default) or one of {_choices(DIFF_DTYPES)}"),
    "master_weights": FieldRule(
        _optional(_one_of(MASTER_WEIGHTS)),
        f"None or one of {_choices(MASTER_WEIGHTS)} ('kahan', the default, keeps 2 bytes per trained parameter, "
        "'fp32' 4, 'fp32_offload' 4 in host memory, 'kahan8' 1, 'stochastic_rounding' none)",
    ),
    "diff_encoding": FieldRule(
        _optional(lambda v: isinstance(v, str)),
        "None (the default: 'exact' for bf16/fp16 tensors) or an encoding name such as 'float', 'int8', 'int4', "
        "'dare:0.9' or 'sign'",
    ),
    "fp32_master_weights": FieldRule(_optional(lambda v: isinstance(v, bool)), "None, True or False"),
    "init_weights": FieldRule(lambda v: isinstance(v, bool), "True or False"),
    "modules_to_save": FieldRule(_optional(_is_names), "None or a list of module names"),
    "trainable_token_indices": FieldRule(
        _optional(lambda v: _is_indices(v) or (
            isinstance(v, dict) and all(isinstance(k, str) and _is_indices(i) for k, i in v.items())
        )),
        "None, a list of token ids, or a dict of module name -> list of token ids",
    ),
    "base_fingerprint": FieldRule(
        _optional(lambda v: isinstance(v, dict)), "None or a dict (it is written by save_pretrained)"
    ),
    "scaling": FieldRule(
        _optional(lambda v: isinstance(v, dict)), "None or a dict (it is written by peft_hft.scale_adapter)"
    ),
}


@dataclass
class HFTConfig(PeftConfig):
    """Configuration for Half Fine-Tuning (Hui et al., ACL 2025, arXiv:2404.18466).

    HFT trains a chosen half of a model's weight tensors in full and freezes the other half, without changing the
    architecture. The chosen tensors are trained in place; the saved adapter holds, for each of them, the difference
    between the tuned and the original tensor.

    Args:
        ratio: Share of tensors to train, in (0, 1]. The paper's best value is 0.5.
        strategy: How the tensors are chosen:
            ``"category"`` (default, the paper's method): in every transformer block, ``ratio`` of the attention
            matrices, of the feed-forward matrices and of the norms, chosen at random. Where ``ratio`` times the
            number of tensors of a category is fractional, blocks alternate between rounding down and up so that the
            model-wide share is ``ratio`` to within one tensor.
            ``"param_count"``: like ``"category"``, but balances parameter counts instead of tensor counts, which
            matters when matrices differ in size (grouped-query attention, MoE routers).
            ``"layer"``: ``ratio`` of the blocks are trained entirely (the paper's layer-level ablation).
            ``"model"``: ``ratio`` of all block tensors, drawn model-wide (the paper's model-level ablation).
        seed: Seed of the selection. The selection depends on the seed and the model's structure only, so every
            process of a distributed run draws the same one.
        train_embeddings: Train the input embeddings, the output embeddings (``lm_head``, or the task head
            ``score``/``classifier``/``qa_outputs`` of a classification model) and the norms outside the blocks (the
            final norm) in full, as the paper does (freezing them hurt).
        target_modules: Restricts the pool of block tensors to modules whose names match (a list of names or suffixes,
            or a regex matched against the full module name, as in PEFT).
        exclude_modules: Modules never trained (same matching rules), also applied to the embeddings.
        layers_pattern: Name of the ``nn.ModuleList`` that holds the transformer blocks, for models where it is not
            found automatically.
        selected_parameters: The resolved selection: fully qualified parameter names, e.g.
            ``model.layers.0.self_attn.q_proj.weight``. Filled in when the adapter is created and saved with it. If
            given, it is used as is (a custom selection) and the strategy is not consulted.
        calibration: Written by :func:`peft_hft.calibrate`, never set by hand: how ``selected_parameters`` was chosen
            (the importance strategy, the structure it kept, and how much calibration data it saw). ``None`` for the
            random draw. Informational: loading an adapter uses ``selected_parameters`` as saved.
        originals_device: Where the original values of the trained tensors are kept (needed for the diffs, for
            ``disable_adapter`` and for ``unmerge``): ``"cpu"`` (default) keeps them in host memory, off the
            accelerator; ``"device"`` keeps them beside the weights, which makes ``disable_adapter`` free (useful for
            DPO's reference passes) at the cost of device memory for half the model.
        diff_dtype: Dtype of the saved diffs. ``None`` (default) saves float32 diffs for the bf16/fp16 tensors of an
            adapter with ``master_weights="fp32"``, ``"fp32_offload"``, ``"kahan"`` or ``"kahan8"`` (they carry the
            exact value: a reload restores the trained weights bit-exactly, and training resumes from the master or
            error buffer) and each tensor's own dtype otherwise.
            ``"bfloat16"`` halves the file of a bf16 adapter (the diff of the bf16 weight; a reload reproduces all
            but a few elements, which are one ulp off, see docs/concepts.md) or of an fp32 adapter.
        master_weights: What keeps the small updates of the trained bf16/fp16 tensors, which the optimizer would
            otherwise write straight into low-precision weights (updates smaller than half a bf16 ulp, about 0.2% of
            a weight, round away; at lr 1e-5 most do). The model computes, saves and merges in its own dtype either
            way. Bytes per trained parameter on the training device, between steps:
            ``"kahan"`` (default): compensated bf16, a 2-byte buffer holding what the weight lacks of the exact
            value: for bf16 weights the lower half of the fp32 pattern, so weight and buffer are the fp32 master
            bit for bit (2 bytes); for fp16 weights the error in fp16 (close to exact: an error below fp16's normal
            range keeps a resolution of 2^-24).
            ``"fp32"``: an fp32 master value the optimizer steps (4 bytes); exact, also for fp16 weights.
            ``"fp32_offload"``: the same fp32 master in host memory, stepped there, so the optimizer's state is
            created in host memory too (0 bytes on the accelerator; 4 in host memory, plus the state): "fp32"'s
            update, with each trained tensor's gradient copied to the host and its weight back at every step, and
            the step on the host's cores (the offloaded preset, ``peft_hft.low_memory_preset(offload=True)``: half
            of an 8B model in 23.4 GiB of GPU memory with default HFT's learning; README).
            ``"kahan8"``: compensated bf16 in 1 byte: weight and an int8 buffer hold the value to 24 bits (2^-8 of
            a bf16 ulp), each step's result rounded to them stochastically, unbiased, with 1/256 of the noise of
            ``"stochastic_rounding"`` (bf16 models only).
            ``"stochastic_rounding"``: no buffer (0 bytes); each step's fp32 result is rounded to bf16 up or down at
            random, unbiased, so small updates survive on average but add noise (bf16 models only).
            ``"none"``: the tensors train in their own dtype (0 bytes), for engines that keep fp32 master weights
            themselves (DeepSpeed bf16/ZeRO never gets a second copy either way; FSDP2 with fp32 parameters needs
            none); it warns when a low-precision model is trained so.
            No effect on fp32 models, which keep no masters. Measurements: docs/benchmarks.md ("Master values").
        diff_encoding: How the diffs are stored (docs/adapter-format.md, "Encodings"). ``None`` (default) resolves
            at save time to ``"exact"`` for bf16/fp16 tensors (lossless: the trained weights as int8 counts of ulp
            steps from the base, with the rare larger moves stored apart; about a quarter of fp32 diffs; a trainable
            reload seeds the fp32 masters from the weights) and to ``"float"`` otherwise (or when ``diff_dtype`` is
            set). ``"float"`` stores plain diffs (``diff_dtype``; for bf16 tensors with masters, fp32 diffs that carry
            the masters, so training resumes from them exactly). Lossy, explicit: ``"int8"``/``"int4"``
            (blockwise, ``"int4:128"`` for blocks of 128), ``"dare:0.9"`` (drop 90% and rescale, seeded),
            ``"sign"`` (one bit and a scale per row). The resolved value is saved in ``adapter_config.json``.
        fp32_master_weights: The older spelling, kept working: ``True`` means ``master_weights="fp32"``, ``False``
            means ``"none"``. If both are given and contradict each other, ``master_weights`` wins (with a warning).
            After construction it reads ``master_weights == "fp32"`` (so ``False`` for the default ``"kahan"`` too:
            read ``master_weights`` to know what is kept).
        init_weights: ``True`` (default) starts from the base model exactly. ``False`` perturbs the selected tensors
            with small random noise, which mimics a trained adapter; only useful for tests.
        modules_to_save: Modules trained in full and saved (as diffs) in addition to the selection. TRL fills this in
            when a chat template adds tokens.
        trainable_token_indices: Accepted for compatibility with TRL. HFT trains whole embedding matrices, which
            includes these rows; the embedding tensors are added to the selection.
        base_fingerprint: Written when the adapter is saved, never set by hand: the base model's id and revision and
            a digest (XXH3-128) of every base tensor the adapter modifies. Loading and merging check the base against it
            (see ``peft_hft.format.fingerprint`` and docs/adapter-format.md).
        scaling: Written by ``peft_hft.scale_adapter`` (``peft-hft scale``), never set by hand: the factor alpha the
            diffs were multiplied by, relative to the original fine-tune, and each step of the chain. The diffs
            already hold the scaled values; loading applies them as they are.
    """

    ratio: float = field(default=0.5, metadata={"help": "Share of tensors to train, in (0, 1]."})
    strategy: Literal["category", "layer", "model", "param_count"] = field(
        default="category", metadata={"help": f"Selection strategy, one of {STRATEGIES}."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the selection."})
    train_embeddings: bool = field(
        default=True, metadata={"help": "Train embeddings, lm_head and the final norm in full."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Restrict the pool of block tensors to these modules."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules that are never trained."}
    )
    layers_pattern: Optional[str] = field(
        default=None, metadata={"help": "Name of the ModuleList holding the transformer blocks."}
    )
    selected_parameters: Optional[list[str]] = field(
        default=None, metadata={"help": "Resolved selection (fully qualified parameter names)."}
    )
    calibration: Optional[dict] = field(
        default=None, metadata={"help": "How selected_parameters was chosen by peft_hft.calibrate (None: random)."}
    )
    originals_device: Literal["cpu", "device"] = field(
        default="cpu", metadata={"help": "Where the original values of trained tensors are kept."}
    )
    diff_dtype: Optional[str] = field(default=None, metadata={"help": f"Dtype of saved diffs, one of {DIFF_DTYPES}."})
    master_weights: Optional[Literal["fp32", "fp32_offload", "kahan", "kahan8", "stochastic_rounding", "none"]] = field(
        default=None,
        metadata={"help": f"What keeps small updates of trained bf16/fp16 tensors, one of {MASTER_WEIGHTS} "
                          "(None: from fp32_master_weights, default 'kahan')."},
    )
    diff_encoding: Optional[str] = field(
        default=None, metadata={"help": "How diffs are stored: exact (default for bf16/fp16), float, int8, int4, "
                                        "dare:P, sign."}
    )
    fp32_master_weights: Optional[bool] = field(
        default=None, metadata={"help": "Older spelling of master_weights: True = 'fp32', False = 'none'."}
    )
    init_weights: bool = field(default=True, metadata={"help": "False perturbs the selection (tests only)."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained in full in addition to the selection."}
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None, metadata={"help": "Accepted for TRL; HFT trains the whole embedding matrix."}
    )
    base_fingerprint: Optional[dict] = field(
        default=None, repr=False, metadata={"help": "Base model id/revision and digests of the modified base tensors."}
    )
    scaling: Optional[dict] = field(
        default=None, metadata={"help": "How peft_hft.scale_adapter scaled the diffs (None: as trained)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()

        self.peft_type = hft_peft_type()
        self._validate()

    def _validate(self) -> None:
        """Reject bad values up front, before any model is touched: the type of every field (:data:`FIELD_RULES`),
        then the rules that tie values together."""
        for name in _SEQUENCE_FIELDS:  # sets and tuples are stored as lists, so the config stays JSON
            value = getattr(self, name)
            if isinstance(value, (set, frozenset)):
                setattr(self, name, sorted(value))
            elif isinstance(value, tuple):
                setattr(self, name, list(value))
        for name, rule in FIELD_RULES.items():
            value = getattr(self, name)
            if not rule.accepts(value):
                raise ValueError(rule.message(name, value))
        if not 0 < self.ratio <= 1:
            raise ValueError(
                f"HFTConfig.ratio must be in (0, 1], got {self.ratio}. Use ratio=0.5 for the paper's setting, or "
                "ratio=1.0 to train every tensor."
            )
        if self.diff_encoding is not None:
            try:
                parse_encoding(self.diff_encoding)
            except EncodingError as exc:
                raise ValueError(f"HFTConfig.diff_encoding: {exc}") from None
        self.master_weights = resolve_master_weights(self.master_weights, self.fp32_master_weights)
        self.fp32_master_weights = self.master_weights == "fp32"
        if str(getattr(self.task_type, "value", self.task_type)) in _WRAPPED_HEAD_TASKS:
            raise ValueError(
                f"HFTConfig(task_type={self.task_type!r}) would make PEFT wrap the task head ('score', 'classifier' "
                "or 'qa_outputs') in a ModulesToSaveWrapper: a second, separately trained copy that HFT does not "
                "manage. HFT trains the head in place already (with train_embeddings=True, the default). Fix: leave "
                "task_type unset (e.g. for TRL's RewardTrainer); to train the head with train_embeddings=False, pass "
                "modules_to_save=['score'] (or the head's name)."
            )
        if self.selected_parameters is not None:
            if not self.selected_parameters:
                raise ValueError(
                    "HFTConfig.selected_parameters is empty: an HFT adapter must train at least one tensor. "
                    "Leave it as None to let the strategy choose."
                )
            self.selected_parameters = list(self.selected_parameters)
        if self.calibration is not None:
            if self.selected_parameters is None:
                raise ValueError(
                    "HFTConfig.calibration records how selected_parameters was chosen, but selected_parameters is "
                    "unset. Fix: build the config with peft_hft.calibrate(model, dataloader, ...), or drop calibration."
                )
