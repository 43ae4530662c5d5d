"""``robolearn run`` and ``robolearn serve``: the runtime room wired to checkpoints and MuJoCo tasks; and the
checkpoint helpers every command that runs a policy uses (``eval``, ``run``, ``serve``, ``teleop``)."""
from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from robolearn.cli import CLIError
from robolearn.cli.accel import apply_cache


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


def apply_rank(policy: Any, ckpt: Path, rank: int | None) -> Any:
    """``rank=`` of eval/run/serve: deploy ranking of a steered checkpoint (``SteeredPolicy.set_rank``); None
    leaves the checkpoint's own setting."""
    if rank is None:
        return policy
    if getattr(policy, "policy_type", None) != "steered":
        raise CLIError(f"rank={rank} applies to a steered checkpoint (robolearn finetune method=steer "
                       f"finetune.variant=na); {ckpt} is a {getattr(policy, 'policy_type', type(policy).__name__)!r} "
                       f"policy")
    try:
        policy.set_rank(rank)
    except ValueError as e:
        raise CLIError(f"{ckpt}: {e}") from None
    return policy


INFERENCE_DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def check_inference_options(dtype: str, graph: bool = False, device: Any = None, cache: Any = None,
                            rank: Any = None) -> None:
    """``dtype=``/``graph=`` refused before any checkpoint is loaded or calibrated: an unknown dtype, graph=true
    off a GPU or together with cache= or rank= (a graph wraps a base diffusion or flow policy)."""
    if str(dtype) not in INFERENCE_DTYPES:
        raise CLIError(f"dtype={str(dtype)!r} is not one of float32, bf16, fp16")
    if not graph:
        return
    if device is None or getattr(device, "type", str(device)) != "cuda":
        raise CLIError(f"graph=true samples through CUDA graphs and needs the policy on a GPU (device=cuda); this "
                       f"run's device is {device if device is not None else 'cpu'}")
    for key, value in (("cache", cache), ("rank", rank)):
        if value is not None:
            raise CLIError(f"graph=true captures a base diffusion or flow policy; {key}={value} wraps it (drop one "
                           f"of them)")


def apply_inference(policy: Any, ckpt: Path, dtype: str = "float32", graph: bool = False) -> Any:
    """``dtype=`` and ``graph=`` of eval/run/serve, applied last (after ``cache=`` and ``rank=``).

    ``dtype``: the denoiser backbone's dtype for sampling (float32, the default, leaves it; bf16/fp16 cast it:
    lossy, faster where the hardware has native bf16 products: :func:`robolearn.accel.set_inference_dtype`).
    ``graph``: sample through CUDA graphs (:func:`robolearn.accel.graphed`); needs the policy on a GPU and a base
    diffusion or flow checkpoint (a cached, steered or residual one is refused, naming it)."""
    from robolearn.accel import GraphError, graphed, set_inference_dtype

    name = str(dtype)
    check_inference_options(name, graph, getattr(policy, "device", None))
    if graph:
        try:
            policy = graphed(policy, dtype=name)
        except GraphError as e:
            raise CLIError(f"graph=true: {ckpt}: {e}") from None
        print(f"graph=true: each denoiser call replayed as a CUDA graph, backbone in {policy_dtype(policy)}",
              file=sys.stderr)
        return policy
    if name in ("float32", "fp32"):
        return policy
    try:
        set_inference_dtype(policy, name)
    except TypeError as e:
        raise CLIError(f"dtype={name}: {ckpt}: {e}") from None
    print(f"dtype={name}: the denoiser backbone samples in {policy_dtype(policy)} (lossy against float32)",
          file=sys.stderr)
    return policy


def policy_dtype(policy: Any) -> Any:
    """The dtype of the innermost denoiser backbone's parameters (None without one)."""
    from robolearn.accel.kernels import _backbone_owner

    owner = _backbone_owner(policy)
    return next(owner.backbone.parameters()).dtype if owner is not None else None


def probe_task(task: str, env_config: dict[str, Any], policy: Any = None) -> float | None:
    """Make the task once: a bad name or override, or a policy that does not fit the task -- observations it needs
    and the task lacks (or gives in another shape), or another action size -- stop the command before any work,
    naming them. Returns the task's control rate (``env.unwrapped.fps``, Hz; None if it does not say)."""
    import sim

    try:
        env = sim.make(task, **env_config)
    except (ValueError, TypeError) as e:
        raise CLIError(f"cannot make task {task!r}: {e}") from None
    try:
        if policy is not None:
            check_fit(task, env, policy)
        fps = getattr(getattr(env, "unwrapped", env), "fps", None)
        return float(fps) if fps else None
    finally:
        env.close()


def check_fit(task: str, env: Any, policy: Any) -> None:
    """The policy's observation keys (and shapes, when it says them) and action size against ``env``'s spaces."""
    import numpy as np

    have = env.observation_space.spaces
    name = type(policy).__name__
    missing = [k for k in policy.obs_keys if k not in have]
    if missing:
        raise CLIError(f"task {task} with these env settings does not produce the observation(s) {missing} "
                       f"the policy ({name}) needs (it produces {sorted(have)}): a checkpoint of another task?")
    shapes = getattr(policy, "obs_shapes", None) or {}
    wrong = {k: (tuple(shapes[k]), tuple(have[k].shape)) for k in policy.obs_keys
             if k in shapes and have[k].shape is not None and tuple(int(d) for d in shapes[k]) != tuple(have[k].shape)}
    if wrong:
        raise CLIError(f"task {task} gives observation(s) of other shapes than the policy ({name}) takes: "
                       + ", ".join(f"{k}: policy {p}, task {t}" for k, (p, t) in wrong.items()))
    space = getattr(env, "action_space", None)
    shape = getattr(space, "shape", None)
    if shape is not None and int(np.prod(shape)) != int(policy.action_dim):
        raise CLIError(f"task {task} takes actions of size {int(np.prod(shape))} (shape {tuple(shape)}), but the "
                       f"policy ({name}) outputs actions of size {int(policy.action_dim)}: a checkpoint of another "
                       f"task?")


def _check_numbers(cfg: DictConfig) -> None:
    from robolearn.runtime.runner import check_settings

    try:
        check_settings(rate_hz=cfg.rate_hz, latency_s=cfg.latency_s, episodes=cfg.episodes, duration_s=cfg.duration_s,
                       max_nonfinite_chunks=cfg.max_nonfinite_chunks, warm_steps=cfg.warm_steps)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _check_warm_window(policy: Any, blend: str, steps: int | None) -> None:
    """Warn (stderr) when a cache scheduled for a warm start of W steps runs without one (``steps`` None), or
    with another W."""
    schedule = getattr(policy, "schedule", None)
    window = getattr(schedule, "info", {}).get("warm_steps") if schedule is not None else None
    if window is None:
        return
    if steps is None:
        print(f"warning: this cache was scheduled for a {window}-step warm start (accel calibrate warm_steps="
              f"{window}), but blend={blend} samples every step: only its last {window} steps are cached",
              file=sys.stderr)
    elif steps != int(window):
        print(f"warning: this cache was scheduled for a {window}-step warm start, but this run's warm start runs "
              f"{steps} steps (warm_steps={steps}); calibrate with warm_steps={steps} for a schedule that fits",
              file=sys.stderr)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Checks everything it can before the first tick (settings, the checkpoint or server, and that the policy
    fits the task); the run itself writes report.json and prints its summary last; a run that stopped on an
    error (a policy exception, too many non-finite chunks, a non-finite observation) exits 1 after that.

    ``rate_hz=null`` is the task's own control rate, for a checkpoint and a policy server alike: a policy runs at
    the rate its demonstrations were recorded at (the chunk's actions are that many steps apart); the rate in use
    and where it came from are printed on stderr. ``video=true`` replays each episode's sent actions in a
    rendering environment after the run (nothing is rendered in the control loop) and names the mp4s in
    report.json."""
    import sim
    from robolearn.runtime.jobs import run_job

    if bool(cfg.checkpoint) == bool(cfg.policy):
        raise CLIError("give exactly one of checkpoint=<folder> or policy=ws://host:port")
    if cfg.mode not in ("sync", "async"):
        raise CLIError(f"mode must be sync or async, not {cfg.mode!r}")
    if cfg.blend not in ("none", "ensemble", "warmstart"):
        raise CLIError(f"blend must be none, ensemble or warmstart, not {cfg.blend!r}")
    if cfg.warm_steps is not None and cfg.blend != "warmstart":
        raise CLIError(f"warm_steps={cfg.warm_steps} applies to blend=warmstart (RTI-DP), not blend={cfg.blend}")
    _check_numbers(cfg)
    env_config: dict[str, Any] = {}
    task = cfg.task
    if cfg.checkpoint:
        ckpt = Path(cfg.checkpoint)
        run_cfg = checkpoint_run_config(ckpt)
        task = task or run_cfg.get("task")
        if task == run_cfg.get("task"):
            env_config = dict(run_cfg.get("env_config") or {})
    elif not str(cfg.policy).startswith(("ws://", "wss://")):
        raise CLIError(f"policy= must be a ws:// URL of a policy server, got {cfg.policy!r}")
    if not task:
        raise CLIError("task= is required with a remote policy (the server does not say which task)")
    env_config.update(OmegaConf.to_container(cfg.env, resolve=True) or {})
    if cfg.rank is not None and not cfg.checkpoint:
        raise CLIError("rank= applies to a checkpoint=, not to a remote policy (give the server rank= instead)")
    if cfg.cache is not None and not cfg.checkpoint:
        raise CLIError("cache= applies to a checkpoint=, not to a remote policy (give the server cache= instead)")
    from robolearn.cli.evaluation import pick_device

    device = pick_device(str(cfg.device))
    check_inference_options(cfg.dtype, bool(cfg.graph), device, cfg.cache, cfg.rank)
    for key, default in (("dtype", "float32"), ("device", "cpu"), ("graph", False)):
        if cfg[key] != default and not cfg.checkpoint:
            raise CLIError(f"{key}= applies to a checkpoint=, not to a remote policy (give the server {key}= "
                           f"instead)")
    policy = load_checkpoint(Path(cfg.checkpoint), map_location=device) if cfg.checkpoint else \
        _connect(str(cfg.policy), cfg.token)
    if cfg.checkpoint:
        warm = None  # the warm start's steps: a cache made on the spot is scheduled for them
        if cfg.blend == "warmstart":
            from robolearn.runtime.runner import warm_start_steps

            try:
                warm = warm_start_steps(policy, cfg.warm_steps)
            except ValueError as e:
                raise CLIError(str(e)) from None
        policy = apply_cache(policy, Path(cfg.checkpoint), cfg.cache, cfg.cache_updates, warm_steps=warm)
        _check_warm_window(policy, cfg.blend, warm)
        policy = apply_rank(policy, Path(cfg.checkpoint), cfg.rank)
        policy = apply_inference(policy, Path(cfg.checkpoint), cfg.dtype, bool(cfg.graph))
    try:
        task_rate = probe_task(task, env_config, policy)  # before the first tick: the policy must fit the task
        rate_hz = _rate(cfg.rate_hz, task_rate, task)
        run_dir = Path(cfg.run_dir) if cfg.run_dir else Path("runs/run") / f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
        video = bool(cfg.video)
        after_run = partial(_record_videos, task=task, env_config=env_config, run_dir=run_dir) if video else None
        try:
            report = run_job(
                policy, lambda: sim.make(task, **env_config), run_dir=run_dir, episodes=cfg.episodes,
                duration_s=cfg.duration_s, seed=int(cfg.seed), token=cfg.token, rate_hz=rate_hz, mode=cfg.mode,
                blend=cfg.blend, realtime=bool(cfg.realtime), latency_s=cfg.latency_s, status=bool(cfg.status),
                max_nonfinite_chunks=int(cfg.max_nonfinite_chunks), print_error=False, record_actions=video,
                after_run=after_run, warm_steps=cfg.warm_steps,
            )
        except (PermissionError, ConnectionError, OSError) as e:
            if not cfg.policy:
                raise
            raise CLIError(f"policy server {cfg.policy}: {e}") from None
        except (TypeError, ValueError) as e:
            raise CLIError(str(e)) from None
    finally:
        if not cfg.checkpoint:
            policy.close()
    if report.get("error"):
        raise CLIError(f"run failed: {report['error']} (report: {report.get('report_path', run_dir)})")
    return report


def _rate(given: Any, task_rate: float | None, task: str) -> float:
    """The control rate to run at, printed with where it came from (stderr: stdout ends with the summary)."""
    if given is not None:
        rate, why = float(given), "rate_hz="
        if task_rate and abs(rate - task_rate) > 1e-9:
            why += f"; the task's own is {task_rate:g} Hz, which its demonstrations were recorded at"
    elif task_rate:
        rate, why = task_rate, "the task's control rate"
    else:
        rate, why = 10.0, "the task does not say its rate; the default"
    print(f"robolearn run: {task} at {rate:g} Hz ({why})", file=sys.stderr, flush=True)
    return rate


def _record_videos(runner: Any, report: dict[str, Any], *, task: str, env_config: dict[str, Any],
                   run_dir: Path) -> None:
    """``video=true``: each episode again in one rendering environment, from its seed, with the very actions the
    run sent (holds included), through the evaluation room's writer. The environments are deterministic given seed
    and actions, so the video is the run; ``video_matches_run`` checks it (steps, return, success) per episode.
    A failure here is reported (``video_error``), never allowed to lose report.json."""
    import sim
    from robolearn.evaluation import record_episode

    videos: list[str] = []
    try:
        env = sim.make(task, **env_config)
        try:
            for (seed, actions), ep in zip(runner.episode_actions, report["per_episode"]):
                it = iter(actions)
                out = record_episode(env, lambda obs, it=it: next(it), run_dir / "videos" / f"ep{ep['episode']}.mp4",
                                     seed=seed, max_steps=len(actions), fps=runner.rate_hz)
                ep["video"] = out["path"]
                ep["video_matches_run"] = (out["steps"] == ep["steps"] and out["success"] == ep["success"]
                                           and abs(out["return"] - ep["return"]) <= 1e-3 * max(1.0, abs(ep["return"])))
                if not ep["video_matches_run"]:
                    print(f"robolearn run: warning: the video of episode {ep['episode']} differs from the run "
                          f"(replay: {out['steps']} steps, return {out['return']}; run: {ep['steps']} steps, return "
                          f"{ep['return']}): task {task} is not deterministic given its seed and actions",
                          file=sys.stderr, flush=True)
                videos.append(out["path"])
        finally:
            env.close()
    except Exception as e:  # the run's results stand; say what went wrong with the video
        report["video_error"] = f"{type(e).__name__}: {e}"
        print(f"robolearn run: warning: no video: {report['video_error']}", file=sys.stderr, flush=True)
    report["videos"] = videos


def _connect(url: str, token: str | None) -> Any:
    """The policy server as a :class:`RemotePolicy` (its metadata says its keys and sizes), errors as CLIError."""
    from robolearn.extras import require

    for module in ("websockets", "msgpack"):
        require(module, "server", "a policy=ws://... server")
    from websockets.exceptions import WebSocketException

    from robolearn.runtime.client import RemotePolicy, RemotePolicyError

    try:
        return RemotePolicy(url, token=token)
    except (OSError, RemotePolicyError, WebSocketException) as e:
        raise CLIError(f"policy server {url}: {e}") from None


def serve(cfg: DictConfig) -> None:
    from robolearn.extras import require

    for module in ("websockets", "msgpack"):
        require(module, "server", "robolearn serve")
    from robolearn.runtime.jobs import serve_job
    from robolearn.runtime.server import is_loopback

    if not cfg.checkpoint:
        raise CLIError("checkpoint= is required (a checkpoint folder)")
    if not cfg.token and not is_loopback(str(cfg.host)) and not cfg.allow_unauthenticated:
        raise CLIError(f"refusing to serve on host={cfg.host} (beyond loopback) without a token: anyone who can "
                       f"reach the port could run the policy. Set token=<secret> (clients send 'Authorization: "
                       f"Api-Key <secret>'), or allow_unauthenticated=true to serve openly anyway")
    if int(cfg.max_pending) < 1:
        raise CLIError(f"max_pending must be >= 1, got {cfg.max_pending}")
    from robolearn.cli.evaluation import pick_device

    device = pick_device(str(cfg.device))
    check_inference_options(cfg.dtype, bool(cfg.graph), device, cfg.cache, cfg.rank)
    policy = load_checkpoint(Path(cfg.checkpoint), map_location=device)  # a residual is served as its chunk view
    policy = apply_cache(policy, Path(cfg.checkpoint), cfg.cache, cfg.cache_updates)
    policy = apply_rank(policy, Path(cfg.checkpoint), cfg.rank)
    policy = apply_inference(policy, Path(cfg.checkpoint), cfg.dtype, bool(cfg.graph))
    key_map = {str(k): str(v) for k, v in (OmegaConf.to_container(cfg.key_map) or {}).items()}
    try:
        serve_job(policy, host=str(cfg.host), port=int(cfg.port), token=cfg.token, key_map=key_map or None,
                  max_message_bytes=int(float(cfg.max_message_mb) * 2**20),
                  allow_unauthenticated=bool(cfg.allow_unauthenticated), max_pending=int(cfg.max_pending))
    except OSError as e:
        raise CLIError(f"cannot serve on {cfg.host}:{cfg.port}: {e}") from None
    except ValueError as e:
        raise CLIError(str(e)) from None
