"""Configuration of Half Fine-Tuning (HFT) adapters."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ..format.encoding import EncodingError, parse_encoding
from ..utils import FLOAT_DTYPES
from .peft_type import hft_peft_type

STRATEGIES = ("category", "layer", "model", "param_count")
ORIGINALS_DEVICES = ("cpu", "device")
DIFF_DTYPES = FLOAT_DTYPES
# Task types for which PEFT wraps the task head in a ModulesToSaveWrapper (PeftModelForSequenceClassification etc.).
_WRAPPED_HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


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
            adapter with ``fp32_master_weights`` (they carry the fp32 master: a reload restores the trained weights
            bit-exactly, and training resumes from the master) and each tensor's own dtype otherwise.
            ``"bfloat16"`` halves the file of a bf16 adapter (the diff of the bf16 weight; a reload reproduces all
            but a few elements, which are one ulp off, see docs/concepts.md) or of an fp32 adapter.
        diff_encoding: How the diffs are stored (docs/adapter-format.md, "Encodings"). ``None`` (default) resolves
            at save time to ``"exact"`` for bf16/fp16 tensors (lossless: the trained weights as int8 counts of ulp
            steps from the base, with the rare larger moves stored apart; about a quarter of fp32 diffs; a trainable
            reload seeds the fp32 masters from the weights) and to ``"float"`` otherwise (or when ``diff_dtype`` is
            set). ``"float"`` stores plain diffs (``diff_dtype``; for bf16 tensors with masters, fp32 diffs that carry
            the masters, so training resumes from them exactly). Lossy, explicit: ``"int8"``/``"int4"``
            (blockwise, ``"int4:128"`` for blocks of 128), ``"dare:0.9"`` (drop 90% and rescale, seeded),
            ``"sign"`` (one bit and a scale per row). The resolved value is saved in ``adapter_config.json``.
        fp32_master_weights: ``True`` (default) keeps an fp32 master value of every trained bf16/fp16 tensor, which
            the optimizer steps while the model computes, saves and merges in its own dtype; without it, updates
            smaller than half a bf16 ulp (about 0.2% of a weight) round away, which at lr 1e-5 is most of them. Costs
            4 bytes per trained parameter on the training device (see docs/concepts.md). ``False`` trains the tensors
            in their own dtype, for engines that keep fp32 master weights themselves (DeepSpeed bf16/ZeRO never
            gets a second copy either way; FSDP2 with fp32 parameters needs none); it warns when a low-precision
            model is trained so. No effect on fp32 models.
        init_weights: ``True`` (default) starts from the base model exactly. ``False`` perturbs the selected tensors
            with small random noise, which mimics a trained adapter; only useful for tests.
        modules_to_save: Modules trained in full and saved (as diffs) in addition to the selection. TRL fills this in
            when a chat template adds tokens.
        trainable_token_indices: Accepted for compatibility with TRL. HFT trains whole embedding matrices, which
            includes these rows; the embedding tensors are added to the selection.
        base_fingerprint: Written when the adapter is saved, never set by hand: the base model's id and revision and
            a SHA-256 digest of every base tensor the adapter modifies. Loading and merging check the base against it
            (see ``peft_hft.format.fingerprint`` and docs/adapter-format.md).
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
    diff_encoding: Optional[str] = field(
        default=None, metadata={"help": "How diffs are stored: exact (default for bf16/fp16), float, int8, int4, "
                                        "dare:P, sign."}
    )
    fp32_master_weights: bool = field(
        default=True, metadata={"help": "Keep fp32 master values of trained bf16/fp16 tensors for the optimizer."}
    )
    init_weights: bool = field(default=True, metadata={"help": "False perturbs the selection (tests only)."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained in full in addition to the selection."}
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None, metadata={"help": "Accepted for TRL; HFT trains the whole embedding matrix."}
    )
    base_fingerprint: Optional[dict] = field(
        default=None, repr=False, metadata={"help": "Base model id/revision and SHA-256 of the modified base tensors."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()

        self.peft_type = hft_peft_type()
        self._validate()

    def _validate(self) -> None:
        """Reject bad values up front, before any model is touched."""
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or math.isnan(self.ratio):
            raise ValueError(f"HFTConfig.ratio must be a number in (0, 1], got {self.ratio!r}.")
        if not 0 < self.ratio <= 1:
            raise ValueError(
                f"HFTConfig.ratio must be in (0, 1], got {self.ratio}. Use ratio=0.5 for the paper's setting, or "
                "ratio=1.0 to train every tensor."
            )
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"Unknown HFTConfig.strategy {self.strategy!r}. Choose one of {', '.join(map(repr, STRATEGIES))}; "
                "'category' is the paper's method."
            )
        if self.originals_device not in ORIGINALS_DEVICES:
            raise ValueError(
                f"HFTConfig.originals_device must be 'cpu' or 'device', got {self.originals_device!r}."
            )
        if self.diff_dtype is not None and self.diff_dtype not in DIFF_DTYPES:
            raise ValueError(
                f"HFTConfig.diff_dtype must be None (the default) or one of {DIFF_DTYPES}, "
                f"got {self.diff_dtype!r}."
            )
        if self.diff_encoding is not None:
            try:
                parse_encoding(self.diff_encoding)
            except EncodingError as exc:
                raise ValueError(f"HFTConfig.diff_encoding: {exc}") from None
        if not isinstance(self.fp32_master_weights, bool):
            raise ValueError(
                f"HFTConfig.fp32_master_weights must be True or False, got {self.fp32_master_weights!r}."
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"HFTConfig.seed must be an int, got {self.seed!r}.")
        if str(getattr(self.task_type, "value", self.task_type)) in _WRAPPED_HEAD_TASKS:
            raise ValueError(
                f"HFTConfig(task_type={self.task_type!r}) would make PEFT wrap the task head ('score', 'classifier' "
                "or 'qa_outputs') in a ModulesToSaveWrapper: a second, separately trained copy that HFT does not "
                "manage. HFT trains the head in place already (with train_embeddings=True, the default). Fix: leave "
                "task_type unset (e.g. for TRL's RewardTrainer); to train the head with train_embeddings=False, pass "
                "modules_to_save=['score'] (or the head's name)."
            )
        if self.selected_parameters is not None:
            if isinstance(self.selected_parameters, str) or not all(
                isinstance(name, str) for name in self.selected_parameters
            ):
                raise ValueError(
                    "HFTConfig.selected_parameters must be a list of parameter names such as "
                    "'model.layers.0.self_attn.q_proj.weight'."
                )
            if not self.selected_parameters:
                raise ValueError(
                    "HFTConfig.selected_parameters is empty: an HFT adapter must train at least one tensor. "
                    "Leave it as None to let the strategy choose."
                )
            self.selected_parameters = list(self.selected_parameters)
        if self.calibration is not None:
            if not isinstance(self.calibration, dict):
                raise ValueError(
                    "HFTConfig.calibration is written by peft_hft.calibrate and must be a dict or None, got "
                    f"{type(self.calibration).__name__}."
                )
            if self.selected_parameters is None:
                raise ValueError(
                    "HFTConfig.calibration records how selected_parameters was chosen, but selected_parameters is "
                    "unset. Fix: build the config with peft_hft.calibrate(model, dataloader, ...), or drop calibration."
                )
        if self.base_fingerprint is not None and not isinstance(self.base_fingerprint, dict):
            raise ValueError(
                "HFTConfig.base_fingerprint is written by save_pretrained and must be a dict or None, got "
                f"{type(self.base_fingerprint).__name__}."
            )
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, set):
                setattr(self, name, sorted(value))
