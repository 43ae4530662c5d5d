"""``robolearn train``: a chunk policy from an episode store, evaluated in the task's MuJoCo environment.

``task=`` picks a file of ``robolearn/configs/task/`` (the simulation task, its dataset, observation keys, environment
overrides and evaluation length) and ``policy=`` one of ``robolearn/configs/policy/``: N tasks and M policies cost N + M files.

Everything that can be wrong with the inputs is checked before the first training step: the dataset opens,
validates and holds episodes, its task and observation keys match the environment, the policy config builds, and
a resumed run uses the policy it was started with.

A run folder is first made whole again after a killed run (:func:`robolearn.training.trainer.recover_checkpoints`:
what dead checkpoint writers left is deleted, ``latest`` repaired). ``resume=true`` on a run killed before its
first complete checkpoint starts it from step 0 (saying so): there is nothing to lose, and a job that always
passes ``resume=true`` restarts cleanly. A run folder that holds a complete checkpoint is never started over.

Multi-GPU / multi-node: launch with ``torchrun --nproc_per_node=N -m robolearn.cli train ...``; the process
group comes from torchrun's environment (NCCL on GPUs, gloo on CPUs).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from robolearn.cli import CLIError, print_json
from robolearn.cli.evaluation import Evaluator, pick_device


def _init_distributed(device: torch.device) -> tuple[bool, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False, 0, device
    import torch.distributed as dist

    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    import datetime

    # Rank 0 evaluates (videos included) while the others wait at a barrier: allow it an hour.
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(hours=1))
    return True, dist.get_rank(), device


def check_dataset_matches_env(store: Any, env: Any, obs_keys: list[str], task: str) -> None:
    """The dataset's observations and actions must be what the environment produces and takes."""
    space = env.observation_space.spaces
    for key in obs_keys:
        if key not in store.schema:
            raise CLIError(f"obs key {key!r} is not in dataset {store.path}; it has: {', '.join(store.schema)}")
        if key not in space:
            raise CLIError(
                f"dataset {store.path} has observation {key!r}, which task {task} does not produce "
                f"(its observations: {', '.join(space)}); was it collected for another task or obs_mode?"
            )
        if tuple(space[key].shape) != store.schema[key].shape:
            raise CLIError(f"observation {key!r} is {store.schema[key].shape} in dataset {store.path} but "
                           f"{tuple(space[key].shape)} in task {task}")
    if "action" not in store.schema:
        raise CLIError(f"dataset {store.path} has no 'action' key")
    if store.schema["action"].shape != tuple(env.action_space.shape):
        raise CLIError(f"actions are {store.schema['action'].shape} in dataset {store.path} but task {task} takes "
                       f"{tuple(env.action_space.shape)}")


@dataclass
class _Data:
    """The dataset, checked against the task."""

    store: Any
    path: Path | str  # several stores: their paths joined by " + " (store.paths)
    obs_keys: list[str]
    env_config: dict[str, Any]
    step_weights: Any = None  # per-row loss weights (training.episode_weights, training.intervention_weight)


def _open_dataset(cfg: DictConfig) -> _Data:
    import sim

    from robolearn.data import open_stores
    from robolearn.data.storeset import store_paths

    task = str(cfg.task.name)
    if task == "none" and not (cfg.dataset or cfg.task.dataset):
        raise CLIError("task=none trains without a simulator on a store you give: add dataset=<store.zarr>")
    paths = store_paths(cfg.dataset or cfg.task.dataset or f"data/{task}.zarr")  # dataset=[a.zarr,b.zarr]: several
    path: Path | str = next((p for p in paths if not p.exists()), paths[0])
    if not path.exists():
        _check_task_exists(task)  # suggest a collect command only for a task that collect can run
        raise CLIError(f"dataset {path} does not exist; make one with: robolearn collect task={task} "
                       f"episodes=200 out={path}")
    store = open_stores(paths)  # several: refused as `data merge` refuses them, else read as one
    path = store.path
    if task == "none":
        return _no_simulator(cfg, store, path)
    if store.task and store.task != task:
        hint = ""
        if not _has_environment(store.task):
            hint = f" (no simulation task is called {store.task!r}: train without one with task=none)"
        raise CLIError(f"dataset {path} was recorded for task {store.task!r}, not {task!r}{hint}")
    if store.n_episodes == 0:
        raise CLIError(f"dataset {path} holds no episodes; record some with: robolearn collect task={task} "
                       f"episodes=200 out={path} (or by hand: robolearn teleop task={task} out={path})")
    chosen = cfg.obs_keys or cfg.task.obs_keys
    obs_keys = list(chosen) if chosen else [k for k, s in store.schema.items() if s.role == "obs"]
    env_config = {**store.env_config, **(OmegaConf.to_container(cfg.task.env, resolve=True) or {})}
    try:
        probe = sim.make(task, **env_config)
    except (ValueError, TypeError) as e:
        raise CLIError(f"cannot make task {task!r} with the dataset's env config: {e}") from None
    try:
        check_dataset_matches_env(store, probe, obs_keys, task)
    finally:
        probe.close()
    return _Data(store, path, obs_keys, env_config)


def _no_simulator(cfg: DictConfig, store: Any, path: Path) -> _Data:
    """``task=none``: the store's own keys, no environment to check them against or to evaluate in."""
    if store.n_episodes == 0:
        raise CLIError(f"dataset {path} holds no episodes")
    chosen = cfg.obs_keys or cfg.task.obs_keys
    obs_keys = list(chosen) if chosen else [k for k, s in store.schema.items() if s.role == "obs"]
    for key in obs_keys:
        if key not in store.schema:
            raise CLIError(f"obs key {key!r} is not in dataset {path}; it has: {', '.join(store.schema)}")
    if not obs_keys:
        raise CLIError(f"dataset {path} has no observation keys (role obs); name them with obs_keys=[...]")
    if "action" not in store.schema:
        raise CLIError(f"dataset {path} has no 'action' key")
    print(f"task=none: no simulator; training on {', '.join(obs_keys)} -> action from {path} (its task: "
          f"{store.task or 'unnamed'}); the validation loss is the measure", flush=True)
    return _Data(store, path, obs_keys, dict(store.env_config))


def _has_environment(task: str) -> bool:
    import sim

    return task.startswith("robosuite/") or task in sim.available_tasks()


def _check_task_exists(task: str) -> None:
    """``task=robosuite/<Env>`` must name an environment robosuite has (with the nearest one when it does not)."""
    if not task.startswith("robosuite/"):
        return
    import difflib

    from sim.robosuite_env import available_robosuite_envs

    envs = available_robosuite_envs()
    name = task.split("/", 1)[1]
    if name not in envs:
        import sim

        lower = {e.lower(): f"robosuite/{e}" for e in envs}
        lower.update({t: t for t in sim.available_tasks() if "/" not in t})  # robosuite/pusht -> push_t
        close = difflib.get_close_matches(name.lower(), list(lower), n=1, cutoff=0.6)
        hint = f" (did you mean task={lower[close[0]]}?)" if close else ""
        raise CLIError(f"robosuite has no environment {name!r}{hint}; it has: {', '.join(envs)}")


def _run_dir(cfg: DictConfig, policy_name: str, distributed: bool, rank: int) -> tuple[Path, bool, int | None]:
    """The run folder (rank 0's), whether training resumes from its ``latest`` checkpoint, and (rank 0) the
    run's lock, held until training ends: a second trainer on the same folder is refused, not interleaved."""
    run_dir = Path(cfg.run_dir) if cfg.run_dir else Path("runs/train") / (
        f"{cfg.task.name}-{policy_name}-{time.strftime('%Y%m%d-%H%M%S')}".replace("/", "_"))
    if distributed:  # every rank writes to rank 0's folder
        holder = [str(run_dir)]
        torch.distributed.broadcast_object_list(holder, src=0)
        run_dir = Path(holder[0])
    if cfg.resume and not cfg.run_dir:
        raise CLIError("resume=true needs run_dir=<the run to continue>")
    verdict: dict[str, Any] = {"resume": bool(cfg.resume), "error": None}
    lock = None
    if rank == 0:  # rank 0 alone repairs the folder; the others learn its verdict
        try:
            lock = _lock_run(run_dir)
            verdict["resume"] = _check_run_dir(run_dir, bool(cfg.resume))
        except CLIError as e:
            verdict["error"] = str(e)
            _unlock_run(lock)
            lock = None
    if distributed:
        holder = [verdict]
        torch.distributed.broadcast_object_list(holder, src=0)
        verdict = holder[0]
    if verdict["error"]:
        raise CLIError(verdict["error"])
    return run_dir, bool(verdict["resume"]), lock


def _lock_run(run_dir: Path) -> int:
    """An exclusive flock on ``run_dir/.robolearn-train.lock`` (released by the kernel however the process ends)."""
    import fcntl

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / ".robolearn-train.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise CLIError(f"cannot use run folder {run_dir}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise CLIError(f"run folder {run_dir} is being trained by {holder}: wait for it to finish, or give another "
                       f"run_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
    return fd


def _unlock_run(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the last descriptor releases the flock


def _check_run_dir(run_dir: Path, resume: bool) -> bool:
    """Repair the run folder after a killed run; refuse to start over a complete checkpoint; say whether to
    resume (``resume=true`` on a run with no complete checkpoint starts from step 0)."""
    from robolearn.policies import CheckpointError
    from robolearn.training.trainer import complete_checkpoints, recover_checkpoints

    root = run_dir / "checkpoints"
    try:
        done = recover_checkpoints(root)
    except CheckpointError as e:
        raise CLIError(str(e)) from None
    for line in done:
        print(f"train: {root}: {line}", file=sys.stderr)
    latest = root / "latest"
    if resume:
        if latest.exists():
            return True
        if (run_dir / "config.yaml").is_file() and not complete_checkpoints(root):
            print(f"train: resume=true: {run_dir} has no complete checkpoint (the run stopped before its first one "
                  f"was written), so it starts from step 0", file=sys.stderr)
            return False
        raise CLIError(f"cannot resume: no checkpoint at {latest}")
    if latest.exists() or complete_checkpoints(root):
        raise CLIError(f"run folder {run_dir} already holds checkpoints; pass resume=true to continue it, or "
                       f"another run_dir")
    return False


def _build_policy(cfg: DictConfig, policy_cfg: dict[str, Any], policy_name: str, data: _Data,
                  run_dir: Path, resume: bool) -> Any:
    """The policy of the config and the dataset's statistics; a resumed run must describe the same policy."""
    from robolearn.policies import CheckpointError, ConfigError, make_policy, read_checkpoint_config, resolve_config

    policy_cfg["obs"] = {k: list(data.store.schema[k].shape) for k in data.obs_keys}
    policy_cfg["action_dim"] = int(data.store.schema["action"].shape[0])
    stats = data.store.stats()
    try:
        torch.manual_seed(int(cfg.training.seed))
        policy = make_policy(policy_cfg, stats)
    except (ConfigError, KeyError, ValueError, TypeError) as e:
        raise CLIError(f"policy {policy_name}: {e}") from None
    if resume:
        try:
            saved = read_checkpoint_config((run_dir / "checkpoints" / "latest").resolve())
        except CheckpointError as e:
            raise CLIError(str(e)) from None
        if saved.get("type") != policy.policy_type:
            raise CLIError(f"cannot resume {run_dir} with a {policy.policy_type!r} policy: its checkpoint "
                           f"holds a {saved.get('type')!r} policy (pass the policy it was started with)")
        now = resolve_config(policy_cfg, stats)
        differ = sorted(k for k in set(now) | set(saved) if k != "sampler" and now.get(k) != saved.get(k))
        if differ:
            raise CLIError(f"cannot resume {run_dir}: the policy config differs from its checkpoint in "
                           f"{', '.join(differ)} (resume with the settings the run was started with)")
    return policy


# What the null training settings become: CPU-sized presets train fast with a large step size and a batch a laptop
# computes quickly; the paper-sized ones (preset=dp) with Diffusion Policy's lr 1e-4 and batch 256.
CPU_TRAINING = {"lr": 1e-3, "batch_size": 128}
PAPER_TRAINING = {"lr": 1e-4, "batch_size": 256}
EVALUATIONS = 4  # eval_every=null: this many evaluations over the run (the last one at the end)


def training_defaults(t: DictConfig, policy_config: dict[str, Any]) -> dict[str, Any]:
    """Fill ``training.lr``, ``batch_size`` and ``eval_every`` where they are null (in place); returns what was
    filled, so the run can say so."""
    from robolearn.policies.config import PAPER_PRESETS

    backbone = policy_config.get("backbone") or {}
    paper = backbone.get("preset") in PAPER_PRESETS.get(str(backbone.get("name")), ())
    chosen: dict[str, Any] = {}
    for key, value in (PAPER_TRAINING if paper else CPU_TRAINING).items():
        if t.get(key) is None:
            chosen[key] = value
    if t.get("eval_every") is None:
        chosen["eval_every"] = max(1, int(t.steps) // EVALUATIONS) if int(t.steps) >= EVALUATIONS else 0
    for key, value in chosen.items():
        OmegaConf.update(t, key, value, merge=False)
    return chosen


def _train_settings(t: DictConfig) -> Any:
    from robolearn.training import TrainSettings

    plain: dict[str, Any] = OmegaConf.to_container(t)  # type: ignore[assignment]
    settings = TrainSettings(**{f.name: plain[f.name] for f in dataclasses.fields(TrainSettings)})
    settings.betas = tuple(settings.betas)  # type: ignore[assignment]
    try:
        settings.check()
    except ValueError as e:
        raise CLIError(str(e)) from None
    if not 0.0 <= float(t.val_ratio) < 1.0:
        raise CLIError(f"training.val_ratio must be in [0, 1), got {t.val_ratio}")
    return settings


def _evaluator(cfg: DictConfig, data: _Data, run_dir: Path, device: torch.device) -> Evaluator | None:
    e, task_eval = cfg.eval, cfg.task.eval
    if str(cfg.task.name) == "none":
        return None  # no simulator to evaluate in: the validation loss is what training reports
    episodes = int(e.episodes if e.episodes is not None else task_eval.episodes)
    if episodes <= 0:
        return None
    env_config = dict(data.env_config)
    if task_eval.max_steps is not None:
        env_config["max_episode_steps"] = int(task_eval.max_steps)
    return Evaluator(str(cfg.task.name), env_config, episodes=episodes, num_envs=int(e.num_envs),
                     workers=int(e.workers), seed=int(e.seed), videos=int(e.videos), run_dir=run_dir, device=device,
                     progress=bool(cfg.training.progress), video_from_step=int(cfg.training.steps))


def check_config(cfg: DictConfig) -> tuple[dict[str, Any], str]:
    """Check what needs no data -- the policy section (geometry, sampler, family settings) with a stand-in
    observation -- so a bad value is named before the dataset is opened (and by ``--cfg job``). Returns the
    policy config without its preset ``name``, and that name."""
    from robolearn.policies import ConfigError, policy_config

    policy_cfg: dict[str, Any] = OmegaConf.to_container(cfg.policy, resolve=True)  # type: ignore[assignment]
    policy_name = str(policy_cfg.pop("name", policy_cfg.get("type", "policy")))
    probe = {**policy_cfg, "obs": {"probe": [1]}, "action_dim": 1}
    try:
        policy_config(probe)
    except ConfigError as e:
        raise CLIError(f"policy {policy_name}: {e}") from None
    return policy_cfg, policy_name


def step_weights(t: DictConfig, store: Any) -> Any:
    """Per-row loss weights from ``training.episode_weights`` (a score file's ``weight`` per episode, e.g. the
    ``scores.jsonl`` of ``robolearn data audit``) and ``training.intervention_weight`` (rows a person drove, flagged
    ``intervention``, weigh W; the others 1: HG-DAgger's emphasis on corrections). None when neither is set."""
    import numpy as np

    path, iw = t.get("episode_weights"), t.get("intervention_weight")
    if path is None and iw is None:
        return None
    w = np.ones(store.n_steps, np.float32)
    lengths = np.asarray(store.episode_lengths)
    if path is not None:
        from robolearn.audit.rules import episode_weights

        try:
            ew = episode_weights(path, store.n_episodes, lengths, store=str(store.path))
        except (OSError, ValueError) as e:
            raise CLIError(f"training.episode_weights: {e}") from None
        w *= np.repeat(ew, lengths).astype(np.float32)
        print(f"training.episode_weights: {path}: mean weight {ew.mean():.3f}, {int((ew == 0).sum())} of "
              f"{len(ew)} episodes at 0, {int((ew < 0.5).sum())} below 0.5", file=sys.stderr)
    if iw is not None:
        iw = float(iw)
        if not np.isfinite(iw) or iw < 0:
            raise CLIError(f"training.intervention_weight must be >= 0, got {iw}")
        spec = store.schema.get("intervention")
        if spec is None or spec.role != "flag":
            raise CLIError(f"training.intervention_weight={iw:g} needs an 'intervention' flag in the dataset; "
                           f"{store.path} has keys {', '.join(store.schema)} (teleop in intervention mode records "
                           f"it; data merge fills it with false for stores without it)")
        flags = np.asarray(store.load(["intervention"])["intervention"]).reshape(-1).astype(bool)
        w *= np.where(flags, iw, 1.0).astype(np.float32)
        print(f"training.intervention_weight: {int(flags.sum()):,} of {len(flags):,} steps were driven by a person "
              f"and weigh {iw:g}", file=sys.stderr)
    if not (w > 0).any():
        raise CLIError("training.episode_weights / intervention_weight leave every step at weight 0")
    return w


def run(cfg: DictConfig) -> dict[str, Any]:
    policy_cfg, policy_name = check_config(cfg)
    device = pick_device(str(cfg.device))
    distributed, rank, device = _init_distributed(device)
    data = _open_dataset(cfg)
    data.step_weights = step_weights(cfg.training, data.store)
    run_dir, resume, lock = _run_dir(cfg, policy_name, distributed, rank)
    try:
        return _train(cfg, policy_cfg, policy_name, data, run_dir, resume, device, distributed, rank)
    finally:
        _unlock_run(lock)


def _train(cfg: DictConfig, policy_cfg: dict[str, Any], policy_name: str, data: _Data, run_dir: Path, resume: bool,
           device: torch.device, distributed: bool, rank: int) -> dict[str, Any]:
    from robolearn.data import SequenceDataset, StoreError, dataset_ref
    from robolearn.policies import CheckpointError
    from robolearn.training import Trainer

    policy = _build_policy(cfg, policy_cfg, policy_name, data, run_dir, resume)
    t = cfg.training
    filled = training_defaults(t, policy.config)
    settings = _train_settings(t)
    train_ds = SequenceDataset(data.store, split="train", horizon=policy.horizon, n_obs_steps=policy.n_obs_steps,
                               n_action_steps=policy.n_action_steps, obs_keys=data.obs_keys,
                               val_ratio=float(t.val_ratio), seed=int(t.seed), step_weights=data.step_weights)
    val_ds = train_ds.split("val")
    if len(train_ds) == 0:
        raise CLIError(f"no training windows: {len(train_ds.episodes)} training episodes after holding out "
                       f"training.val_ratio={t.val_ratio} of {data.store.n_episodes}")
    run_config = {
        "task": str(cfg.task.name), "task_config": OmegaConf.to_container(cfg.task),
        "dataset": dataset_ref(data.store),  # a path, or the list of paths of several stores
        "env_config": data.env_config, "obs_keys": data.obs_keys, "policy_name": policy_name,
        "policy": policy.config, "training": OmegaConf.to_container(t), "eval": OmegaConf.to_container(cfg.eval),
        "device": str(device),
    }
    n_params = sum(p.numel() for p in policy.parameters())
    evaluator = None
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
        if filled:
            print("defaults for this policy size: " + ", ".join(f"training.{k}={v}" for k, v in filled.items()))
        print(f"training {policy_name} ({n_params / 1e6:.2f}M parameters) on {data.path}: "
              f"{len(train_ds.episodes)} train / {len(val_ds.episodes)} val episodes, {len(train_ds):,} windows; "
              f"run folder {run_dir}")
        evaluator = _evaluator(cfg, data, run_dir, device)
    try:
        trainer = Trainer(policy, train_ds, settings, run_dir, run_config, val_dataset=val_ds, evaluate=evaluator,
                          device=device, logger=str(cfg.logger))
    except ValueError as e:
        raise CLIError(str(e)) from None
    try:
        out = trainer.fit(resume=resume)
    except (StoreError, CheckpointError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    finally:
        if evaluator is not None:
            evaluator.close()
        if distributed:
            torch.distributed.destroy_process_group()
    if rank != 0:
        return out
    return _summarize(cfg, trainer, out, policy_name, run_dir, n_params)


def _summarize(cfg: DictConfig, trainer: Any, out: dict[str, Any], policy_name: str, run_dir: Path,
               n_params: int) -> dict[str, Any]:
    losses = [m["loss"] for m in trainer.metrics() if "loss" in m]
    ev = out.get("eval") or {}
    summary = {
        "task": str(cfg.task.name),
        "policy": policy_name,
        "run_dir": str(run_dir),
        "checkpoint": out["checkpoint"],
        "step": out["step"],
        "finished": out["finished"],
        "final_loss": losses[-1] if losses else None,
        "val_loss": next((m["val_loss"] for m in reversed(trainer.metrics()) if "val_loss" in m), None),
        "success_rate": ev.get("success_rate"),
        "score": ev.get("score"),
        "eval_episodes": ev.get("episodes"),
        "videos": ev.get("videos", []),
        "plots": [str(p) for p in sorted((run_dir / "plots").glob("*.png"))],
        "parameters": n_params,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    (run_dir / "result.json").write_text(json.dumps(summary, indent=1))
    if summary["task"] == "none" and summary["val_loss"] is not None:
        print(f"validation loss {summary['val_loss']:.4f} (no simulator: task=none)")
    if ev:
        from robolearn.cli.eval import describe_result

        print(describe_result({"mean_return": ev.get("mean_return", 0.0), **ev}))
    print(f"checkpoint: {out['checkpoint']}")
    print_json(summary)
    return summary
