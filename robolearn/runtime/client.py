"""robolearn's client for :class:`~robolearn.runtime.server.PolicyServer` (or any openpi-protocol server that sends
the same metadata): a :class:`ChunkPredictor`, so the runner drives a remote policy exactly like a local one.

It sends the runner's whole observation history with ``"history": True`` (the server's per-connection buffer is
not used), ``"reset": True`` on the first request after :meth:`reset`, and rebuilds the ``(B, horizon, A)`` chunk
from the reply's ``chunk`` (one request per batch element). An error reply raises :class:`RemotePolicyError`; the
server's refusal of a non-finite chunk raises :class:`RemoteNonFiniteChunkError` (also a
:class:`~robolearn.policies.executor.NonFiniteChunkError`, which the runner counts instead of stopping at once).
"""
from __future__ import annotations

import threading
from typing import Any, Mapping

import numpy as np
import torch
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from robolearn.policies.executor import NONFINITE_CHUNK, NonFiniteChunkError
from robolearn.runtime import msgpack_numpy


class RemotePolicyError(RuntimeError):
    """The server answered a request with an error (a text frame)."""


class RemoteNonFiniteChunkError(RemotePolicyError, NonFiniteChunkError):
    """The server refused to send a chunk holding NaN or inf; the runner counts it as a non-finite chunk."""


class RemotePolicy:
    def __init__(self, url: str, token: str | None = None, open_timeout: float = 10.0,
                 timeout: float | None = 300.0) -> None:
        if not url.startswith(("ws://", "wss://")):
            url = "ws://" + url
        self.url = url
        self.timeout = timeout
        headers = {"Authorization": f"Api-Key {token}"} if token else None
        try:
            kw: dict[str, Any] = dict(additional_headers=headers, compression=None, max_size=None,
                                      open_timeout=open_timeout)
            try:  # websockets >= 17 warns unless a directly held connection is asked for by name
                self._ws: ClientConnection = connect(url, legacy=True, **kw)
            except TypeError:
                self._ws = connect(url, **kw)
        except InvalidStatus as exc:
            status = exc.response.status_code
            hint = " (missing or wrong token)" if status == 401 else ""
            raise PermissionError(f"policy server at {url} refused the connection: HTTP {status}{hint}") from None
        meta = self._ws.recv(timeout=open_timeout)
        if isinstance(meta, str):
            raise RemotePolicyError(f"server at {url} sent text instead of metadata: {meta}")
        self.metadata: dict[str, Any] = msgpack_numpy.unpackb(meta)
        try:
            self.horizon = int(self.metadata["horizon"])
            self.n_obs_steps = int(self.metadata["n_obs_steps"])
            self.n_action_steps = int(self.metadata["n_action_steps"])
            self.action_dim = int(self.metadata["action_dim"])
            self.obs_keys = list(self.metadata["obs_keys"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RemotePolicyError(f"server at {url} sent metadata without the chunk-policy fields: {exc}") from None
        shapes = self.metadata.get("obs_shapes")
        self.obs_shapes = {k: tuple(v) for k, v in shapes.items()} if shapes else None
        self._lock = threading.Lock()
        self._reset_next = True
        self.last_server_timing: dict[str, float] | None = None

    def reset(self) -> None:
        self._reset_next = True

    def predict_action(self, obs_history: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None
                       ) -> torch.Tensor:
        batch = int(next(iter(obs_history.values())).shape[0])
        chunks = []
        with self._lock:
            for b in range(batch):
                req: dict[str, Any] = {k: np.ascontiguousarray(_numpy(obs_history[k][b])) for k in self.obs_keys}
                req["history"] = True
                if self._reset_next:
                    req["reset"] = True
                if noise is not None:
                    req["noise"] = np.ascontiguousarray(_numpy(noise[b]), dtype=np.float32)
                self._ws.send(msgpack_numpy.packb(req))
                reply = self._ws.recv(timeout=self.timeout)
                if isinstance(reply, str):
                    if reply.startswith(f"error: {NONFINITE_CHUNK}"):
                        raise RemoteNonFiniteChunkError(f"policy server {self.url}: {reply}")
                    raise RemotePolicyError(f"policy server {self.url}: {reply}")
                self._reset_next = False
                msg = msgpack_numpy.unpackb(reply)
                self.last_server_timing = msg.get("server_timing")
                chunks.append(np.asarray(msg["chunk"], dtype=np.float32))
        return torch.from_numpy(np.stack(chunks))

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> "RemotePolicy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
