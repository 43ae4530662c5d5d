"""Scalar loggers beside metrics.jsonl: Weights & Biases works offline, without a network; bad names are refused."""
from __future__ import annotations

import pytest

from robolearn.training.loggers import make_logger


def test_wandb_logs_offline_into_the_run_folder(tmp_path, monkeypatch):
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = make_logger("wandb", tmp_path / "run", config={"task": "push_t"})
    assert logger is not None and logger.mode == "offline"
    for step in range(1, 4):
        logger.add_scalar("loss", 1.0 / step, step)
    logger.close()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(p.suffix == ".wandb" for p in runs[0].iterdir())


def test_tensorboard_and_none(tmp_path):
    tb = make_logger("tensorboard", tmp_path)
    tb.add_scalar("loss", 0.5, 1)
    tb.close()
    assert any((tmp_path / "tb").iterdir())
    assert make_logger("none", tmp_path / "x") is None
    with pytest.raises(ValueError, match="logger must be one of tensorboard, wandb, none, got 'mlflow'"):
        make_logger("mlflow", tmp_path)
