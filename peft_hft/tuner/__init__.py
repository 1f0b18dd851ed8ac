"""The PEFT tuner: ``HFTConfig``, the selection of the trained half, the ledger (``HFTLayer``) and ``HFTModel``."""
