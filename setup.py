"""Build steps beyond pyproject.toml: ship ``peft_hft-autoload.pth`` at the root of site-packages.

The .pth file (one line, run by Python's ``site`` at interpreter start) makes HFT adapters loadable without
``import peft_hft`` (see ``_peft_hft_autoload.py``). setuptools has no declarative way to put a file at the root of
site-packages (``data_files`` land under the environment prefix, not in site-packages), so:

* regular wheels: ``build_py`` copies it into the build directory, whose contents become the wheel's root;
* editable installs (PEP 660): ``editable_wheel`` copies it into the editable wheel's root, next to setuptools' own
  ``__editable__.*.pth``, which sorts before it and makes ``_peft_hft_autoload`` importable from the checkout.

pip records both in RECORD, so ``pip uninstall peft-hft`` removes them again.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = Path(__file__).resolve().parent / "peft_hft-autoload.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(str(PTH), str(Path(self.build_lib) / PTH.name), preserve_mode=0)


class EditableWheelWithPth(editable_wheel):
    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        self.copy_file(str(PTH), str(Path(unpacked_wheel) / PTH.name), preserve_mode=0)
        return result


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
