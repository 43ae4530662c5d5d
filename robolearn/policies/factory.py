"""Build a chunk policy from a plain dict config (what the hydra CLI passes) and store statistics.

A config (every key but ``obs`` has a default; ``action_dim`` can come from the statistics)::

    {
      "type": "diffusion",                      # or "flow"
      "backbone": {"name": "unet", "preset": "small", ...overrides},   # or "transformer" / "default"
      "horizon": 16, "n_obs_steps": 2, "n_action_steps": 8,
      "obs": {"state": [20], "agentview_image": [84, 84, 3]},        # per-step shapes, in order
      "image_keys": null,                       # default: every key with an (H, W, C) shape
      "action_key": "action", "action_dim": 2,
      "normalization": {"state": "minmax"},     # default: images "image", low-dim and action "minmax"
      "encoder": {"low_dim": "identity", "crop_ratio": 0.9, "shared_trunk": false, ...},
      "diffusion": {"num_train_timesteps": 100, "beta_schedule": "squaredcos_cap_v2",
                    "prediction_type": "epsilon", "clip_sample": true},
      "flow": {"time_sampling": "beta", "time_scale": 100.0, "clip_sample": true, ...},
      "sampler": {"kind": "ddim", "steps": 10}  # diffusion: ddim|ddpm; flow: euler|midpoint
    }

:func:`resolve_config` fills every default and returns the fully explicit config that checkpoints save, so a
checkpoint never depends on defaults that may change later.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import numpy as np
from torch import nn

from robolearn.data.normalizer import Normalizer
from robolearn.models.encoders import ObsEncoder
from robolearn.models.transformer import PRESETS as TRANSFORMER_PRESETS
from robolearn.models.transformer import TransformerDenoiser
from robolearn.models.unet import PRESETS as UNET_PRESETS
from robolearn.models.unet import ConditionalUnet1D
from robolearn.policies.base import ChunkPolicy
from robolearn.policies.diffusion import DiffusionPolicy
from robolearn.policies.flow import FlowPolicy

POLICY_TYPES: dict[str, type[ChunkPolicy]] = {"diffusion": DiffusionPolicy, "flow": FlowPolicy}

_ENCODER_DEFAULTS: dict[str, Any] = dict(
    low_dim="identity", low_dim_features=64, shared_trunk=False, crop_ratio=0.9,
    image_widths=[32, 64, 128], num_keypoints=32, image_features=64, token_dim=None,
)
_DIFFUSION_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=None,
    ddpm_seed=0,
)
_FLOW_DEFAULTS: dict[str, Any] = dict(
    time_sampling="beta", logit_mean=0.0, logit_std=1.0, beta_alpha=1.5, beta_beta=1.0, beta_s=0.999,
    time_scale=100.0, clip_sample=None,
)
_SAMPLER_DEFAULTS = {"diffusion": {"kind": "ddim", "steps": 10}, "flow": {"kind": "euler", "steps": 10}}
_TOP_KEYS = {"type", "backbone", "horizon", "n_obs_steps", "n_action_steps", "obs", "image_keys", "action_key",
             "action_dim", "normalization", "encoder", "diffusion", "flow", "sampler"}


class ConfigError(ValueError):
    """A policy config with a missing, unknown or ill-typed key (the message names it)."""


def _plain(x: Any) -> Any:
    """Tuples/numpy -> lists and python scalars, so the config round-trips through YAML and JSON."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def _merge(defaults: Mapping[str, Any], given: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in policy config '{where}'; known: {sorted(defaults)}")
    return {**defaults, **given}


def resolve_config(config: Mapping[str, Any], stats: Mapping[str, Mapping[str, Any]] | None = None
                   ) -> dict[str, Any]:
    """Fill defaults and check a policy config; errors name the offending key."""
    cfg = _plain(copy.deepcopy(dict(config)))
    unknown = sorted(set(cfg) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"unknown policy config key(s) {unknown}; known: {sorted(_TOP_KEYS)}")
    ptype = cfg.get("type", "diffusion")
    if ptype not in POLICY_TYPES:
        raise ConfigError(f"policy config 'type' must be one of {sorted(POLICY_TYPES)}, got {ptype!r}")
    if not cfg.get("obs"):
        raise ConfigError("policy config needs 'obs': a mapping of observation key -> per-step shape")
    obs = {k: [int(s) for s in (v if isinstance(v, (list, tuple)) else [v])] for k, v in cfg["obs"].items()}
    action_key = cfg.get("action_key", "action")
    action_dim = cfg.get("action_dim")
    if action_dim is None:
        if stats is None or action_key not in stats:
            raise ConfigError("policy config needs 'action_dim' (or statistics for the action key)")
        action_dim = int(np.asarray(stats[action_key]["min"]).size)
    image_keys = cfg.get("image_keys")
    if image_keys is None:
        image_keys = [k for k, s in obs.items() if len(s) == 3]
    for k in image_keys:
        if k not in obs:
            raise ConfigError(f"policy config 'image_keys' names {k!r}, which is not in 'obs' ({list(obs)})")

    norm = dict(cfg.get("normalization") or {})
    for k in obs:
        norm.setdefault(k, "image" if k in image_keys else "minmax")
    norm.setdefault(action_key, "minmax")

    bb = dict(cfg.get("backbone") or {})
    name = bb.pop("name", "unet")
    presets = {"unet": UNET_PRESETS, "transformer": TRANSFORMER_PRESETS}
    if not isinstance(name, str) or name not in presets:
        raise ConfigError(f"policy config 'backbone.name' must be 'unet' or 'transformer', got {name!r}")
    preset = bb.pop("preset", "small" if name == "unet" else "default")
    if not isinstance(preset, str) or preset not in presets[name]:
        raise ConfigError(f"policy config 'backbone.preset' {preset!r} is not a {name} preset: {sorted(presets[name])}")
    arch = _merge(presets[name][preset], bb, "backbone")

    encoder = _merge(_ENCODER_DEFAULTS, cfg.get("encoder"), "encoder")
    if encoder["token_dim"] is None and name == "transformer":
        encoder["token_dim"] = int(arch["d_model"])
    clip_default = norm[action_key] == "minmax"  # [-1, 1] clipping only means something for min-max actions
    out: dict[str, Any] = {
        "type": ptype,
        "backbone": {"name": name, "preset": preset, **arch},
        "horizon": int(cfg.get("horizon", 16)),
        "n_obs_steps": int(cfg.get("n_obs_steps", 2)),
        "n_action_steps": int(cfg.get("n_action_steps", 8)),
        "obs": obs,
        "image_keys": list(image_keys),
        "action_key": action_key,
        "action_dim": int(action_dim),
        "normalization": norm,
        "encoder": encoder,
    }
    if ptype == "diffusion":
        d = _merge(_DIFFUSION_DEFAULTS, cfg.get("diffusion"), "diffusion")
        if cfg.get("flow"):
            raise ConfigError("policy config has a 'flow' section but 'type' is 'diffusion'")
    else:
        d = _merge(_FLOW_DEFAULTS, cfg.get("flow"), "flow")
        if cfg.get("diffusion"):
            raise ConfigError("policy config has a 'diffusion' section but 'type' is 'flow'")
    if d["clip_sample"] is None:
        d["clip_sample"] = clip_default
    out[ptype] = d
    out["sampler"] = _merge(_SAMPLER_DEFAULTS[ptype], cfg.get("sampler"), "sampler")
    return _plain(out)


def build_backbone(cfg: Mapping[str, Any], cond_dim: int) -> nn.Module:
    bb = dict(cfg["backbone"])
    name = bb.pop("name")
    bb.pop("preset")
    if name == "unet":
        return ConditionalUnet1D(cfg["action_dim"], cond_dim, **bb)
    return TransformerDenoiser(cfg["action_dim"], cond_dim, cfg["horizon"], **bb)


def make_policy(
    config: Mapping[str, Any],
    stats: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    normalizer: Normalizer | None = None,
) -> ChunkPolicy:
    """Build a policy from a config dict, fitting its normalizer from store statistics
    (``EpisodeStore.stats()`` / ``SequenceDataset.stats()``), or taking a ready ``normalizer`` (loading)."""
    cfg = resolve_config(config, stats)
    if normalizer is None:
        if stats is None:
            raise ConfigError("make_policy needs store statistics (stats=store.stats()) or a normalizer")
        normalizer = Normalizer.from_stats(stats, cfg["normalization"])
    for key in [*cfg["obs"], cfg["action_key"]]:
        if key not in normalizer and cfg["normalization"].get(key, "identity") != "identity":
            raise ConfigError(f"the normalizer has no entry for key {key!r}")
    enc = dict(cfg["encoder"])
    tokens = cfg["backbone"]["name"] == "transformer"
    token_dim = enc.pop("token_dim")
    encoder = ObsEncoder(
        cfg["obs"], cfg["n_obs_steps"], image_keys=cfg["image_keys"], output="tokens" if tokens else "flat",
        token_dim=token_dim or 256, **enc,
    )
    backbone = build_backbone(cfg, encoder.out_dim)
    base = dict(
        obs_encoder=encoder, backbone=backbone, normalizer=normalizer, horizon=cfg["horizon"],
        n_obs_steps=cfg["n_obs_steps"], n_action_steps=cfg["n_action_steps"], action_dim=cfg["action_dim"],
        obs_shapes={k: tuple(v) for k, v in cfg["obs"].items()}, action_key=cfg["action_key"], config=cfg,
    )
    sampler = cfg["sampler"]
    if cfg["type"] == "diffusion":
        return DiffusionPolicy(**cfg["diffusion"], sampler=sampler["kind"], num_inference_steps=sampler["steps"],
                               **base)
    return FlowPolicy(**cfg["flow"], integrator=sampler["kind"], num_steps=sampler["steps"], **base)
