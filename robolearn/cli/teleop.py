"""``robolearn teleop``: record demonstrations by hand, or corrections of a running policy, into an episode store.

Wiring only: the session, devices and viewer live in :mod:`robolearn.teleop`. Episodes are stored with the schema
scripted collection writes (``collect.schema_for``: every observation key, ``action``, ``reward``) plus a per-step
``intervention`` flag (role ``flag``: True where a person chose the action), and per-episode attributes (source,
device, start and save times, seed, success, policy). An existing scripted store (no ``intervention`` key) takes
plain teleoperated episodes as they are, without the flag; intervention episodes need a store that has it.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from robolearn.cli import CLIError, print_json
from robolearn.data import EpisodeStore, KeySpec
from robolearn.data.schema import schema_mismatch


def _open_store(out: Path, schema: dict[str, KeySpec], policy_mode: bool, **meta: Any) -> tuple[Any, bool]:
    """The store to append to, and whether its episodes carry the ``intervention`` flag."""
    base = {k: v for k, v in schema.items() if k != "intervention"}
    if out.exists():
        peek = EpisodeStore.open(out, mode="r", validate=False)
        existing = dict(peek.schema)
        peek.close()
        if "intervention" not in existing and schema_mismatch(existing, base) is None:
            if policy_mode:
                raise CLIError(
                    f"store {out} has no per-step 'intervention' flag (it was written by scripted collection); "
                    f"intervention episodes need one: give another out=")
            print(f"teleop: {out} is a store without the 'intervention' flag; appending plain teleoperated "
                  f"episodes without it", file=sys.stderr)
            return EpisodeStore.open_or_create(out, base, **meta), False
    return EpisodeStore.open_or_create(out, schema, **meta), True


def run(cfg: DictConfig) -> dict[str, Any]:
    t_start = time.perf_counter()
    kind, arg, replay, use_viewer, realtime = _check_args(cfg)
    hardware = _open_hardware(kind, arg)
    try:
        return _run(cfg, kind, arg, replay, hardware, use_viewer, realtime, t_start)
    finally:
        if hardware is not None:
            hardware.close()


def _check_args(cfg: DictConfig) -> tuple[str, str | None, Any, bool, bool]:
    """What drives, checked first, before anything slow: ``(kind, arg, replay, use_viewer, realtime)``."""
    from robolearn.teleop.devices import MAX_RATE_HZ, MIN_RATE_HZ, DeviceError, ReplayDevice, parse_device
    from robolearn.teleop.display import DisplayError, check_display

    try:
        kind, arg = parse_device(str(cfg.device))
        replay = ReplayDevice(arg) if kind == "replay" else None  # type: ignore[arg-type]
    except DeviceError as e:
        raise CLIError(str(e)) from None
    if cfg.mode is not None and cfg.mode not in ("sync", "async"):
        raise CLIError(f"mode must be sync or async, not {cfg.mode!r}")
    if cfg.rate_hz is not None and not MIN_RATE_HZ <= float(cfg.rate_hz) <= MAX_RATE_HZ:  # NaN fails too
        raise CLIError(f"rate_hz must be in [{MIN_RATE_HZ:g}, {MAX_RATE_HZ:g}] Hz, got {float(cfg.rate_hz):g}")
    if cfg.episodes is not None and cfg.episodes < 1:
        raise CLIError(f"episodes must be >= 1 (or null for no limit), got {cfg.episodes}")
    if replay is not None and cfg.record_events:
        raise CLIError("record_events= records a live session; a replay already is such a log")
    if cfg.record_events and Path(cfg.record_events).exists():
        raise CLIError(f"record_events={cfg.record_events} already exists; an event log is never overwritten: "
                       f"give a new file name")
    if replay is not None and replay.header.get("policy") and not cfg.policy:
        raise CLIError(
            f"replay log {arg} was recorded in intervention mode with policy {replay.header['policy']}: give "
            f"policy=CHECKPOINT to replay it (the operator's inputs are replayed against the policy's actions)")
    use_viewer = bool(cfg.viewer) if cfg.viewer is not None else replay is None
    realtime = bool(cfg.realtime) if cfg.realtime is not None else replay is None
    if replay is None and not use_viewer:
        raise CLIError(f"device={kind} needs the viewer window (its keys start, save and discard episodes); "
                       f"only a replay runs headless (viewer=false)")
    if use_viewer:
        try:
            check_display()
        except DisplayError as e:
            raise CLIError(str(e)) from None
    return kind, arg, replay, use_viewer, realtime


def _open_hardware(kind: str, arg: str | None) -> Any:
    """The SpaceMouse or gamepad, opened; None for the other devices."""
    from robolearn.teleop.devices import DeviceError, open_live_device

    if kind not in ("spacemouse", "gamepad"):
        return None
    try:
        return open_live_device(kind, arg)
    except DeviceError as e:
        raise CLIError(str(e)) from None


@dataclass
class _InFlight:
    """One session's pieces as they are built. ``closers`` closes them in order: each new piece goes first (the
    viewer, then the devices, then the store), the environment last."""
    cfg: DictConfig
    kind: str
    arg: str | None
    replay: Any
    hardware: Any
    use_viewer: bool
    realtime: bool
    header: dict[str, Any]
    task: str
    policy: Any
    policy_label: str | None
    env: Any
    closers: list[Any]
    control: Any = None
    fps: float = 10.0
    rate_hz: float = 0.0
    mode: str = "async"
    latency_s: Any = None
    full_env_config: dict[str, Any] = field(default_factory=dict)
    out: Path = field(default_factory=Path)
    store: Any = None
    with_flag: bool = True
    seed: int = 0
    keyboard: Any = None
    device: Any = None
    label: Any = None
    viewer: Any = None
    ticks: list[Any] = field(default_factory=list)  # the session, once it exists: the log's end line is its last tick


def _run(cfg: DictConfig, kind: str, arg: str | None, replay: Any, hardware: Any, use_viewer: bool, realtime: bool,
         t_start: float) -> dict[str, Any]:
    import sim

    header = replay.header if replay is not None else {}
    task, env_config, policy, policy_label = _resolve_task(cfg, header, arg)
    try:
        env = sim.make(task, **env_config)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e).strip("'\"")) from None
    s = _InFlight(cfg, kind, arg, replay, hardware, use_viewer, realtime, header, task, policy, policy_label, env,
                  closers=[env.close])
    try:
        _settle_control(s, env_config)
        _open_output(s)
        _open_devices(s)
        if policy is not None:
            _check_policy_fits(s)
        _open_viewer(s)
        session, result, store_episodes = _run_session(s)
    finally:
        for close in s.closers:  # the viewer first (its thread is joined), the store before the environment
            try:
                close()
            except Exception as e:  # closing must not hide the error that got us here
                print(f"teleop: while closing: {type(e).__name__}: {e}", file=sys.stderr)
    return _summarize(s, session, result, store_episodes, t_start)


def _resolve_task(cfg: DictConfig, header: dict[str, Any], arg: str | None
                  ) -> tuple[str, dict[str, Any], Any, str | None]:
    """The task, its environment's settings, and the policy in intervention mode: ``(task, env_config, policy,
    policy_label)``."""
    task = cfg.task or header.get("task")
    env_config: dict[str, Any] = dict(header.get("env_config") or {})
    policy: Any = None
    policy_label = None
    if cfg.policy:
        from robolearn.cli.runtime import checkpoint_run_config, load_checkpoint

        ckpt = Path(cfg.policy)
        run_cfg = checkpoint_run_config(ckpt)
        task = task or run_cfg.get("task")
        if task == run_cfg.get("task") and not env_config:
            env_config = dict(run_cfg.get("env_config") or {})
        policy = load_checkpoint(ckpt)
        if hasattr(policy, "eval"):
            policy.eval()
        policy_label = str(ckpt)
    if not task:
        raise CLIError("task= is required (push_t, peg_insert, lift, can, square or robosuite/<EnvName>)")
    if header.get("task") and header["task"] != task:
        raise CLIError(f"replay log {arg} was recorded on task {header['task']!r}, not {task!r}")
    env_config.update(OmegaConf.to_container(cfg.env, resolve=True) or {})  # type: ignore[arg-type]
    return task, env_config, policy, policy_label


def _settle_control(s: _InFlight, env_config: dict[str, Any]) -> None:
    """The task's key mapping and the session's pace (a replay uses the settings it was recorded with, unless told
    otherwise)."""
    from robolearn.teleop.devices import MAX_RATE_HZ, MIN_RATE_HZ
    from robolearn.teleop.tasks import control_for

    try:
        s.control = control_for(s.task, s.env)
    except ValueError as e:
        raise CLIError(str(e)) from None
    unwrapped = s.env.unwrapped
    s.fps = float(getattr(unwrapped, "fps", 10.0))
    s.rate_hz = float(s.cfg.rate_hz or s.header.get("rate_hz") or s.fps)
    s.mode = str(s.cfg.mode or s.header.get("mode") or "async")
    s.latency_s = s.cfg.latency_s if s.cfg.latency_s is not None else s.header.get("latency_s")
    if not MIN_RATE_HZ <= s.rate_hz <= MAX_RATE_HZ:  # NaN fails too
        raise CLIError(f"rate_hz must be in [{MIN_RATE_HZ:g}, {MAX_RATE_HZ:g}] Hz, got {s.rate_hz:g}")
    s.full_env_config = unwrapped.env_config() if hasattr(unwrapped, "env_config") else dict(env_config)


def _open_output(s: _InFlight) -> None:
    """The store (closed before the environment) and the first episode's seed."""
    from robolearn.cli.collect import schema_for

    schema = schema_for(s.env)
    if "intervention" in schema:
        raise CLIError("the environment has an observation named 'intervention', which teleop reserves")
    schema["intervention"] = KeySpec((), "bool", "flag")
    s.out = Path(s.cfg.out or f"data/{s.task}_teleop.zarr")
    s.store, s.with_flag = _open_store(s.out, schema, s.policy is not None, fps=s.fps, task=s.task,
                                       env_config=s.full_env_config, attrs={"source": {"kind": "teleop"}})
    s.closers.insert(0, s.store.close)
    if s.cfg.seed is not None:
        s.seed = int(s.cfg.seed)
    elif s.replay is not None and "seed" in s.header:
        s.seed = int(s.header["seed"])
    else:
        used = [int((s.store.attrs.get(k) or {}).get("next_seed", 0)) for k in ("collect", "teleop")]
        s.seed = max(used)


def _open_devices(s: _InFlight) -> None:
    """What drives the session: the replay, or the keyboard (after the SpaceMouse or gamepad) with the event log."""
    from robolearn.teleop.devices import DeviceSet, KeyboardDevice

    if s.replay is not None:
        device: Any = s.replay
        s.label = s.replay.recorded_device
    else:
        s.keyboard = KeyboardDevice()
        devices = [s.keyboard] if s.hardware is None else [s.hardware, s.keyboard]
        device = DeviceSet(devices, _open_event_log(s, devices))
        s.label = s.kind
    s.device = device
    ticks = s.ticks
    s.closers.insert(0, lambda: device.close(ticks[0].tick_index if ticks else 0))


def _open_event_log(s: _InFlight, devices: list[Any]) -> Any:
    """The ``record_events=`` log of a live session, or None."""
    from robolearn.teleop.devices import EventLog

    if not s.cfg.record_events:
        return None
    try:
        return EventLog(s.cfg.record_events, {
            "task": s.task, "device": s.kind, "sources": [d.name for d in devices], "rate_hz": s.rate_hz,
            "seed": s.seed, "env_config": s.full_env_config, "policy": s.policy_label,
            **({"mode": s.mode, "latency_s": s.latency_s} if s.policy is not None else {})})
    except FileExistsError:
        raise CLIError(f"record_events={s.cfg.record_events} already exists; an event log is never "
                       f"overwritten: give a new file name") from None
    except OSError as e:
        raise CLIError(f"cannot write the event log record_events={s.cfg.record_events}: "
                       f"{e.strerror or e}") from None


def _check_policy_fits(s: _InFlight) -> None:
    """The policy's action size matches the task's, and it runs on the first observation (the warm-up)."""
    from robolearn.teleop.session import warm_up

    want = int(np.prod(s.env.action_space.shape))
    if int(s.policy.action_dim) != want:
        raise CLIError(f"policy checkpoint {s.policy_label} predicts {s.policy.action_dim}-D actions; task {s.task} "
                       f"takes {want}-D actions")
    try:
        warm_up(s.policy, s.env.reset(seed=s.seed)[0])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:  # RuntimeError: torch, on a shape mismatch
        raise CLIError(f"policy checkpoint {s.policy_label} does not fit task {s.task}: {e}") from None


def _open_viewer(s: _InFlight) -> None:
    """The window (closed first, once it exists), when the session has one."""
    from robolearn.teleop.display import DisplayError
    from robolearn.teleop.viewer import TeleopViewer, mujoco_handles

    if not s.use_viewer:
        return
    model, data = mujoco_handles(s.env)
    keyboard = s.keyboard
    s.viewer = TeleopViewer(model, data, keyboard.press if keyboard is not None else (lambda key: None),
                            s.control.view)
    s.closers.insert(0, s.viewer.close)
    try:
        s.viewer.open()
    except DisplayError as e:
        raise CLIError(str(e)) from None


def _run_session(s: _InFlight) -> tuple[Any, dict[str, Any], int]:
    """Run the session to its end: ``(session, result, store_episodes)``."""
    from robolearn.teleop.devices import DeviceError
    from robolearn.teleop.session import TeleopError, TeleopSession, run_intervention, run_teleop
    from robolearn.teleop.viewer import mujoco_handles

    extra = {"replayed_from": str(s.arg)} if s.replay is not None else {}
    session = TeleopSession(
        s.env, s.control, s.device, s.store, device_label=s.label, seed=s.seed, policy_label=s.policy_label,
        record_intervention=s.with_flag, autosave=bool(s.cfg.autosave), max_episodes=s.cfg.episodes,
        viewer=s.viewer, handles=mujoco_handles, episode_attrs=extra)
    s.ticks.append(session)
    mode_text = f"policy {s.policy_label} drives ({s.mode}), F9 takes over, F10 hands back" if s.policy is not None \
        else "Enter starts recording, F8 saves, Delete discards, Escape quits"
    print(f"teleop: {s.task} at {s.rate_hz:g} Hz with {s.label}{' (replay)' if s.replay else ''} -> {s.out}; "
          f"{mode_text}", file=sys.stderr, flush=True)
    try:
        if s.policy is None:
            result = run_teleop(session, s.rate_hz, s.realtime)
        else:
            result = run_intervention(session, s.policy, s.rate_hz, s.realtime, mode=s.mode, latency_s=s.latency_s)
    except (TeleopError, DeviceError) as e:  # e.g. a SpaceMouse or gamepad unplugged mid-session
        raise CLIError(f"{e} ({session.saved} saved episodes are kept in {s.out})") from None
    return session, result, s.store.n_episodes


def _summarize(s: _InFlight, session: Any, result: dict[str, Any], store_episodes: int,
               t_start: float) -> dict[str, Any]:
    """The run's summary, printed as JSON (and a line for the operator on stderr)."""
    summary = {
        "task": s.task, "out": str(s.out), "device": s.label, "replay": s.replay is not None,
        "policy": s.policy_label, "intervention_flag": s.with_flag, **result, "store_episodes": store_episodes,
        "rate_hz": s.rate_hz, "realtime": s.realtime, "viewer": s.use_viewer, "events_log": s.cfg.record_events,
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    print(f"{session.saved} episode(s) saved to {s.out} ({store_episodes} in the store); quit: {session.quit_reason}",
          file=sys.stderr)
    print_json(summary)
    return summary
