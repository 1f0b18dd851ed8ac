"""Startup hook of peft-hft: registers HFT with PEFT the first time any process imports ``peft``.

PEFT has no plugin discovery, so without this a fresh interpreter cannot read an HFT adapter
(``PeftModel.from_pretrained`` raises ``KeyError: 'HFT'``) unless the user imports ``peft_hft`` first, and tools such
as lm-eval's ``--model_args peft=...`` give them no place to do so. pip installs ``peft_hft-autoload.pth`` next to
this module in site-packages; Python's ``site`` runs its one line at every interpreter start, which calls
:func:`install`. That only puts a small finder at the front of ``sys.meta_path`` (no torch, no peft, no
``peft_hft`` is imported: about 0.2 ms, see docs/integrations.md). When ``peft`` itself is imported later, the finder
lets PEFT's normal loader run and then imports ``peft_hft``, which registers the method, and removes itself.

This is a top-level module on purpose: anything inside the ``peft_hft`` package would run ``peft_hft/__init__.py``,
which imports torch and peft, at every interpreter start.

Set ``PEFT_HFT_NO_AUTOLOAD=1`` to turn the hook off. A failing ``import peft_hft`` never breaks ``import peft``: it
becomes a warning (a line on stderr where warnings are errors, ``python -W error``).
"""

from __future__ import annotations

import os
import sys

ENV_VARIABLE = "PEFT_HFT_NO_AUTOLOAD"
PTH_NAME = "peft_hft-autoload.pth"  # sorts after setuptools' "__editable__.*.pth", which makes this module importable


def enabled() -> bool:
    """False when ``PEFT_HFT_NO_AUTOLOAD`` is set to anything but ``""``, ``0``, ``false`` or ``no``."""
    return os.environ.get(ENV_VARIABLE, "").strip().lower() in ("", "0", "false", "no")


def install() -> None:
    """Put the finder in front of ``sys.meta_path`` (idempotent; nothing when disabled or peft is already in)."""
    if not enabled() or _PeftFinder in sys.meta_path:
        return
    if "peft" in sys.modules:  # too late for a hook: register now (only when something imported peft already)
        _register()
        return
    sys.meta_path.insert(0, _PeftFinder)


def _register() -> None:
    if "peft_hft" in sys.modules:  # imported already, or being imported (it imports peft itself)
        return
    try:
        import peft_hft  # noqa: F401  (registers HFT with PEFT)
    except Exception as exc:  # never break `import peft` for a plugin
        import warnings

        message = (
            f"peft-hft could not register the HFT method with PEFT ({type(exc).__name__}: {exc}); HFT adapters will "
            f"not load. Fix the installation (pip install peft-hft), or set {ENV_VARIABLE}=1 to turn this hook off."
        )
        try:
            warnings.warn(message, stacklevel=2)
        except Exception:  # warnings are errors here (python -W error): say it without breaking `import peft`
            sys.stderr.write(f"UserWarning: {message}\n")


class _PeftFinder:
    """Meta-path finder that wraps the loader of the top-level ``peft`` package, once."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        # Stay in place until peft is loaded: availability checks (transformers' is_peft_available) call
        # importlib.util.find_spec("peft") long before the import itself.
        for finder in sys.meta_path:
            if finder is cls:
                continue
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                break
        else:
            return None  # peft is not installed: let the import fail as usual
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader:
    """Runs peft's own loader, puts it back on the module, then registers HFT."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        if _PeftFinder in sys.meta_path:
            sys.meta_path.remove(_PeftFinder)
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _register()
