"""``robolearn data import FORMAT ...`` and ``robolearn data export FORMAT ...``: other formats in and out.

Each format lives in its own module (``robolearn/cli/io_<format>.py``) that adds its argparse sub-command with
``add_import_parser(sub)`` and/or ``add_export_parser(sub)``; the data room holds the readers and writers
(``robolearn/data/formats/``). A format whose optional libraries are missing still shows in ``--help`` and says
which extra to install when used.
"""
from __future__ import annotations

import importlib
from typing import Any

# format -> module under robolearn.cli
IMPORTERS = {"robomimic": "io_robomimic", "lerobot": "io_lerobot"}
EXPORTERS = {"lerobot": "io_lerobot", "dp": "io_dp"}


def add_parsers(dsub: Any) -> None:
    """``data import`` and ``data export`` with one sub-command per format."""
    imp = dsub.add_parser("import", help="bring a dataset of another format into a new episode store")
    isub = imp.add_subparsers(dest="import_format", metavar="FORMAT")
    imp.set_defaults(func=lambda a: imp.print_help())
    for name, module in IMPORTERS.items():
        _module(module).add_import_parser(isub)
    exp = dsub.add_parser("export", help="write an episode store in another format")
    esub = exp.add_subparsers(dest="export_format", metavar="FORMAT")
    exp.set_defaults(func=lambda a: exp.print_help())
    for name, module in EXPORTERS.items():
        _module(module).add_export_parser(esub)


def _module(name: str) -> Any:
    return importlib.import_module(f"robolearn.cli.{name}")
