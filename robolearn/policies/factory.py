"""Build a chunk policy from its config (a plain dict, what the hydra CLI passes, or a typed config) and either
store statistics (a new policy) or a ready normalizer (loading a checkpoint). The defaults live in
:mod:`robolearn.policies.config`; this module only assembles the modules they describe.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from robolearn.data.normalizer import Normalizer
from robolearn.models.encoders import ObsEncoder
from robolearn.models.transformer import TransformerDenoiser
from robolearn.models.unet import ConditionalUnet1D
from robolearn.policies.base import ChunkPolicy
from robolearn.policies.config import ChunkPolicyConfig, ConfigError, policy_config
from robolearn.policies.registry import policy_class


def build_backbone(cfg: ChunkPolicyConfig, cond_dim: int) -> nn.Module:
    bb = dict(cfg.backbone)
    name = bb.pop("name")
    bb.pop("preset")
    if name == "unet":
        return ConditionalUnet1D(int(cfg.action_dim), cond_dim, **bb)  # type: ignore[arg-type]
    return TransformerDenoiser(int(cfg.action_dim), cond_dim, cfg.horizon, **bb)  # type: ignore[arg-type]


def make_policy(
    config: Mapping[str, Any] | ChunkPolicyConfig,
    stats: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    normalizer: Normalizer | None = None,
) -> ChunkPolicy:
    """Build a policy from a config, fitting its normalizer from store statistics
    (``EpisodeStore.stats()`` / ``SequenceDataset.stats()``), or taking a ready ``normalizer`` (loading)."""
    cfg = policy_config(config, stats)
    if normalizer is None:
        if stats is None:
            raise ConfigError("make_policy needs store statistics (stats=store.stats()) or a normalizer")
        normalizer = Normalizer.from_stats(stats, cfg.normalization)
    for key in [*cfg.obs, cfg.action_key]:
        if key not in normalizer and cfg.normalization.get(key, "identity") != "identity":
            raise ConfigError(f"the normalizer has no entry for key {key!r}")
    enc = dict(vars(cfg.encoder))
    tokens = cfg.backbone["name"] == "transformer"
    token_dim = enc.pop("token_dim")
    encoder = ObsEncoder(
        cfg.obs, cfg.n_obs_steps, image_keys=cfg.image_keys, output="tokens" if tokens else "flat",
        token_dim=token_dim or 256, **enc,
    )
    backbone = build_backbone(cfg, encoder.out_dim)
    cls = policy_class(cfg.family)
    return cls(cfg, obs_encoder=encoder, backbone=backbone, normalizer=normalizer)
