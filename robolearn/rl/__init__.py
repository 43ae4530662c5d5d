"""Reinforcement-learning fine-tuning of trained chunk policies. Imports ``policies`` and ``evaluation``, never
``sim``: the CLI (``robolearn finetune``) hands it environments.

- :mod:`.residual_policy`: ``ResidualPolicy``, registered as ``"residual"``: a Gaussian MLP that corrects each
  executed action of a frozen chunk policy (ResiP); a checkpoint of it names its base and works wherever a policy
  does (``eval``, ``run``, ``serve``, ``teleop policy=``, ``collect policy=``).
- :mod:`.residual`: PPO for it, top to bottom in one file (:class:`~robolearn.rl.residual.ResidualPPO`); the other
  learners of the same kind: TD3 (:mod:`.residual_td3`, ``learner=td3``) and random search over a linear residual
  (:mod:`.residual_ars`, ``learner=ars``).
- :mod:`.steer_policy`: ``SteeredPolicy``, registered as ``"steered"``: an actor that picks a frozen chunk policy's
  initial noise (DSRL); :mod:`.steer`: SAC and noise aliasing for it (:class:`~robolearn.rl.steer.SteeringSAC`).
- :mod:`.loop`: what the trainers share (``FinetuneRun``: evaluations, metrics, checkpoints, resume).
- :mod:`.features`: the normalized observation both heads read (running statistics kept in the checkpoint).
- :mod:`.settings`: their hyperparameters (``ResidualSettings``, ``SteerSettings``; no torch import).
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "ResidualPolicy": "residual_policy",
    "GaussianActor": "residual_policy",
    "ResidualPPO": "residual",
    "RolloutCorrector": "residual",
    "ResidualTD3": "residual_td3",
    "ResidualARS": "residual_ars",
    "ResidualSettings": "settings",
    "SteeredPolicy": "steer_policy",
    "NoiseActor": "steer_policy",
    "SteeringSAC": "steer",
    "SteerSettings": "settings",
    "FinetuneRun": "loop",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:  # PEP 562: the settings import without torch
    if name not in _WHERE:
        raise AttributeError(f"module 'robolearn.rl' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"robolearn.rl.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
