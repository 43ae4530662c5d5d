"""Chunk policies (diffusion and flow matching), the one denoising loop, the chunk executor, the policy registry
and checkpoint folders.

Typical use::

    stats = store.stats()
    policy = make_policy({"type": "diffusion", "obs": {"state": [20]}, "backbone": {"name": "unet",
                          "preset": "dp"}}, stats)
    loss = policy.compute_loss(batch)                  # batch from SequenceDataset.batches(), raw units
    save_policy(policy, "runs/x/checkpoints/last", config=run_cfg, ema_state_dict=ema.state_dict())
    policy = load_policy("runs/x/checkpoints/last")    # any registered kind: base families and wrappers
    policy.set_sampler(steps=10)                       # or predict_action(..., steps=10)
    chunk = policy.predict_action(obs_history)         # (B, horizon, action_dim), raw units

    executor = ChunkExecutor(policy, num_envs=8, seed=0)   # histories, action queues, seeded noise per chunk
    executor.reset(obs)                                # obs: {key: (8, ...)}
    actions = executor.act()                           # (8, action_dim); then executor.observe(next_obs)
"""

from __future__ import annotations

import importlib
from typing import Any

# Names load on first use (PEP 562): the executor and the configs are light (the runtime imports them without
# the models and diffusers); the policies themselves load what they need when first asked for.
_WHERE = {
    "ChunkPolicy": "base",
    "DenoiseStep": "base",
    "CheckpointError": "folders",
    "checkpoint_digest": "checkpoint",
    "checkpoint_folder": "folders",
    "load_policy": "checkpoint",
    "read_checkpoint_config": "checkpoint",
    "read_run_config": "checkpoint",
    "save_policy": "checkpoint",
    "ChunkPolicyConfig": "config",
    "ConfigError": "config",
    "DiffusionConfig": "config",
    "FlowConfig": "config",
    "check_geometry": "config",
    "policy_config": "config",
    "resolve_config": "config",
    "DiffusionPolicy": "diffusion",
    "FlowPolicy": "flow",
    "ChunkExecutor": "executor",
    "ChunkPredictor": "executor",
    "ObsHistory": "executor",
    "WarmStartPredictor": "executor",
    "chunk_noise": "executor",
    "executable": "executor",
    "make_policy": "factory",
    "policy_class": "registry",
    "register_policy": "registry",
    "registered_types": "registry",
    "PolicyWrapper": "wrapper",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'robolearn.policies' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"robolearn.policies.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
