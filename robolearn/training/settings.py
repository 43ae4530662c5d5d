"""Training hyperparameters (no torch import: the CLI's config schema extends them)."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class TrainSettings:
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 1e-6
    betas: tuple[float, float] = (0.95, 0.999)
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_power: float = 0.75
    ema_max_decay: float = 0.9999
    log_every: int = 50
    val_every: int = 500
    val_batches: int = 4
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: evaluate only at the end
    seed: int = 0
    progress: bool = True
    stop_after: int | None = None  # stop (as if interrupted) after this step: for tests of resume


    def check(self) -> None:
        """Refuse settings that would crash late or delete checkpoints; messages name the setting."""
        positive = ("steps", "batch_size", "log_every", "keep_checkpoints", "val_batches")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("val_every", "ckpt_every", "eval_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"training.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"training.lr must be > 0, got {self.lr}")


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
