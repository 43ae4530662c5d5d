"""Typed policy configs: one dataclass per policy family, the only place its defaults are written.

A config is checked once, when it is built (:func:`policy_config`), and every problem is a :class:`ConfigError`
naming the key (``policy.n_action_steps``, ``policy.sampler.kind``, ...); the CLI prints it as
``robolearn: error: ...``. Checkpoints save the config as a plain dict (:meth:`ChunkPolicyConfig.to_dict`, fully
explicit), so a checkpoint never depends on defaults that may change later::

    {
      "type": "diffusion",                      # or "flow"
      "backbone": {"name": "unet", "preset": "cpu", ...architecture},   # or "transformer" / "small"
      "horizon": 16, "n_obs_steps": 2, "n_action_steps": 8,
      "obs": {"state": [20], "agentview_image": [84, 84, 3]},        # per-step shapes, in order
      "image_keys": [...], "action_key": "action", "action_dim": 2,
      "normalization": {"state": "minmax", ...},
      "encoder": {"low_dim": "identity", "crop_ratio": 0.9, ...},
      "diffusion": {"num_train_timesteps": 100, ...}    # or "flow": {"time_sampling": "beta", ...}
      "sampler": {"kind": "ddim", "steps": 10}  # diffusion: ddim|ddpm; flow: euler|midpoint
    }

Only ``obs`` is required; ``action_dim`` can come from the dataset's statistics.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import numpy as np


class ConfigError(ValueError):
    """A configuration with a missing, unknown, ill-typed or out-of-range key; the message names the key."""


def check_geometry(horizon: int, n_obs_steps: int, n_action_steps: int, where: str = "policy") -> None:
    """The chunk geometry every chunk policy obeys (the only place it is checked).

    The chunk's step ``n_obs_steps - 1`` is the newest observation's; ``n_action_steps`` actions are executed from
    there, so at most ``horizon - n_obs_steps + 1`` of them exist.
    """
    h, o, a = int(horizon), int(n_obs_steps), int(n_action_steps)
    where = f"{where}." if where else ""
    if h < 1:
        raise ConfigError(f"{where}horizon must be >= 1, got {h}")
    if not 1 <= o <= h:
        raise ConfigError(f"{where}n_obs_steps must be in [1, horizon={h}], got {o}")
    if not 1 <= a <= h - o + 1:
        raise ConfigError(f"{where}n_action_steps must be in [1, {h - o + 1}] (horizon - n_obs_steps + 1, with "
                          f"horizon {h} and n_obs_steps {o}), got {a}")


def plain(x: Any) -> Any:
    """Tuples/numpy -> lists and python scalars, so a config round-trips through YAML and JSON."""
    if isinstance(x, Mapping):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as the annotated type ``tp``, or a ConfigError naming ``key``: YAML and command-line overrides
    arrive as whatever their text parsed to (``policy.horizon=16.7`` is a float, ``=abc`` a string)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    bad = ConfigError(f"{key} must be {names.get(tp, _type_name(tp))}, got {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    return value


def _fill(cls: type, given: Any, where: str) -> Any:
    """A dataclass from a mapping, refusing unknown keys (with a 'did you mean') and ill-typed values."""
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        raise ConfigError(f"{where} must be a mapping of settings, got {given!r}")
    given = dict(given)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(given) - set(names))
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown key(s) {unknown} in {where}{hint}; known: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in given.items()})


def _choice(value: Any, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")


@dataclass
class EncoderConfig:
    """Observation encoder (:class:`robolearn.models.ObsEncoder`)."""

    low_dim: str = "identity"  # identity | mlp: how low-dimensional keys enter
    low_dim_features: int = 64
    shared_trunk: bool = False  # one image trunk for every camera
    crop_ratio: float = 0.9  # random crop in training, center crop at inference
    image_widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    num_keypoints: int = 32
    image_features: int = 64
    token_dim: int | None = None  # transformer tokens; default: the backbone's d_model


@dataclass
class SamplerConfig:
    kind: str
    steps: int


@dataclass
class DiffusionSettings:
    """DDPM training as Diffusion Policy (Chi et al. 2023) sets it."""

    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"  # epsilon | sample
    clip_sample: bool | None = None  # default: true for min-max normalized actions
    ddpm_seed: int = 0  # mixed into DDPM's per-step noise when the initial noise is given


@dataclass
class FlowSettings:
    """Flow matching on the straight noise-to-action path (see :mod:`robolearn.policies.flow`)."""

    time_sampling: str = "beta"  # uniform | logit_normal | beta (pi0's)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    beta_alpha: float = 1.5
    beta_beta: float = 1.0
    beta_s: float = 0.999
    time_scale: float = 100.0
    clip_sample: bool | None = None


BACKBONES = ("unet", "transformer")
# CPU-sized by default (a newcomer's first run finishes in minutes); preset=dp is Diffusion Policy's size.
DEFAULT_PRESET = {"unet": "cpu", "transformer": "small"}
# The paper-sized presets, which train with Diffusion Policy's lr 1e-4 and batch 256 (robolearn train's defaults
# for the CPU presets are lr 1e-3 and batch 128).
PAPER_PRESETS = {"unet": ("dp",), "transformer": ("dp", "default")}


@dataclass
class ChunkPolicyConfig:
    """What every chunk-policy family shares. Subclasses add their family's section and sampler default."""

    family: ClassVar[str] = "abstract"
    samplers: ClassVar[tuple[str, ...]] = ()
    sampler_word: ClassVar[str] = "sampler"
    settings_class: ClassVar[type] = object  # the family's section (DiffusionSettings, FlowSettings)
    default_kind_steps: ClassVar[tuple[str, int]] = ("", 0)

    obs: dict[str, list[int]] = field(default_factory=dict)
    backbone: dict[str, Any] = field(default_factory=lambda: {"name": "unet"})
    horizon: int = 16
    n_obs_steps: int = 2
    n_action_steps: int = 8
    image_keys: list[str] | None = None  # default: every key with an (H, W, C) shape
    action_key: str = "action"
    action_dim: int | None = None  # default: from the statistics of the action key
    normalization: dict[str, str] = field(default_factory=dict)  # default: images "image", the rest "minmax"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig("", 0))

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], stats: Mapping[str, Mapping[str, Any]] | None = None
                  ) -> "ChunkPolicyConfig":
        """Parse, fill what can be derived (action_dim, image keys, normalization, backbone preset) and check."""
        cfg = plain(copy.deepcopy(dict(cfg)))
        cfg.pop("type", None)
        section = cls.section_name()
        names = {f.name for f in dataclasses.fields(cls) if f.init} | {"type"}
        other = {"diffusion", "flow"} - {section}
        wrong = sorted(other & set(cfg))
        if wrong and cfg.get(wrong[0]):
            raise ConfigError(f"policy config has a {wrong[0]!r} section but 'type' is {cls.family!r}")
        for k in wrong:
            cfg.pop(k)
        unknown = sorted(set(cfg) - names)
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown policy config key(s) {unknown}{hint}; known: {sorted(names)}")
        if "encoder" in cfg:
            cfg["encoder"] = _fill(EncoderConfig, cfg["encoder"], "policy.encoder")
        if "sampler" in cfg:
            given = cfg["sampler"] or {}
            if not isinstance(given, Mapping):
                raise ConfigError(f"policy.sampler must be a mapping like {{kind: ddim, steps: 10}}, got {given!r}")
            cfg["sampler"] = _fill(SamplerConfig, {**dataclasses.asdict(cls.default_sampler()), **given},
                                   "policy.sampler")
        if section in cfg:
            cfg[section] = _fill(cls.settings_class, cfg[section], f"policy.{section}")
        hints = typing.get_type_hints(cls)
        for key in ("horizon", "n_obs_steps", "n_action_steps", "image_keys", "action_key", "action_dim",
                    "normalization", "backbone"):
            if key in cfg:
                cfg[key] = _coerce(cfg[key], hints[key], f"policy.{key}")
        out = cls(**cfg)
        out._derive(stats)
        out.validate()
        return out

    @classmethod
    def section_name(cls) -> str:
        return cls.family

    @classmethod
    def default_sampler(cls) -> SamplerConfig:
        return SamplerConfig(*cls.default_kind_steps)

    def __post_init__(self) -> None:
        if not self.sampler.kind:
            self.sampler = self.default_sampler()

    def _derive(self, stats: Mapping[str, Mapping[str, Any]] | None) -> None:
        if not isinstance(self.obs, Mapping) or not self.obs:
            raise ConfigError("policy config needs 'obs': a mapping of observation key -> per-step shape")
        try:
            self.obs = {str(k): [int(s) for s in (v if isinstance(v, (list, tuple)) else [v])]
                        for k, v in self.obs.items()}
        except (TypeError, ValueError):
            raise ConfigError(f"policy.obs must map keys to shapes (lists of ints), got {self.obs}") from None
        if self.action_dim is None:
            if stats is None or self.action_key not in stats:
                raise ConfigError("policy config needs 'action_dim' (or statistics for the action key)")
            self.action_dim = int(np.asarray(stats[self.action_key]["min"]).size)
        if self.image_keys is None:
            self.image_keys = [k for k, s in self.obs.items() if len(s) == 3]
        norm = dict(self.normalization or {})
        for k in self.obs:
            norm.setdefault(k, "image" if k in self.image_keys else "minmax")
        norm.setdefault(self.action_key, "minmax")
        self.normalization = norm
        self._derive_backbone()
        settings = getattr(self, self.section_name())
        if getattr(settings, "clip_sample", False) is None:  # [-1, 1] clipping only means something for min-max
            settings.clip_sample = self.normalization[self.action_key] == "minmax"

    def _derive_backbone(self) -> None:
        from robolearn.models.presets import TRANSFORMER_PRESETS, UNET_PRESETS

        bb = dict(self.backbone or {})
        name = bb.pop("name", "unet")
        if not isinstance(name, str) or name not in BACKBONES:
            raise ConfigError(f"policy.backbone.name must be one of {list(BACKBONES)}, got {name!r}")
        presets = {"unet": UNET_PRESETS, "transformer": TRANSFORMER_PRESETS}[name]
        preset = bb.pop("preset", DEFAULT_PRESET[name])
        if not isinstance(preset, str) or preset not in presets:
            raise ConfigError(f"policy.backbone.preset {preset!r} is not a {name} preset: {sorted(presets)}")
        unknown = sorted(set(bb) - set(presets[preset]))
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in policy.backbone; known: {sorted(presets[preset])}")
        self.backbone = plain({"name": name, "preset": preset, **presets[preset], **bb})
        if self.encoder.token_dim is None and name == "transformer":
            self.encoder.token_dim = int(self.backbone["d_model"])

    # ------------------------------------------------------------------ checking
    def validate(self) -> None:
        """Every range and name this family accepts; the message names the key."""
        check_geometry(self.horizon, self.n_obs_steps, self.n_action_steps)
        for k in self.image_keys or []:
            if k not in self.obs:
                raise ConfigError(f"policy.image_keys names {k!r}, which is not in policy.obs ({list(self.obs)})")
        for k, how in self.normalization.items():
            _choice(how, ("minmax", "meanstd", "image", "identity"), f"policy.normalization.{k}")
        _choice(self.encoder.low_dim, ("identity", "mlp"), "policy.encoder.low_dim")
        if not 0.0 < float(self.encoder.crop_ratio) <= 1.0:
            raise ConfigError(f"policy.encoder.crop_ratio must be in (0, 1], got {self.encoder.crop_ratio}")
        self.check_sampler(self.sampler.kind, self.sampler.steps)

    def check_sampler(self, kind: str, steps: int) -> None:
        if kind not in self.samplers:
            raise ConfigError(f"policy.sampler.kind must be a {self.family} {self.sampler_word}, one of "
                              f"{list(self.samplers)}, got {kind!r}")
        if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
            raise ConfigError(f"policy.sampler.steps must be an integer >= 1, got {steps!r}")

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, Any]:
        """The fully explicit plain dict checkpoints save (and :meth:`from_dict` reads back)."""
        d = dataclasses.asdict(self)
        out = {"type": self.family, "backbone": d["backbone"], "horizon": d["horizon"],
               "n_obs_steps": d["n_obs_steps"], "n_action_steps": d["n_action_steps"], "obs": d["obs"],
               "image_keys": d["image_keys"], "action_key": d["action_key"], "action_dim": d["action_dim"],
               "normalization": d["normalization"], "encoder": d["encoder"],
               self.section_name(): d[self.section_name()], "sampler": d["sampler"]}
        return plain(out)


@dataclass
class DiffusionConfig(ChunkPolicyConfig):
    family: ClassVar[str] = "diffusion"
    samplers: ClassVar[tuple[str, ...]] = ("ddim", "ddpm")
    settings_class: ClassVar[type] = DiffusionSettings
    default_kind_steps: ClassVar[tuple[str, int]] = ("ddim", 10)  # deterministic given the noise (eta = 0)

    diffusion: DiffusionSettings = field(default_factory=DiffusionSettings)


    def validate(self) -> None:
        d = self.diffusion
        if int(d.num_train_timesteps) < 1:
            raise ConfigError(f"policy.diffusion.num_train_timesteps must be >= 1, got {d.num_train_timesteps}")
        _choice(d.prediction_type, ("epsilon", "sample"), "policy.diffusion.prediction_type")
        _choice(d.beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"), "policy.diffusion.beta_schedule")
        super().validate()

    def check_sampler(self, kind: str, steps: int) -> None:
        super().check_sampler(kind, steps)
        if steps > self.diffusion.num_train_timesteps:
            raise ConfigError(f"policy.sampler.steps must be in [1, {self.diffusion.num_train_timesteps}] "
                              f"(num_train_timesteps), got {steps}")


@dataclass
class FlowConfig(ChunkPolicyConfig):
    family: ClassVar[str] = "flow"
    samplers: ClassVar[tuple[str, ...]] = ("euler", "midpoint")
    sampler_word: ClassVar[str] = "integrator (sampler)"
    settings_class: ClassVar[type] = FlowSettings
    default_kind_steps: ClassVar[tuple[str, int]] = ("euler", 10)

    flow: FlowSettings = field(default_factory=FlowSettings)


    def validate(self) -> None:
        f = self.flow
        _choice(f.time_sampling, ("uniform", "logit_normal", "beta"), "policy.flow.time_sampling")
        if not 0.0 < f.beta_s <= 1.0:
            raise ConfigError(f"policy.flow.beta_s must be in (0, 1], got {f.beta_s}")
        if f.time_scale <= 0:
            raise ConfigError(f"policy.flow.time_scale must be positive, got {f.time_scale}")
        super().validate()


FAMILIES: dict[str, type[ChunkPolicyConfig]] = {"diffusion": DiffusionConfig, "flow": FlowConfig}


def policy_config(cfg: Mapping[str, Any] | ChunkPolicyConfig,
                  stats: Mapping[str, Mapping[str, Any]] | None = None) -> ChunkPolicyConfig:
    """The typed, checked config of a plain dict (its ``type`` picks the family; default diffusion)."""
    if isinstance(cfg, ChunkPolicyConfig):
        cfg.validate()
        return cfg
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"a policy config must be a mapping, got {type(cfg).__name__}")
    family = cfg.get("type", "diffusion")
    if family not in FAMILIES:
        raise ConfigError(f"policy.type must be one of {sorted(FAMILIES)}, got {family!r}")
    return FAMILIES[family].from_dict(cfg, stats)


def resolve_config(cfg: Mapping[str, Any], stats: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Fill every default and check: the fully explicit plain dict a checkpoint saves."""
    return policy_config(cfg, stats).to_dict()
