"""Collect fine-tuning runs (residual RL and latent-noise steering) into one JSON and one plot.

Reads each run folder's ``metrics.jsonl`` (written by ``robolearn finetune``) and its ``config.yaml`` (method and
the settings that differ between runs), and writes::

    <out>.json   per run: label, method, settings, evaluations [(env_steps, success_rate, wall_s)], best and last
                 evaluation (overall and within --budget environment steps), throughput (env steps/s of
                 collection and learning -- evaluations and checkpoints excluded, as ``finetune`` reports it)
    <out>.png    held-out success rate against environment steps (left) and against wall time (right, seconds of
                 collection + learning + evaluation), one line per run

Example (what the README quotes)::

    python tools/bench/finetune_curves.py runs/peg_residual_v4 runs/peg_steer_sac runs/peg_steer_na \\
        --labels "residual PPO" "steer sac" "steer na" --budget 300000 --out tools/bench/results/finetune_peg_insert
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

# a training record's seconds of collection and learning: PPO logs rollout_s/update_s, the replay-buffer learners
# (steering, residual td3: rl/loop.py's OffPolicyRun) act_s/learn_s; a record holds one pair
TRAIN_SECONDS = ("rollout_s", "update_s", "act_s", "learn_s")


def load_records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        sys.exit(f"finetune_curves: {path} does not exist (not a finetune run folder?)")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"finetune_curves: skipping line {n} of {path}: not JSON (a run killed mid-write?)", file=sys.stderr)
    return out


def summarize(run: Path, label: str, budget: int | None) -> dict:
    records = load_records(run)
    doc: dict = {}
    cfg = run / "config.yaml"
    if cfg.is_file():
        import yaml

        doc = yaml.safe_load(cfg.read_text()) or {}
    method = str(doc.get("method") or "residual")
    settings = {k: doc.get(k) for k in ("num_envs", "workers", "env_steps", "seed") if k in doc}
    settings.update(doc.get("finetune") or doc.get("settings") or {})
    wall, train_s, evals, trains, first_steps, last_steps = 0.0, 0.0, [], [], None, 0
    for r in records:
        if r.get("eval_success_rate") is not None:
            wall += float(r.get("eval_s") or 0.0)
            evals.append((int(r["env_steps"]), float(r["eval_success_rate"]), round(wall, 1)))
        elif any(k in r for k in TRAIN_SECONDS):
            seconds = sum(float(r.get(k) or 0.0) for k in TRAIN_SECONDS)
            wall, train_s = wall + seconds, train_s + seconds
            first_steps = r["env_steps"] if first_steps is None else first_steps
            last_steps = int(r["env_steps"])
            if r.get("train_success_rate") is not None:
                trains.append(float(r["train_success_rate"]))
    within = [e for e in evals if budget is None or e[0] <= budget]
    return {
        "label": label, "run": str(run), "method": method, "settings": settings, "evaluations": evals,
        "success_before": evals[0][1] if evals else None,
        "success_last": evals[-1][1] if evals else None,
        "success_best": max(e[1] for e in evals) if evals else None,
        "budget": budget,
        "success_last_within_budget": within[-1][1] if within else None,
        "success_best_within_budget": max(e[1] for e in within) if within else None,
        "wall_s_at_budget": within[-1][2] if within else None,
        "env_steps": last_steps,
        "train_success_first_10": round(float(np.mean(trains[:10])), 4) if trains else None,
        "train_success_last_10": round(float(np.mean(trains[-10:])), 4) if trains else None,
        "env_steps_s": round(last_steps / train_s, 1) if train_s > 0 else None,
    }


def plot(rows: list[dict], path: Path, title: str, budget: int | None, target: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4 + 0.22 * len(rows)), sharey=True)
    for row in rows:
        if row["evaluations"]:
            steps, success, wall = zip(*row["evaluations"])
            line, = ax.plot(np.asarray(steps) / 1e6, success, marker="o", ms=3, label=row["label"])
            bx.plot(np.asarray(wall) / 60, success, marker="o", ms=3, color=line.get_color(), label=row["label"])
    ax.set_xlabel("environment steps (millions)")
    bx.set_xlabel("wall time (minutes: collection + learning + evaluation)")
    ax.set_ylabel("held-out success rate")
    ax.set_ylim(0, 1)
    for a in (ax, bx):
        if target is not None:
            a.axhline(target, color="grey", ls=":", lw=1, label=f"target {target:g}")
        a.grid(alpha=0.3)
    if budget:
        ax.axvline(budget / 1e6, color="grey", ls="--", lw=1, label=f"budget {budget:,}")
    ax.set_title(title)
    # below both panels, so long labels never hide the curves
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2 if len(rows) > 3 else 1, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.045 * ((len(labels) + 1) // 2), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="finetune run folders")
    p.add_argument("--labels", nargs="*", help="one label per run (default: the folder names)")
    p.add_argument("--out", type=Path, required=True, help="output path without suffix (.json and .png are written)")
    p.add_argument("--title", default="fine-tuning: held-out success")
    p.add_argument("--budget", type=int, default=None, help="also report success within this many env steps")
    p.add_argument("--target", type=float, default=None, help="a horizontal target line (e.g. 0.95)")
    p.add_argument("--note", default="", help="free text stored in the JSON (machine, base, budget)")
    args = p.parse_args(argv)
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        p.error(f"{len(labels)} labels for {len(args.runs)} runs")
    rows = [summarize(r, lab, args.budget) for r, lab in zip(args.runs, labels)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"bench": "finetune_curves", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "note": args.note, "runs": rows}
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    plot(rows, args.out.with_suffix(".png"), args.title, args.budget, args.target)
    for r in rows:
        budget = f"  within {r['budget']:,}: best {r['success_best_within_budget']} at {r['wall_s_at_budget']} s" \
            if r["budget"] else ""
        print(f"{r['label']:<32} before {r['success_before']}  best {r['success_best']}  last {r['success_last']}  "
              f"at {r['env_steps']:,} steps  {r['env_steps_s']} steps/s{budget}")
    print(json.dumps({"bench": "finetune_curves", "out": str(args.out.with_suffix('.json'))}))


if __name__ == "__main__":
    main()
