"""Where scalar metrics go besides ``metrics.jsonl`` (which is always written): TensorBoard, Weights & Biases,
or nowhere (``logger=tensorboard|wandb|none``).

TensorBoard is the default; when it is not installed the run goes on without it and says so once (the JSON lines
and the PNG plots hold the same numbers). Weights & Biases runs offline unless ``WANDB_MODE`` (or an API key in
``WANDB_API_KEY``) says otherwise, so it works on a machine without a network: ``wandb sync <run>/wandb/...``
uploads the run later.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

LOGGERS = ("tensorboard", "wandb", "none")


class ScalarLogger:
    """``add_scalar(name, value, step)`` and ``close()``: the two calls the trainers make."""

    def add_scalar(self, name: str, value: float, step: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


class _TensorBoard(ScalarLogger):
    def __init__(self, log_dir: Path, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def add_scalar(self, name: str, value: float, step: int) -> None:
        self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class _Wandb(ScalarLogger):
    def __init__(self, run_dir: Path, project: str, name: str, config: dict[str, Any] | None) -> None:
        from robolearn.extras import require

        wandb = require("wandb", "wandb", "logger=wandb")
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=project, name=name, dir=str(run_dir), config=config or {}, mode=mode,
                              reinit="finish_previous")
        self.mode = mode

    def add_scalar(self, name: str, value: float, step: int) -> None:
        self.run.log({name: value}, step=int(step))

    def close(self) -> None:
        self.run.finish()


def make_logger(kind: str, run_dir: str | os.PathLike, *, purge_step: int | None = None, project: str = "robolearn",
                config: dict[str, Any] | None = None) -> ScalarLogger | None:
    """The scalar logger ``kind`` for a run folder (``tb/`` for TensorBoard, ``wandb/`` for W&B); None for
    ``none`` or a TensorBoard that is not installed."""
    if kind not in LOGGERS:
        raise ValueError(f"logger must be one of {', '.join(LOGGERS)}, got {kind!r}")
    run_dir = Path(run_dir)
    if kind == "none":
        return None
    if kind == "wandb":
        return _Wandb(run_dir, project, run_dir.name, config)
    try:
        import tensorboard  # noqa: F401  (torch's SummaryWriter needs it)
    except ImportError:
        from robolearn.extras import DISTRIBUTION

        print(f"note: TensorBoard is not installed, so {run_dir}/tb is not written (metrics.jsonl and plots/ are): "
              f"pip install '{DISTRIBUTION}[tensorboard]', or logger=none to silence this", file=sys.stderr)
        return None
    return _TensorBoard(run_dir / "tb", purge_step)
