"""Real-time execution of chunk policies: a fixed-rate runner (sync / async inference, stale-action dropping,
chunk blending, deadline accounting), and a policy server / client speaking openpi's WebSocket protocol.

This room never imports ``sim``: callers hand the runner an environment or a factory of one.

The names below load on first use (PEP 562), so light modules such as :mod:`robolearn.runtime.clock` can be
imported without torch and the server (teleoperation paces its loop with the same clocks).
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "ActionQueue": "action_queue",
    "RemotePolicy": "client", "RemotePolicyError": "client", "RemoteNonFiniteChunkError": "client",
    "PolicyError": "runner", "NonFiniteActionsError": "runner", "Runner": "runner",
    "PolicyServer": "server",
}
_FROM_POLICIES = ("ChunkPredictor", "WarmStartPredictor")
__all__ = sorted([*_WHERE, *_FROM_POLICIES])


def __getattr__(name: str) -> Any:
    if name not in _WHERE and name not in _FROM_POLICIES:
        raise AttributeError(f"module 'robolearn.runtime' has no attribute {name!r}")
    if name in _FROM_POLICIES:  # the one protocol lives with the executor
        value = getattr(importlib.import_module("robolearn.policies.executor"), name)
    else:
        value = getattr(importlib.import_module(f"robolearn.runtime.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
