"""Wiring into other libraries: PEFT's registry, transformers' adapter API, the Hub, distributed engines."""
