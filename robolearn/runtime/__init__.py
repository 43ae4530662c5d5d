"""Real-time execution of chunk policies: a fixed-rate runner (sync / async inference, stale-action dropping,
chunk blending, deadline accounting), and a policy server / client speaking openpi's WebSocket protocol.

This room never imports ``sim``: callers hand the runner an environment or a factory of one.
"""
from robolearn.runtime.action_queue import ActionQueue
from robolearn.runtime.client import RemotePolicy, RemotePolicyError
from robolearn.runtime.protocol import ChunkPredictor, WarmStartPredictor
from robolearn.runtime.runner import PolicyError, Runner
from robolearn.runtime.server import PolicyServer

__all__ = ["ActionQueue", "ChunkPredictor", "PolicyError", "PolicyServer", "RemotePolicy", "RemotePolicyError",
           "Runner", "WarmStartPredictor"]
