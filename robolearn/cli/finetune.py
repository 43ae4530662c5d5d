"""``robolearn finetune method=residual|steer checkpoint=BASE``: RL fine-tuning of a trained chunk policy in its
MuJoCo task, without retraining it: residual RL (ResiP, :mod:`robolearn.rl.residual`) or latent-noise steering
(DSRL, :mod:`robolearn.rl.steer`). This module wires them to checkpoints, ``sim`` environments, the evaluator and
the run folder.

Everything that can be wrong with the inputs stops the command (``robolearn: error: ...``) before the first
rollout: the settings (``check_config``, also under ``--cfg job``), the base checkpoint (exists, loads, is a chunk
policy and not already a per-step residual), its task (``task=`` must be the one it was trained on), that it fits
the task's observations and actions, and for ``resume=true`` that the run's checkpoint, base and settings agree.

The result is a ``residual`` or ``steered`` policy checkpoint (``run_dir/checkpoints/latest``) that names its base
by relative path and content hash: ``robolearn eval``, ``run``, ``serve``, ``teleop policy=`` and ``collect policy=``
take it like any checkpoint. ``run_dir/checkpoints/best`` holds the trained policy at the run's best in-run
evaluation (its seeds chose it: evaluate it on others before quoting it). Moving the run folder without its base
(or retraining the base) makes it refuse to load, naming both folders.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from robolearn.cli import CLIError, print_json
from robolearn.policies.config import ConfigError
from robolearn.rl.settings import ResidualSettings, SteerSettings

METHODS: dict[str, type] = {"residual": ResidualSettings, "steer": SteerSettings}
Settings = ResidualSettings | SteerSettings


def method_of(settings: Settings) -> str:
    return next(name for name, kind in METHODS.items() if isinstance(settings, kind))


def _method_classes(settings: Settings) -> tuple[type, type]:
    """The method's policy kind and its trainer (imported here: they pull in torch)."""
    if isinstance(settings, SteerSettings):
        from robolearn.rl.steer import SteeringSAC
        from robolearn.rl.steer_policy import SteeredPolicy

        return SteeredPolicy, SteeringSAC
    from robolearn.rl.residual_policy import ResidualPolicy

    if settings.learner == "td3":
        from robolearn.rl.residual_td3 import ResidualTD3

        return ResidualPolicy, ResidualTD3
    if settings.learner == "ars":
        from robolearn.rl.residual_ars import ResidualARS

        return ResidualPolicy, ResidualARS
    from robolearn.rl.residual import ResidualPPO

    return ResidualPolicy, ResidualPPO


def check_config(cfg: DictConfig) -> Settings:
    """What needs no files: the method's hyperparameters and the run's numbers (also what ``--cfg job`` checks)."""
    method: dict[str, Any] = OmegaConf.to_container(cfg.finetune, resolve=True)  # type: ignore[assignment]
    name = method.pop("name", "residual")
    if name not in METHODS:
        raise CLIError(f"finetune.name must be one of {sorted(METHODS)}, got {name!r}")
    settings = METHODS[name](**method)
    try:
        settings.check()
    except ConfigError as e:
        raise CLIError(str(e)) from None
    for key, low in (("env_steps", 1), ("num_envs", 1), ("workers", 0), ("ckpt_every", 0), ("keep_checkpoints", 1),
                     ("eval.episodes", 0), ("eval.every", 0), ("eval.num_envs", 1), ("eval.workers", 0),
                     ("eval.videos", 0)):
        value = OmegaConf.select(cfg, key)
        if value < low:
            raise CLIError(f"{key} must be >= {low}, got {value}")
    return settings


def run(cfg: DictConfig) -> dict[str, Any]:
    from robolearn.cli.evaluation import Evaluator, pick_device
    from robolearn.cli.train import _lock_run, _unlock_run

    settings = check_config(cfg)
    device = pick_device(str(cfg.device))
    run_dir, latest = _resume_point(cfg)
    base_path = _base_path(cfg, run_dir, latest)
    base, task, env_config = _load_base(cfg, base_path, device)
    method = method_of(settings)
    policy = _make_policy(base, base_path, settings, latest, run_dir, device, int(cfg.seed))
    if run_dir is None:
        run_dir = Path("runs/finetune") / f"{task}-{method}-{time.strftime('%Y%m%d-%H%M%S')}".replace("/", "_")
    lock = _lock_run(run_dir)
    try:
        if latest is None and (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step_*")):
            raise CLIError(f"run folder {run_dir} already holds checkpoints; pass resume=true to continue it, or "
                           f"another run_dir")
        run_config = {"task": task, "env_config": env_config, "base_checkpoint": str(base_path.resolve()),
                      "method": method, "finetune": dataclasses.asdict(settings),
                      "env_steps": int(cfg.env_steps), "num_envs": int(cfg.num_envs), "seed": int(cfg.seed),
                      "eval": OmegaConf.to_container(cfg.eval), "device": str(device)}
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
        evaluator = None
        if int(cfg.eval.episodes) > 0:
            evaluator = Evaluator(task, env_config, episodes=int(cfg.eval.episodes), num_envs=int(cfg.eval.num_envs),
                                  workers=int(cfg.eval.workers), seed=int(cfg.eval.seed),
                                  videos=int(cfg.eval.videos), run_dir=run_dir, device=device, progress=False)
        what = (f"residual {settings.learner.upper()}" if isinstance(settings, ResidualSettings)
                else f"latent-noise steering ({settings.variant})")
        print(f"finetune: {what} over {base_path} ({type(base).__name__}) in {task}: {cfg.env_steps:,} env "
              f"steps, {cfg.num_envs} envs; run folder {run_dir}", file=sys.stderr, flush=True)
        try:
            out = _train(cfg, policy, settings, task, env_config, run_dir, run_config, evaluator, latest)
        finally:
            if evaluator is not None:
                evaluator.close()
    finally:
        _unlock_run(lock)
    summary = {
        "task": task, "method": method, "base_checkpoint": str(base_path), "run_dir": str(run_dir),
        "checkpoint": out["checkpoint"], "env_steps": out["env_steps"],
        **{k: out[k] for k in ("updates", "transitions", "grad_steps", "iterations") if k in out},
        **{k: out[k] for k in ("success_rate_before", "success_rate_after", "best_checkpoint", "best_success_rate",
                               "best_env_steps")},
        "eval_episodes": int(cfg.eval.episodes), "wall_s": out["wall_s"], "env_steps_per_s": out["env_steps_s"],
        "base_inference_s": out["inference_s"], "plots": out["plots"], "resumed": latest is not None,
    }
    (run_dir / "result.json").write_text(json.dumps(summary, indent=1))
    if summary["success_rate_after"] is not None:
        print(f"success rate {summary['success_rate_before']} -> {summary['success_rate_after']} over "
              f"{summary['eval_episodes']} episodes")
    print(f"checkpoint: {out['checkpoint']}")
    if summary["best_checkpoint"] is not None:
        print(f"best evaluation: {summary['best_success_rate']} at {summary['best_env_steps']:,} env steps, "
              f"{summary['best_checkpoint']} (chosen on the evaluation seeds: report it on others)")
    print_json(summary)
    return summary


def _train(cfg: DictConfig, policy: Any, settings: Settings, task: str, env_config: dict[str, Any],
           run_dir: Path, run_config: dict[str, Any], evaluator: Any, latest: Path | None) -> dict[str, Any]:
    from sim.vector import make_vector_env

    from robolearn.policies.executor import NonFiniteChunkError, NonFiniteObservationError

    n = int(cfg.num_envs)
    trainer = _method_classes(settings)[1]
    envs = make_vector_env(task, num_envs=n, num_workers=min(int(cfg.workers), n), seed=int(cfg.seed),
                           autoreset_mode=trainer.autoreset_mode, **env_config)
    try:
        try:
            job = trainer(policy, envs, settings, total_env_steps=int(cfg.env_steps), run_dir=run_dir,
                          seed=int(cfg.seed), evaluate=evaluator, eval_every=int(cfg.eval.every),
                          ckpt_every=int(cfg.ckpt_every), keep_checkpoints=int(cfg.keep_checkpoints),
                          run_config=run_config, progress=bool(cfg.progress))
        except ValueError as e:  # e.g. a PPO run's (unbounded) residual resumed with learner=td3
            raise CLIError(f"cannot fine-tune in {run_dir}: {e}") from None
        if latest is not None:
            try:
                job.load_state(latest)
            except (FileNotFoundError, KeyError, RuntimeError, ValueError) as e:
                raise CLIError(f"cannot resume from {latest}: {e}") from None
            print(f"finetune: resuming {run_dir} at {job.env_steps:,} env steps", file=sys.stderr, flush=True)
        try:
            return job.fit(resume=latest is not None)
        except (NonFiniteObservationError, NonFiniteChunkError) as e:  # broken inputs, base or diverged head
            raise CLIError(f"fine-tuning in task {task} stopped: {e} (checkpoints saved so far: "
                           f"{run_dir / 'checkpoints'})") from None
        except FloatingPointError as e:
            raise CLIError(str(e)) from None
    finally:
        envs.close()


def _resume_point(cfg: DictConfig) -> tuple[Path | None, Path | None]:
    """The run folder (None: a new default one) and, for ``resume=true``, the checkpoint to continue from (None:
    the run stopped before its first checkpoint, so it starts over, saying so)."""
    from robolearn.rl.loop import latest_checkpoint

    run_dir = Path(cfg.run_dir) if cfg.run_dir else None
    if not cfg.resume:
        return run_dir, None
    if run_dir is None:
        raise CLIError("resume=true needs run_dir=<the fine-tuning run to continue>")
    latest = latest_checkpoint(run_dir / "checkpoints")
    if latest is None:
        if (run_dir / "config.yaml").is_file():
            print(f"finetune: resume=true: {run_dir} has no complete checkpoint (the run stopped before its first "
                  f"one was written), so it starts from env step 0", file=sys.stderr)
            return run_dir, None
        raise CLIError(f"cannot resume: no checkpoint in {run_dir / 'checkpoints'}")
    return run_dir, latest


def _base_path(cfg: DictConfig, run_dir: Path | None, latest: Path | None) -> Path:
    """The base checkpoint: ``checkpoint=``, or for a resumed run the one it was started with (they must agree)."""
    saved = None
    if cfg.resume and run_dir is not None and (run_dir / "config.yaml").is_file():
        try:
            saved = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("base_checkpoint")
        except yaml.YAMLError as e:
            raise CLIError(f"{run_dir / 'config.yaml'} is not valid YAML: {e}") from None
    if cfg.checkpoint:
        given = Path(cfg.checkpoint)
        if saved and given.resolve() != Path(saved).resolve():
            raise CLIError(f"cannot resume {run_dir}: it fine-tunes the base {saved}, not {given} (leave checkpoint= "
                           f"out, or give that one)")
        return given
    if saved:
        return Path(saved)
    raise CLIError("checkpoint= is required: the base chunk policy's checkpoint folder "
                   "(e.g. runs/train/<run>/checkpoints/latest)")


def _load_base(cfg: DictConfig, base_path: Path, device: Any) -> tuple[Any, str, dict[str, Any]]:
    """The base policy (inference kernels applied), its task and the environment config to fine-tune in."""
    from robolearn.cli.runtime import checkpoint_run_config, load_checkpoint, probe_task

    if not base_path.exists():
        raise CLIError(f"base checkpoint {base_path} does not exist")
    base = load_checkpoint(base_path, map_location=device)
    if callable(getattr(base, "correct_actions", None)):
        raise CLIError(f"{base_path} holds a {base.policy_type!r} policy, which already corrects each step: "
                       f"fine-tune a chunk policy (resume=true run_dir=... continues a fine-tuning run)")
    run_cfg = checkpoint_run_config(base_path)
    trained_on = run_cfg.get("task")
    task = str(cfg.task) if cfg.task else trained_on
    if not task:
        raise CLIError(f"{base_path / 'config.yaml'} does not say which task the policy was trained on "
                       f"('run.task'): pass task=")
    if trained_on and task != trained_on:
        raise CLIError(f"base checkpoint {base_path} was trained on task {trained_on!r}, not {task!r}: fine-tuning "
                       f"runs a policy in the task it was trained for")
    env_config = {**(run_cfg.get("env_config") or {}), **(OmegaConf.to_container(cfg.env, resolve=True) or {})}
    probe_task(task, env_config, base)  # its observations and action size must fit the task
    return base, task, env_config


def _make_policy(base: Any, base_path: Path, settings: Settings, latest: Path | None, run_dir: Path | None,
                 device: Any, seed: int) -> Any:
    """A fresh residual (zero correction) or steered policy over ``base`` (hidden layers initialised from
    ``seed``), or the one of the checkpoint a run resumes from."""
    import torch

    from robolearn.cli.runtime import load_checkpoint
    from robolearn.rl.steer_policy import SteeredPolicy

    kind = _method_classes(settings)[0]
    if kind is SteeredPolicy and isinstance(base, SteeredPolicy):
        raise CLIError(f"{base_path} is already a steered policy (it chooses its own noise, so steering it again "
                       f"would change nothing): steer its base, or resume=true run_dir=... to continue that run")
    if latest is None:
        torch.manual_seed(seed)
        try:
            return kind(base, **settings.policy_config())  # type: ignore[arg-type]
        except ValueError as e:
            raise CLIError(f"cannot fine-tune {base_path}: {e}") from None
    policy = load_checkpoint(latest, map_location=device)  # checks that its base is unchanged since
    if not isinstance(policy, kind):
        raise CLIError(f"cannot resume {run_dir}: {latest} holds a {policy.policy_type!r} policy, not a "
                       f"{kind.policy_type!r} one (method={method_of(settings)})")
    if Path(policy.base.checkpoint_path).resolve() != base_path.resolve():
        raise CLIError(f"cannot resume {run_dir}: its checkpoint {latest} wraps {policy.base.checkpoint_path}, not "
                       f"{base_path}")
    saved = (yaml.safe_load((latest / "config.yaml").read_text()).get("run") or {}).get("settings") or {}
    now = dataclasses.asdict(settings)
    differ = sorted(k for k in now if k in saved and now[k] != saved[k])
    if differ:
        raise CLIError(f"cannot resume {run_dir}: finetune settings differ from its checkpoint in "
                       + ", ".join(f"{k} ({saved[k]!r} -> {now[k]!r})" for k in differ)
                       + " (resume with the settings the run was started with)")
    return policy
