#!/usr/bin/env python
"""Does the data audit find the bad half of a mixed dataset, and does dropping it train a better policy?

For each task: collect ``--demos`` clean scripted demonstrations and ``--demos`` from the same expert with heavy
noise (``--noise``; its successes, or with ``--keep-failures`` its first ``--demos`` attempts, failed ones included), merge them into one store (the audit is not told which is which: it never reads the episodes'
provenance), then train the same policy with the same budget three times:

- ``all``: on the whole mixed store;
- ``clean``: on the clean half alone (what a perfect filter would give);
- ``filtered``: on what ``robolearn data filter --drop "action_divergence>auto"`` keeps after ``robolearn data
  audit`` (cross-fitted action divergence, the split picked from the scores alone).

Each policy is evaluated on ``--episodes`` new seeds (the noisy demonstrations use seeds from 50000, evaluation
starts at 100000, as ``robolearn train`` does). The audit's picks are scored against the hidden labels (each
episode's recorded ``source.noise``): precision and recall of the dropped set. Every finished step is kept on disk,
so a second call continues where the first stopped (``--fresh`` starts over).

    .venv/bin/python tools/bench/audit_experiment.py --tasks peg_insert --steps 4000 --episodes 100
    .venv/bin/python tools/bench/audit_experiment.py --tasks lift --noise 1.0 --steps 3000 --episodes 50
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXE = str(Path(sys.executable).with_name("robolearn"))


def sh(cmd: list[str]) -> str:
    print("$", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return r.stdout


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def collect(task: str, out: Path, demos: int, seed: int, noise: float, workers: int, bias: float = 0.0,
            keep_failures: bool = False) -> None:
    if out.exists():
        return
    sh([EXE, "collect", f"task={task}", f"episodes={demos}", f"out={out}", f"workers={workers}", f"seed={seed}",
        f"expert.noise={noise}", *([f"expert.bias={bias}"] if bias else []),
        *(["keep_failures=true"] if keep_failures else []), "progress=false"])


def train(task: str, policy: str, data: Path, run_dir: Path, steps: int, episodes: int, workers: int) -> dict:
    result = run_dir / "result.json"
    if result.exists():
        return json.loads(result.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    out = sh([EXE, "train", f"task={task}", f"policy={policy}", f"dataset={data}", f"run_dir={run_dir}",
              f"training.steps={steps}", f"training.eval_every={steps}", f"eval.episodes={episodes}",
              f"eval.workers={workers}", "eval.videos=0", "training.progress=false", "training.val_every=0",
              "logger=none"])
    s = last_json(out)
    row = {"success_rate": s["success_rate"], "eval_episodes": s["eval_episodes"], "final_loss": s["final_loss"],
           "train_steps": steps, "minutes": round((time.perf_counter() - t0) / 60, 1)}
    result.write_text(json.dumps(row))
    return row


def hidden_labels(store_path: Path) -> list[bool]:
    """True for a noisy episode: read from the provenance the audit never looks at."""
    from robolearn.data import EpisodeStore
    from robolearn.data import provenance

    with EpisodeStore.open(store_path) as store:
        entries = provenance.backfill(store.all_episode_attrs(), store.attrs.get("source"))
    return [float((e or {}).get("noise") or 0.0) > 0 or float((e or {}).get("bias") or 0.0) > 0 for e in entries]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["peg_insert"])
    ap.add_argument("--policy", default="flow_unet")
    ap.add_argument("--demos", type=int, default=100, help="clean demonstrations, and as many noisy ones")
    ap.add_argument("--noise", type=float, default=1.0, help="the noisy half's expert.noise")
    ap.add_argument("--bias", type=float, default=0.0,
                    help="the noisy half's expert.bias (peg_insert: a systematic misjudgment of the hole, mm)")
    ap.add_argument("--keep-failures", action="store_true",
                    help="the noisy half is the expert's first --demos attempts, failed ones included (default: "
                         "its first --demos successes)")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--episodes", type=int, default=100, help="evaluation episodes per policy")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rule", default="action_divergence>auto")
    ap.add_argument("--dir", type=Path, default=ROOT / "runs" / "audit_experiment")
    ap.add_argument("--out", type=Path, default=ROOT / "tools/bench/results/audit_experiment.json")
    ap.add_argument("--fresh", action="store_true", help="delete earlier stores and runs of these tasks first")
    ap.add_argument("--tag", default="", help="appended to the task's folder and result key (another noise level)")
    args = ap.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else {"tasks": {}}
    for task in args.tasks:
        base = args.dir / f"{task}{args.tag}"
        if args.fresh and base.exists():
            shutil.rmtree(base)
        base.mkdir(parents=True, exist_ok=True)
        clean, noisy, mixed = base / "clean.zarr", base / "noisy.zarr", base / "mixed.zarr"
        collect(task, clean, args.demos, 0, 0.0, args.workers)
        collect(task, noisy, args.demos, 50000, args.noise, args.workers, args.bias, args.keep_failures)
        if not mixed.exists():
            sh([EXE, "data", "merge", str(clean), str(noisy), "--out", str(mixed)])
        row: dict = {"demos_per_half": args.demos, "noise": args.noise, "bias": args.bias,
                     "keep_failures": args.keep_failures, "policy": args.policy,
                     "steps": args.steps, "rule": args.rule}
        row["clean"] = train(task, args.policy, clean, base / "run_clean", args.steps, args.episodes, args.workers)
        row["all"] = train(task, args.policy, mixed, base / "run_all", args.steps, args.episodes, args.workers)
        audit_dir = base / "audit"
        t0 = time.perf_counter()
        if not (audit_dir / "summary.json").exists():
            sh([EXE, "data", "audit", str(mixed), f"out={audit_dir}", "progress=false"])
            (audit_dir / "seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}")
        filtered = base / "filtered.zarr"
        if not filtered.exists():
            sh([EXE, "data", "filter", str(mixed), "--scores", str(audit_dir / "scores.jsonl"), "--out",
                str(filtered), "--drop", args.rule])
        labels = hidden_labels(mixed)
        from robolearn.data import EpisodeStore

        with EpisodeStore.open(filtered) as f:
            dropped = set(f.attrs["filter"]["dropped"])
        noisy_ids = {i for i, bad in enumerate(labels) if bad}
        hit = len(dropped & noisy_ids)
        row["audit"] = {
            "seconds": float((audit_dir / "seconds.txt").read_text()) if (audit_dir / "seconds.txt").exists()
            else None,
            "dropped": len(dropped), "noisy": len(noisy_ids), "noisy_dropped": hit,
            "precision": round(hit / len(dropped), 3) if dropped else None,
            "recall": round(hit / len(noisy_ids), 3) if noisy_ids else None,
        }
        # how each score alone would have split the store (its `auto` rule), against the hidden labels
        from robolearn.audit.rules import read_scores, select_episodes

        scores = read_scores(audit_dir / "scores.jsonl")
        by_score = {}
        for score in ("action_divergence", "transition_diversity", "action_jerk", "idle_share", "overall"):
            picked = select_episodes(scores, drop=[f"{score}>auto"])
            d = set(picked["dropped"])
            h = len(d & noisy_ids)
            by_score[score] = {"dropped": len(d), "precision": round(h / len(d), 3) if d else None,
                               "recall": round(h / len(noisy_ids), 3) if noisy_ids else None}
        row["audit"]["auto_split_by_score"] = by_score
        row["filtered"] = train(task, args.policy, filtered, base / "run_filtered", args.steps, args.episodes,
                                args.workers)
        row["filtered_minus_all"] = round(row["filtered"]["success_rate"] - row["all"]["success_rate"], 3)
        row["clean_minus_filtered"] = round(row["clean"]["success_rate"] - row["filtered"]["success_rate"], 3)
        results["tasks"][f"{task}{args.tag}"] = row
        results.update({"machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU, "
                                   f"Python {platform.python_version()}",
                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print(json.dumps({f"{task}{args.tag}": row}), flush=True)


if __name__ == "__main__":
    main()
