"""A pytest plugin for running PEFT's own test files in a subprocess (``-p upstream_probe``), without peft-hft.

It never imports ``peft_hft``, so a run with ``PEFT_HFT_NO_AUTOLOAD=1`` is PEFT alone, and a run without it has
peft-hft only through the startup hook. It

* stubs ``diffusers``, which PEFT's ``testing_common`` imports at module level for tests that never run here;
* keeps only the tests whose parameter id starts with one of the rows in ``PEFT_HFT_PROBE_ROWS`` (``|``-separated
  row names of ``TEST_CASES``, e.g. ``Vanilla MLP 1 LoRA``), when that is set;
* writes ``PEFT_HFT_PROBE_OUT`` (JSON): each test's outcome (``passed``, ``skipped``, or ``failed`` with the phase
  and the exception type), and whether HFT was registered with PEFT in that process.
"""

from __future__ import annotations

import json
import os
import sys
import types

ROWS_ENV = "PEFT_HFT_PROBE_ROWS"
OUT_ENV = "PEFT_HFT_PROBE_OUT"


def stub_diffusers() -> None:
    """testing_common imports diffusers at module level for its Stable Diffusion tests, which never run here."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        stub = types.ModuleType("diffusers")
        stub.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})
        sys.modules["diffusers"] = stub


_outcomes: dict[str, str] = {}


def pytest_configure(config) -> None:
    stub_diffusers()


def pytest_collection_modifyitems(config, items) -> None:
    rows = [row for row in os.environ.get(ROWS_ENV, "").split("|") if row]
    if not rows:
        return
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        wanted = callspec is not None and any(callspec.id.startswith(f"{row}-") for row in rows)
        (keep if wanted else drop).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_runtest_logreport(report) -> None:
    if report.passed and report.when != "call":
        _outcomes.setdefault(report.nodeid, "passed")
        return
    if report.skipped:
        _outcomes[report.nodeid] = "skipped"
    elif report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message.split(":", 1)[0] if crash is not None else "?"
        _outcomes[report.nodeid] = f"failed in {report.when}: {message}"
    else:
        _outcomes.setdefault(report.nodeid, "passed")


def pytest_sessionfinish(session, exitstatus) -> None:
    out = os.environ.get(OUT_ENV)
    if not out:
        return
    peft_types = sys.modules.get("peft.utils.peft_types")
    registered = peft_types is not None and "HFT" in peft_types.PeftType.__members__
    with open(out, "w", encoding="utf-8") as handle:
        json.dump({"outcomes": _outcomes, "hft_registered": registered, "peft_hft_imported": "peft_hft" in sys.modules},
                  handle, indent=1, sort_keys=True)
