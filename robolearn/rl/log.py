"""A fine-tuning run's record: ``metrics.jsonl`` (one JSON object per update and per evaluation), TensorBoard
events in ``tb/``, and ``plots/success.png`` (success rate against environment steps), as ``robolearn train``
keeps them. Every record carries ``env_steps``, the x axis of everything RL."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from robolearn.training.trainer import parse_metrics_line


class RunLog:
    """Appends records to ``run_dir/metrics.jsonl`` and TensorBoard (``run_dir/tb``)."""

    def __init__(self, run_dir: str | os.PathLike, *, resume_at: int | None = None, logger: str = "tensorboard"
                 ) -> None:
        """``resume_at``: the env-step count of the checkpoint a run resumes from -- records written after it by
        the interrupted run are dropped (they will be redone), so curves have no duplicates. None: a new run
        (an old ``metrics.jsonl`` is removed)."""
        from robolearn.training.loggers import make_logger

        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_at is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines()
                    if (rec := parse_metrics_line(ln)) is not None and rec.get("env_steps", 0) <= resume_at]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, self.path)
        self.tb = make_logger(logger, self.run_dir, purge_step=None if resume_at is None else resume_at + 1)

    def log(self, record: dict[str, Any], prefix: str = "") -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is None:
            return
        for k, v in record.items():
            if k != "env_steps" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb.add_scalar(prefix + k, v, record["env_steps"])

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [rec for ln in self.path.read_text().splitlines() if (rec := parse_metrics_line(ln)) is not None]

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_success(records: Sequence[dict[str, Any]], path: str | os.PathLike, *, title: str, train_label: str,
                 eval_label: str) -> str | None:
    """Success rate against environment steps: the deterministic evaluations (``eval_success_rate``) and the
    sampled training episodes (``train_success_rate``). Returns the PNG's path, or None without data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["env_steps"], r[key]) for r in records if key in r and r[key] is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    ev, tr = series("eval_success_rate"), series("train_success_rate")
    if not ev[0] and not tr[0]:
        return None
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    if tr[0]:
        ax.plot(*tr, ".-", lw=1.0, alpha=0.6, color="tab:blue", label=train_label)
    if ev[0]:
        ax.plot(*ev, "o-", color="tab:green", label=eval_label)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("success rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return str(out)
