"""PolicyServer / RemotePolicy over real loopback sockets: answers, auth, malformed input, concurrency."""
from __future__ import annotations

import random
import threading
import time

import msgpack
import numpy as np
import pytest
import torch
from rt_policies import ExpertChunkPolicy, TickPolicy
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

import sim
from robolearn.runtime import PolicyServer, RemotePolicy, RemotePolicyError, Runner, msgpack_numpy


def _connect(port: int, token: str | None = None):
    headers = {"Authorization": f"Api-Key {token}"} if token else None
    ws = connect(f"ws://127.0.0.1:{port}", additional_headers=headers, max_size=None, legacy=True)
    meta = msgpack_numpy.unpackb(ws.recv(timeout=5))
    return ws, meta


def _ask(ws, obs: dict) -> dict | str:
    ws.send(msgpack_numpy.packb(obs))
    reply = ws.recv(timeout=10)
    return reply if isinstance(reply, str) else msgpack_numpy.unpackb(reply)


def _t(x: float) -> np.ndarray:
    return np.array([x], dtype=np.float32)


@pytest.fixture
def server():
    srv = PolicyServer(TickPolicy(horizon=8, n_obs_steps=2, n_action_steps=4), max_message_bytes=4096)
    srv.start()
    yield srv
    srv.stop()


def test_answers_on_loopback_with_metadata_and_the_chunk_from_now_on(server: PolicyServer) -> None:
    assert server.host == "127.0.0.1" and server.port > 0
    ws, meta = _connect(server.port)
    assert meta["obs_keys"] == ["t"] and meta["obs_shapes"] == {"t": [1]}
    assert (meta["horizon"], meta["n_obs_steps"], meta["n_action_steps"], meta["action_dim"]) == (8, 2, 4, 3)
    r = _ask(ws, {"t": _t(5.0), "prompt": "ignored"})
    local = TickPolicy().predict_action({"t": torch.tensor([[[5.0], [5.0]]])})[0].numpy()
    np.testing.assert_array_equal(r["chunk"], local)
    np.testing.assert_array_equal(r["actions"], local[1:])  # actions[0] is "now"
    assert r["actions"][0, 0] == 5.0 and r["action_start"] == 1
    assert set(r["server_timing"]) >= {"infer_ms", "queue_ms", "total_ms"}
    ws.close()


def test_single_frames_build_a_per_connection_history_and_reset_clears_it(server: PolicyServer) -> None:
    ws, _ = _connect(server.port)
    other, _ = _connect(server.port)
    # frames 1 then 2 must give what an explicit history (1, 2) gives
    a = _ask(ws, {"t": _t(1.0)})
    b = _ask(ws, {"t": _t(2.0)})
    _ask(other, {"t": _t(100.0)})  # another connection's frames do not leak into this one
    h = _ask(ws, {"t": np.array([[1.0], [2.0]], np.float32), "history": True})
    np.testing.assert_array_equal(b["chunk"], h["chunk"])
    assert a["actions"][0, 0] == 1.0 and b["actions"][0, 0] == 2.0
    r = _ask(ws, {"t": _t(9.0), "reset": True})
    assert r["actions"][0, 0] == 9.0
    assert server.policy.resets == 1  # reset=True also resets the policy
    ws.close()
    other.close()


def test_history_is_really_used() -> None:
    class Diff(TickPolicy):  # chunk = newest - oldest frame: shows which frames the server stacked
        def predict_action(self, obs, noise=None):
            t = obs["t"][:, :, 0]
            return (t[:, -1] - t[:, 0])[:, None, None].expand(-1, self.horizon, 3).float()

    with PolicyServer(Diff(n_obs_steps=3)) as srv:
        ws, _ = _connect(srv.port)
        assert _ask(ws, {"t": _t(1.0)})["actions"][0, 0] == 0.0  # padded: (1, 1, 1)
        assert _ask(ws, {"t": _t(3.0)})["actions"][0, 0] == 2.0  # (1, 1, 3)
        assert _ask(ws, {"t": _t(10.0)})["actions"][0, 0] == 9.0  # (1, 3, 10)
        assert _ask(ws, {"t": _t(20.0)})["actions"][0, 0] == 17.0  # (3, 10, 20)
        assert _ask(ws, {"t": _t(50.0), "reset": True})["actions"][0, 0] == 0.0
        ws.close()


def test_token_required_and_checked() -> None:
    with PolicyServer(TickPolicy(), token="s3cret") as srv:
        for bad in (None, "wrong"):
            with pytest.raises(InvalidStatus) as info:
                _connect(srv.port, bad)
            assert info.value.response.status_code == 401
        with pytest.raises(PermissionError, match="401"):
            RemotePolicy(f"ws://127.0.0.1:{srv.port}", token="nope")
        ws, meta = _connect(srv.port, "s3cret")
        assert meta["auth"] is True and isinstance(_ask(ws, {"t": _t(1.0)}), dict)
        ws.close()


def test_malformed_requests_get_errors_and_the_server_keeps_serving(server: PolicyServer) -> None:
    ws, _ = _connect(server.port)
    bad = {
        "random bytes": b"\x00\xff\x13garbage",
        "text frame": "hello",
        "not a map": msgpack_numpy.packb([1, 2, 3]),
        "missing key": msgpack_numpy.packb({"x": _t(1.0)}),
        "wrong shape": msgpack_numpy.packb({"t": np.zeros(3, np.float32)}),
        "wrong type": msgpack_numpy.packb({"t": "abc"}),
        "nested map": msgpack_numpy.packb({"t": {"a": 1}}),
        "bad array header": msgpack.packb({"t": {b"__ndarray__": True, b"data": b"123", b"dtype": "<f4",
                                                 b"shape": [1]}}),
        "object dtype": msgpack.packb({"t": {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O",
                                             b"shape": [1]}}),
        "bad history": msgpack_numpy.packb({"t": _t(1.0), "history": True}),
        "bad noise": msgpack_numpy.packb({"t": _t(1.0), "noise": np.zeros(3)}),
        "oversized": msgpack_numpy.packb({"t": _t(1.0), "pad": b"x" * 5000}),
    }
    for name, msg in bad.items():
        ws.send(msg)
        reply = ws.recv(timeout=5)
        assert isinstance(reply, str) and reply.startswith("error: "), (name, reply)
    assert "exceeds the limit" in reply
    rng = random.Random(0)
    for _ in range(100):
        ws.send(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))))
        reply = ws.recv(timeout=5)
        assert isinstance(reply, str) or "actions" in msgpack_numpy.unpackb(reply)
    good = _ask(ws, {"t": _t(4.0)})
    assert good["actions"][0, 0] == 4.0
    ws.close()


def test_far_oversized_message_closes_only_that_connection(server: PolicyServer) -> None:
    ws, _ = _connect(server.port)
    ws.send(b"\x00" * (3 * 4096))  # beyond twice the limit: websockets closes with 1009 without reading it all
    with pytest.raises(ConnectionClosed) as info:
        ws.recv(timeout=5)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    ws2, _ = _connect(server.port)
    assert _ask(ws2, {"t": _t(2.0)})["actions"][0, 0] == 2.0
    ws2.close()


def test_policy_exception_is_an_error_reply_and_serving_goes_on() -> None:
    with PolicyServer(TickPolicy(fail_after=1)) as srv:
        ws, _ = _connect(srv.port)
        assert isinstance(_ask(ws, {"t": _t(1.0)}), dict)
        reply = _ask(ws, {"t": _t(2.0)})
        assert isinstance(reply, str) and "simulated policy failure" in reply
        srv.policy.fail_after = None
        assert _ask(ws, {"t": _t(3.0)})["actions"][0, 0] == 3.0
        ws.close()


def test_survives_a_client_that_disconnects_mid_request() -> None:
    with PolicyServer(TickPolicy(sleep_s=0.3)) as srv:
        ws, _ = _connect(srv.port)
        ws.send(msgpack_numpy.packb({"t": _t(1.0)}))
        ws.socket.close()  # vanish without a closing handshake while the inference runs
        time.sleep(0.4)
        ws2, _ = _connect(srv.port)
        assert _ask(ws2, {"t": _t(7.0)})["actions"][0, 0] == 7.0
        ws2.close()


def test_two_clients_at_once_are_both_served_with_inference_serialized() -> None:
    with PolicyServer(TickPolicy(sleep_s=0.2)) as srv:
        out: dict[int, float] = {}

        def client(i: int) -> None:
            ws, _ = _connect(srv.port)
            for _ in range(2):
                out[i] = float(_ask(ws, {"t": _t(10.0 * i)})["actions"][0, 0])
            ws.close()

        t = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in (1, 2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(20)
        elapsed = time.perf_counter() - t
        assert out == {1: 10.0, 2: 20.0}
        assert elapsed >= 0.75  # 4 inferences of 0.2 s, one at a time


def test_key_map_renames_client_keys() -> None:
    with PolicyServer(TickPolicy(), key_map={"observation/step": "t"}) as srv:
        ws, meta = _connect(srv.port)
        assert meta["obs_keys"] == ["observation/step"]
        assert _ask(ws, {"observation/step": _t(3.0)})["actions"][0, 0] == 3.0
        assert "missing observation key" in _ask(ws, {"t": _t(3.0)})
        ws.close()
    with pytest.raises(ValueError, match="does not have"):
        PolicyServer(TickPolicy(), key_map={"a": "nope"})


def test_remote_policy_matches_local_and_runs_push_t_through_the_runner() -> None:
    local = ExpertChunkPolicy()
    with PolicyServer(ExpertChunkPolicy()) as srv:
        remote = RemotePolicy(f"ws://127.0.0.1:{srv.port}")
        assert (remote.horizon, remote.n_obs_steps, remote.n_action_steps, remote.action_dim) == (16, 2, 8, 2)
        settings = dict(mode="async", realtime=False, latency_s=0.3, status=False)
        rep_remote = Runner(remote, sim.make("push_t"), **settings).run(episodes=1, seed=2)
        rep_local = Runner(local, sim.make("push_t"), **settings).run(episodes=1, seed=2)
        remote.close()
    assert rep_remote["error"] is None and rep_remote["success_rate"] == 1.0
    assert [e["steps"] for e in rep_remote["per_episode"]] == [e["steps"] for e in rep_local["per_episode"]]


def test_remote_errors_surface_as_remote_policy_errors() -> None:
    with PolicyServer(TickPolicy(fail_after=0)) as srv:
        remote = RemotePolicy(f"127.0.0.1:{srv.port}")
        with pytest.raises(RemotePolicyError, match="simulated policy failure"):
            remote.predict_action({"t": torch.zeros(1, 2, 1)})
        remote.close()
