"""Training loop for chunk policies: optimizer, schedule, EMA, checkpoints, resume, metrics, plots.

``robolearn.training.settings`` imports no torch; the rest loads on first use.
"""
from __future__ import annotations

from typing import Any

from robolearn.training.settings import TrainSettings, cosine_with_warmup

__all__ = ["EMA", "TrainSettings", "Trainer", "cosine_with_warmup"]


def __getattr__(name: str) -> Any:
    if name == "Trainer":
        from robolearn.training.trainer import Trainer

        return Trainer
    if name == "EMA":
        from robolearn.training.ema import EMA

        return EMA
    raise AttributeError(f"module 'robolearn.training' has no attribute {name!r}")
