"""Benchmarks that users run on their own model and data: ``peft-hft bench forgetting --help``.

The forgetting benchmark fine-tunes a model on a new task with full fine-tuning, HFT (several ratios), a model-level
random half and LoRA, and measures with lm-eval how much of the model's prior knowledge each method keeps.
"""

from .forgetting import run as run_forgetting
from .protocol import Protocol, quick_protocol

__all__ = ["Protocol", "quick_protocol", "run_forgetting"]
