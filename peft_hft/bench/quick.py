"""The quick mode's model: a 2-block Llama with hidden size 32 and a small byte-level BPE tokenizer trained on the
benchmark's own texts, both built in a second without any download. Its scores mean nothing; it exists so that every
code path of the benchmark (training, lm-eval scoring, resuming, tables, plots) can be checked in seconds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch

VOCAB_SIZE = 384
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def tiny_tokenizer(
    texts: Sequence[str],
    roles: Mapping[str, str] = SPECIAL,
    special_tokens: Optional[Sequence[str]] = None,
    chat_template: Optional[str] = None,
) -> Any:
    """A byte-level BPE tokenizer with ``VOCAB_SIZE`` entries trained on ``texts`` (deterministic, ~10 ms).

    ``roles``: the ``bos_token``/``eos_token``/``pad_token`` strings; ``special_tokens``: every special token, in id
    order (default: the role tokens); ``chat_template``: a Jinja chat template, for TRL. The one tiny tokenizer of the
    package and its tests.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(special_tokens if special_tokens is not None else roles.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    extra = {"chat_template": chat_template} if chat_template is not None else {}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **roles, **extra)


def tiny_model_and_tokenizer(texts: list[str], seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """A randomly initialised tiny Llama (same ``seed``, same weights) and its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer(texts)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval(), tokenizer
