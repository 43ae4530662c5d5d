"""Backbone size presets as plain data (no torch): what ``policy.backbone.preset`` names.

Kept apart from the modules so that checking a config and printing ``robolearn train --help`` need not import
torch (seconds on a cold start).
"""
from __future__ import annotations

from typing import Any

UNET_PRESETS: dict[str, dict[str, Any]] = {
    # Diffusion Policy's CNN: ~64M parameters for obs_dim 20 x 2 obs steps, action dim 2.
    "dp": dict(down_dims=(256, 512, 1024), kernel_size=5, n_groups=8, step_embed_dim=128),
    # ~4M parameters.
    "small": dict(down_dims=(64, 128, 256), kernel_size=5, n_groups=8, step_embed_dim=64),
    # ~1.2M parameters, the default: trains in minutes on a laptop CPU (the README's results table used it).
    "cpu": dict(down_dims=(32, 64, 128), kernel_size=5, n_groups=8, step_embed_dim=64),
    # For unit tests.
    "tiny": dict(down_dims=(16, 32, 64), kernel_size=3, n_groups=4, step_embed_dim=32),
}

TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    # Diffusion Policy's transformer size (8 layers x 256): ~9M parameters.
    "dp": dict(d_model=256, n_layers=8, n_heads=4, ff_mult=4, dropout=0.0),
    # The same model under the name checkpoints written before 2026-12-02 carry (it was the default then).
    "default": dict(d_model=256, n_layers=8, n_heads=4, ff_mult=4, dropout=0.0),
    # ~1.3M parameters, the default: trains in minutes on a laptop CPU.
    "small": dict(d_model=128, n_layers=4, n_heads=4, ff_mult=4, dropout=0.0),
    "tiny": dict(d_model=32, n_layers=2, n_heads=2, ff_mult=2, dropout=0.0),
}
