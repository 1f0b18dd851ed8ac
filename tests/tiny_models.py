"""Tiny models built from configs (no downloads) and small training helpers for the tests."""

from __future__ import annotations

import torch

import peft_hft  # noqa: F401  (registers HFT with PEFT)

# Tiny configs of every architecture family the selection must understand.
TINY_SPECS: dict[str, dict] = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
    "gemma": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    "phi3": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0),
    "gpt2": dict(n_embd=32, n_head=4, n_positions=64),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4),
    "opt": dict(hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64),
    "mixtral": dict(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2,
    ),
    "qwen2_moe": dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
    ),
}
LAYER_KEY = {"gpt2": "n_layer"}
VOCAB = 100


def tiny_config(arch: str = "llama", layers: int = 2, **overrides):
    from transformers import AutoConfig

    kwargs = dict(TINY_SPECS[arch])
    kwargs[LAYER_KEY.get(arch, "num_hidden_layers")] = layers
    kwargs["vocab_size"] = VOCAB
    kwargs.setdefault("bos_token_id", 1)
    kwargs.setdefault("eos_token_id", 2)
    kwargs.update(overrides)
    return AutoConfig.for_model(arch, **kwargs)


def tiny_model(arch: str = "llama", layers: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised causal LM with hidden size 32; the same seed gives the same weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers, **overrides), dtype=dtype)
    return model.eval()


def clone_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def batch(seed: int = 0, size: int = 2, length: int = 8, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Random tokens drawn on the CPU (the same values on every device), then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (size, length), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def train_steps(model, steps: int = 1, lr: float = 1e-2, seed: int = 0) -> None:
    """A few AdamW steps on random tokens (on the model's device), over the parameters that require grad."""
    model.train()
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        inputs = batch(seed + step, device=device)
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()



def reference_pass_gradients(device: torch.device | str = "cpu") -> list[dict[str, torch.Tensor]]:
    """Gradients of one HFT step without and with a ``disable_adapter()`` forward between forward and backward.

    DPO computes its reference log-probs that way; the two gradient sets must be equal.
    """
    from peft import get_peft_model

    from peft_hft import HFTConfig

    inputs = batch(device=device)
    results = []
    for reference_pass in (False, True):
        peft_model = get_peft_model(tiny_model("llama", layers=2).to(device), HFTConfig(seed=0))
        train_steps(peft_model, steps=1)  # make the policy differ from the base
        peft_model.train()
        loss = peft_model(**inputs, labels=inputs["input_ids"]).loss
        if reference_pass:
            with torch.no_grad(), peft_model.disable_adapter():
                reference = peft_model(**inputs).logits
            assert reference.shape[-1] == VOCAB
        loss.backward()
        results.append({n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None})
    return results
