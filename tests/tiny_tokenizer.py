"""A tiny chat tokenizer built locally (no Hub), and tiny causal LMs whose vocabulary matches it.

TRL's trainers need a real tokenizer with a chat template. SmolLM2's tokenizer has 49,152 tokens, which would make a
"tiny" model mostly embedding; this byte-level BPE has a few hundred, so the models stay tiny and tests stay fast.
"""

from __future__ import annotations

from pathlib import Path

from tiny_models import tiny_model

from peft_hft.bench.quick import tiny_tokenizer

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A second template with tokens the first tokenizer lacks, as TRL's `chat_template_path` clones it.
TOOL_TEMPLATE = (
    "{% for message in messages %}<|start|>{{ message['role'] }}<|sep|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|start|>assistant<|sep|>{% endif %}"
)
SPECIAL = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Describe a process of making crepes with flour, eggs, milk and butter.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "What is two plus two? Two plus two is four.",
    "Write a short poem about the sea, the wind and the stars at night.",
    "user assistant system: please answer the question briefly and politely.",
    "0123456789 numbers, letters ABCDEFGHIJKLMNOPQRSTUVWXYZ and punctuation !?.,;:'\"()-",
]


def build_tokenizer(template: str = CHATML, special: list[str] = SPECIAL, eos: str = "<|im_end|>"):
    """The package's tiny byte-level BPE (:func:`peft_hft.bench.quick.tiny_tokenizer`) with ``special`` tokens
    (pad, bos, ...) and a chat ``template``."""
    roles = {"pad_token": special[0], "bos_token": special[1], "eos_token": eos}
    return tiny_tokenizer(_CORPUS * 4, roles=roles, special_tokens=special, chat_template=template)


def save_tool_tokenizer(directory: Path) -> Path:
    """A tokenizer directory whose chat template uses three tokens the ChatML tokenizer does not have."""
    tokenizer = build_tokenizer(TOOL_TEMPLATE, ["<|pad|>", "<|start|>", "<|sep|>", "<|end|>"], eos="<|end|>")
    tokenizer.save_pretrained(directory)
    return directory


def chat_model(tokenizer, arch: str = "llama", seed: int = 0, **overrides):
    """A tiny causal LM (hidden size 32, 2 layers) whose vocabulary and special ids match ``tokenizer``."""
    kwargs = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    kwargs.update(overrides)
    return tiny_model(arch, seed=seed, **kwargs)
