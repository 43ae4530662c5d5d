"""Make the small real test policies and environments of this folder importable as ``rt_policies``."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
