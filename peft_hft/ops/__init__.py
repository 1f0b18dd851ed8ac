"""Offline operations on checkpoints: merge an adapter, extract one from a fine-tune, inspect one, half-reset."""
