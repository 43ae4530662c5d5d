"""PNG plots of a run's metrics: what a person looks at first."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence


def plot_metrics(records: Sequence[dict[str, Any]], out_dir: str | Path) -> list[str]:
    """``loss.png`` (train and validation loss) and ``success.png`` (evaluation success rate), where data exists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in records if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    def figure(name: str, title: str, ylabel: str, draw: Callable[[Any], None]) -> None:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        draw(ax)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(str(out / name))

    def draw_loss(ax: Any) -> None:
        ax.plot(*series("loss"), label="train loss", lw=1.2)
        vs, vl = series("val_loss")
        if vs:
            ax.plot(vs, vl, "o-", label="validation loss (EMA weights)", lw=1.2)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend()

    def draw_success(ax: Any) -> None:
        ax.plot(*series("success_rate"), "o-", color="tab:green", label="success rate")
        ss, sv = series("score")
        if ss:  # the task's own score (Push-T: the coverage score, Diffusion Policy's metric)
            ax.plot(ss, sv, "s--", color="tab:blue", label="score (mean of each episode's best)")
            ax.legend(loc="lower right")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)

    if series("loss")[0]:
        figure("loss.png", "training loss", "loss", draw_loss)
    if series("success_rate")[0]:
        title = "evaluation success rate" + (" and score" if series("score")[0] else "")
        figure("success.png", title, "success rate" + (" / score" if series("score")[0] else ""), draw_success)
    return written
