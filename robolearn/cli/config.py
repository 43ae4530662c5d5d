"""Hydra configs backed by dataclasses: defaults in ``configs/<name>.yaml``, types and keys in the dataclass.

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


class ConfigError(Exception):
    """A bad override or config file; the message names the key."""


@dataclass
class ExpertConfig:
    noise: float = 0.0  # scale of the expert's imperfection: 0 is the clean expert


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


@dataclass
class BenchEnvConfig:
    task: str = "push_t"
    steps: int = 5000
    seed: int = 0
    out: str | None = None  # JSON result; default runs/bench/env_<task>.json
    env: dict[str, Any] = field(default_factory=dict)


FREE_FORM = ("env.",)  # keys under these take any name: they are passed on to sim.make
@dataclass
class QuickstartConfig:
    task: str = "push_t"
    episodes: int = 20  # scripted demonstrations to collect
    workers: int = 2
    seed: int = 0
    out_dir: str = "data/quickstart"
    progress: bool = True


SCHEMAS: dict[str, type] = {"collect": CollectConfig, "bench_env": BenchEnvConfig, "quickstart": QuickstartConfig}


def config_dir() -> Path:
    """``configs/`` beside the package (an editable install or a checkout), or ``$ROBOLEARN_CONFIG_DIR``."""
    env = os.environ.get("ROBOLEARN_CONFIG_DIR")
    if env:
        return Path(env).resolve()
    return (Path(__file__).resolve().parents[2] / "configs").resolve()


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
    """Compose ``configs/<name>.yaml`` with ``overrides`` and validate it against its dataclass."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    schema = SCHEMAS[name]
    valid = _valid_keys(schema)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"{ov!r} is not a key=value setting; valid keys: {', '.join(valid)}")
        key = ov.split("=", 1)[0].lstrip("+~")
        if key not in valid and not key.startswith(FREE_FORM):
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r} for {name}{hint}; valid keys: {', '.join(valid)}")
    # Free-form dicts (environment overrides) take new keys without hydra's '+' prefix.
    overrides = [f"++{ov}" if ov.split("=", 1)[0].startswith(FREE_FORM) else ov for ov in overrides]
    cdir = config_dir()
    if not (cdir / f"{name}.yaml").exists():
        raise ConfigError(f"config file {cdir / (name + '.yaml')} is missing (set ROBOLEARN_CONFIG_DIR?)")
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=f"{name}_schema", node=schema)
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
    OmegaConf.set_struct(merged, True)
    return merged  # type: ignore[return-value]


def _first_line(e: BaseException) -> str:
    """Hydra's message folded onto one line, without its full-key boilerplate."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip() and not ln.strip().startswith(("full_key", "object_type", "Key:"))]
    return " ".join(lines) if lines else type(e).__name__
