"""CUDA behaviour: training on the GPU with the originals in (pinned) host memory or beside the weights.

Skipped where there is no GPU (CI); run on a GPU machine with ``pytest tests/tuner/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import batch, clone_state, reference_pass_gradients, tiny_model, train_steps

from peft_hft import HFTConfig
from peft_hft.tuner.layer import find_ledger

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_batch(seed=0):
    return batch(seed, device="cuda")


@pytest.mark.parametrize("originals_device", ["cpu", "device"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_train_disable_save_reload_on_cuda(tmp_path, originals_device, dtype):
    model = tiny_model("llama", layers=2, dtype=dtype).cuda()
    base = clone_state(model)
    peft_model = get_peft_model(model, HFTConfig(originals_device=originals_device))
    ledger = find_ledger(peft_model)
    expected_store = "cpu" if originals_device == "cpu" else "cuda"
    assert {t.device.type for t in ledger._originals.values()} == {expected_store}
    if originals_device == "cpu":
        assert all(t.is_pinned() for t in ledger._originals.values())
    train_steps(peft_model, steps=3)
    assert {p.device.type for p in peft_model.parameters()} == {"cuda"}
    assert {p.dtype for p in peft_model.parameters()} == {dtype}
    tuned = clone_state(model)
    with torch.no_grad():
        tuned_logits = peft_model(**cuda_batch()).logits
        with peft_model.disable_adapter():
            assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
        assert all(torch.equal(v, tuned[k]) for k, v in model.state_dict().items())
    peft_model.save_pretrained(tmp_path)
    fresh = tiny_model("llama", layers=2, dtype=dtype).cuda()
    fresh.load_state_dict(base)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        gap = (loaded(**cuda_batch()).logits.float() - tuned_logits.float()).abs().max().item()
    assert gap <= (1e-5 if dtype == torch.float32 else 5e-2)


def test_reference_pass_keeps_gradients_on_cuda():
    without, with_reference = reference_pass_gradients("cuda")
    assert without.keys() == with_reference.keys()
    for name in without:
        assert torch.equal(without[name], with_reference[name])


def test_moving_the_model_after_injection_keeps_diffs_exact():
    model = tiny_model("llama", layers=2)
    base = clone_state(model)
    peft_model = get_peft_model(model, HFTConfig())
    peft_model.cuda()
    train_steps(peft_model, steps=3)
    diffs = find_ledger(peft_model).diffs("default")
    state = model.state_dict()
    for name, diff in diffs.items():
        assert torch.equal(diff, state[name].cpu() - base[name])


def test_bf16_on_cuda_trains_on_fp32_masters_beside_the_weights():
    """The bf16 path on a GPU: masters on the device, updates below a bf16 ulp kept, the reference pass through the
    pinned host originals leaves the masters in place (they are re-validated by value), fp32 diffs reload exactly."""
    from peft_hft import memory_report

    def run(dtype):
        model = tiny_model("llama", layers=2).to(torch.bfloat16).to(dtype).cuda()
        peft_model = get_peft_model(model, HFTConfig(seed=0))
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-5)
        peft_model.train()
        for step in range(20):
            inputs = batch(step, size=4, length=16, device="cuda")
            loss = peft_model(**inputs, labels=inputs["input_ids"]).loss
            with torch.no_grad(), peft_model.disable_adapter():  # DPO's reference pass
                peft_model(**inputs)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return peft_model, find_ledger(peft_model).diffs("default", torch.float32)

    peft_model, diffs = run(torch.bfloat16)
    _, reference = run(torch.float32)
    changed = sum(int((d != 0).sum()) for d in diffs.values())
    changed_fp32 = sum(int((d != 0).sum()) for d in reference.values())
    assert changed >= 0.9 * changed_fp32
    norm = torch.sqrt(sum((d**2).sum() for d in diffs.values()))
    norm_fp32 = torch.sqrt(sum((d**2).sum() for d in reference.values()))
    assert abs(norm / norm_fp32 - 1) < 0.15
    ledger = find_ledger(peft_model)
    assert {ledger.masters.value(n, peft_model.get_base_model().get_parameter(n)).device.type
            for n in ledger.masters.names()} == {"cuda"}
    report = memory_report(peft_model)
    assert report["master_bytes"] == report["master_bytes_when_training"] > 0
    assert {p.dtype for p in peft_model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("in_backward", [False, True], ids=["after-backward", "in-backward"])
def test_fp32_offload_on_cuda_steps_host_masters_and_keeps_only_the_weights_on_the_gpu(in_backward):
    """``master_weights="fp32_offload"``: the masters (pinned host memory) and the optimizer's state live on the
    host, the weights and gradients on the GPU; the update is the on-device fp32 masters' update (the host's AdamW
    kernels may round differently, so close rather than equal); a checkpoint's state loaded onto the GPU by torch
    goes back to the host."""
    from peft_hft import memory_report, optimizer_in_backward

    def run(mode):
        model = tiny_model("llama", layers=2, hidden_size=64, intermediate_size=256).to(torch.bfloat16).cuda()
        peft_model = get_peft_model(model, HFTConfig(seed=0, master_weights=mode))
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = (optimizer_in_backward(peft_model, torch.optim.AdamW, chunk_elements=4096, lr=1e-4)
                     if in_backward else torch.optim.AdamW(params, lr=1e-4))
        peft_model.train()
        for step in range(5):
            inputs = batch(step, size=4, length=16, device="cuda")
            peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return peft_model, optimizer

    offloaded, optimizer = run("fp32_offload")
    reference, _ = run("fp32")
    ledger = find_ledger(offloaded)
    masters = [ledger.masters._masters[n] for n in ledger.masters.names()]
    assert masters and all(m.value.device.type == "cpu" and m.value.is_pinned() for m in masters)
    assert {p.device.type for p in offloaded.parameters()} == {"cuda"}
    inners = [o for per in optimizer.optimizers for o in per] if in_backward else [optimizer]
    assert {s["exp_avg"].device.type for o in inners for s in o.state.values()} == {"cpu"}
    got = find_ledger(offloaded).diffs("default", torch.float32)
    expected = find_ledger(reference).diffs("default", torch.float32)
    cosine = sum((got[k] * expected[k]).sum() for k in got) / torch.sqrt(
        sum((got[k] ** 2).sum() for k in got) * sum((expected[k] ** 2).sum() for k in got))
    assert cosine > 0.9999
    report = memory_report(offloaded)
    assert report["master_bytes_when_training"] == 0 and report["master_host_bytes_when_training"] > 0
    if in_backward:
        again = optimizer_in_backward(offloaded, torch.optim.AdamW, chunk_elements=4096, lr=1e-4)
        optimizer.remove_hooks()
        state = optimizer.state_dict()
        for entry in state["state"].values():  # as a checkpoint mapped onto the GPU arrives
            for one in entry.get("slices", [entry]):
                for key, value in one.items():
                    one[key] = value.cuda()
        again.load_state_dict(state)
        placed = {(s["exp_avg"].device.type, s["exp_avg"].dtype) for per in again.optimizers for o in per
                  for s in o.state.values()}
        assert placed == {("cpu", torch.float32)}


def test_exact_steps_decode_onto_the_base_device():
    """The step decoding runs on the host but gives the tuned tensor on the base's device, in the base's bits."""
    from peft_hft.format.encoding import parse_encoding

    base = torch.randn(257, dtype=torch.float32).to(torch.bfloat16)
    steps = torch.randint(-127, 128, (257,), dtype=torch.int8)
    parts = {"": steps, "exc_idx": torch.empty(0, dtype=torch.int64), "exc_val": torch.empty(0, dtype=torch.bfloat16)}
    encoding = parse_encoding("exact")
    on_host = encoding.value(parts, (257,), base, torch.bfloat16)
    on_gpu = encoding.value(parts, (257,), base.cuda(), torch.bfloat16)
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu().view(torch.int16), on_host.view(torch.int16))
