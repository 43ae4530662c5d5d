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
    from robolearn.teleop.devices import DeviceError, ReplayDevice, open_live_device, parse_device
    from robolearn.teleop.display import DisplayError, check_display

    t_start = time.perf_counter()
    # ---- what drives: checked first, before anything slow
    try:
        kind, arg = parse_device(str(cfg.device))
        replay = ReplayDevice(arg) if kind == "replay" else None  # type: ignore[arg-type]
    except DeviceError as e:
        raise CLIError(str(e)) from None
    if cfg.mode is not None and cfg.mode not in ("sync", "async"):
        raise CLIError(f"mode must be sync or async, not {cfg.mode!r}")
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
    hardware = None
    if kind in ("spacemouse", "gamepad"):
        try:
            hardware = open_live_device(kind, arg)
        except DeviceError as e:
            raise CLIError(str(e)) from None
    try:
        return _run(cfg, kind, arg, replay, hardware, use_viewer, realtime, t_start)
    finally:
        if hardware is not None:
            hardware.close()


def _run(cfg: DictConfig, kind: str, arg: str | None, replay: Any, hardware: Any, use_viewer: bool, realtime: bool,
         t_start: float) -> dict[str, Any]:
    import sim

    from robolearn.cli.collect import schema_for
    from robolearn.teleop.devices import DeviceError, DeviceSet, EventLog, KeyboardDevice
    from robolearn.teleop.display import DisplayError
    from robolearn.teleop.session import TeleopError, TeleopSession, run_intervention, run_teleop
    from robolearn.teleop.tasks import control_for
    from robolearn.teleop.viewer import TeleopViewer, mujoco_handles

    # ---- the task, its environment, and the policy in intervention mode
    header = replay.header if replay is not None else {}
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
    try:
        env = sim.make(task, **env_config)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e).strip("'\"")) from None
    closers: list[Any] = [env.close]
    try:
        try:
            control = control_for(task, env)
        except ValueError as e:
            raise CLIError(str(e)) from None
        unwrapped = env.unwrapped
        fps = float(getattr(unwrapped, "fps", 10.0))
        # A replay uses the settings it was recorded with, unless told otherwise.
        rate_hz = float(cfg.rate_hz or header.get("rate_hz") or fps)
        mode = str(cfg.mode or header.get("mode") or "async")
        latency_s = cfg.latency_s if cfg.latency_s is not None else header.get("latency_s")
        if rate_hz <= 0:
            raise CLIError(f"rate_hz must be positive, got {rate_hz}")
        full_env_config = unwrapped.env_config() if hasattr(unwrapped, "env_config") else dict(env_config)

        # ---- the store
        schema = schema_for(env)
        if "intervention" in schema:
            raise CLIError("the environment has an observation named 'intervention', which teleop reserves")
        schema["intervention"] = KeySpec((), "bool", "flag")
        out = Path(cfg.out or f"data/{task}_teleop.zarr")
        store, with_flag = _open_store(out, schema, policy is not None, fps=fps, task=task,
                                       env_config=full_env_config, attrs={"source": {"kind": "teleop"}})
        closers.insert(0, store.close)
        if cfg.seed is not None:
            seed = int(cfg.seed)
        elif replay is not None and "seed" in header:
            seed = int(header["seed"])
        else:
            used = [int((store.attrs.get(k) or {}).get("next_seed", 0)) for k in ("collect", "teleop")]
            seed = max(used)

        # ---- the devices
        keyboard: KeyboardDevice | None = None
        if replay is not None:
            device: Any = replay
            label = replay.recorded_device
        else:
            keyboard = KeyboardDevice()
            devices = [keyboard] if hardware is None else [hardware, keyboard]
            log = None
            if cfg.record_events:
                try:
                    log = EventLog(cfg.record_events, {
                        "task": task, "device": kind, "sources": [d.name for d in devices], "rate_hz": rate_hz,
                        "seed": seed, "env_config": full_env_config, "policy": policy_label,
                        **({"mode": mode, "latency_s": latency_s} if policy is not None else {})})
                except FileExistsError:
                    raise CLIError(f"record_events={cfg.record_events} already exists; an event log is never "
                                   f"overwritten: give a new file name") from None
                except OSError as e:
                    raise CLIError(f"cannot write the event log record_events={cfg.record_events}: "
                                   f"{e.strerror or e}") from None
            device = DeviceSet(devices, log)
            label = kind
        ticks: list[Any] = []  # the session, once it exists: the log's end line is its last tick
        closers.insert(0, lambda: device.close(ticks[0].tick_index if ticks else 0))

        if policy is not None:
            from robolearn.teleop.session import warm_up

            want = int(np.prod(env.action_space.shape))
            if int(policy.action_dim) != want:
                raise CLIError(f"policy checkpoint {policy_label} predicts {policy.action_dim}-D actions; task {task} "
                               f"takes {want}-D actions")
            try:
                warm_up(policy, env.reset(seed=seed)[0])
            except (KeyError, ValueError, TypeError, RuntimeError) as e:  # RuntimeError: torch, on a shape mismatch
                raise CLIError(f"policy checkpoint {policy_label} does not fit task {task}: {e}") from None

        # ---- the window
        viewer = None
        if use_viewer:
            model, data = mujoco_handles(env)
            viewer = TeleopViewer(model, data, keyboard.press if keyboard is not None else (lambda key: None),
                                  control.view)
            closers.insert(0, viewer.close)
            try:
                viewer.open()
            except DisplayError as e:
                raise CLIError(str(e)) from None
        extra = {"replayed_from": str(arg)} if replay is not None else {}
        session = TeleopSession(
            env, control, device, store, device_label=label, seed=seed, policy_label=policy_label,
            record_intervention=with_flag, autosave=bool(cfg.autosave), max_episodes=cfg.episodes, viewer=viewer,
            handles=mujoco_handles, episode_attrs=extra)
        ticks.append(session)
        mode_text = f"policy {policy_label} drives ({mode}), F9 takes over, F10 hands back" if policy is not None \
            else "Enter starts recording, F8 saves, Delete discards, Escape quits"
        print(f"teleop: {task} at {rate_hz:g} Hz with {label}{' (replay)' if replay else ''} -> {out}; "
              f"{mode_text}", file=sys.stderr, flush=True)
        try:
            if policy is None:
                result = run_teleop(session, rate_hz, realtime)
            else:
                result = run_intervention(session, policy, rate_hz, realtime, mode=mode, latency_s=latency_s)
        except (TeleopError, DeviceError) as e:  # e.g. a SpaceMouse or gamepad unplugged mid-session
            raise CLIError(f"{e} ({session.saved} saved episodes are kept in {out})") from None
        store_episodes = store.n_episodes
    finally:
        for close in closers:  # the viewer first (its thread is joined), the store before the environment
            try:
                close()
            except Exception as e:  # closing must not hide the error that got us here
                print(f"teleop: while closing: {type(e).__name__}: {e}", file=sys.stderr)
    summary = {
        "task": task, "out": str(out), "device": label, "replay": replay is not None, "policy": policy_label,
        "intervention_flag": with_flag, **result, "store_episodes": store_episodes, "rate_hz": rate_hz,
        "realtime": realtime, "viewer": use_viewer, "events_log": cfg.record_events,
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    print(f"{session.saved} episode(s) saved to {out} ({store_episodes} in the store); quit: {session.quit_reason}",
          file=sys.stderr)
    print_json(summary)
    return summary
