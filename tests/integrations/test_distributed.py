"""HFT on 2 CPU processes: DDP (accelerate loop and Trainer), FSDP2 and DeepSpeed ZeRO-2/3 train the same tiny model
as one process does, every process holds the same selection and weights, and the saved adapter equals the
single-process one. Each engine runs once (a module-scoped fixture launching tests/distributed_worker.py); the tests
read what the processes wrote. Select them with ``-m distributed``."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_worker import train_reference
from safetensors.torch import load_file
from tiny_models import tiny_model

from peft_hft.format.keys import diff_key

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).resolve().parents[1] / "distributed_worker.py"
WORLD = 2
LAUNCH_TIMEOUT_S = 300


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(launcher: str, scenario: str, base_dir: Path, out: Path) -> Path:
    """Run the worker on WORLD CPU processes; fail with the processes' output if any of them fails."""
    out.mkdir(parents=True, exist_ok=True)
    if launcher == "accelerate":
        # `accelerate launch --cpu` starts several processes only through MPI (an mpirun hostfile); --multi_gpu is
        # accelerate's torchrun launcher, and the worker asks for the CPU (Accelerator(cpu=True), use_cpu=True).
        prefix = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", "--main_process_port", _free_port(), "--num_processes", str(WORLD)]
    else:
        prefix = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD)]  # picks a free port
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, *prefix, str(WORKER), scenario, str(base_dir), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    if result.returncode != 0:
        output = f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        pytest.fail(f"{' '.join(command)} failed ({result.returncode}):\n{output}")
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("distributed") / "base"
    tiny_model("llama", layers=2).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(base_dir):
    """(selection, {name: tuned - base}) of the same training on one process."""
    return train_reference(str(base_dir))


@pytest.fixture(scope="module")
def ddp_run(base_dir):
    return launch("accelerate", "ddp", base_dir, base_dir.parent / "ddp")


@pytest.fixture(scope="module")
def fsdp2_run(base_dir):
    return launch("torchrun", "fsdp2", base_dir, base_dir.parent / "fsdp2")


@pytest.fixture(scope="module")
def zero_run(base_dir):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install 'peft-hft[dev]' installs it)")
    return launch("torchrun", "zero", base_dir, base_dir.parent / "zero")


@pytest.fixture(scope="module")
def precision_run(base_dir):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install 'peft-hft[dev]' installs it)")
    return launch("torchrun", "precision", base_dir, base_dir.parent / "precision")


def ranks(run: Path, tag: str) -> list[dict]:
    return [torch.load(run / f"{tag}_rank{r}.pt") for r in range(WORLD)]


def assert_ranks_agree(run: Path, tag: str, reference) -> list[dict]:
    """Same selection as one process, same base values, and the same trained tensors on every rank."""
    selected, _ = reference
    views = ranks(run, tag)
    for view in views:
        assert view["selected"] == selected
        assert view["fingerprint"] == views[0]["fingerprint"]
        assert view["values"].keys() == set(selected)
        for name in selected:
            assert torch.equal(view["values"][name], views[0]["values"][name]), name
    return views


def assert_adapter_matches(path: Path, reference, trained: dict[str, torch.Tensor], base: dict[str, torch.Tensor]):
    """The saved adapter holds exactly the selection, with real values: tuned - base, as one process trains it."""
    selected, expected = reference
    tensors = load_file(path / "adapter_model.safetensors")
    assert set(tensors) == {diff_key(name) for name in selected}
    for name in selected:
        diff = tensors[diff_key(name)]
        assert diff.shape == base[name].shape and diff.abs().max() > 0, name  # never empty, never all zero
        torch.testing.assert_close(diff, trained[name] - base[name], rtol=0, atol=0)
        torch.testing.assert_close(diff, expected[name], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def base_state(base_dir) -> dict[str, torch.Tensor]:
    return load_file(base_dir / "model.safetensors")


# What each engine saved, and through which path: (run fixture, rank dump tag, adapter directory)
SAVED_ADAPTERS = [
    ("ddp_run", "ddp_loop", "ddp_loop_adapter"),  # accelerate loop, peft_hft.integrations.distributed.save_adapter
    ("ddp_run", "ddp_trainer", "ddp_trainer_adapter"),  # Trainer.save_model
    ("fsdp2_run", "fsdp2", "fsdp2_adapter"),  # save_adapter: gathers the trained tensors only
    ("fsdp2_run", "fsdp2", "fsdp2_full_state_dict_adapter"),  # full state dict, as accelerate / Trainer gather it
    ("zero_run", "zero2", "zero2_adapter"),
    ("zero_run", "zero2", "zero2_rank0_adapter"),  # plain save_pretrained on rank 0 (ZeRO-2 keeps whole replicas)
    ("zero_run", "zero3", "zero3_adapter"),
    ("zero_run", "zero3", "zero3_trainer_adapter"),  # Trainer's path: 16-bit consolidated, frozen tensors excluded
]


@pytest.mark.parametrize("run, tag, adapter", SAVED_ADAPTERS, ids=[a for _, _, a in SAVED_ADAPTERS])
def test_ranks_agree_and_the_saved_adapter_matches_one_process(request, reference, base_state, run, tag, adapter):
    run_dir = request.getfixturevalue(run)
    views = assert_ranks_agree(run_dir, tag, reference)
    assert_adapter_matches(run_dir / adapter, reference, views[0]["values"], base_state)


def test_ddp_reference_pass_with_adapters_disabled_sees_the_base_model(ddp_run):
    for view in ranks(ddp_run, "ddp_loop"):
        assert view["checks"]["reference_pass_error"] == 0.0


def test_fsdp2_refuses_what_it_cannot_do_with_clear_errors_and_no_change(fsdp2_run):
    for view in ranks(fsdp2_run, "fsdp2"):
        checks = view["checks"]
        assert checks["params_are_dtensors"]
        assert checks["inject_after_sharding"] == "ok"  # HFT added after fully_shard
        assert checks["disable_refused"] == "ok"  # disable_adapter on DTensors
        assert checks["unchanged_after_refusal"]
        assert checks["plain_save_refused"] == "ok"  # save_pretrained without a gathered state dict
        assert checks["different_seeds_detected"] == "ok"  # verify_ranks_agree


def test_zero2_disable_round_trip_keeps_the_flat_buffer_and_sees_the_base_model(zero_run, reference):
    selected, _ = reference
    for view in ranks(zero_run, "zero2"):
        checks = view["checks"]
        assert checks["views_before"] == checks["views_after"] == len(selected)
        assert checks["reference_pass_error"] == 0.0


def test_zero3_loads_partitioned_gathers_only_the_trained_half_and_refuses_clearly(zero_run, reference):
    selected, _ = reference
    views = ranks(zero_run, "zero3")
    assert views[0]["checks"]["consolidated_keys"] == len(selected)  # Trainer's gather skips frozen tensors
    for view in views:
        checks = view["checks"]
        assert checks["loaded_partitioned"]
        assert checks["disable_refused"] == "ok"
        assert checks["plain_save_refused"] == "ok"
        assert checks["empty_state_dict_refused"] == "ok"


def test_engines_that_keep_fp32_masters_get_no_second_copy_on_bf16_models(precision_run):
    for rank in range(WORLD):
        checks = torch.load(precision_run / f"precision_rank{rank}.pt")
        # ZeRO-2 with bf16: DeepSpeed steps its own fp32 partitions; HFT makes no masters and does not warn
        assert checks["zero2_bf16_master_bytes"] == 0 and checks["zero2_bf16_changed"]
        assert checks["zero2_bf16_weights_dtype"] == ["torch.bfloat16"] and not checks["zero2_bf16_hft_warnings"]
        # FSDP2 on a bf16 model: no masters on sharded parameters, one warning with the fix
        assert checks["fsdp2_bf16_master_bytes"] == 0
        assert len(checks["fsdp2_bf16_warnings"]) == 1 and "MixedPrecisionPolicy" in checks["fsdp2_bf16_warnings"][0]
        # the fix: fp32 parameters with MixedPrecisionPolicy(param_dtype=bf16): no masters needed, no warning
        assert checks["fsdp2_mp_master_bytes"] == 0 and checks["fsdp2_mp_changed"]
        assert not checks["fsdp2_mp_warnings"]
