"""GPU check of HFT under accelerate's FSDP2 and DeepSpeed ZeRO-2/3, with a plain accelerate loop and with Trainer.

Run it through ``examples/distributed/gpu_check.sh`` (one GPU is enough: a world of one still shards into DTensors,
partitions under ZeRO-3 and goes through every gather). It complements tests/integrations/test_distributed.py, which
runs the same
training with 2 CPU processes but cannot reach accelerate's FSDP plugin (GPU only), DeepSpeed's CUDA code, or the
ledger's GPU path (base values in host memory, weights on the GPU).

    python examples/distributed/gpu_check.py prepare OUT            # tiny base model + single-process reference
    accelerate launch --config_file OUT/<engine>.yaml examples/distributed/gpu_check.py run <engine> OUT
    python examples/distributed/gpu_check.py report OUT             # OUT/results.json; exit 1 on any failure

Every run trains the tiny llama of tests/tiny_models.py for 3 SGD steps on one global batch (fp32, so the result must
equal the single-process reference up to float order) and checks the saved adapters: non-empty, non-zero, exactly
``tuned - base`` of the tensors gathered after training, and equal to the reference.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import distributed_worker as w  # noqa: E402  (shared training set-up of the CPU tests)

from peft_hft.format.keys import diff_key  # noqa: E402
from peft_hft.integrations.distributed import save_adapter, unwrap_peft_model  # noqa: E402
from peft_hft.tuner import engines  # noqa: E402

ENGINES = ("fsdp2", "zero2", "zero3")
EXAMPLES = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------------------------------
# prepare / report (one process)
# ----------------------------------------------------------------------------------------------------------------------


def prepare(out: Path) -> None:
    """Save the base model, the reference diffs, and accelerate configs for one process (from the examples)."""
    import yaml
    from tiny_models import tiny_model

    out.mkdir(parents=True, exist_ok=True)
    tiny_model("llama", layers=2).save_pretrained(out / "base")
    selected, diffs = w.train_reference(str(out / "base"))
    torch.save({"selected": selected, "diffs": diffs}, out / "reference.pt")
    for engine, name in (("fsdp2", "fsdp2"), ("zero2", "zero2"), ("zero3", "zero3")):
        config = yaml.safe_load((EXAMPLES / f"accelerate_{name}.yaml").read_text())
        config["num_processes"] = torch.cuda.device_count() or 1
        if engine == "fsdp2":
            config["mixed_precision"] = "no"  # fp32, for an exact comparison (DeepSpeed's json says "auto")
        else:
            ds = json.loads((EXAMPLES / f"deepspeed_{engine}.json").read_text())
            # partition every tensor of the tiny model, so ZeRO-3 goes through the real gather paths
            ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
            ds["gradient_clipping"] = 0.0  # "auto" is 1.0 outside Trainer; the reference does not clip
            (out / f"deepspeed_{engine}.json").write_text(json.dumps(ds, indent=2))
            config["deepspeed_config"]["deepspeed_config_file"] = str(out / f"deepspeed_{engine}.json")
        (out / f"{engine}.yaml").write_text(yaml.safe_dump(config))
    print(f"prepared {out}: {len(selected)} selected tensors")


def report(out: Path) -> int:
    results = {engine: json.loads((out / f"{engine}.json").read_text()) if (out / f"{engine}.json").exists()
               else {"missing": "the run wrote no results (see its output)"} for engine in ENGINES}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    failed = 0
    for engine, checks in results.items():
        for name, value in checks.items():
            ok = value is True or value == "ok" or (name.startswith("info_"))
            failed += not ok
            print(f"{'PASS' if ok else 'FAIL'} {engine:6s} {name}: {value}")
    print(f"{failed} failed")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------------------------------
# run (under accelerate launch)
# ----------------------------------------------------------------------------------------------------------------------


def rows() -> list[dict[str, torch.Tensor]]:
    data = w.samples()
    return [{k: v[i] for k, v in data.items()} for i in range(w.GLOBAL_BATCH)]


def gathered_values(model) -> dict[str, torch.Tensor]:
    """Every process: the trained tensors, gathered whole, on the CPU."""
    peft_model = unwrap_peft_model(model)
    root = peft_model.base_model.ledger.root
    names = peft_model.peft_config["default"].selected_parameters
    return {n: engines.full_value(root.get_parameter(n), n, collective=True).detach().float().cpu() for n in names}


def check_adapter(path: Path, values: dict[str, torch.Tensor], out: Path) -> str:
    """'ok' if the adapter holds exactly tuned - base for the selection and equals the single-process reference."""
    from safetensors.torch import load_file

    reference = torch.load(out / "reference.pt")
    base = load_file(out / "base" / "model.safetensors")
    tensors = load_file(path / "adapter_model.safetensors")
    if set(tensors) != {diff_key(n) for n in reference["selected"]}:
        return f"keys differ: {sorted(tensors)[:3]}... vs {len(reference['selected'])} selected"
    for name in reference["selected"]:
        diff = tensors[diff_key(name)].float()
        if diff.numel() == 0 or diff.shape != base[name].shape or diff.abs().max() == 0:
            return f"{name}: empty or zero diff {tuple(diff.shape)}"
        if not torch.equal(diff, values[name] - base[name].float()):
            return f"{name}: diff != tuned - base (max err {(diff - values[name] + base[name]).abs().max():.3g})"
        if not torch.allclose(diff, reference["diffs"][name].float(), rtol=1e-4, atol=1e-5):
            return f"{name}: differs from the single-process run by {(diff - reference['diffs'][name]).abs().max():.3g}"
    return "ok"


def attempt(checks: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    try:
        result = fn()
        checks[name] = "ok" if result is None else result
    except Exception:  # a failed flow is a result to report, not a reason to skip the others
        checks[name] = traceback.format_exc(limit=6)[-1500:]


def loop_flow(engine: str, out: Path, checks: dict[str, Any]) -> None:
    """A plain accelerate loop; under ZeRO-2 a DPO-style reference pass (adapters disabled) at step REF_STEP."""
    from accelerate import Accelerator
    from peft import get_peft_model
    from torch.utils.data import DataLoader

    accelerator = Accelerator()  # before loading: with zero3_init_flag the model loads partitioned
    base = w.load_base(str(out / "base"))
    if engine == "zero3":
        checks["loop_loaded_partitioned"] = all(engines.is_zero3_param(p) for p in base.parameters())
    model = get_peft_model(base, w.hft_config())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=w.LR)
    loader = DataLoader(rows(), batch_size=w.GLOBAL_BATCH // accelerator.num_processes)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    peft_model = unwrap_peft_model(model)
    root = peft_model.base_model.ledger.root
    selected = peft_model.peft_config["default"].selected_parameters
    if engine == "fsdp2":
        from torch.distributed.fsdp import FSDPModule

        checks["loop_layers_sharded_per_layer"] = all(isinstance(m, FSDPModule) for m in root.model.layers)
    model.train()
    for step in range(w.STEPS):
        for inputs in loader:
            loss = model(**inputs).loss
            if step == w.REF_STEP:
                reference_step(engine, model, inputs, out, root, selected, checks)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            if engine == "zero2" and step == w.REF_STEP:
                after_ref = {n: root.get_parameter(n).detach().clone() for n in selected}
    if engine == "zero2":
        changed = sum(not torch.equal(after_ref[n], root.get_parameter(n)) for n in selected)
        checks["loop_zero2_training_continues_after_round_trip"] = changed == len(selected) or f"{changed} changed"
        checks["loop_zero2_tensors_still_in_flat_buffer"] = all(
            not engines.owns_storage(root.get_parameter(n).data) for n in selected)
    values = gathered_values(model)
    save_adapter(model, out / f"{engine}_loop_adapter")
    full = accelerator.get_state_dict(model)  # accelerate's own gather (every process); whole on the main one only
    if accelerator.is_main_process:
        peft_model.save_pretrained(out / f"{engine}_loop_state_dict_adapter", state_dict=full)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checks["loop_save_adapter"] = check_adapter(out / f"{engine}_loop_adapter", values, out)
        checks["loop_get_state_dict_save"] = check_adapter(out / f"{engine}_loop_state_dict_adapter", values, out)


def reference_step(engine, model, inputs, out, root, selected, checks) -> None:
    cpu_inputs = {k: v.cpu() for k, v in inputs.items()}
    if engine == "zero2":
        checks["loop_zero2_params_view_flat_buffer"] = all(
            not engines.owns_storage(root.get_parameter(n).data) for n in selected)
        with torch.no_grad(), unwrap_peft_model(model).disable_adapter():
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        err = (logits.float().cpu() - w.base_logits(str(out / "base"), cpu_inputs)).abs().max().item()
        checks["loop_zero2_reference_pass_is_base_model"] = err < 1e-4 or f"max error {err}"
    else:
        checks["loop_disable_refused"] = w.expect_error(
            lambda: w.reference_pass_matches_base(model, inputs, str(out / "base")), "sharded by")


def trainer_flow(engine: str, out: Path, checks: dict[str, Any]) -> None:
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    world = torch.cuda.device_count() or 1
    args = TrainingArguments(  # before loading the model: under ZeRO-3 it then loads partitioned (zero.Init)
        output_dir=str(out / f"{engine}_trainer_run"),
        per_device_train_batch_size=w.GLOBAL_BATCH // world,
        max_steps=w.STEPS,
        learning_rate=w.LR,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    base = w.load_base(str(out / "base"))
    if engine == "zero3":
        checks["trainer_loaded_partitioned"] = all(engines.is_zero3_param(p) for p in base.parameters())
    model = get_peft_model(base, w.hft_config())
    trainer = Trainer(model=model, args=args, train_dataset=rows())
    trainer.train()
    root = model.base_model.ledger.root
    if engine == "fsdp2":
        from torch.distributed.fsdp import FSDPModule

        # transformers swaps in PEFT's FSDP1 wrap policy for every PEFT model, which accelerate's FSDP2 path ignores
        checks["info_trainer_layers_sharded_per_layer"] = all(isinstance(m, FSDPModule) for m in root.model.layers)
    values = gathered_values(trainer.model_wrapped)
    trainer.save_model(str(out / f"{engine}_trainer_adapter"))
    save_adapter(trainer.model_wrapped, out / f"{engine}_trainer_save_adapter")
    if trainer.accelerator.is_main_process:
        checks["trainer_save_model"] = check_adapter(out / f"{engine}_trainer_adapter", values, out)
        checks["trainer_save_adapter"] = check_adapter(out / f"{engine}_trainer_save_adapter", values, out)


def run(engine: str, out: Path) -> None:
    checks: dict[str, Any] = {"info_device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    attempt(checks, "loop_flow", lambda: loop_flow(engine, out, checks))
    attempt(checks, "trainer_flow", lambda: trainer_flow(engine, out, checks))
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        (out / f"{engine}.json").write_text(json.dumps(checks, indent=2))


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "prepare":
        prepare(Path(rest[0]))
    elif command == "run":
        run(rest[0], Path(rest[1]))
    elif command == "report":
        sys.exit(report(Path(rest[0])))
    else:
        sys.exit(f"unknown command {command!r}; use prepare, run or report")
