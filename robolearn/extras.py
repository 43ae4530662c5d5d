"""Optional parts of robolearn and the extra that installs each.

The core (`pip install robolearn-mujoco`) trains, evaluates and runs policies. The rest comes with extras:
``server`` (the policy server and remote policies: websockets, msgpack), ``tensorboard``, ``wandb``, ``io``
(robomimic HDF5 and LeRobot import/export: h5py, pyarrow, av), ``teleop`` (SpaceMouse: hidapi), ``all``. A
missing part is a :class:`MissingExtra` naming the extra, printed by the CLI as one line.
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["DISTRIBUTION", "MissingExtra", "require"]

#: The name on PyPI (``robolearn`` there is an unrelated 2018 package); the import name stays ``robolearn``.
DISTRIBUTION = "robolearn-mujoco"


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says which extra installs it."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` for ``what`` (e.g. "robolearn serve"), or raise :class:`MissingExtra` naming ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(f"{what} needs the Python package {module.split('.')[0]!r}, which is not installed "
                           f"({e}): pip install '{DISTRIBUTION}[{extra}]'") from None
