"""Collect residual-RL fine-tuning runs into one JSON and one plot (success rate against environment steps).

Reads each run folder's ``metrics.jsonl`` (written by ``robolearn finetune``) and its ``config.yaml`` (the
settings that differ between runs), and writes::

    <out>.json   per run: label, settings, evaluations [(env_steps, success_rate)], training-success means,
                 throughput (env steps/s of collection and PPO updates -- evaluations and checkpoints excluded,
                 as ``finetune`` reports it -- and the rollout share of that time), best and last evaluation
    <out>.png    held-out success rate against environment steps, one line per run

Example (what the README quotes)::

    python tools/bench/residual_curves.py runs/peg_residual_v1 runs/peg_residual_v2 \\
        --labels "obs_norm=base, 32 envs" "obs_norm=running, 64 envs" --out tools/bench/results/residual_peg_insert
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def load_records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        sys.exit(f"residual_curves: {path} does not exist (not a finetune run folder?)")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"residual_curves: skipping line {n} of {path}: not JSON (a run killed mid-write?)", file=sys.stderr)
    return out


def summarize(run: Path, label: str) -> dict:
    records = load_records(run)
    evals = [(int(r["env_steps"]), float(r["eval_success_rate"])) for r in records
             if r.get("eval_success_rate") is not None]
    updates = [r for r in records if "update" in r]
    train = [r["train_success_rate"] for r in updates if r.get("train_success_rate") is not None]
    rollout_s = sum(float(r.get("rollout_s", 0.0)) for r in updates)
    update_s = sum(float(r.get("update_s", 0.0)) for r in updates)
    steps = updates[-1]["env_steps"] - (updates[0]["env_steps"] - _batch(updates)) if updates else 0
    settings = {}
    cfg = run / "config.yaml"
    if cfg.is_file():
        import yaml

        doc = yaml.safe_load(cfg.read_text()) or {}
        settings = {k: doc.get(k) for k in ("num_envs", "workers", "env_steps", "seed") if k in doc}
        settings.update(doc.get("finetune") or doc.get("settings") or {})
    return {
        "label": label, "run": str(run), "settings": settings, "evaluations": evals,
        "success_before": evals[0][1] if evals else None,
        "success_last": evals[-1][1] if evals else None,
        "success_best": max(s for _, s in evals) if evals else None,
        "env_steps": updates[-1]["env_steps"] if updates else 0,
        "train_success_first_10_updates": round(float(np.mean(train[:10])), 4) if train else None,
        "train_success_last_10_updates": round(float(np.mean(train[-10:])), 4) if train else None,
        "env_steps_s": round(steps / (rollout_s + update_s), 1) if rollout_s + update_s > 0 else None,
        "rollout_share": round(rollout_s / (rollout_s + update_s), 3) if rollout_s + update_s > 0 else None,
    }


def _batch(updates: list[dict]) -> int:
    if len(updates) >= 2:
        return int(updates[1]["env_steps"]) - int(updates[0]["env_steps"])
    return int(updates[0]["env_steps"]) if updates else 0


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        if row["evaluations"]:
            x, y = zip(*row["evaluations"])
            ax.plot(np.asarray(x) / 1e6, y, marker="o", ms=3, label=row["label"])
    ax.set_xlabel("environment steps (millions)")
    ax.set_ylabel("held-out success rate")
    ax.set_ylim(0, 1)
    ax.axhline(0.95, color="grey", ls=":", lw=1, label="target 0.95")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="finetune run folders")
    p.add_argument("--labels", nargs="*", help="one label per run (default: the folder names)")
    p.add_argument("--out", type=Path, required=True, help="output path without suffix (.json and .png are written)")
    p.add_argument("--title", default="residual PPO: held-out success")
    p.add_argument("--note", default="", help="free text stored in the JSON (machine, base, budget)")
    args = p.parse_args(argv)
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        p.error(f"{len(labels)} labels for {len(args.runs)} runs")
    rows = [summarize(r, lab) for r, lab in zip(args.runs, labels)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"bench": "residual_curves", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "note": args.note, "runs": rows}
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    plot(rows, args.out.with_suffix(".png"), args.title)
    for r in rows:
        print(f"{r['label']:<40} before {r['success_before']}  best {r['success_best']}  last {r['success_last']}  "
              f"at {r['env_steps']:,} steps  {r['env_steps_s']} steps/s")
    print(json.dumps({"bench": "residual_curves", "out": str(args.out.with_suffix('.json'))}))


if __name__ == "__main__":
    main()
