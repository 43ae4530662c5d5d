"""``robolearn run`` and ``robolearn serve``: the runtime room wired to checkpoints and MuJoCo tasks; and the
checkpoint helpers every command that runs a policy uses (``eval``, ``run``, ``serve``, ``teleop``)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from robolearn.cli import CLIError


def checkpoint_run_config(ckpt: Path) -> dict[str, Any]:
    """The training run's ``run`` section of a checkpoint (task, env_config, ...; a wrapper's over its base's),
    errors as :class:`CLIError`."""
    from robolearn.policies import CheckpointError, read_run_config

    try:
        return read_run_config(ckpt)
    except CheckpointError as e:
        raise CLIError(str(e)) from None


def load_checkpoint(ckpt: Path, **kwargs: Any) -> Any:
    """Any registered policy kind, ready for inference (:func:`robolearn.accel.prepare_for_inference`: the fast
    CPU kernels), in eval mode; errors as :class:`CLIError`."""
    from robolearn.accel import prepare_for_inference
    from robolearn.policies import CheckpointError, load_policy

    try:
        return prepare_for_inference(load_policy(ckpt, **kwargs))
    except CheckpointError as e:
        raise CLIError(str(e)) from None


def probe_task(task: str, env_config: dict[str, Any], policy: Any = None) -> None:
    """Make the task once: a bad name or override, or observations the policy needs and the task lacks, stop
    the command before any work, naming them."""
    import sim

    try:
        env = sim.make(task, **env_config)
    except (ValueError, TypeError) as e:
        raise CLIError(f"cannot make task {task!r}: {e}") from None
    try:
        if policy is not None:
            have = env.observation_space.spaces
            missing = [k for k in policy.obs_keys if k not in have]
            if missing:
                raise CLIError(f"task {task} with these env settings does not produce the observation(s) {missing} "
                               f"the policy needs (it produces {sorted(have)})")
    finally:
        env.close()


def run(cfg: DictConfig) -> dict[str, Any]:
    import sim
    from robolearn.runtime.jobs import run_job

    if bool(cfg.checkpoint) == bool(cfg.policy):
        raise CLIError("give exactly one of checkpoint=<folder> or policy=ws://host:port")
    if cfg.mode not in ("sync", "async"):
        raise CLIError(f"mode must be sync or async, not {cfg.mode!r}")
    if cfg.blend not in ("none", "ensemble", "warmstart"):
        raise CLIError(f"blend must be none, ensemble or warmstart, not {cfg.blend!r}")
    env_config: dict[str, Any] = {}
    task = cfg.task
    if cfg.checkpoint:
        ckpt = Path(cfg.checkpoint)
        run_cfg = checkpoint_run_config(ckpt)
        task = task or run_cfg.get("task")
        if task == run_cfg.get("task"):
            env_config = dict(run_cfg.get("env_config") or {})
        policy: Any = load_checkpoint(ckpt)
    else:
        if not str(cfg.policy).startswith(("ws://", "wss://")):
            raise CLIError(f"policy= must be a ws:// URL of a policy server, got {cfg.policy!r}")
        policy = str(cfg.policy)
    if not task:
        raise CLIError("task= is required with a remote policy (the server does not say which task)")
    env_config.update(OmegaConf.to_container(cfg.env, resolve=True) or {})
    probe_task(task, env_config)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else Path("runs/run") / f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        return run_job(
            policy, lambda: sim.make(task, **env_config), run_dir=run_dir, episodes=cfg.episodes,
            duration_s=cfg.duration_s, seed=int(cfg.seed), token=cfg.token, rate_hz=cfg.rate_hz, mode=cfg.mode,
            blend=cfg.blend, realtime=bool(cfg.realtime), latency_s=cfg.latency_s, status=bool(cfg.status),
        )
    except (PermissionError, ConnectionError, OSError) as e:
        if not cfg.policy:
            raise
        raise CLIError(f"policy server {cfg.policy}: {e}") from None
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None


def serve(cfg: DictConfig) -> None:
    from robolearn.runtime.jobs import serve_job

    if not cfg.checkpoint:
        raise CLIError("checkpoint= is required (a checkpoint folder)")
    policy = load_checkpoint(Path(cfg.checkpoint))
    key_map = {str(k): str(v) for k, v in (OmegaConf.to_container(cfg.key_map) or {}).items()}
    try:
        serve_job(policy, host=str(cfg.host), port=int(cfg.port), token=cfg.token, key_map=key_map or None,
                  max_message_bytes=int(float(cfg.max_message_mb) * 2**20))
    except OSError as e:
        raise CLIError(f"cannot serve on {cfg.host}:{cfg.port}: {e}") from None
