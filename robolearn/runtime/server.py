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
- Numbers must be finite: an observation (or ``noise``) holding NaN or inf is answered ``"error: observation 'key'
  is not finite ..."`` (``noise`` likewise) and does not enter the connection's history.

Replies
-------
``actions``: the chunk from the newest observation's step on, ``chunk[n_obs_steps-1:]`` of shape
``(horizon - n_obs_steps + 1, A)``, float32, so ``actions[0]`` is the action for "now" and ``actions[:n_action_steps]``
is the executable part -- what an openpi client, which executes ``actions[:k]``, expects. ``chunk``: the full
``(horizon, A)`` chunk (Diffusion Policy's convention). ``action_start``, ``n_action_steps``, and ``server_timing``
(``infer_ms``: the policy call; ``queue_ms``: waiting for the inference worker; ``total_ms``: receipt to reply).
A chunk holding NaN or inf anywhere (NaN weights; an observation so large that normalization overflowed) is never
sent: the reply is the text frame ``"error: non-finite action chunk ..."`` (the request is undone, as for any
policy error) and ``nonfinite_chunks`` counts it.

Serving
-------
Loopback only unless ``host`` says otherwise. A ``host`` beyond loopback (``0.0.0.0``, a LAN address, a name other
than ``localhost``) needs a ``token``, or ``allow_unauthenticated=True`` (then a warning is logged). More than one
``Authorization`` header is answered HTTP 400.

Inference runs on ONE worker thread (policies are not assumed thread-safe). Each connection has a reader that
keeps reading (so a close is seen at once) and serves its own requests one after another, in order: at most one
request per connection waits for the worker, so the worker's first-come queue takes the connections in turn and
no client can starve the others. A connection may have ``max_pending`` requests read but not yet answered; a
request beyond that is answered (in order) ``"error: ... at most N requests in flight ..."`` without inference.
When a connection closes, its requests that have not started inference are dropped (``requests_dropped``):
abandoned requests cost nothing but an inference that had already started. ``max_message_bytes`` bounds a request:
larger ones (up to twice that) get an error reply; beyond that websockets closes that connection (code 1009)
without reading the rest.

Threads
-------
A policy on this process's CPU is watched for oversubscribed torch threads
(:mod:`robolearn.runtime.oversubscription`, judged against a 20 Hz client since the server does not know its
clients' rate): the first time the recent inferences suggest it, one warning is logged and ``oversubscription``
keeps the numbers (``robolearn serve`` prints them in its final summary line).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hmac
import ipaddress
import logging
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Mapping

import numpy as np
import torch
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from robolearn.runtime import msgpack_numpy
from robolearn.runtime.oversubscription import SERVER_PERIOD_S, Diagnosis, ThreadMonitor, runs_on_cpu
from robolearn.policies.executor import (NONFINITE_CHUNK, ChunkPredictor, NonFiniteChunkError, ObsHistory,
                                         check_chunk, check_finite_obs, check_policy, executable_start)

log = logging.getLogger("robolearn.runtime.server")

RESERVED_KEYS = ("reset", "history", "noise")


class RequestError(ValueError):
    """A request the server cannot serve; its message goes back to the client as a text frame."""


class _Dropped(Exception):
    """The request's connection closed before its inference started."""


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` stays on this machine (``localhost``, 127.0.0.0/8, ::1). Any other name or
    address, and the empty host (every interface), is beyond loopback."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class _Connection:
    """One client's requests: read by the reader task, served in order by the handler."""

    inbox: collections.deque = field(default_factory=collections.deque)  # (t_recv, message) or _REFUSED
    pending: int = 0  # requests read and not yet answered (refused ones not counted)
    closed: bool = False  # read by the inference thread too (a plain bool: no lock needed to read it)
    wake: asyncio.Event = field(default_factory=asyncio.Event)


_REFUSED = object()


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
        *,
        allow_unauthenticated: bool = False,
        max_pending: int = 4,
        thread_check: bool | None = None,
    ) -> None:
        # Clients get chunks, not steps: a kind that corrects each executed step (a residual) is served through
        # the view whose chunks carry the correction on the current observation's action
        # (robolearn/rl/residual_policy.py).
        for_chunk_clients = getattr(policy, "for_chunk_clients", None)
        if callable(for_chunk_clients):
            policy = for_chunk_clients()
        check_policy(policy)
        self.policy = policy
        # thread_check None: when the policy is a torch module on this CPU (see "Threads")
        check = runs_on_cpu(policy) if thread_check is None else bool(thread_check)
        self._threads = ThreadMonitor(SERVER_PERIOD_S) if check else None
        self.host, self.port = host, int(port)
        self.token = token or None
        if self.token is None and not is_loopback(host):
            if not allow_unauthenticated:
                raise ValueError(
                    f"refusing to serve on {host!r} (beyond loopback) without a token: anyone who can reach the port "
                    f"could run the policy. Set a token (clients send 'Authorization: Api-Key <token>'), or "
                    f"allow_unauthenticated=true to serve openly anyway")
            log.warning("serving on %r without a token (allow_unauthenticated): anyone who can reach this port can "
                        "run the policy", host)
        if int(max_pending) < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.max_pending = int(max_pending)
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
        # counted in the event loop's thread only
        self.nonfinite_chunks = 0  # chunks not sent because they held NaN or inf
        self.requests_dropped = 0  # requests whose connection closed before their inference started

    @property
    def oversubscription(self) -> Diagnosis | None:
        """What the thread check found (once found, kept), or None."""
        return self._threads.diagnosis if self._threads is not None else None

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
            "max_pending": self.max_pending,
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
        values = request.headers.get_all("Authorization")
        if len(values) > 1:
            return connection.respond(HTTPStatus.BAD_REQUEST,
                                      f"{len(values)} Authorization headers: send exactly one, "
                                      f"'Authorization: Api-Key <token>'\n")
        got = values[0] if values else ""
        if hmac.compare_digest(got.encode(), f"Api-Key {self.token}".encode()):
            return None
        return connection.respond(HTTPStatus.UNAUTHORIZED,
                                  "missing or wrong API key: send the header 'Authorization: Api-Key <token>'\n")

    async def _read(self, ws: ServerConnection, conn: _Connection) -> None:
        """Read every message as it arrives (so a close is seen at once), queueing at most ``max_pending``."""
        try:
            async for message in ws:
                if conn.pending >= self.max_pending:
                    conn.inbox.append(_REFUSED)  # answered in order, without inference; the bytes are not kept
                else:
                    conn.pending += 1
                    conn.inbox.append((time.perf_counter(), message))
                conn.wake.set()
        except ConnectionClosed:
            pass
        finally:
            conn.closed = True
            conn.wake.set()

    async def _handler(self, ws: ServerConnection) -> None:
        history = ObsHistory(list(self.policy.obs_keys), self.n_obs, self.obs_shapes)
        conn = _Connection()
        reader: asyncio.Task | None = None
        try:
            await ws.send(msgpack_numpy.packb(self.metadata()))
            reader = asyncio.create_task(self._read(ws, conn))
            while True:
                if not conn.inbox and not conn.closed:
                    conn.wake.clear()
                    await conn.wake.wait()
                    continue
                if conn.closed:  # the client went away: what it left unanswered is dropped, uncomputed
                    self.requests_dropped += sum(item is not _REFUSED for item in conn.inbox)
                    return
                item = conn.inbox.popleft()
                if item is _REFUSED:
                    self.errors_sent += 1
                    await ws.send(f"error: at most {self.max_pending} requests in flight per connection (this "
                                  f"server's max_pending); this one was not computed: wait for the replies")
                    continue
                t_recv, message = item
                try:
                    reply = await self._serve_one(message, history, t_recv, conn)
                except _Dropped:
                    self.requests_dropped += 1
                    return
                except NonFiniteChunkError as exc:
                    self.errors_sent += 1
                    self.nonfinite_chunks += 1
                    log.warning("%s", exc)
                    await ws.send(f"error: {exc}")
                    continue
                except RequestError as exc:
                    self.errors_sent += 1
                    await ws.send(f"error: {exc}")
                    continue
                except Exception as exc:  # the policy failed: tell the client, keep serving
                    self.errors_sent += 1
                    log.warning("policy raised while serving a request", exc_info=True)
                    await ws.send(f"error: policy {type(self.policy).__name__} raised {type(exc).__name__}: {exc}")
                    continue
                finally:
                    conn.pending -= 1
                await ws.send(reply)
                self.requests_served += 1
        except ConnectionClosed:
            pass  # the client went away (possibly mid-request): nothing to clean up but this handler
        finally:
            if reader is not None:
                reader.cancel()

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

    async def _serve_one(self, message: Any, history: ObsHistory, t_recv: float, conn: _Connection) -> bytes:
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
        t_submit = time.perf_counter()
        assert self._executor is not None
        job = self._executor.submit(self._predict, batch, noise, reset, conn)
        try:
            done = asyncio.wrap_future(job)
            closed = asyncio.ensure_future(self._closed(conn))
            try:
                await asyncio.wait({done, closed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
            if not done.done() and job.cancel():  # closed before its turn: never computed
                raise _Dropped()
            chunk, t_start, infer_s = await done
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

    @staticmethod
    async def _closed(conn: _Connection) -> None:
        while not conn.closed:
            conn.wake.clear()
            await conn.wake.wait()

    def _noise(self, raw: Any) -> torch.Tensor | None:
        if raw is None:
            return None
        want = (int(self.policy.horizon), int(self.policy.action_dim))
        if not isinstance(raw, np.ndarray) or raw.dtype.kind != "f" or tuple(raw.shape[-2:]) != want \
                or raw.ndim not in (2, 3) or (raw.ndim == 3 and raw.shape[0] != 1):
            raise RequestError(f"noise must be a float array of shape {want} or (1, {want[0]}, {want[1]})")
        if not np.isfinite(raw).all():
            raise RequestError("noise is not finite (holds NaN or inf): refused")
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
            try:
                check_finite_obs(k, a)
            except ValueError as exc:
                raise RequestError(str(exc)) from None
            batch[k] = torch.from_numpy(a)[None]
        return batch

    def _predict(self, batch: dict[str, torch.Tensor], noise: torch.Tensor | None, reset: bool,
                 conn: _Connection | None = None) -> tuple[np.ndarray, float, float]:
        if conn is not None and conn.closed:  # went away while this waited for the worker: skip it
            raise _Dropped()
        t0 = time.perf_counter()
        if reset:
            self.policy.reset()
        start = ThreadMonitor.measure() if self._threads is not None else None
        out = self.policy.predict_action(batch) if noise is None else self.policy.predict_action(batch, noise)
        if start is not None and self._threads is not None:
            self._threads.record(start)
            found = self._threads.check()
            if found is not None:
                log.warning("%s", found.message("robolearn serve"))
        chunk = check_chunk(out, self.policy, 1)[0]
        if not np.isfinite(chunk).all():
            what = " and ".join(n for n, bad in (("NaN", np.isnan(chunk).any()), ("inf", np.isinf(chunk).any()))
                                if bad)
            raise NonFiniteChunkError(f"{NONFINITE_CHUNK}: policy {type(self.policy).__name__} returned {what} for "
                                      f"this observation; nothing was sent (check its weights and the observation's "
                                      f"scale)")
        return chunk, t0, time.perf_counter() - t0
