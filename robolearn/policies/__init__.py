"""Chunk policies (diffusion and flow matching), their factory, and checkpoint folders.

Typical use::

    stats = store.stats()
    policy = make_policy({"type": "diffusion", "obs": {"state": [20]}, "backbone": {"name": "unet",
                          "preset": "dp"}}, stats)
    loss = policy.compute_loss(batch)                  # batch from SequenceDataset.batches(), raw units
    save_policy(policy, "runs/x/checkpoints/last", config=run_cfg, ema_state_dict=ema.state_dict())
    policy = load_policy("runs/x/checkpoints/last", expected_type="diffusion")
    policy.set_sampler(steps=10)                       # or predict_action(..., steps=10)
    chunk = policy.predict_action(obs_history)         # (B, horizon, action_dim), raw units
    actions = policy.executable(chunk)                 # the n_action_steps to execute now
"""
from robolearn.policies.base import ChunkPolicy
from robolearn.policies.checkpoint import (
    CheckpointError,
    load_policy,
    read_checkpoint_config,
    read_run_config,
    save_policy,
)
from robolearn.policies.diffusion import DiffusionPolicy
from robolearn.policies.factory import POLICY_TYPES, ConfigError, make_policy, resolve_config
from robolearn.policies.flow import FlowPolicy

__all__ = [
    "POLICY_TYPES",
    "CheckpointError",
    "ChunkPolicy",
    "ConfigError",
    "DiffusionPolicy",
    "FlowPolicy",
    "load_policy",
    "make_policy",
    "read_checkpoint_config",
    "read_run_config",
    "resolve_config",
    "save_policy",
]
