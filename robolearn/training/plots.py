"""PNG plots of a run's metrics: what a person looks at first."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def plot_metrics(records: Sequence[dict[str, Any]], out_dir: str | Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in records if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    steps, loss = series("loss")
    if steps:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        ax.plot(steps, loss, label="train loss", lw=1.2)
        vs, vl = series("val_loss")
        if vs:
            ax.plot(vs, vl, "o-", label="validation loss (EMA weights)", lw=1.2)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        ax.set_title("training loss")
        fig.tight_layout()
        path = out / "loss.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    es, sr = series("success_rate")
    if es:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        ax.plot(es, sr, "o-", color="tab:green")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step")
        ax.set_ylabel("success rate")
        ax.grid(alpha=0.3)
        ax.set_title("evaluation success rate")
        fig.tight_layout()
        path = out / "success.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    return written
