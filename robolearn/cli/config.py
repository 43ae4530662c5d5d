"""Hydra configs backed by dataclasses: defaults in ``robolearn/configs/<name>.yaml``, types and keys in the dataclass.

``compose(name, overrides)`` returns a validated ``DictConfig``. A key that is not in the dataclass, or a value
of the wrong type, is refused before any work starts, with a message naming the key and listing valid ones.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from robolearn.policies.config import ConfigError  # the one config error type: the CLI prints it, naming the key
from robolearn.rl.settings import ResidualSettings, SteerSettings
from robolearn.training.settings import TrainSettings

__all__ = ["ConfigError", "SCHEMAS", "compose", "config_dir"]


@dataclass
class ExpertConfig:
    noise: float = 0.0  # scale of the expert's imperfection: 0 is the clean expert
    bias: float = 0.0  # peg_insert: per-episode misjudgment of the hole's position (std, mm); 0 is none


@dataclass
class CollectConfig:
    task: str = "push_t"
    episodes: int = 50  # successful episodes to add (all attempts when keep_failures=true)
    out: str | None = None  # default: data/<task>.zarr
    seed: int = 0  # first environment seed; a resumed collection continues after the last one used
    keep_failures: bool = False
    workers: int = 1  # rollout processes
    max_attempts: int | None = None  # give up after this many rollouts (default: 4 x episodes + 10)
    post_success_steps: int = 10  # steps recorded after the task first reports success
    progress: bool = True
    env: dict[str, Any] = field(default_factory=dict)  # overrides passed to sim.make(task, **env)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    policy: str | None = None  # a checkpoint folder: record its rollouts instead of the scripted expert's
    threads: int | None = None  # torch threads; default per command (robolearn/cli/threads.py)
    # Appending episodes made otherwise (expert.noise, policy=, env.*) than the store's: refuse | allow (each
    # episode records its own settings; the store's source then says "mixed").
    append_mismatch: str = "refuse"


@dataclass
class BenchEnvConfig:
    task: str = "push_t"
    steps: int = 5000
    seed: int = 0
    out: str | None = None  # JSON result; default runs/bench/env_<task>.json
    env: dict[str, Any] = field(default_factory=dict)


@dataclass
class AccelCalibrateConfig:
    checkpoint: str | None = None  # a diffusion/flow transformer checkpoint
    method: str = "bac"  # bac | shared | searched | uniform | none
    updates: int | None = None  # update steps per branch; default a quarter of the sampler's steps
    bubble: int = 4  # Bubbling Union: how many of the worst-cached branches take their downstream FFN's steps
    metric: str = "cosine"  # cosine | l1
    step_weights: bool = False  # bac/shared: weigh each step's lost similarity by how much it moves the chunk
    warm_steps: int | None = None  # schedule only the last W steps (the ones a warm start runs)
    observations: int = 256  # calibration observations drawn from the training data
    batch: int = 32
    sampler: str | None = None  # default: the checkpoint's
    steps: int | None = None
    dataset: str | None = None  # default: the checkpoint's training data
    out: str | None = None  # default: beside the checkpoint, <name>-<method>-<sampler>-k<updates>
    seed: int = 0
    plot: bool = True
    progress: bool = True
    threads: int | None = None  # torch threads; default per command (robolearn/cli/threads.py)


@dataclass
class BenchLatencyConfig:
    checkpoint: str | None = None  # a base checkpoint (cached per cache=) or a cached one (against its base)
    cache: str | None = None  # bac | shared | searched | uniform | none; default bac (for a base checkpoint)
    updates: int | None = None
    sampler: str | None = None
    steps: int | None = None
    warm_steps: int | None = None  # time the warm start (RTI-DP) with this many steps instead of full sampling
    dtype: str = "float32"  # the backbone's dtype for both timed policies (after calibration): float32 | bf16 | fp16
    repeats: int = 20
    warmup: int = 3
    observations: int = 16  # observations from the training data for the action error
    threads: int | None = None
    dataset: str | None = None
    seed: int = 0
    out: str | None = None  # also write the JSON summary here
    progress: bool = True


# Keys under these take any name: env overrides go to sim.make (which checks them), policy settings to the
# typed policy config (robolearn/policies/config.py, which checks them and names unknown keys).
FREE_FORM = ("env.", "policy.", "key_map.", "task.env.")
@dataclass
class QuickstartConfig:
    task: str = "lift"
    episodes: int = 100  # scripted demonstrations to collect
    workers: int = 2
    seed: int = 0
    out_dir: str = "data/quickstart"
    run_dir: str = "runs/quickstart"
    policy: str = "diffusion_unet"
    train_steps: int = 1500
    eval_episodes: int = 20
    train: list[str] = field(default_factory=list)  # more overrides for robolearn train
    progress: bool = True
    threads: int | None = None  # torch threads; default per command (robolearn/cli/threads.py)


@dataclass
class TrainingConfig(TrainSettings):
    steps: int = 3000
    warmup_steps: int = 100
    # null: chosen by robolearn train from the backbone preset (robolearn/cli/train.py, training_defaults)
    batch_size: int | None = None  # type: ignore[assignment]
    lr: float | None = None  # type: ignore[assignment]
    eval_every: int | None = None  # type: ignore[assignment]
    val_ratio: float = 0.05  # episodes held out for the validation loss
    episode_weights: str | None = None  # a score file (data audit's scores.jsonl): each episode's 'weight' in the loss
    intervention_weight: float | None = None  # loss weight of steps flagged 'intervention' (a person drove)


@dataclass
class TaskEvalConfig:
    episodes: int = 20  # evaluation episodes at the end of training (and every training.eval_every steps)
    max_steps: int | None = None  # evaluation episode length; default: the task's own time limit


@dataclass
class TaskConfig:
    """One task: a file in robolearn/configs/task/ (``robolearn train task=<file name>``)."""

    name: str = "push_t"  # the simulation task: push_t | peg_insert | lift | can | square | robosuite/<EnvName>
    dataset: str | None = None  # default: data/<name>.zarr
    obs_keys: list[str] | None = None  # default: every observation key of the dataset
    env: dict[str, Any] = field(default_factory=dict)  # sim.make overrides on top of the dataset's env config
    eval: TaskEvalConfig = field(default_factory=TaskEvalConfig)


@dataclass
class EvalLoopConfig:
    episodes: int | None = None  # default: the task's eval.episodes
    num_envs: int = 4
    workers: int = 2
    seed: int = 100000
    videos: int = 1


@dataclass
class TrainConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    dataset: Any = None  # overrides task.dataset: a store path, or a list of them ([a.zarr,b.zarr]) read as one
    obs_keys: list[str] | None = None  # overrides task.obs_keys
    run_dir: str | None = None
    resume: bool = False
    device: str = "auto"
    policy: dict[str, Any] = field(default_factory=dict)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalLoopConfig = field(default_factory=EvalLoopConfig)
    threads: int | None = None  # torch threads; default per command (robolearn/cli/threads.py)
    logger: str = "tensorboard"  # tensorboard | wandb (offline unless WANDB_MODE says otherwise) | none


@dataclass
class SamplerOverride:
    kind: str | None = None  # diffusion: ddim | ddpm; flow: euler | midpoint (default: the checkpoint's)
    steps: int | None = None


@dataclass
class EvalConfig:
    checkpoint: str | None = None
    episodes: int = 50
    seed: int = 100000
    num_envs: int = 4
    workers: int = 2
    video: bool = False
    videos: int = 2  # episodes recorded when video=true
    run_dir: str | None = None
    device: str = "auto"
    sampler: SamplerOverride = field(default_factory=SamplerOverride)
    n_action_steps: int | None = None  # override: actions executed per chunk before re-planning
    env: dict[str, Any] = field(default_factory=dict)  # overrides on top of the training data's env config
    cache: str | None = None  # block caching of a transformer base: bac | shared | searched | uniform | none
    cache_updates: int | None = None  # update steps per branch (default a quarter of the sampler's steps)
    rank: int | None = None  # a steered (variant=na) checkpoint: noise draws ranked by its critic per decision
    dtype: str = "float32"  # the denoiser backbone's dtype for sampling: float32 | bf16 | fp16 (lossy)
    graph: bool = False  # sample through CUDA graphs (device=cuda, a base diffusion/flow checkpoint)
    threads: int | None = None  # torch threads; default per command (robolearn/cli/threads.py)


@dataclass
class RunConfig:
    checkpoint: str | None = None  # a checkpoint folder ...
    cache: str | None = None  # block caching of a transformer checkpoint: bac | shared | searched | uniform | none
    cache_updates: int | None = None
    rank: int | None = None  # a steered (variant=na) checkpoint: noise draws ranked by its critic per decision
    dtype: str = "float32"  # the denoiser backbone's dtype for sampling: float32 | bf16 | fp16 (lossy)
    device: str = "cpu"  # where the policy runs: cpu | cuda | cuda:N | auto
    graph: bool = False  # sample through CUDA graphs (device=cuda, a base diffusion/flow checkpoint)
    policy: str | None = None  # ... or a policy server, ws://host:port
    task: str | None = None  # default: the task the checkpoint was trained on
    rate_hz: float | None = None  # control rate; null: the task's own (lift/can/square 20, push_t/peg_insert 10)
    mode: str = "async"  # sync: wait for each chunk (the robot idles) | async: infer while acting
    blend: str = "none"  # none | ensemble (ACT's temporal ensembling) | warmstart (RTI-DP)
    warm_steps: int | None = None  # blend=warmstart: denoising steps run from the previous chunk (default 2, 1-step sampler 1)
    episodes: int | None = 1
    duration_s: float | None = None  # stop after this long, whatever the episode count
    realtime: bool = True  # false: virtual clock, as fast as possible (latency from latency_s or measured)
    latency_s: float | None = None  # virtual time: inference takes this long; real time: at least this long
    seed: int = 100000
    token: str | None = None  # for a policy server that wants one
    run_dir: str | None = None  # default: runs/run/<task>-<date>-<time>
    status: bool = True  # live status line
    max_nonfinite_chunks: int = 3  # stop (exit 1) after this many action chunks holding NaN/inf (none is executed)
    video: bool = False  # an mp4 of every episode in run_dir/videos (the sent actions replayed after the run)
    threads: int | None = None  # torch threads; default per command (robolearn/cli/threads.py)
    env: dict[str, Any] = field(default_factory=dict)


@dataclass
class ServeConfig:
    checkpoint: str | None = None
    cache: str | None = None  # block caching of a transformer base: bac | shared | searched | uniform | none
    cache_updates: int | None = None
    rank: int | None = None  # a steered (variant=na) checkpoint: noise draws ranked by its critic per decision
    dtype: str = "float32"  # the denoiser backbone's dtype for sampling: float32 | bf16 | fp16 (lossy)
    device: str = "cpu"  # where the policy runs: cpu | cuda | cuda:N | auto
    graph: bool = False  # sample through CUDA graphs (device=cuda, a base diffusion/flow checkpoint)
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    token: str | None = None  # clients must send "Authorization: Api-Key <token>"
    allow_unauthenticated: bool = False  # serve beyond loopback without a token (refused otherwise)
    max_pending: int = 4  # requests one connection may have unanswered; more are answered with an error
    max_message_mb: float = 16.0
    key_map: dict[str, Any] = field(default_factory=dict)  # client observation name -> policy's name
    threads: int | None = None  # torch threads; default per command (robolearn/cli/threads.py)


@dataclass
class TeleopConfig:
    task: str | None = None  # default: the replay log's task, or the checkpoint's
    device: str = "keyboard"  # keyboard | spacemouse | gamepad[:/dev/input/jsN] | replay:FILE
    out: str | None = None  # default: data/<task>_teleop.zarr; an existing store is appended to
    policy: str | None = None  # a checkpoint folder: intervention mode
    episodes: int | None = None  # quit after this many saved episodes
    seed: int | None = None  # first scene; default: after the last one used in the store (a replay: its own)
    rate_hz: float | None = None  # control rate; default the task's
    realtime: bool | None = None  # default: true for live devices, false for replays (as fast as possible)
    viewer: bool | None = None  # default: true for live devices, false for replays
    record_events: str | None = None  # write the session's device events here (a replay log)
    autosave: bool = False  # save every episode the task ends (success or time limit) without asking
    mode: str | None = None  # intervention mode: sync | async inference (default async; a replay: the log's)
    latency_s: float | None = None  # intervention mode: pad inference to at least this (default: a replay's own)
    env: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None  # torch threads; default per command (robolearn/cli/threads.py)


@dataclass
class ResidualMethodConfig(ResidualSettings):
    """``robolearn/configs/finetune/residual.yaml``: ResiP's hyperparameters (robolearn/rl/settings.py), as ``finetune.*``."""

    name: str = "residual"


@dataclass
class SteerMethodConfig(SteerSettings):
    """``robolearn/configs/finetune/steer.yaml``: DSRL's hyperparameters (robolearn/rl/settings.py), as ``finetune.*``."""

    name: str = "steer"


@dataclass
class FinetuneEvalConfig:
    episodes: int = 20  # deterministic evaluation episodes (the residual's mean) before, during and after
    every: int = 50000  # environment steps between evaluations (0: only before and after)
    num_envs: int = 4
    workers: int = 2
    seed: int = 100000  # held-out seeds: far from the demonstrations' and the training rollouts'
    videos: int = 0  # episodes recorded to mp4 at each evaluation


@dataclass
class FinetuneConfig:
    checkpoint: str | None = None  # the base chunk policy's checkpoint folder (required unless resume=true)
    task: str | None = None  # default: the base's task (another task is refused)
    env_steps: int = 1000000  # environment steps to train for (rounded up to whole updates)
    num_envs: int = 8  # environments stepped in parallel (batch per update = num_envs x finetune.rollout_steps)
    workers: int = 2  # environment processes; 0 runs them in this process
    seed: int = 0
    run_dir: str | None = None  # default: runs/finetune/<task>-residual-<date>-<time>
    resume: bool = False  # continue the run in run_dir from its latest checkpoint
    device: str = "auto"
    ckpt_every: int = 100000  # environment steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    progress: bool = True
    env: dict[str, Any] = field(default_factory=dict)  # sim.make overrides on top of the base's env config
    eval: FinetuneEvalConfig = field(default_factory=FinetuneEvalConfig)
    finetune: ResidualMethodConfig = field(default_factory=ResidualMethodConfig)
    threads: int | None = None  # torch threads; default per command (robolearn/cli/threads.py)


@dataclass
class SteerFinetuneConfig(FinetuneConfig):
    """``robolearn finetune method=steer``: the same run keys, DSRL's ``finetune.*``."""

    finetune: SteerMethodConfig = field(default_factory=SteerMethodConfig)  # type: ignore[assignment]


# Config groups (folders of robolearn/configs/) each command composes from: `train task=can policy=flow_unet`.
GROUPS: dict[str, set[str]] = {"train": {"task", "policy"}, "finetune": {"finetune"}}
# A command-line key that picks a group under another name: `finetune method=residual` chooses
# robolearn/configs/finetune/residual.yaml, whose settings are then `finetune.*` keys.
GROUP_ALIASES: dict[str, dict[str, str]] = {"finetune": {"method": "finetune"}}

# A command whose schema depends on a group choice: `finetune method=steer` validates against SteerFinetuneConfig.
GROUP_SCHEMAS: dict[str, tuple[str, dict[str, type]]] = {
    "finetune": ("finetune", {"residual": FinetuneConfig, "steer": SteerFinetuneConfig}),
}

SCHEMAS: dict[str, type] = {
    "teleop": TeleopConfig,
    "run": RunConfig, "serve": ServeConfig,
    "collect": CollectConfig, "bench_env": BenchEnvConfig, "quickstart": QuickstartConfig,
    "train": TrainConfig, "eval": EvalConfig, "finetune": FinetuneConfig,
    "accel_calibrate": AccelCalibrateConfig, "bench_latency": BenchLatencyConfig,
}


def config_dir() -> Path:
    """The hydra configs: ``robolearn/configs/`` inside the installed package (found through
    :mod:`importlib.resources`, so a plain ``pip install`` of the wheel has them), or ``$ROBOLEARN_CONFIG_DIR`` (a
    copy of that folder with your own tasks and policies added)."""
    env = os.environ.get("ROBOLEARN_CONFIG_DIR")
    if env:
        return Path(env).resolve()
    from importlib.resources import files

    return Path(str(files("robolearn").joinpath("configs"))).resolve()


def _valid_keys(schema: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(f.type) or (isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory)):  # type: ignore[arg-type]
            sub = f.default_factory if f.default_factory is not dataclasses.MISSING else f.type  # type: ignore[misc]
            keys += _valid_keys(sub, prefix + f.name + ".")  # type: ignore[arg-type]
        else:
            keys.append(prefix + f.name)
    return keys


def compose(name: str, overrides: Sequence[str]) -> DictConfig:
    """Compose ``robolearn/configs/<name>.yaml`` with ``overrides`` and validate it against its dataclass."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    schema = SCHEMAS[name]
    groups = GROUPS.get(name, set())
    aliases = GROUP_ALIASES.get(name, {})
    overrides = [_group_alias(ov, aliases) for ov in overrides]
    if name in GROUP_SCHEMAS:
        group, by_choice = GROUP_SCHEMAS[name]
        choice = next((ov.split("=", 1)[1] for ov in overrides if ov.split("=", 1)[0] == group), None)
        schema = by_choice.get(choice, schema) if choice is not None else schema
    valid = _valid_keys(schema)
    types = _key_types(schema)
    for ov in overrides:
        if ov.split("=", 1)[0] in groups:  # a config group choice: policy=flow_unet
            continue
        if "=" not in ov:
            raise ConfigError(f"{ov!r} is not a key=value setting; valid keys: {', '.join(valid)}")
        key = ov.split("=", 1)[0].lstrip("+~")
        if key not in valid and not key.startswith(FREE_FORM):
            close = suggest_key(key, valid)
            hint = f" (did you mean {close!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r} for {name}{hint}; valid keys: {', '.join(valid)}")
        if key in valid:
            check_value(key, ov.split("=", 1)[1], types.get(key))
    # Free-form dicts (environment overrides) take new keys without hydra's '+' prefix.
    overrides = [f"++{ov}" if ov.split("=", 1)[0].startswith(FREE_FORM) else ov for ov in overrides]
    for j, ov in enumerate(overrides):
        key, _, value = ov.partition("=")
        if key in groups and not (config_dir() / key / f"{value}.yaml").exists():
            if key == "task" and value.startswith("robosuite/"):  # any robosuite environment, without a file
                overrides[j] = f"task.name={value}"
                continue
            choices = sorted(p.stem for p in (config_dir() / key).glob("*.yaml"))
            shown = next((alias for alias, group in aliases.items() if group == key), key)
            close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
            hint = f" (did you mean {shown}={close[0]}?)" if close else ""
            raise ConfigError(f"unknown {shown} {value!r}{hint}; choose one of: {', '.join(choices)}"
                              + (" (or robosuite/<EnvName>)" if key == "task" else ""))
    cdir = config_dir()
    if not (cdir / f"{name}.yaml").exists():
        raise ConfigError(f"config file {cdir / (name + '.yaml')} is missing (set ROBOLEARN_CONFIG_DIR?)")
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=f"{name}_schema", node=schema)
    # A plain value whose key is also a config group folder (run's policy=ws://...) would be read by hydra as a
    # group choice: such values are set after composition instead.
    group_dirs = {p.name for p in cdir.iterdir() if p.is_dir()} - groups
    late = [ov for ov in overrides if ov.split("=", 1)[0] in group_dirs]
    overrides = [ov for ov in overrides if ov not in late]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(cdir), version_base=None):
            cfg = hydra_compose(config_name=name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        cause = e.__cause__
        if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
            raise ConfigError(f"bad value for {cause.full_key!r}: {_first_line(cause)}") from None
        raise ConfigError(_first_line(e)) from None
    finally:
        GlobalHydra.instance().clear()
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, cfg)
    except (ConfigKeyError, ConfigAttributeError) as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None)
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}") from None
    except ValidationError as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"bad value for {key!r}: {_first_line(e)}") from None
    for ov in late:
        key, _, value = ov.partition("=")
        try:
            OmegaConf.update(merged, key, None if value in ("null", "") else value, merge=False)
        except (OmegaConfBaseException, ValueError) as e:
            raise ConfigError(f"bad value for {key!r}: {_first_line(e)}") from None
    OmegaConf.set_struct(merged, True)
    return merged  # type: ignore[return-value]


def suggest_key(key: str, valid: Sequence[str]) -> str | None:
    """The valid key a mistyped ``key`` most likely meant, or None when nothing is near.

    Keys are compared part by part: the shared ``training.`` of ``training.foo`` and ``training.lr`` must not make
    them look alike. Among keys with the same parent the last part must be close (``training.step`` ->
    ``training.steps``); otherwise the whole key (``trainig.steps`` -> ``training.steps``)."""
    parent, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in valid if k.rpartition(".")[0] == parent}
    close = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.75)
    if close:
        return siblings[close[0]]
    others = [k for k in valid if k.rpartition(".")[0] != parent]
    close = difflib.get_close_matches(key, others, n=1, cutoff=0.85)
    return close[0] if close else None


def _key_types(schema: type, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> the annotated type of its dataclass field (nested dataclasses flattened)."""
    import typing

    hints = typing.get_type_hints(schema)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        tp = hints.get(f.name)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out.update(_key_types(tp, prefix + f.name + "."))
        else:
            out[prefix + f.name] = tp
    return out


def check_value(key: str, value: str, tp: Any) -> None:
    """Refuse, in plain words, a command-line value the key's type cannot take (OmegaConf's own message names
    its internals: "Value '5000.0' of type 'float' could not be converted to Integer reference_type=...")."""
    import types
    import typing

    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    members = [a for a in typing.get_args(tp) if a is not type(None)] if union else [tp]
    optional = union and len(members) < len(typing.get_args(tp))
    base = members[0] if len(members) == 1 else None  # a value typed by several types is left to OmegaConf
    v = value.strip()
    if optional and v in ("null", "~", ""):
        return
    if base is bool and v.lower() not in ("true", "false", "yes", "no", "on", "off", "1", "0"):
        raise ConfigError(f"{key} takes true or false, got {value!r}")
    if base is int and v.lstrip("+-").isdigit() is False:
        try:
            as_float = float(v)
        except ValueError:
            raise ConfigError(f"{key} takes a whole number, got {value!r}") from None
        hint = f": write {int(as_float)}" if as_float.is_integer() else ""
        raise ConfigError(f"{key} takes a whole number, got {value!r}{hint}")
    if base is float:
        try:
            float(v)
        except ValueError:
            raise ConfigError(f"{key} takes a number, got {value!r}") from None


def _group_alias(override: str, aliases: dict[str, str]) -> str:
    """``method=residual`` -> ``finetune=residual`` where ``method`` is an alias of the group ``finetune``."""
    key, eq, value = override.partition("=")
    return f"{aliases[key]}={value}" if eq and key in aliases else override


def _first_line(e: BaseException) -> str:
    """Hydra's message folded onto one line, without its full-key boilerplate."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip() and not ln.strip().startswith(("full_key", "object_type", "Key:"))]
    return " ".join(lines) if lines else type(e).__name__


# ------------------------------------------------------------------------------------------------ --help text
def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    return str(value)


def _dataclass_defaults(cls: type) -> list[tuple[str, Any]]:
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in ("obs",):
            continue
        if f.default is not dataclasses.MISSING:
            out.append((f.name, f.default))
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
            if not dataclasses.is_dataclass(value):
                out.append((f.name, value))
    return out


def _wrap(prefix: str, items: list[str], width: int = 110) -> list[str]:
    lines, line = [], prefix
    for item in items:
        if len(line) + len(item) + 2 > width and line.strip():
            lines.append(line.rstrip())
            line = " " * len(prefix)
        line += item + "  "
    lines.append(line.rstrip())
    return lines


def policy_keys_help() -> str:
    """Every policy.* key with its default, from the typed configs (robolearn/policies/config.py)."""
    from robolearn.models.presets import TRANSFORMER_PRESETS as TRANSFORMER
    from robolearn.models.presets import UNET_PRESETS as UNET
    from robolearn.policies.config import (DEFAULT_PRESET, ChunkPolicyConfig, DiffusionConfig, DiffusionSettings,
                                           EncoderConfig, FlowConfig, FlowSettings)

    common = [f"{k}={_fmt(v)}" for k, v in _dataclass_defaults(ChunkPolicyConfig)
              if k not in ("backbone", "sampler", "encoder")]
    lines = ["policy keys (policy.<key>=value; defaults in robolearn/policies/config.py):"]
    lines += _wrap("  ", common)
    for name, presets in (("unet", UNET), ("transformer", TRANSFORMER)):
        shown = [p for p in presets if p != "default" or name != "transformer"]
        keys = sorted(next(iter(presets.values())))
        lines += _wrap(f"  backbone ({name}): ", [f"preset={'|'.join(shown)} (default {DEFAULT_PRESET[name]})",
                                                  f"or any of {', '.join(keys)}"])
    for cls, word in ((DiffusionConfig, "diffusion"), (FlowConfig, "flow")):
        kind, steps = cls.default_kind_steps
        lines.append(f"  sampler ({word}): sampler.kind={'|'.join(cls.samplers)} sampler.steps=N "
                     f"(default {kind} {steps}, or the policy file's)")
    lines += _wrap("  encoder.", [f"{k}={_fmt(v)}" for k, v in _dataclass_defaults(EncoderConfig)])
    lines += _wrap("  diffusion.", [f"{k}={_fmt(v)}" for k, v in _dataclass_defaults(DiffusionSettings)])
    lines += _wrap("  flow.", [f"{k}={_fmt(v)}" for k, v in _dataclass_defaults(FlowSettings)])
    return "\n".join(lines)


def training_keys_help() -> str:
    """Every training.* key robolearn train accepts, with its default."""
    items = [f"{k}={_fmt(v)}" for k, v in _dataclass_defaults(TrainingConfig)]
    return "\n".join(["training keys (training.<key>=value; null: chosen from the policy's size):",
                      *_wrap("  ", items)])
