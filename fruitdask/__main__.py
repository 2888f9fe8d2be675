"""``python -m fruitdask``."""

import os
import sys


def _own_package() -> None:
    """From a folder that holds a clone named ``fruitdask``, Python takes that
    folder for a namespace package called fruitdask (the current directory
    comes first on the path), and nothing of the real one imports: put this
    file's package first instead."""
    pkg = sys.modules.get("fruitdask")
    if pkg is None or getattr(pkg, "__file__", None) is not None:
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cwd = os.getcwd()
    sys.path[:] = [here, *(p for p in sys.path if os.path.abspath(p or ".") != cwd)]
    for name in [m for m in sys.modules if m == "fruitdask" or m.startswith("fruitdask.")]:
        del sys.modules[name]


_own_package()

from fruitdask.cli import console_main  # noqa: E402 - after the path is right

if __name__ == "__main__":
    console_main()
