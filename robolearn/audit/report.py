"""What ``data audit`` writes: ``scores.jsonl``, ``summary.json``, ``report.png`` and ``report.html`` (which links
the replayed videos of the worst episodes that ``robolearn/cli/audit.py`` makes: only the CLI imports ``sim``)."""
from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

PLOTTED = ("action_divergence", "transition_diversity", "overall", "length", "idle_share", "action_jerk")
COLUMNS = ("episode", "seed", "length", "action_divergence", "transition_diversity", "idle_share", "action_jerk",
           "success", "overall", "worst_score")


def worst(rows: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    ranked = sorted(rows, key=lambda r: -(r["overall"] if r["overall"] is not None else -np.inf))
    return ranked[:n]


def write_scores(out: Path, rows: Sequence[dict[str, Any]], summary: dict[str, Any]) -> Path:
    """``scores.jsonl`` (one line per episode, then the summary line) and ``summary.json``, each written to a
    temporary name and renamed, so a reader never sees half a file."""
    path = out / "scores.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write(json.dumps({"summary": summary}) + "\n")
    os.replace(tmp, path)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / "summary.json")
    return path


def plot(out: Path, rows: Sequence[dict[str, Any]], summary: dict[str, Any], n_worst: int) -> Path:
    """One page: a histogram per score (the worst episodes marked in red) and the worst episodes listed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bad = {r["episode"] for r in worst(rows, n_worst)}
    fig = plt.figure(figsize=(13, 9.5))
    grid = fig.add_gridspec(3, 3, height_ratios=[1, 1, 1.1])
    for i, key in enumerate(PLOTTED):
        ax = fig.add_subplot(grid[i // 3, i % 3])
        vals = np.array([r.get(key) if r.get(key) is not None else np.nan for r in rows], dtype=np.float64)
        marked = np.array([r["episode"] in bad for r in rows])
        ok = np.isfinite(vals)
        if not ok.any():
            ax.text(0.5, 0.5, "not available", ha="center", va="center", transform=ax.transAxes)
        else:
            n_bins = min(40, max(5, int(np.sqrt(ok.sum()))))
            pos = vals[ok]
            if pos.min() > 0 and pos.max() > 20 * np.median(pos):  # heavy tail: log bins show both ends
                bins = np.geomspace(pos.min(), pos.max(), n_bins + 1)
                ax.set_xscale("log")
            else:
                bins = np.histogram_bin_edges(pos, bins=n_bins)
            ax.hist(vals[ok & ~marked], bins=bins, color="#4C72B0", label="episodes")
            if (ok & marked).any():
                ax.hist(vals[ok & marked], bins=bins, color="#C44E52", label=f"worst {len(bad)}")
            ax.axvline(float(np.median(vals[ok])), color="k", lw=0.8, ls="--")
        ax.set_title(key.replace("_", " "), fontsize=10)
        ax.set_ylabel("episodes", fontsize=8)
        if i == 0:
            ax.legend(fontsize=7)
    ax = fig.add_subplot(grid[2, :])
    ax.axis("off")
    head = ["episode", "seed", "length", "act. div.", "trans. div.", "idle", "jerk", "success", "overall", "why"]
    table = []
    for r in worst(rows, min(n_worst, 12)):
        table.append([str(r["episode"]), str(r.get("seed")), str(r["length"]), _fmt(r.get("action_divergence")),
                      _fmt(r.get("transition_diversity")), _fmt(r.get("idle_share")), _fmt(r.get("action_jerk")),
                      str(r.get("success")), _fmt(r.get("overall")), str(r.get("worst_score", "")).replace("_", " ")])
    if table:
        t = ax.table(cellText=table, colLabels=head, loc="upper center", cellLoc="center")
        t.auto_set_font_size(False)
        t.set_fontsize(8)
        t.scale(1, 1.2)
    ax.set_title("worst episodes (by overall: the largest robust z-score)", fontsize=10)
    fig.suptitle(f"data audit: {Path(summary['store']).name} — {summary['episodes']:,} episodes, "
                 f"{summary['steps']:,} steps (task {summary.get('task')}); dashed: median", fontsize=12)
    fig.tight_layout()
    path = out / "report.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def write_html(out: Path, rows: Sequence[dict[str, Any]], summary: dict[str, Any], n_worst: int,
               videos: dict[int, str]) -> Path:
    cells = []
    for r in worst(rows, n_worst):
        tds = "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in COLUMNS)
        v = videos.get(r["episode"])
        link = f'<a href="{html.escape(os.path.relpath(v, out))}">video</a>' if v else ""
        cells.append(f"<tr>{tds}<td>{link}</td></tr>")
    head = "".join(f"<th>{c.replace('_', ' ')}</th>" for c in COLUMNS) + "<th></th>"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>data audit: {html.escape(summary['store'])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:3px 8px;text-align:right}}</style></head><body>
<h1>Data audit</h1><p>{html.escape(summary['store'])}: {summary['episodes']:,} episodes, {summary['steps']:,} steps,
task {html.escape(str(summary.get('task')))}; action divergence by {html.escape(summary['action_divergence']['method'])}.
Scores per episode are in <code>scores.jsonl</code>; <code>robolearn data filter</code> applies rules to them.</p>
<img src="report.png" style="max-width:100%"><h2>Worst {len(cells)} episodes</h2>
<table><tr>{head}</tr>{''.join(cells)}</table></body></html>
"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
