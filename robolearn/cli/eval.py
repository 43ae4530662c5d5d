"""``robolearn eval``: success rate of a checkpoint (any registered policy kind) in its task, with per-episode
results and videos. The same checkpoint, seed and episode count print the same results, whatever ``num_envs``
and ``workers`` (see :mod:`robolearn.evaluation.rollout`)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from robolearn.cli import CLIError, print_json
from robolearn.cli.evaluation import Evaluator, pick_device
from robolearn.cli.accel import apply_cache
from robolearn.cli.runtime import (apply_inference, apply_rank, check_inference_options, checkpoint_run_config,
                                   load_checkpoint, probe_task)
from robolearn.policies.config import ConfigError, check_geometry


def run(cfg: DictConfig) -> dict[str, Any]:
    if not cfg.checkpoint:
        raise CLIError("checkpoint= is required (a checkpoint folder, e.g. runs/train/<run>/checkpoints/latest)")
    ckpt = Path(cfg.checkpoint)
    if cfg.episodes < 1:
        raise CLIError(f"episodes must be >= 1, got {cfg.episodes}")
    device = pick_device(str(cfg.device))
    check_inference_options(cfg.dtype, bool(cfg.graph), device, cfg.cache, cfg.rank)
    policy = load_checkpoint(ckpt, map_location=device)
    run_cfg = checkpoint_run_config(ckpt)
    task = run_cfg.get("task")
    if not task:
        raise CLIError(f"{ckpt / 'config.yaml'} does not say which task the policy was trained on ('run.task')")
    if task == "none":
        raise CLIError(f"{ckpt} was trained without a simulator (task=none): there is no environment to evaluate it "
                       f"in; serve it (robolearn serve checkpoint={ckpt}) to a robot, or train on a simulated task")
    env_config = {**(run_cfg.get("env_config") or {}), **OmegaConf.to_container(cfg.env, resolve=True)}
    probe_task(task, env_config, policy)
    if cfg.sampler.kind is not None or cfg.sampler.steps is not None:
        try:
            policy.set_sampler(kind=cfg.sampler.kind, steps=cfg.sampler.steps)
        except ValueError as e:
            raise CLIError(f"sampler: {e}") from None
    policy = apply_cache(policy, ckpt, cfg.cache, cfg.cache_updates)
    policy = apply_rank(policy, ckpt, cfg.rank)
    policy = apply_inference(policy, ckpt, cfg.dtype, bool(cfg.graph))
    n_action_steps = int(cfg.n_action_steps) if cfg.n_action_steps is not None else int(policy.n_action_steps)
    try:
        check_geometry(policy.horizon, policy.n_obs_steps, n_action_steps, where="")
    except ConfigError as e:
        raise CLIError(f"n_action_steps={n_action_steps} does not fit this policy's chunks: {e}") from None
    run_dir = Path(cfg.run_dir) if cfg.run_dir else Path("runs/eval") / f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    evaluator = Evaluator(task, env_config, episodes=int(cfg.episodes), num_envs=int(cfg.num_envs),
                          workers=int(cfg.workers), seed=int(cfg.seed), videos=int(cfg.videos) if cfg.video else 0,
                          run_dir=run_dir, device=device, n_action_steps=n_action_steps)
    try:
        result = evaluator(policy, _step(ckpt))
    finally:
        evaluator.close()
    summary = {
        "checkpoint": str(ckpt), "task": task, "policy_type": policy.policy_type, "sampler": policy.sampler_config,
        "n_action_steps": n_action_steps, "seed": int(cfg.seed), "dtype": str(cfg.dtype), "graph": bool(cfg.graph),
        **result, "run_dir": str(run_dir),
    }
    if policy.policy_type == "cached":
        summary["cache"] = {"method": policy.schedule.method, "sampler": policy.schedule.sampler,
                            "compute_fraction": round(policy.schedule.compute_fraction, 4)}
    if policy.policy_type == "steered":
        summary["rank"] = int(policy.rank)  # noise candidates per decision (1: the actor's choice alone)
    (run_dir / "result.json").write_text(json.dumps(summary, indent=1))
    print(f"{task}: {describe_result(summary)}; per-episode results in {run_dir / 'eval'}")
    print_json(summary)
    return summary


def describe_result(summary: dict[str, Any]) -> str:
    """One human line: success rate, the task's score where it has one (Push-T's coverage score), mean return."""
    text = f"success rate {summary['success_rate']:.2f} over {summary['episodes']} episodes"
    if summary.get("score") is not None:
        text += (f", coverage score {summary['score']:.3f} (mean of each episode's best clip(coverage / 0.95); "
                 f"Diffusion Policy's Push-T metric)")
    return text + f" (mean return {summary['mean_return']:.3f})"


def _step(ckpt: Path) -> int:
    try:
        return int(json.loads((ckpt / "extra.json").read_text()).get("step", 0))
    except (OSError, ValueError, AttributeError):
        return 0
