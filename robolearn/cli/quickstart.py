"""``robolearn quickstart``: the main job on the built-in default, end to end.

Collect scripted demonstrations, train a chunk policy on them, evaluate it in MuJoCo, and say where the video
and the plots are. Re-running it reuses the collected episodes (collection only tops the store up) and starts
a fresh training run.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from robolearn.cli import CLIError, print_json
from robolearn.cli.config import compose


def run(cfg: DictConfig) -> dict[str, Any]:
    from robolearn.cli import collect, train
    from robolearn.data import EpisodeStore

    t0 = time.perf_counter()
    store_path = Path(cfg.out_dir) / f"{cfg.task}.zarr"
    have = EpisodeStore.open(store_path).n_episodes if store_path.exists() else 0
    missing = max(0, int(cfg.episodes) - have)
    print(f"[1/3] demonstrations: {cfg.task}, {cfg.episodes} episodes in {store_path} ({have} there already)",
          flush=True)
    collected: dict[str, Any] = {"success_rate": None}
    if missing:
        collected = collect.run(compose("collect", [
            f"task={cfg.task}", f"episodes={missing}", f"out={store_path}", f"seed={cfg.seed}",
            f"workers={cfg.workers}", f"progress={str(bool(cfg.progress)).lower()}"]))
    run_dir = Path(cfg.run_dir)
    train_cfg = compose("train", [
        f"task={cfg.task}", f"policy={cfg.policy}", f"dataset={store_path}", f"run_dir={run_dir}",
        f"training.steps={cfg.train_steps}", f"eval.episodes={cfg.eval_episodes}", f"eval.workers={cfg.workers}",
        f"training.seed={cfg.seed}", f"training.progress={str(bool(cfg.progress)).lower()}", *cfg.train])
    if run_dir.exists():
        # A fresh run each time (the quickstart is a demonstration, not an experiment) -- but only ever delete
        # a folder that is an earlier training run.
        if not ((run_dir / "config.yaml").exists() or (run_dir / "checkpoints").exists()):
            raise CLIError(f"run_dir {run_dir} exists and is not an earlier training run; choose another run_dir")
        shutil.rmtree(run_dir)
    print(f"[2/3] training {cfg.policy} for {cfg.train_steps} steps, then [3/3] evaluating on "
          f"{cfg.eval_episodes} episodes; run folder {run_dir}", flush=True)
    trained = train.run(train_cfg)
    summary = {
        "task": cfg.task,
        "dataset": str(store_path),
        "demonstrations": max(have, int(cfg.episodes)),
        "expert_success_rate": collected.get("success_rate"),
        "policy": cfg.policy,
        "train_steps": trained["step"],
        "checkpoint": trained["checkpoint"],
        "success_rate": trained["success_rate"],
        "eval_episodes": trained["eval_episodes"],
        "video": (trained["videos"] or [None])[0],
        "plots": trained["plots"],
        "minutes": round((time.perf_counter() - t0) / 60, 1),
    }
    print()
    if summary["success_rate"] is not None:
        print(f"success rate: {summary['success_rate']:.2f} over {summary['eval_episodes']} evaluation episodes "
              f"of {cfg.task} ({summary['minutes']} min)")
    print(f"video:        {summary['video']}")
    print(f"plots:        {', '.join(summary['plots'])}")
    print(f"checkpoint:   {summary['checkpoint']}")
    print(f"next:         robolearn eval checkpoint={summary['checkpoint']} episodes=50 video=true")
    print_json(summary)
    return summary
