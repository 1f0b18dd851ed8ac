"""``peft-hft`` imports a command's module only when that command runs; ``--help`` lists every command anyway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from peft_hft.cli.main import SUBCOMMANDS, command_of

REPO = Path(__file__).resolve().parents[2]

PROBE = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from peft_hft.cli.main import SUBCOMMANDS, main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            status = main(sys.argv[1:])
        except SystemExit as exc:
            status = exc.code
    loaded = sorted(name for name, (module, _) in SUBCOMMANDS.items() if module in sys.modules)
    print(json.dumps({"status": status, "loaded": loaded, "trl": "trl" in sys.modules, "help": out.getvalue()}))
    """
)


def probe(*argv: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_help_lists_every_command_and_imports_none():
    result = probe("--help")
    assert result["status"] == 0 and result["loaded"] == [] and not result["trl"]
    flat = " ".join(result["help"].split())
    for name, (_, help_text) in SUBCOMMANDS.items():
        assert name in flat and " ".join(help_text.split()) in flat, name


def test_a_command_imports_its_module_only():
    result = probe("inspect", "--help")
    assert result["status"] == 0 and result["loaded"] == ["inspect"] and not result["trl"]
    assert "ADAPTER" in result["help"]  # its own arguments are there
    result = probe("--traceback", "to-lora", "/nonexistent-adapter", "/tmp/out", "--rank", "4")
    assert result["loaded"] == ["to-lora"] and result["status"] == 1


def test_command_of_is_the_first_word():
    assert command_of(["--traceback", "merge", "a", "b"]) == "merge"
    assert command_of(["--version"]) is None and command_of([]) is None
