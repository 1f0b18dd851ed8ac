"""The text summary and the PNG map show the selection that is really trained."""

from __future__ import annotations

import pytest
from peft import get_peft_model
from tiny_models import tiny_model

import peft_hft
from peft_hft import HFTConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_summary_reports_shares_and_marks_every_selected_tensor():
    model = get_peft_model(tiny_model("llama", layers=4), HFTConfig(seed=2))
    text = peft_hft.selection_summary(model)
    selected = set(model.peft_config["default"].selected_parameters)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"{len(selected)} of" in text and f"{trainable:,} of" in text
    assert "attention" in text and "50.0%" in text
    rows = [line for line in text.splitlines() if line[:1].isdigit() and len(line.split()) > 5]
    assert len(rows) == 4  # one row per block
    marks = sum(row.count(peft_hft.tuner.summary.TRAINED) for row in rows)
    in_blocks = sum(1 for n in selected if ".layers." in n)
    assert marks == in_blocks
    assert "■ lm_head" in text and "■ model.embed_tokens" in text


def test_summary_of_a_named_adapter_and_errors():
    model = get_peft_model(tiny_model("llama"), HFTConfig(seed=0))
    model.add_adapter("other", HFTConfig(seed=1, train_embeddings=False))
    assert "■ lm_head" not in peft_hft.selection_summary(model, "other")
    with pytest.raises(ValueError, match="No HFT adapter named 'nope'"):
        peft_hft.selection_summary(model, "nope")
    with pytest.raises(ValueError, match="has no HFT adapter"):
        peft_hft.selection_summary(tiny_model("llama"))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_plot_selection_writes_a_png(tmp_path, arch):
    model = get_peft_model(tiny_model(arch, layers=2), HFTConfig())
    path = peft_hft.plot_selection(model, tmp_path / "maps" / f"{arch}.png")
    data = open(path, "rb").read()
    assert data.startswith(PNG_MAGIC) and len(data) > 2000
