"""What a checkpoint folder is called and holds, and its error type: no torch import, so that every command (a
``robolearn data info`` too) can name and catch checkpoint problems without loading the models."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CONFIG", "EXTRA", "NORMALIZER", "VERSION", "WEIGHTS", "CheckpointError", "checkpoint_folder"]

WEIGHTS, CONFIG, NORMALIZER, VERSION, EXTRA = (
    "model.safetensors", "config.yaml", "normalizer.json", "version.json", "extra.json"
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the folder, file or key at fault."""


def checkpoint_folder(folder: str | os.PathLike) -> Path:
    """The checkpoint a path means: a training or fine-tuning run folder (``runs/train/<run>``, which holds
    ``checkpoints/latest`` but no weights of its own) means its latest checkpoint; anything else itself."""
    folder = Path(folder)
    latest = folder / "checkpoints" / "latest"
    if folder.is_dir() and not (folder / WEIGHTS).exists() and latest.exists():
        return latest
    return folder
