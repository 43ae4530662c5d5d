"""``robolearn bench env``: environment steps per second, written as JSON."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from robolearn.cli import CLIError, print_json


def run(cfg: DictConfig) -> dict[str, Any]:
    from sim.bench import bench_env

    env_overrides = OmegaConf.to_container(cfg.env, resolve=True) or {}
    try:
        result = bench_env(cfg.task, steps=int(cfg.steps), seed=int(cfg.seed), **env_overrides)
    except (ValueError, TypeError, KeyError) as e:
        raise CLIError(str(e).strip("'\"")) from None
    result = {
        **result,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(cfg.out or f"runs/bench/env_{str(cfg.task).replace('/', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{cfg.task}: {result['steps_per_s']:,.0f} steps/s  ->  {out}")
    print_json(result)
    return result
