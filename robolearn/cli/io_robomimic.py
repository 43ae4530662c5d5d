
"""Placeholder: being written (issue 16)."""
from __future__ import annotations

from typing import Any


def add_import_parser(sub: Any) -> None:
    pass


def add_export_parser(sub: Any) -> None:
    pass
