"""HFT adapters load in processes that never import peft_hft (the startup hook, ``_peft_hft_autoload``).

The hook is installed by pip (``peft_hft-autoload.pth`` in site-packages). When this test environment has it (``make
test`` installs the checkout with ``pip install -e``), the load tests run in it; otherwise (a checkout on
``PYTHONPATH`` only) they run in a fresh venv with a wheel of this checkout installed. The packaging tests always build
a wheel and do editable and regular installs into fresh venvs, and uninstall them again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_tokenizer import build_tokenizer, chat_model

from peft_hft import HFTConfig

REPO = Path(__file__).resolve().parents[2]
PTH = "peft_hft-autoload.pth"
HOOK = "_peft_hft_autoload"
SOURCES = ["peft_hft", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md", f"{HOOK}.py", PTH]
PROMPT = [[1, 17, 42, 99, 7, 250, 3, 12]]


def offline_env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")


def run(python: Path, *args: str, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *args], capture_output=True, text=True, env=env, timeout=timeout)


def make_venv(path: Path) -> tuple[Path, Path]:
    """A venv without pip or packages of its own that sees this environment's packages (torch, peft, pip,
    setuptools) as a plain path entry, so their .pth files (an editable install of this checkout) are not run."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                    env=venv_env()).stdout.strip())
    (site / "zz_test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python, site


def venv_env() -> dict[str, str]:
    env = offline_env()
    env.pop("PYTHONPATH", None)  # the venv's own installation of peft-hft, not this checkout on the path
    return env


def pip(python: Path, *args: str) -> None:
    offline = ["--no-deps", "--no-build-isolation", "--no-index"] if args[0] == "install" else []
    done = run(python, "-m", "pip", *args, *offline, "--quiet", env=venv_env(), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def listing(site: Path) -> set[str]:
    return {p.name for p in site.iterdir() if p.name != "__pycache__"}


@pytest.fixture(scope="session")
def source_copy(tmp_path_factory) -> Path:
    """The package sources, copied: builds write build/ and *.egg-info beside them, never into the checkout."""
    target = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, target / name)
    return target


@pytest.fixture(scope="session")
def wheel(source_copy, tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "--quiet", "-w", str(dist), str(source_copy)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = dist.glob("peft_hft-*.whl")
    return path


@pytest.fixture(scope="session")
def autoload_python(wheel, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """An interpreter with the startup hook installed, and the environment to run it with."""
    if (Path(sysconfig.get_paths()["purelib"]) / PTH).exists():
        return Path(sys.executable), offline_env()
    python, _ = make_venv(tmp_path_factory.mktemp("venv") / "hft")
    pip(python, "install", str(wheel))
    return python, venv_env()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A tiny chat model with its tokenizer, an HFT adapter of it (perturbed: every diff is non-zero), the merged
    model, and the adapter's logits on PROMPT."""
    root = tmp_path_factory.mktemp("autoload")
    tokenizer = build_tokenizer()
    chat_model(tokenizer).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(root / "base")
    model = get_peft_model(base, HFTConfig(seed=0, init_weights=False, task_type="CAUSAL_LM"))
    model.save_pretrained(root / "adapter")
    with torch.no_grad():
        torch.save(model(torch.tensor(PROMPT)).logits, root / "expected.pt")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), root / "adapter")
    merged.merge_and_unload().save_pretrained(root / "merged")
    tokenizer.save_pretrained(root / "merged")
    return {"root": root, "base": root / "base", "adapter": root / "adapter", "merged": root / "merged"}


def test_wheel_puts_the_hook_at_the_root_of_site_packages(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert {PTH, f"{HOOK}.py", "peft_hft/__init__.py"} <= names
        assert archive.read(PTH).decode() == f"import {HOOK}; {HOOK}.install()\n"
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        recorded = {line.split(",")[0] for line in archive.read(record).decode().splitlines()}
    assert {PTH, f"{HOOK}.py"} <= recorded  # so that pip uninstall removes them


def test_interpreter_start_imports_nothing_heavy(autoload_python):
    python, env = autoload_python
    script = "import sys, json; print(json.dumps({'peft': 'peft' in sys.modules, 'torch': 'torch' in sys.modules, " \
             "'hft': 'peft_hft' in sys.modules, 'hook': any(type(f).__name__ == 'type' and " \
             "f.__name__ == '_PeftFinder' for f in sys.meta_path)}))"
    done = run(python, "-X", "importtime", "-c", script, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"peft": False, "torch": False, "hft": False, "hook": True}
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert HOOK in imported and not imported & {"torch", "peft", "peft_hft", "transformers"}


LOAD_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    assert importlib.util.find_spec("peft") is not None  # as transformers' is_peft_available() does, before the import
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter, out = sys.argv[1:4]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    auto = AutoPeftModelForCausalLM.from_pretrained(adapter)
    with torch.no_grad():
        ids = torch.tensor(json.loads(sys.argv[4]))
        torch.save({"peft_model": model(ids).logits, "auto": auto(ids).logits}, out)
    print(json.dumps({"tuner": type(model.base_model).__name__, "auto_tuner": type(auto.base_model).__name__,
                      "registered_by_hook": "peft_hft" in sys.modules}))
    """
)


def test_fresh_process_loads_hft_adapters_without_importing_peft_hft(autoload_python, checkpoints):
    python, env = autoload_python
    out = checkpoints["root"] / "fresh.pt"
    done = run(python, "-c", LOAD_SCRIPT, str(checkpoints["base"]), str(checkpoints["adapter"]), str(out), json.dumps(PROMPT),
               env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "tuner": "HFTModel", "auto_tuner": "HFTModel", "registered_by_hook": True
    }
    expected = torch.load(checkpoints["root"] / "expected.pt")
    got = torch.load(out)
    assert torch.equal(got["peft_model"], expected) and torch.equal(got["auto"], expected)


def test_environment_variable_turns_the_hook_off(autoload_python, checkpoints):
    python, env = autoload_python
    out = checkpoints["root"] / "off.pt"
    done = run(python, "-c", LOAD_SCRIPT, str(checkpoints["base"]), str(checkpoints["adapter"]), str(out),
               json.dumps(PROMPT), env=dict(env, PEFT_HFT_NO_AUTOLOAD="1"))
    assert done.returncode != 0 and "HFT" in done.stderr.splitlines()[-1], done.stderr[-2000:]
    assert not out.exists()


def test_lm_eval_cli_scores_the_adapter_exactly_as_the_merged_model(autoload_python, checkpoints, tmp_path):
    """lm-eval's own CLI, `--model_args pretrained=BASE,peft=ADAPTER`, on a local task, in a process that never
    imports peft_hft: the scores equal those of the merged model (and differ from the base model's)."""
    python, env = autoload_python
    rows = [{"context": f"What is {i} plus {i}?", "continuation": f" It is {2 * i}."} for i in range(12)]
    (tmp_path / "probe.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "hft_probe.yaml").write_text(textwrap.dedent(f"""\
        task: hft_probe
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tmp_path / "probe.jsonl"}
        test_split: test
        output_type: loglikelihood
        doc_to_text: "{{{{context}}}}"
        doc_to_target: "{{{{continuation}}}}"
        metric_list:
          - metric: perplexity
          - metric: acc
        """))
    runs = {
        "adapter": f"pretrained={checkpoints['base']},peft={checkpoints['adapter']},dtype=float32",
        "merged": f"pretrained={checkpoints['merged']},dtype=float32",
        "base": f"pretrained={checkpoints['base']},dtype=float32",
    }
    procs = {
        name: subprocess.Popen(
            [str(python), "-m", "lm_eval", "--model", "hf", "--model_args", args, "--tasks", "hft_probe",
             "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "4",
             "--output_path", str(tmp_path / name)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for name, args in runs.items()
    }
    scores = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        (results,) = (tmp_path / name).rglob("results_*.json")
        scores[name] = json.loads(results.read_text())["results"]["hft_probe"]
    adapter, merged, base = (scores[n]["perplexity,none"] for n in ("adapter", "merged", "base"))
    assert adapter == merged
    assert scores["adapter"]["acc,none"] == scores["merged"]["acc,none"]
    assert abs(adapter - base) > 1e-3 * base  # the adapter was applied


def test_editable_and_wheel_installs_and_uninstall_leave_nothing_behind(source_copy, wheel, tmp_path):
    python, site = make_venv(tmp_path / "venv")
    before = listing(site)
    check = "import sys; import peft; print('peft_hft' in sys.modules, peft.PeftType.HFT.value)"
    for install in (["install", "-e", str(source_copy)], ["install", str(wheel)]):
        pip(python, *install)
        assert (site / PTH).exists()
        done = run(python, "-c", check, env=venv_env())
        assert done.returncode == 0 and done.stdout.split() == ["True", "HFT"], done.stderr[-2000:]
        pip(python, "uninstall", "--yes", "peft-hft")
        assert listing(site) == before
        pycache = site / "__pycache__"
        assert not pycache.exists() or not [p for p in pycache.iterdir() if HOOK in p.name]


def test_a_broken_installation_warns_instead_of_breaking_import_peft(monkeypatch):
    sys.path.insert(0, str(REPO))
    try:
        import _peft_hft_autoload as hook
    finally:
        sys.path.remove(str(REPO))

    class Broken:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "peft_hft":
                raise ImportError("simulated broken install")
            return None

    monkeypatch.delitem(sys.modules, "peft_hft")
    monkeypatch.setattr(sys, "meta_path", [Broken, *sys.meta_path])
    with pytest.warns(UserWarning, match="could not register the HFT method.*simulated broken install.*PEFT_HFT_NO_AUTOLOAD"):
        hook._register()
    for value, enabled in (("", True), ("0", True), ("false", True), ("1", False), ("yes", False)):
        monkeypatch.setenv(hook.ENV_VARIABLE, value)
        assert hook.enabled() is enabled


def test_a_broken_installation_never_breaks_import_peft_under_w_error(tmp_path):
    """Issue 19: under ``python -W error`` the hook's warning became the exception of ``import peft``."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})

        class Broken:
            @staticmethod
            def find_spec(name, path=None, target=None):
                if name == "peft_hft":
                    raise ImportError("simulated broken install")
                return None

        sys.meta_path.insert(0, Broken)
        import _peft_hft_autoload
        _peft_hft_autoload.install()
        import peft
        print("imported", peft.__name__, "peft_hft" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-W", "error", "-c", script], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PEFT_HFT_NO_AUTOLOAD"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "imported peft False"
    assert "could not register the HFT method" in done.stderr and "simulated broken install" in done.stderr
