"""Metadata lives in pyproject.toml; this file only ships ``svfit-autoload.pth`` into site-packages.

The .pth file imports ``_svfit_autoload`` at interpreter start-up, which registers SVFit with PEFT the moment peft
is imported, so that saved adapters load without ``import svfit`` (see src/_svfit_autoload.py). A .pth file only
works at the top of site-packages, which no package-data option reaches, hence this build_py:

* regular wheel (``pip install .``): build_lib is the wheel's root, i.e. site-packages;
* editable wheel (``pip install -e .``, setuptools >= 64): build_lib is discarded and the wheel is packed from the
  install command's ``install_lib`` (the unpacked wheel), so the file goes there too.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "svfit-autoload.pth"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src", PTH)


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        self.copy_file(SOURCE, os.path.join(self.build_lib, PTH), preserve_mode=0)
        if getattr(self, "editable_mode", False):
            wheel_root = self.get_finalized_command("install").install_lib
            if wheel_root:
                self.mkpath(wheel_root)
                self.copy_file(SOURCE, os.path.join(wheel_root, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=True):
        return list(super().get_outputs(include_bytecode)) + [os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": build_py_with_pth})
