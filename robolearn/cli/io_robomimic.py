"""``robolearn data import robomimic FILE.hdf5 --out STORE.zarr``: a robomimic dataset as an episode store.

The reader (:mod:`robolearn.data.formats.robomimic`) knows the file; this command knows the simulator. It maps the
robosuite environment named in ``env_args`` to a robolearn task (Lift -> ``lift``, PickPlaceCan -> ``can``,
NutAssemblySquare -> ``square``, any other -> ``robosuite/<Env>``) and its settings to the task's environment
config -- robots, control rate (the store's fps), reward shaping, the controller when it differs from robosuite's
default for the robot (robosuite 1.4 controller configs, which robomimic's v1.4.1 datasets carry, are converted to
1.5's composite form first), any other robosuite kwarg that differs from the environment's default -- and asks
the environment which observations it produces. Observations it produces, with the same shape, are the store's
``obs`` keys and the environment's ``obs_keys``; camera images (``<camera>_image``) set ``camera_names`` and
``camera_size``; anything else is kept with role ``other`` and named in a note. So ``robolearn train task=lift
dataset=STORE`` trains on exactly what the environment can feed at evaluation, with no further argument.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robolearn.cli import CLIError


def add_import_parser(sub: Any) -> None:
    """``data import robomimic``."""
    p = sub.add_parser(
        "robomimic", help="a robomimic HDF5 dataset (robosuite demonstrations) into a new episode store",
        description="Import a robomimic HDF5 file (data/demo_N/obs/<key>, actions, rewards, dones, states;\n"
                    "env_args) into an episode store for the matching task (Lift -> lift, PickPlaceCan -> can,\n"
                    "NutAssemblySquare -> square, other -> robosuite/<Env>), with the file's environment settings,\n"
                    "so 'robolearn train task=<task> dataset=STORE' needs no further argument. Demos are appended\n"
                    "whole (in batches); running the same command again after an interruption continues where it\n"
                    "stopped. Observations the task does not produce are kept with role 'other' (named on import).",
        epilog="examples:\n"
               "  robolearn data import robomimic lift/ph/low_dim_v141.hdf5 --out data/lift_ph.zarr\n"
               "  robolearn data import robomimic can/ph/image_v141.hdf5 --out data/can_img.zarr --filter train\n"
               "  robolearn data import robomimic lift.hdf5 --out data/lift.zarr "
               "--obs-keys object,robot0_eef_pos,robot0_eef_quat,robot0_gripper_qpos\n"
               "  robolearn train task=lift dataset=data/lift_ph.zarr",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=Path, help="the robomimic .hdf5 file")
    p.add_argument("--out", type=Path, required=True, help="the episode store to write")
    p.add_argument("--filter", default=None, help="import only the demos of mask/<FILTER> (e.g. train, valid)")
    p.add_argument("--obs-keys", default=None,
                   help="comma-separated observations to import (default: every key under obs/)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it exists (otherwise only an interrupted import of this file continues)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=cmd_import_robomimic)


def add_export_parser(sub: Any) -> None:
    """No ``data export robomimic`` (not asked for: robomimic users train from the store or from Diffusion
    Policy's format, ``data export dp``)."""


@dataclass
class EnvPlan:
    """The task an import records and what the environment makes of the file's keys."""

    task: str
    fps: float | None
    env_config: dict[str, Any]
    roles: dict[str, str]  # obs key -> "obs" | "other"
    notes: list[str] = field(default_factory=list)


def _robosuite() -> Any:
    from sim.robosuite_env import _import_robosuite

    return _import_robosuite()


def check_env_name(file: Path, env_name: str) -> None:
    """The robosuite environment ``env_args`` names must exist in the installed robosuite."""
    rs = _robosuite()
    envs = sorted(rs.ALL_ENVIRONMENTS)
    if env_name not in envs:
        close = difflib.get_close_matches(env_name, envs, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise CLIError(f"{file}: data.attrs['env_args'] names the robosuite environment {env_name!r}, which "
                       f"robosuite {rs.__version__} does not have.{hint} (It has: {', '.join(envs)})")


def _canon(x: Any) -> Any:
    """JSON-normal form (tuples as lists, keys sorted) for comparing settings."""
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def controller_override(controller_configs: Any, robot: str) -> dict[str, Any] | None:
    """The composite controller config to pass robosuite for ``controller_configs`` as robomimic recorded it, or
    None when it is robosuite's default for ``robot`` (the usual case: robomimic's datasets use OSC_POSE with
    robosuite's default gains). A robosuite-1.4 part config (``{"type": "OSC_POSE", ..., "control_delta": true}``)
    is converted to 1.5's composite form first -- robosuite 1.5 would otherwise build the robot without an arm
    controller -- and its ``control_delta`` becomes 1.5's ``input_type``."""
    _robosuite()
    from robosuite.controllers.composite.composite_controller_factory import (
        load_composite_controller_config,
        refactor_composite_controller_config,
    )

    default = load_composite_controller_config(robot=robot)
    new = refactor_composite_controller_config(copy.deepcopy(controller_configs), robot, ["right"])
    defaults = default.get("body_parts") or {}
    for name, part in (new.get("body_parts") or {}).items():
        if not isinstance(part, dict):
            continue
        if "control_delta" in part:
            delta = part.pop("control_delta")
            part.setdefault("input_type", "delta" if delta else "absolute")
        # A setting the file leaves out is the controller's own default (robosuite 1.4 had no input_ref_frame),
        # which robosuite's default config for the same controller type spells out.
        same = defaults.get(name)
        if isinstance(same, dict) and same.get("type") == part.get("type"):
            for key, value in same.items():
                part.setdefault(key, copy.deepcopy(value))
    return None if _canon(new) == _canon(default) else new


def robosuite_kwargs(file: Path, env_name: str, robot: str, rest: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The file's remaining robosuite kwargs that differ from ``env_name``'s defaults (what ``robosuite_kwargs``
    must carry to make the same environment), with a note for each kept or ignored one."""
    rs = _robosuite()
    params = inspect.signature(rs.environments.base.REGISTERED_ENVS[env_name].__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    out: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in rest.items():
        if key == "controller_configs":
            if value is None:
                continue
            try:
                cc = controller_override(value, robot)
            except Exception as e:  # a controller robosuite does not know, ...
                raise CLIError(f"{file}: data.attrs['env_args']['env_kwargs']['controller_configs'] cannot be used "
                               f"with robosuite {rs.__version__} ({type(e).__name__}: {e})") from None
            if cc is not None:
                out[key] = cc
                notes.append("the file's controller differs from robosuite's default for "
                             f"{robot}: recorded in env.robosuite_kwargs.controller_configs")
            continue
        if key not in params:
            if not takes_any:
                notes.append(f"env_kwargs {key}={json.dumps(value, default=str)} ignored: robosuite "
                             f"{rs.__version__}'s {env_name} takes no {key!r}")
                continue
            out[key] = value
            continue
        default = params[key].default
        if default is not inspect.Parameter.empty and _canon(value) == _canon(default):
            continue
        out[key] = value
        notes.append(f"env_kwargs {key}={json.dumps(value, default=str)} differs from robosuite's default "
                     f"({json.dumps(default, default=str)}): recorded in env.robosuite_kwargs")
    return out, notes


def plan_environment(header: Any) -> EnvPlan:
    """Task, environment config, fps and each observation's role for an import of ``header``'s file."""
    import sim
    from sim.robosuite_env import _RENAME

    from robolearn.data.formats.robomimic import camera_of, env_overrides, task_for_env

    file = header.path
    check_env_name(file, header.env_name)
    task = task_for_env(header.env_name)
    overrides, rest = env_overrides(header)
    robots = overrides.get("robots", "Panda")
    robot = robots if isinstance(robots, str) else robots[0]
    extra, notes = robosuite_kwargs(file, header.env_name, robot, rest)
    if extra:
        overrides["robosuite_kwargs"] = extra
    try:
        probe = sim.make(task, obs_keys=[], camera_names=[], **overrides)
    except Exception as e:  # robosuite refuses the settings: name them
        raise CLIError(f"{file}: task {task} cannot be made with the settings of data.attrs['env_args'] "
                       f"({json.dumps(overrides, default=str)}): {type(e).__name__}: {e}") from None
    try:
        env = probe.unwrapped
        raw = env.rs_env.observation_spec()
        cameras = list(env.rs_env.sim.model.camera_names)
        env_config = env.env_config()
        fps = getattr(env, "fps", None)
        action_shape = tuple(probe.action_space.shape)
    finally:
        probe.close()
    file_action = header.arrays.get("actions")
    if file_action is not None and tuple(file_action) != action_shape:
        raise CLIError(f"{file}: data/{header.demos[0]}/actions has {tuple(file_action)} per step but task {task} "
                       f"with the file's settings takes {action_shape}")
    produced = sorted(k for k in raw if not k.endswith(("_image", "_depth", "_segmentation")))
    roles: dict[str, str] = {}
    low: list[str] = []
    cams: list[str] = []
    size: tuple[int, int] | None = None
    for key, (shape, dtype) in header.obs.items():
        cam = camera_of(key, shape, dtype)
        if cam is not None:
            if cam not in cameras:
                roles[key] = "other"
                notes.append(f"{key}: task {task} has no camera {cam!r} (its cameras: {', '.join(cameras)}); kept "
                             f"with role 'other', not used for training")
            elif size is not None and tuple(shape[:2]) != size:
                roles[key] = "other"
                notes.append(f"{key} is {shape[0]}x{shape[1]} but the other images are {size[0]}x{size[1]} (one "
                             f"camera size per environment); kept with role 'other', not used for training")
            else:
                size = (int(shape[0]), int(shape[1]))
                roles[key] = "obs"
                cams.append(cam)
            continue
        name = _RENAME.get(key, key)
        if name not in raw:
            roles[key] = "other"
            notes.append(f"observation {key!r} does not exist in task {task} (robosuite's {header.env_name} produces "
                         f"{', '.join(produced)}); kept with role 'other', not used for training")
        elif tuple(np.shape(raw[name])) != tuple(shape):
            roles[key] = "other"
            notes.append(f"observation {key!r} is {tuple(shape)} in the file but {tuple(np.shape(raw[name]))} in "
                         f"task {task}; kept with role 'other', not used for training")
        else:
            roles[key] = "obs"
            low.append(key)
    env_config["obs_keys"] = low
    env_config["camera_names"] = cams
    if size is not None:
        env_config["camera_size"] = list(size)
    if not low and not cams:
        notes.append(f"no observation of the file is one task {task} produces: training needs obs_keys= naming "
                     f"keys it can feed")
    return EnvPlan(task=task, fps=fps, env_config=env_config, roles=roles, notes=notes)


def cmd_import_robomimic(args: argparse.Namespace) -> None:
    from robolearn.cli import print_json
    from robolearn.data.formats.robomimic import import_file, read_header, store_schema

    obs_keys = [k.strip() for k in args.obs_keys.split(",") if k.strip()] if args.obs_keys else None
    header = read_header(args.file, filter=args.filter, obs_keys=obs_keys)
    try:
        subset = f", filter {header.filter}" if header.filter else ""
        print(f"{header.path}: {len(header.demos)} demos, {header.steps} steps{subset}; robosuite {header.env_name}")
        plan = plan_environment(header)
        for note in plan.notes:
            print(f"note: {note}")
        schema = store_schema(header, plan.roles)

        def resumed(have: int, total: int) -> None:
            print(f"resuming: {args.out} holds {have} of the {total} demos already; importing the other "
                  f"{total - have}")

        t0 = time.perf_counter()
        result = import_file(header, args.out, schema=schema, task=plan.task, fps=plan.fps,
                             env_config=plan.env_config, overwrite=args.overwrite, progress=args.progress,
                             on_resume=resumed)
    finally:
        header.close()
    seconds = time.perf_counter() - t0
    rate = result.steps / seconds if seconds > 0 else 0.0
    print(f"imported {len(result.imported)} demos ({result.steps} steps) into {result.out} in {seconds:.1f} s; it "
          f"holds {result.episodes} episodes for task {plan.task}. Train with: robolearn train task={plan.task} "
          f"dataset={result.out}")
    print_json({
        "file": str(header.path), "out": str(result.out), "task": plan.task, "filter": header.filter,
        "demos": len(header.demos), "imported": len(result.imported), "skipped": len(result.skipped),
        "episodes": result.episodes, "steps": result.steps, "seconds": round(seconds, 3),
        "steps_per_s": round(rate, 1), "fps": plan.fps,
        "keys": {k: s.role for k, s in schema.items()},
        "not_in_task": [k for k, r in plan.roles.items() if r != "obs"],
    })
