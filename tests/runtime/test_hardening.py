"""Issue 11: holes in the runner, the server and the executor, each reproduced on real sockets (loopback), real
threads and real MuJoCo: non-finite observations and actions, unauthenticated serving beyond loopback, repeated
auth headers, abandoned and pipelined requests, and numbers that make no sense."""
from __future__ import annotations

import logging
import math
import socket
import time

import numpy as np
import pytest
import torch
from rt_policies import TickEnv, TickPolicy
from websockets.sync.client import connect

import sim
from robolearn.runtime import PolicyServer, RemotePolicy, Runner, msgpack_numpy


def _connect(port: int, token: str | None = None):
    headers = {"Authorization": f"Api-Key {token}"} if token else None
    ws = connect(f"ws://127.0.0.1:{port}", additional_headers=headers, max_size=None, legacy=True)
    meta = msgpack_numpy.unpackb(ws.recv(timeout=5))
    return ws, meta


def _ask(ws, obs: dict, timeout: float = 10) -> dict | str:
    ws.send(msgpack_numpy.packb(obs))
    reply = ws.recv(timeout=timeout)
    return reply if isinstance(reply, str) else msgpack_numpy.unpackb(reply)


def _t(x: float) -> np.ndarray:
    return np.array([x], dtype=np.float32)


class ScalePolicy(TickPolicy):
    """chunk = observation x 1e10, as a normalizer with a tiny std would: 3e38 overflows to inf."""

    def predict_action(self, obs_history, noise=None):
        return super().predict_action(obs_history, noise) * 1e10


class NanAfterPolicy(TickPolicy):
    """TickPolicy whose calls listed in ``bad`` (1-based; ``"all"``: every call) return a chunk with a NaN."""

    def __init__(self, bad: set[int] | str = "all", value: float = float("nan"), **kw) -> None:
        super().__init__(**kw)
        self.bad, self.value = bad, value

    def predict_action(self, obs_history, noise=None):
        out = super().predict_action(obs_history, noise)
        if self.bad == "all" or self.calls in self.bad:
            out = out.clone()
            out[:, -1, 0] = self.value
        return out


def _all_finite(actions) -> bool:
    return all(np.isfinite(np.asarray(a)).all() for a in actions)


# ---------------------------------------------------------------------------------------------- 4: non-finite
@pytest.fixture
def server():
    srv = PolicyServer(ScalePolicy(horizon=8, n_obs_steps=2, n_action_steps=4))
    srv.start()
    yield srv
    srv.stop()


def test_server_refuses_nonfinite_observations_and_noise_naming_the_key(server: PolicyServer) -> None:
    ws, _ = _connect(server.port)
    for bad in (np.nan, np.inf, -np.inf):
        reply = _ask(ws, {"t": _t(bad)})
        assert isinstance(reply, str) and reply.startswith("error: ") and "'t'" in reply and "finite" in reply, reply
        reply = _ask(ws, {"t": np.array([[1.0], [bad]], np.float32), "history": True})
        assert isinstance(reply, str) and "'t'" in reply and "finite" in reply, reply
    noise = np.zeros((8, 3), np.float32)
    noise[2, 1] = np.nan
    reply = _ask(ws, {"t": _t(1.0), "noise": noise})
    assert isinstance(reply, str) and "noise" in reply and "finite" in reply, reply
    # the refused frames did not enter the connection's history: (1, 2) as if nothing happened
    reply = _ask(ws, {"t": _t(2.0)})
    assert isinstance(reply, dict) and np.isfinite(reply["chunk"]).all()
    assert reply["actions"][0, 0] == pytest.approx(2.0e10)
    ws.close()


def test_server_never_sends_a_nonfinite_chunk(server: PolicyServer) -> None:
    ws, _ = _connect(server.port)
    reply = _ask(ws, {"t": _t(3e38)})  # finite, but x 1e10 overflows float32: inf in the chunk
    assert isinstance(reply, str) and reply.startswith("error: ") and "non-finite" in reply, reply
    assert _ask(ws, {"t": _t(1.0), "reset": True})["actions"][0, 0] == pytest.approx(1e10)  # still serving
    ws.close()
    with PolicyServer(NanAfterPolicy(bad={2})) as srv:
        ws, _ = _connect(srv.port)
        assert isinstance(_ask(ws, {"t": _t(1.0)}), dict)
        reply = _ask(ws, {"t": _t(2.0)})
        assert isinstance(reply, str) and "non-finite" in reply, reply
        assert isinstance(_ask(ws, {"t": _t(3.0)}), dict)
        ws.close()


def test_runner_holds_counts_and_stops_after_max_nonfinite_chunks() -> None:
    env = TickEnv(max_steps=60)
    pol = NanAfterPolicy(bad={3, 4, 5, 6}, horizon=8, n_obs_steps=2, n_action_steps=4)
    r = Runner(pol, env, mode="sync", realtime=False, latency_s=0.0, status=False,
               max_nonfinite_chunks=3).run(episodes=1)
    assert _all_finite(env.actions), "a NaN action reached the environment"
    assert r["nonfinite_chunks"] == 3 and r["per_episode"][0]["nonfinite_chunks"] == 3
    assert r["per_episode"][0]["status"] == "nonfinite_actions"
    assert "non-finite" in r["error"] and "max_nonfinite_chunks=3" in r["error"]
    # chunks 1-2 gave ticks 0-7; chunks 3, 4 were refused (the last action held, deadline misses), 5 stopped it
    assert [int(a[0]) for a in env.actions] == [0, 1, 2, 3, 4, 5, 6, 7, 7]
    assert r["deadline_misses"] >= 1


def test_runner_survives_an_occasional_nonfinite_chunk() -> None:
    env = TickEnv(max_steps=30)
    pol = NanAfterPolicy(bad={2}, value=float("inf"), horizon=8, n_obs_steps=2, n_action_steps=4)
    r = Runner(pol, env, mode="async", realtime=False, latency_s=0.15, status=False).run(episodes=1)
    assert r["error"] is None and r["ticks"] == 30 and _all_finite(env.actions)
    assert r["nonfinite_chunks"] == 1


@pytest.mark.parametrize("realtime", [False, True], ids=["virtual", "realtime"])
def test_runner_with_an_always_nan_policy_sends_nothing(realtime: bool) -> None:
    env = TickEnv(max_steps=30)
    r = Runner(NanAfterPolicy(), env, mode="async", realtime=realtime, rate_hz=50, status=False).run(episodes=2)
    assert env.actions == []  # the first chunk of the episode never became usable: the robot never moved
    assert r["nonfinite_chunks"] == 3 and r["episodes"] == 1 and "non-finite" in r["error"]


def test_runner_counts_an_overflowing_observation_as_a_nonfinite_chunk_not_a_crash() -> None:
    class HugeEnv(TickEnv):  # tick 6's observation is 3e38: finite, but x 1e10 in the policy is inf
        def _obs(self):
            return {"t": np.array([3e38 if self.t == 6 else self.t], dtype=np.float32)}

    env = HugeEnv(max_steps=20)
    pol = ScalePolicy(horizon=8, n_obs_steps=1, n_action_steps=2)
    r = Runner(pol, env, mode="sync", realtime=False, latency_s=0.0, status=False).run(episodes=1)
    assert r["error"] is None and r["ticks"] == 20 and _all_finite(env.actions)
    # tick 6: the chunk was refused, and so was the one started at once from the same observation; tick 6 held
    # tick 5's action (a deadline miss), tick 7's observation gave a good chunk again
    assert r["nonfinite_chunks"] == 2 and r["deadline_misses"] == 1
    assert [round(a[0] / 1e10) for a in env.actions][4:9] == [4, 5, 5, 7, 8]


def test_runner_refuses_a_nonfinite_observation_naming_the_key() -> None:
    class NanObsEnv(TickEnv):
        def _obs(self):
            return {"t": np.array([np.nan if self.t == 5 else self.t], dtype=np.float32)}

    env = NanObsEnv(max_steps=30)
    r = Runner(TickPolicy(), env, mode="async", realtime=False, latency_s=0.1, status=False).run(episodes=1)
    assert r["error"] is not None and "'t'" in r["error"] and "finite" in r["error"], r["error"]
    assert len(env.actions) == 5 and _all_finite(env.actions)


def test_a_corrector_returning_nan_stops_the_runner_before_the_action_is_sent() -> None:
    def corrector(newest, base, ids):
        return base * float("nan") if newest["t"][0, 0] >= 4 else base

    env = TickEnv(max_steps=30)
    r = Runner(TickPolicy(), env, realtime=False, latency_s=0.0, status=False, corrector=corrector).run()
    assert "corrector returned non-finite actions" in r["error"] and len(env.actions) == 4
    assert _all_finite(env.actions)


def test_runner_on_real_mujoco_never_sends_nan_controls(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # MuJoCo writes MUJOCO_LOG.TXT into the working directory on a NaN control

    class NanPeg:
        horizon, n_obs_steps, n_action_steps, action_dim = 8, 2, 4, 4
        obs_keys = ["ee_pos", "hole_pos"]

        def __init__(self) -> None:
            self.calls = 0

        def reset(self) -> None:
            pass

        def predict_action(self, obs, noise=None):
            self.calls += 1
            out = torch.zeros(1, self.horizon, self.action_dim)
            return out * float("nan") if self.calls > 2 else out

    env = sim.make("peg_insert")
    sent: list[np.ndarray] = []
    step = env.step
    env.step = lambda a: (sent.append(np.array(a)), step(a))[1]  # type: ignore[method-assign]
    r = Runner(NanPeg(), env, mode="sync", realtime=False, latency_s=0.0, status=False).run(episodes=1)
    env.close()
    # chunks 1-2 moved it 8 ticks; chunks 3, 4 were refused at tick 8 (the last action held), 5 stopped it
    assert len(sent) == 9 and _all_finite(sent)
    assert r["nonfinite_chunks"] == 3 and "non-finite" in r["error"]
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()


def test_remote_nonfinite_chunks_count_as_nonfinite_in_the_runner() -> None:
    with PolicyServer(NanAfterPolicy(bad={3, 4, 5})) as srv:
        remote = RemotePolicy(f"ws://127.0.0.1:{srv.port}")
        env = TickEnv(max_steps=40)
        r = Runner(remote, env, mode="sync", realtime=False, latency_s=0.0, status=False).run(episodes=1)
        remote.close()
    assert r["nonfinite_chunks"] == 3 and r["per_episode"][0]["status"] == "nonfinite_actions"
    assert _all_finite(env.actions) and len(env.actions) == 9


def test_evaluate_counts_nonfinite_chunks_and_never_executes_them(tmp_path, monkeypatch) -> None:
    from robolearn.evaluation import evaluate

    monkeypatch.chdir(tmp_path)  # where MuJoCo would write MUJOCO_LOG.TXT

    class NanPushT:
        """Moves toward the middle; every chunk after the second of an episode is NaN."""

        horizon, n_obs_steps, n_action_steps, action_dim = 8, 2, 4, 2
        obs_keys = ["agent_pos", "block_pose"]

        def __init__(self) -> None:
            self.calls = 0

        def reset(self) -> None:
            pass

        def predict_action(self, obs, noise=None):
            self.calls += 1
            out = torch.zeros(obs["agent_pos"].shape[0], self.horizon, self.action_dim)
            return out * float("nan") if self.calls % 3 == 0 else out

    res = evaluate(NanPushT(), lambda: sim.make("push_t", max_episode_steps=30), [0, 1], keep_steps=True)
    assert res["nonfinite_chunks"] == 2
    for ep in res["per_episode"]:
        assert np.isfinite(ep["actions"]).all() and ep["nonfinite_chunks"] == 1 and ep["success"] is False
        assert ep["length"] == 8  # two chunks of 4 executed, the third was refused: the episode ended there
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()


# ---------------------------------------------------------------------------------------------- 5: serving
def test_serving_beyond_loopback_without_a_token_is_refused_unless_allowed(caplog) -> None:
    for host in ("0.0.0.0", "::", ""):
        with pytest.raises(ValueError, match="allow_unauthenticated"):
            PolicyServer(TickPolicy(), host=host)
    PolicyServer(TickPolicy(), host="0.0.0.0", token="s3cret")  # a token: fine
    PolicyServer(TickPolicy(), host="localhost")  # loopback: fine
    PolicyServer(TickPolicy(), host="127.0.0.2")
    with caplog.at_level(logging.WARNING, logger="robolearn.runtime.server"):
        srv = PolicyServer(TickPolicy(), host="0.0.0.0", allow_unauthenticated=True)
    assert any("without a token" in r.getMessage() for r in caplog.records)
    with srv:  # and it really serves, on loopback too
        ws, _ = _connect(srv.port)
        assert _ask(ws, {"t": _t(2.0)})["actions"][0, 0] == 2.0
        ws.close()


def _handshake(port: int, headers: list[str]) -> bytes:
    lines = ["GET / HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13", *headers]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return s.recv(4096)


def test_two_authorization_headers_get_400_not_500(caplog) -> None:
    with PolicyServer(TickPolicy(), token="s3cret") as srv:
        with caplog.at_level(logging.ERROR, logger="robolearn.runtime.server"):
            for pair in (["Api-Key s3cret", "Api-Key other"], ["Api-Key s3cret", "Api-Key s3cret"]):
                resp = _handshake(srv.port, [f"Authorization: {v}" for v in pair])
                assert resp.startswith(b"HTTP/1.1 400"), resp[:200]
                assert b"Authorization" in resp
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
        assert _handshake(srv.port, ["Authorization: Api-Key s3cret"]).startswith(b"HTTP/1.1 101")


# ---------------------------------------------------------------------------------------------- 6: abandoned
INFER_S = 0.2


def test_abandoned_requests_are_dropped_before_inference() -> None:
    pol = TickPolicy(sleep_s=INFER_S)
    with PolicyServer(pol) as srv:
        for i in range(200):
            ws, _ = _connect(srv.port)
            ws.send(msgpack_numpy.packb({"t": _t(float(i))}))
            if i % 2:
                ws.close()  # with a closing handshake
            else:
                ws.socket.close()  # vanish
        t = time.perf_counter()
        ws, _ = _connect(srv.port)
        reply = _ask(ws, {"t": _t(7.0)}, timeout=30)
        waited = time.perf_counter() - t
        ws.close()
        assert reply["actions"][0, 0] == 7.0
        assert waited < 3 * INFER_S, f"a correct client waited {waited:.2f} s behind abandoned requests"
        assert srv.requests_dropped >= 150 and pol.calls < 60
    print(f"waited {waited:.3f} s; {pol.calls} inferences for 201 requests; dropped {srv.requests_dropped}")


def test_a_pipelining_client_is_limited_per_connection_and_starves_no_one() -> None:
    pol = TickPolicy(sleep_s=INFER_S)
    with PolicyServer(pol, max_pending=2) as srv:
        greedy, _ = _connect(srv.port)
        for i in range(20):
            greedy.send(msgpack_numpy.packb({"t": _t(float(i))}))
        time.sleep(0.05)
        t = time.perf_counter()
        other, _ = _connect(srv.port)
        assert _ask(other, {"t": _t(5.0)})["actions"][0, 0] == 5.0
        assert time.perf_counter() - t < 3 * INFER_S
        replies = [greedy.recv(timeout=10) for _ in range(20)]  # one reply per request, in order
        answered = [r for r in replies if not isinstance(r, str)]
        refused = [r for r in replies if isinstance(r, str)]
        assert [float(msgpack_numpy.unpackb(r)["actions"][0, 0]) for r in replies[:2]] == [0.0, 1.0]
        assert len(answered) == 2 and len(refused) == 18
        assert all("at most 2 requests" in r for r in refused), refused[0]
        assert isinstance(_ask(greedy, {"t": _t(9.0)}), dict)  # the connection still works
        # pipelined requests of a client that then vanished are dropped too
        for i in range(20):
            other.send(msgpack_numpy.packb({"t": _t(float(i))}))
        other.socket.close()
        time.sleep(0.05)
        calls = pol.calls
        t = time.perf_counter()
        assert _ask(greedy, {"t": _t(3.0)})["actions"][0, 0] == 3.0
        assert time.perf_counter() - t < 3 * INFER_S and pol.calls <= calls + 2
        greedy.close()


# ---------------------------------------------------------------------------------------------- 8: numbers
@pytest.mark.parametrize("kw, key", [
    ({"rate_hz": float("nan")}, "rate_hz"), ({"rate_hz": float("inf")}, "rate_hz"), ({"rate_hz": 0}, "rate_hz"),
    ({"rate_hz": -5.0}, "rate_hz"), ({"latency_s": -0.1}, "latency_s"), ({"latency_s": float("nan")}, "latency_s"),
    ({"latency_s": float("inf")}, "latency_s"), ({"max_nonfinite_chunks": 0}, "max_nonfinite_chunks"),
    ({"max_steps": 0}, "max_steps"),
])
def test_runner_refuses_nonsense_settings_naming_the_key(kw, key) -> None:
    with pytest.raises(ValueError, match=rf"^{key} "):
        Runner(TickPolicy(), TickEnv(), status=False, **kw)


@pytest.mark.parametrize("kw, key", [
    ({"episodes": -1}, "episodes"), ({"episodes": 0}, "episodes"), ({"duration_s": -1.0}, "duration_s"),
    ({"duration_s": 0.0}, "duration_s"), ({"duration_s": math.nan}, "duration_s"),
])
def test_runner_run_refuses_nonsense_counts_naming_the_key(kw, key) -> None:
    env = TickEnv()
    with pytest.raises(ValueError, match=rf"^{key} "):
        Runner(TickPolicy(), env, realtime=False, status=False).run(**kw)
    assert env.resets == 0

