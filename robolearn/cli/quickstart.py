"""``robolearn quickstart``: the main job on the built-in default, end to end."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from robolearn.cli import print_json
from robolearn.cli.config import compose


def run(cfg: DictConfig) -> dict[str, Any]:
    from robolearn.cli import collect
    from robolearn.data import EpisodeStore

    out = Path(cfg.out_dir) / f"{cfg.task}.zarr"
    print(f"[1/2] collecting {cfg.episodes} scripted demonstrations of {cfg.task} into {out}")
    collect_cfg = compose(
        "collect",
        [f"task={cfg.task}", f"episodes={cfg.episodes}", f"out={out}", f"seed={cfg.seed}",
         f"workers={cfg.workers}", f"progress={str(bool(cfg.progress)).lower()}"],
    )
    collected = collect.run(collect_cfg)
    print(f"[2/2] validating {out}")
    with EpisodeStore.open(out) as store:
        report = store.validate()
        lengths = store.episode_lengths
    summary = {
        "task": cfg.task,
        "dataset": str(out),
        "episodes": report["episodes"],
        "steps": report["steps"],
        "mean_episode_length": round(float(lengths.mean()), 1) if len(lengths) else 0.0,
        "expert_success_rate": collected["success_rate"],
    }
    print(f"done: {summary['episodes']} episodes, {summary['steps']} steps in {out} "
          f"(expert success {summary['expert_success_rate']:.0%}); inspect with: robolearn data info {out}")
    print_json(summary)
    return summary
