"""quantize_frozen: the frozen block matrices of an HFT model in NF4 for training; the adapter stays relative to the
full-precision base (diffs of the trained tensors against their full-precision originals, fingerprint included)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import batch, tiny_model, train_steps

from peft_hft import HFTConfig, quantize_frozen
from peft_hft.tuner.quantize_frozen import nf4_bytes


def _nf4_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if type(p.data).__name__ == "NF4Tensor"
            or type(p).__name__ == "NF4Tensor"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_only_frozen_block_matrices_are_quantized_and_training_reaches_the_trained_half(dtype, tmp_path):
    pytest.importorskip("torchao", reason="quantize_frozen quantizes with torchao (the dev extra installs it)")
    model = get_peft_model(tiny_model("llama", layers=2, dtype=dtype), HFTConfig(seed=0))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    names = quantize_frozen(model)
    assert names and not any(("base_model.model." + n) in trained for n in names)
    assert all(".layers." in n and n.endswith("proj.weight") for n in names)
    quantized = _nf4_names(model)
    assert len(quantized) == len(names)
    # the trained tensors, embeddings, norms and lm_head stay plain tensors of the model's dtype
    assert all(p.dtype == dtype for n, p in model.named_parameters() if n not in quantized)

    train_steps(model, steps=2, lr=1e-2)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(trained)

    # the adapter: diffs against the full-precision originals; it loads on the full-precision base, base check on
    model.save_pretrained(tmp_path)
    trained_values = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    reloaded = PeftModel.from_pretrained(tiny_model("llama", layers=2, dtype=dtype), tmp_path)
    for name, value in trained_values.items():
        assert torch.allclose(reloaded.get_parameter(name), value, atol=1e-6, rtol=0), name  # base + diff
    # the full-precision base keeps its own frozen half: the reloaded model differs from the NF4 one only there
    ids = batch()
    with torch.no_grad():
        full = reloaded(**ids).logits.float()
        q = model(**ids).logits.float()
    assert not torch.equal(full, q)
    assert torch.allclose(full, q, atol=0.5)


def test_needs_an_hft_model():
    with pytest.raises(ValueError, match="get_peft_model"):
        quantize_frozen(tiny_model("llama", layers=2))


def test_nf4_bytes_are_about_half_a_byte_per_element():
    assert 0.5 < nf4_bytes(4096 * 4096) / (4096 * 4096) < 0.52
