"""Serve a chunk policy over WebSockets in openpi's policy-server protocol.

Existing openpi clients (``openpi_client.websocket_client_policy.WebsocketClientPolicy``) work unchanged:

1. The client connects (with ``Authorization: Api-Key <token>`` when the server has a token; without it, or with a
   wrong one, the handshake is refused with HTTP 401).
2. The server sends one msgpack map of metadata: ``obs_keys`` and ``obs_shapes`` (client-side names), ``action_dim``,
   ``horizon``, ``n_obs_steps``, ``n_action_steps``, ``action_start``, ``policy``, ``max_message_bytes``...
3. Each binary message is a msgpack map of observations (arrays in :mod:`msgpack_numpy` form); each reply a msgpack
   map. Anything wrong with a request is answered with a *text* frame ``"error: ..."`` (openpi's client raises on
   a text reply) and the connection stays open for the next request.

Requests
--------
- Observation keys are the policy's, or client names mapped to the policy's by ``key_map`` (``{client: policy}``).
  Other keys (an openpi client may send ``prompt``...) are ignored.
- By default each value is ONE frame (shape ``obs_shapes[key]``), as openpi clients send. The server keeps a
  per-connection history of the last ``n_obs_steps`` frames; at the start (or after ``"reset": True`` in a request,
  which also calls ``policy.reset()``) it is padded by repeating the oldest frame, as training windows are.
- ``"history": True`` says the values already hold the whole history, shape ``(n_obs_steps, *obs_shape)``; the
  connection's history buffer is then bypassed (robolearn's :class:`~robolearn.runtime.client.RemotePolicy` does
  this, since the runner keeps its own history).
- ``"noise"``: optional initial noise ``(horizon, A)`` or ``(1, horizon, A)`` passed to ``predict_action``.

Replies
-------
``actions``: the chunk from the newest observation's step on, ``chunk[n_obs_steps-1:]`` of shape
``(horizon - n_obs_steps + 1, A)``, float32, so ``actions[0]`` is the action for "now" and ``actions[:n_action_steps]``
is the executable part -- what an openpi client, which executes ``actions[:k]``, expects. ``chunk``: the full
``(horizon, A)`` chunk (Diffusion Policy's convention). ``action_start``, ``n_action_steps``, and ``server_timing``
(``infer_ms``: the policy call; ``queue_ms``: waiting for the inference worker; ``total_ms``: receipt to reply).

Serving
-------
Loopback only unless ``host`` says otherwise. Inference runs on ONE worker thread: requests from all connections are
queued in arrival order and never run concurrently (policies are not assumed thread-safe), while the event loop
keeps reading, answering errors and pings. ``max_message_bytes`` bounds a request: larger ones (up to twice that)
get an error reply; beyond that websockets closes that connection (code 1009) without reading the rest. A client
that disconnects mid-request costs nothing but the inference already queued.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import logging
import threading
import time
from http import HTTPStatus
from typing import Any, Mapping

import numpy as np
import torch
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from robolearn.runtime import msgpack_numpy
from robolearn.policies.executor import ChunkPredictor, ObsHistory, check_chunk, check_policy, executable_start

log = logging.getLogger("robolearn.runtime.server")

RESERVED_KEYS = ("reset", "history", "noise")


class RequestError(ValueError):
    """A request the server cannot serve; its message goes back to the client as a text frame."""


class PolicyServer:
    def __init__(
        self,
        policy: ChunkPredictor,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        key_map: Mapping[str, str] | None = None,
        max_message_bytes: int = 16 * 2**20,
        obs_shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> None:
        check_policy(policy)
        self.policy = policy
        self.host, self.port = host, int(port)
        self.token = token or None
        self.max_message_bytes = int(max_message_bytes)
        policy_keys = list(policy.obs_keys)
        self.key_map = dict(key_map or {})
        bad = {c: p for c, p in self.key_map.items() if p not in policy_keys}
        if bad:
            raise ValueError(f"key_map maps to keys the policy does not have: {bad}; policy keys: {policy_keys}")
        to_client = {p: c for c, p in self.key_map.items()}
        self.client_keys = [to_client.get(k, k) for k in policy_keys]
        self._policy_key = dict(zip(self.client_keys, policy_keys))
        shapes = obs_shapes if obs_shapes is not None else getattr(policy, "obs_shapes", None)
        self.obs_shapes = {k: tuple(int(s) for s in shapes[k]) for k in policy_keys} if shapes else None
        self.n_obs = int(policy.n_obs_steps)
        self.start_index = executable_start(policy)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.requests_served = 0
        self.errors_sent = 0

    # ------------------------------------------------------------------ metadata
    def metadata(self) -> dict[str, Any]:
        p = self.policy
        shapes = ({c: list(self.obs_shapes[self._policy_key[c]]) for c in self.client_keys}
                  if self.obs_shapes else None)
        return {
            "server": "robolearn",
            "protocol_version": 1,
            "policy": type(p).__name__,
            "obs_keys": list(self.client_keys),
            "obs_shapes": shapes,
            "key_map": dict(self.key_map),
            "action_dim": int(p.action_dim),
            "horizon": int(p.horizon),
            "n_obs_steps": self.n_obs,
            "n_action_steps": int(p.n_action_steps),
            "action_start": self.start_index,
            "max_message_bytes": self.max_message_bytes,
            "auth": self.token is not None,
        }

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 10.0) -> int:
        """Serve from a background thread; returns the bound port."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._thread = threading.Thread(target=self._thread_main, name="robolearn-policy-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"policy server did not start within {timeout} s")
        if self._error is not None:
            raise RuntimeError(f"policy server failed to start: {self._error}") from self._error
        return self.port

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stop_event is not None:
            try:
                self._loop.call_soon_threadsafe(self._stop_event.set)
            except RuntimeError:  # loop already closed
                pass
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def serve_forever(self, on_ready: Any = None) -> None:
        """Serve in this thread until stopped or interrupted (Ctrl-C); ``on_ready(server)`` once listening."""
        self._on_ready = on_ready
        try:
            asyncio.run(self._main())
        except KeyboardInterrupt:
            pass

    def __enter__(self) -> "PolicyServer":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="robolearn-infer")
        try:
            async with serve(
                self._handler,
                self.host,
                self.port,
                process_request=self._authorize,
                compression=None,
                max_size=2 * self.max_message_bytes,
                ping_interval=20,
                ping_timeout=60,
                logger=log,
            ) as server:
                self.port = int(server.sockets[0].getsockname()[1])
                self._ready.set()
                on_ready = getattr(self, "_on_ready", None)
                if on_ready is not None:
                    on_ready(self)
                await self._stop_event.wait()
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ protocol
    def _authorize(self, connection: ServerConnection, request: Request) -> Response | None:
        if self.token is None:
            return None
        got = request.headers.get("Authorization", "")
        if hmac.compare_digest(got.encode(), f"Api-Key {self.token}".encode()):
            return None
        return connection.respond(HTTPStatus.UNAUTHORIZED,
                                  "missing or wrong API key: send the header 'Authorization: Api-Key <token>'\n")

    async def _handler(self, ws: ServerConnection) -> None:
        history = ObsHistory(list(self.policy.obs_keys), self.n_obs, self.obs_shapes)
        try:
            await ws.send(msgpack_numpy.packb(self.metadata()))
            async for message in ws:
                t_recv = time.perf_counter()
                try:
                    reply = await self._serve_one(message, history, t_recv)
                except RequestError as exc:
                    self.errors_sent += 1
                    await ws.send(f"error: {exc}")
                    continue
                except Exception as exc:  # the policy failed: tell the client, keep serving
                    self.errors_sent += 1
                    log.warning("policy raised while serving a request", exc_info=True)
                    await ws.send(f"error: policy {type(self.policy).__name__} raised {type(exc).__name__}: {exc}")
                    continue
                await ws.send(reply)
                self.requests_served += 1
        except ConnectionClosed:
            pass  # the client went away (possibly mid-request): nothing to clean up but this handler

    def _parse(self, message: Any) -> dict[str, Any]:
        if isinstance(message, str):
            raise RequestError("expected a binary msgpack message, got a text frame")
        if len(message) > self.max_message_bytes:
            raise RequestError(f"message of {len(message)} bytes exceeds the limit of {self.max_message_bytes}")
        try:
            obj = msgpack_numpy.unpackb(message)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        if not isinstance(obj, dict):
            raise RequestError(f"request must be a msgpack map of observations, got {type(obj).__name__}")
        out = {}
        for k, v in obj.items():
            key = k.decode("utf-8", "replace") if isinstance(k, bytes) else k
            if not isinstance(key, str):
                raise RequestError(f"observation keys must be strings, got {type(k).__name__}")
            out[key] = v
        return out

    async def _serve_one(self, message: Any, history: ObsHistory, t_recv: float) -> bytes:
        req = self._parse(message)
        missing = [c for c in self.client_keys if c not in req]
        if missing:
            raise RequestError(f"missing observation key(s) {missing}; this server needs {self.client_keys}"
                               + (f" (key_map {self.key_map})" if self.key_map else ""))
        obs = {self._policy_key[c]: req[c] for c in self.client_keys}
        flag = req.get("reset", False)
        reset = bool(flag) if isinstance(flag, (bool, int, np.bool_, np.integer)) else False
        noise = self._noise(req.get("noise"))
        if req.get("history", False) is True:
            batch = self._history_batch(obs)
            saved = None
        else:
            saved = history.state()
            if reset:
                history.reset()
            try:
                history.push(obs)
            except (KeyError, ValueError, TypeError) as exc:
                history.restore(saved)
                raise RequestError(str(exc).strip('"')) from None
            batch = history.batch()
        loop = asyncio.get_running_loop()
        t_submit = time.perf_counter()
        assert self._executor is not None
        try:
            chunk, t_start, infer_s = await loop.run_in_executor(self._executor, self._predict, batch, noise, reset)
        except BaseException:
            if saved is not None:
                history.restore(saved)
            raise
        chunk32 = np.ascontiguousarray(chunk, dtype=np.float32)
        reply = {
            "actions": chunk32[self.start_index:],
            "chunk": chunk32,
            "action_start": self.start_index,
            "n_action_steps": int(self.policy.n_action_steps),
            "server_timing": {
                "infer_ms": infer_s * 1e3,
                "queue_ms": (t_start - t_submit) * 1e3,
                "total_ms": (time.perf_counter() - t_recv) * 1e3,
            },
        }
        return msgpack_numpy.packb(reply)

    def _noise(self, raw: Any) -> torch.Tensor | None:
        if raw is None:
            return None
        want = (int(self.policy.horizon), int(self.policy.action_dim))
        if not isinstance(raw, np.ndarray) or raw.dtype.kind != "f" or tuple(raw.shape[-2:]) != want \
                or raw.ndim not in (2, 3) or (raw.ndim == 3 and raw.shape[0] != 1):
            raise RequestError(f"noise must be a float array of shape {want} or (1, {want[0]}, {want[1]})")
        return torch.from_numpy(np.array(raw, dtype=np.float32)).reshape(1, *want)

    def _history_batch(self, obs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        batch = {}
        for k, v in obs.items():
            a = np.array(v)
            if a.dtype.kind not in "biuf":
                raise RequestError(f"observation {k!r} must be numeric, got dtype {a.dtype}")
            want = (self.n_obs, *self.obs_shapes[k]) if self.obs_shapes else None
            if (want is not None and a.shape != want) or a.ndim < 1 or a.shape[0] != self.n_obs:
                raise RequestError(f"observation {k!r} with history=True must have shape "
                                   f"{want or (self.n_obs, '...')}, got {a.shape}")
            batch[k] = torch.from_numpy(a)[None]
        return batch

    def _predict(self, batch: dict[str, torch.Tensor], noise: torch.Tensor | None,
                 reset: bool) -> tuple[np.ndarray, float, float]:
        t0 = time.perf_counter()
        if reset:
            self.policy.reset()
        out = self.policy.predict_action(batch) if noise is None else self.policy.predict_action(batch, noise)
        return check_chunk(out, self.policy, 1)[0], t0, time.perf_counter() - t0
