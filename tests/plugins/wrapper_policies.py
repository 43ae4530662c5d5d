"""A small policy wrapper registered by the tests: adds a learned offset (scaled) to every action of its base.

It exercises the registry and checkpoint contract every real wrapper (residual RL, noise steering, block
caching) relies on: own weights only, the base named by path and content hash, loaded through ``load_policy``.
Subprocesses of the tests load it by module name (``PYTHONPATH=tests/plugins``).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from robolearn.policies import PolicyWrapper, register_policy


@register_policy("test_offset")
class OffsetPolicy(PolicyWrapper):
    def __init__(self, base: Any, scale: float = 1.0) -> None:
        super().__init__(base)
        self.offset = nn.Parameter(torch.zeros(base.action_dim))
        self.scale = float(scale)

    def wrapper_config(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def predict_action(self, obs_history: Mapping[str, Any], noise: torch.Tensor | None = None,
                       **kwargs: Any) -> torch.Tensor:
        with torch.no_grad():
            return self.base.predict_action(obs_history, noise, **kwargs) + self.scale * self.offset
