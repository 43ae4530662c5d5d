"""The control loop: timing model, stale dropping, deadline accounting, blending modes, failure handling.

Deterministic checks run in virtual time (realtime=False); a few run in real time with tolerances loose enough for a
loaded 2-core machine (precise jitter numbers belong to tools/bench/runtime.py).
"""
from __future__ import annotations

import _thread
import io
import signal
import threading
import time

import numpy as np
import pytest
import torch
from rt_policies import ExpertChunkPolicy, TickEnv, TickPolicy

import sim
from robolearn.runtime import Runner


def _executed(env: TickEnv) -> list[int]:
    return [int(round(a[0])) for a in env.actions]


def test_async_drops_stale_actions_and_aligns_the_rest_to_the_clock() -> None:
    # period 0.1 s, latency 0.25 s -> a chunk is usable 3 ticks after its observation; its first 3 actions are stale
    env, pol = TickEnv(max_steps=30), TickPolicy(horizon=8, n_obs_steps=2, n_action_steps=6)
    r = Runner(pol, env, rate_hz=10, mode="async", realtime=False, latency_s=0.25, status=False).run(episodes=1)
    assert r["deadline_misses"] == 0
    assert _executed(env) == list(range(30))  # every executed action was predicted for exactly its tick
    # the first chunk is computed before the clock starts (nothing stale in it); every later one that arrived
    # lost exactly its first 3 actions (the last one may still be in flight when the episode ends)
    later = r["inferences"] - 1
    assert later >= 5 and r["actions_dropped"] in (3 * later, 3 * (later - 1))
    assert r["latency_ms_p50"] == pytest.approx(250.0) and r["latency_source"] == "given"


def test_sync_is_stop_and_go_and_counts_the_idle_ticks_as_misses() -> None:
    env, pol = TickEnv(max_steps=30), TickPolicy(horizon=8, n_obs_steps=2, n_action_steps=6)
    r = Runner(pol, env, rate_hz=10, mode="sync", realtime=False, latency_s=0.25, status=False).run(episodes=1)
    # each later chunk: 2 ticks held (floor(2.5)), then its 6 actions from its first one on, nothing dropped
    assert _executed(env)[:16] == [0, 1, 2, 3, 4, 5, 5, 5, 6, 7, 8, 9, 10, 11, 11, 11]
    assert r["actions_dropped"] == 0
    assert r["deadline_misses"] == 2 * (r["inferences"] - 1)


@pytest.mark.parametrize("blend, executed", [
    ("none", [0, 1, 2, 3, 4, 5, 5, 5, 6, 7]),  # the queue runs out at tick 6: held 6, 7; the chunk from tick 6
    # ensemble queries every 3 executed ticks, with actions still queued: tick 3's query holds the robot at 3 and 4
    # (2 misses, as for "none"), and the queued actions wait with it, so at tick 5 the old chunk's prediction for
    # step 3 meets the new chunk's (its observation was taken at step 3): both say 3. Before the fix the robot
    # executed the queue while the policy thought (0 misses) and the chunks were averaged 2 ticks apart.
    ("ensemble", [0, 1, 2, 2, 2, 3, 4, 5, 5, 5]),
])
def test_sync_stalls_the_robot_for_every_inference_whatever_the_blend(blend, executed) -> None:
    env, pol = TickEnv(max_steps=30), TickPolicy(horizon=8, n_obs_steps=2, n_action_steps=6)
    r = Runner(pol, env, rate_hz=10, mode="sync", blend=blend, ensemble_m=0.0, ensemble_every=3, realtime=False,
               latency_s=0.25, status=False).run(episodes=1)
    assert [float(a[0]) for a in env.actions[:10]] == executed
    # 250 ms at 10 Hz: every inference after the first (pre-clock) one costs floor(2.5) = 2 held ticks
    assert r["inferences"] > 3 and r["deadline_misses"] == 2 * (r["inferences"] - 1)
    assert r["actions_dropped"] == 0


def test_rate_defaults_to_the_tasks_control_rate() -> None:
    class TwentyHz(TickEnv):
        fps = 20.0  # lift, can, square

    r = Runner(TickPolicy(), TwentyHz(max_steps=5), realtime=False, latency_s=0.0, status=False).run()
    assert r["rate_hz"] == 20.0


def test_sync_with_stale_dropping_skips_the_actions_whose_time_passed() -> None:
    env, pol = TickEnv(max_steps=16), TickPolicy(horizon=8, n_obs_steps=2, n_action_steps=6)
    r = Runner(pol, env, mode="sync", realtime=False, latency_s=0.25, drop_stale=True, status=False).run()
    # chunk from tick 6 arrives at tick 8 (2 ticks held): actions for ticks 6, 7 are dropped, 8.. align
    assert _executed(env)[:12] == [0, 1, 2, 3, 4, 5, 5, 5, 8, 9, 10, 11]
    assert r["actions_dropped"] >= 2


def test_zero_latency_offline_mode_never_misses() -> None:
    env, pol = TickEnv(max_steps=25), TickPolicy(horizon=8, n_obs_steps=2, n_action_steps=4)
    for mode in ("sync", "async"):
        r = Runner(pol, env, mode=mode, realtime=False, latency_s=0.0, status=False).run(episodes=2, seed=3)
        assert r["deadline_misses"] == 0 and r["actions_dropped"] == 0
        assert _executed(env) == list(range(25))
        assert [e["seed"] for e in r["per_episode"]] == [3, 4] and r["success_rate"] == 1.0


def test_real_time_loop_keeps_its_rate_with_a_slow_policy() -> None:
    env, pol = TickEnv(max_steps=40), TickPolicy(horizon=12, n_obs_steps=2, n_action_steps=8, sleep_s=0.1)
    t = time.perf_counter()
    r = Runner(pol, env, rate_hz=20, mode="async", realtime=True, status=False).run(episodes=1)
    elapsed = time.perf_counter() - t
    assert r["ticks"] == 40
    # 40 ticks at 20 Hz: 1.95 s from the first tick to the last, plus the first (pre-clock) inference
    assert 1.9 <= elapsed <= 2.8, elapsed
    assert r["hz_achieved"] == pytest.approx(20, rel=0.05)
    assert r["latency_ms_p50"] >= 95  # the sleep is really measured
    assert r["deadline_misses"] <= 2


def test_async_beats_sync_on_deadline_misses_in_real_time() -> None:
    results = {}
    for mode in ("sync", "async"):
        env = TickEnv(max_steps=30)
        pol = TickPolicy(horizon=10, n_obs_steps=2, n_action_steps=8, sleep_s=0.12)  # 2.4 periods at 20 Hz
        results[mode] = Runner(pol, env, rate_hz=20, mode=mode, realtime=True, status=False).run()
    assert results["sync"]["deadline_misses"] >= 4
    assert results["async"]["deadline_misses"] <= 1 < results["sync"]["deadline_misses"]
    assert results["async"]["actions_dropped"] > 0


def test_async_beats_sync_on_push_t_in_virtual_time() -> None:
    pol = ExpertChunkPolicy(sleep_s=0.0)
    rep = {m: Runner(pol, sim.make("push_t"), mode=m, realtime=False, latency_s=0.25, status=False).run(episodes=1)
           for m in ("sync", "async")}
    assert rep["async"]["deadline_misses"] == 0 < rep["sync"]["deadline_misses"]
    assert rep["async"]["success_rate"] == 1.0


class _WarmTickPolicy(TickPolicy):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.warm_calls: list[tuple[int, int, float]] = []

    def predict_action_warm(self, obs_history, prev_chunk, shift, steps):
        assert prev_chunk.shape == (1, self.horizon, self.action_dim)
        self.warm_calls.append((int(shift), int(steps), float(prev_chunk[0, self.n_obs_steps - 1, 0])))
        return self.predict_action(obs_history)


def test_warmstart_passes_the_previous_chunk_and_the_ticks_since_its_observation() -> None:
    env, pol = TickEnv(max_steps=20), _WarmTickPolicy(horizon=8, n_obs_steps=2, n_action_steps=4)
    r = Runner(pol, env, mode="sync", blend="warmstart", warm_steps=3, realtime=False, latency_s=0.0,
               status=False).run()
    assert r["error"] is None and pol.warm_calls
    # sync without latency: a new chunk every 4 ticks, each warm-started from the one observed 4 ticks before
    assert [c[0] for c in pol.warm_calls] == [4] * len(pol.warm_calls)
    assert all(c[1] == 3 for c in pol.warm_calls)
    assert [c[2] for c in pol.warm_calls[:3]] == [0.0, 4.0, 8.0]  # prev chunk's "now" action = its obs tick


def test_warmstart_on_a_policy_without_the_hook_names_the_type() -> None:
    with pytest.raises(TypeError, match="TickPolicy has none"):
        Runner(TickPolicy(), TickEnv(), blend="warmstart")


class _StepsWarmPolicy(_WarmTickPolicy):
    """Reports a sampler of ``steps`` steps, as the project's policies do (``sampler_config``)."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.sampler_config = {"kind": "euler", "steps": steps}


def test_warm_steps_default_to_two_and_fit_the_sampler() -> None:
    env = TickEnv(max_steps=12)
    assert Runner(_StepsWarmPolicy(10), env, blend="warmstart", realtime=False, status=False).warm_steps == 2
    one = _StepsWarmPolicy(1)  # a 1-step sampler: the default is all of it
    r = Runner(one, TickEnv(max_steps=12), mode="sync", blend="warmstart", realtime=False, latency_s=0.0,
               status=False).run(episodes=1)
    assert r["warm_steps"] == 1 and one.warm_calls and all(c[1] == 1 for c in one.warm_calls)
    with pytest.raises(ValueError, match=r"warm_steps=3 is more than the 1 denoising steps of _StepsWarmPolicy"):
        Runner(_StepsWarmPolicy(1), env, blend="warmstart", warm_steps=3)
    assert Runner(_StepsWarmPolicy(1), env, blend="none", status=False).warm_steps is None


@pytest.mark.parametrize("bad", [0, 1.5, -2, True])
def test_warm_steps_must_be_a_positive_whole_number(bad) -> None:
    with pytest.raises(ValueError, match=r"warm_steps must be a whole number >= 1 \(blend=warmstart"):
        Runner(_WarmTickPolicy(), TickEnv(), blend="warmstart", warm_steps=bad)


def test_ensemble_blend_runs_and_averages_overlapping_chunks() -> None:
    env = TickEnv(max_steps=20)
    pol = TickPolicy(horizon=8, n_obs_steps=1, n_action_steps=8)
    # async, 0.15 s latency, a new inference whenever the last is done: each tick gets predictions from several
    # chunks; the tick component agrees across them, the index component (j) differs and shows the averaging
    r = Runner(pol, env, mode="async", blend="ensemble", ensemble_m=0.0, realtime=False, latency_s=0.15,
               status=False).run()
    assert _executed(env) == list(range(20)) and r["deadline_misses"] == 0
    # the first chunk (observed at tick 0) comes before the clock; then queries go out at tick 1 and whenever the
    # previous one lands (2 ticks later): chunks observed at 0, 1, 3, 5, ... Tick 6 is predicted by chunks 0, 1, 3
    # (step j = 6, 5, 3; chunk 5 lands at tick 7), tick 7 by chunks 0, 1, 3, 5 (j = 7, 6, 4, 2). m = 0: plain mean.
    js = [a[1] for a in env.actions]
    assert js[6] == pytest.approx(14 / 3) and js[7] == pytest.approx(19 / 4)
    assert js[0] == 0.0 and js[1] == 1.0  # only the first chunk covers ticks 0 and 1


def test_policy_exception_stops_safely_and_still_reports() -> None:
    env, pol = TickEnv(max_steps=50), TickPolicy(n_action_steps=4, fail_after=3)
    r = Runner(pol, env, mode="async", realtime=True, rate_hz=50, status=False).run(episodes=2)
    assert "TickPolicy raised RuntimeError: simulated policy failure" in r["error"]
    assert r["per_episode"][-1]["status"] == "policy_error" and r["episodes"] == 1
    n = len(env.actions)
    assert 0 < n < 50
    # hold: no action after the failure is sent (the last commanded one stays in force)
    assert r["ticks"] == n


def test_ctrl_c_stops_cleanly_with_a_report() -> None:
    env, pol = TickEnv(max_steps=10_000), TickPolicy(n_action_steps=4)
    # A shell's background job (CI may be one) starts with SIGINT ignored, and then interrupt_main does
    # nothing: give this test Python's own Ctrl-C handler.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.4, _thread.interrupt_main)
    timer.start()
    try:
        r = Runner(pol, env, mode="async", rate_hz=50, realtime=True, status=False).run(episodes=1)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert r["interrupted"] is True and r["per_episode"][0]["status"] == "interrupted"
    assert 5 <= r["ticks"] < 100


def test_duration_limits_a_run_of_many_episodes() -> None:
    env, pol = TickEnv(max_steps=30), TickPolicy()
    r = Runner(pol, env, realtime=False, latency_s=0.0, status=False).run(episodes=None, duration_s=7.0)
    assert r["ticks"] == 70 and r["episodes"] == 3 and r["per_episode"][-1]["status"] == "duration"


def test_status_line_plain_output_when_not_a_tty() -> None:
    buf = io.StringIO()
    env, pol = TickEnv(max_steps=15), TickPolicy()
    Runner(pol, env, realtime=True, rate_hz=50, status=True, status_stream=buf).run()
    assert "tick" in buf.getvalue() and "\r" not in buf.getvalue()
    buf2 = io.StringIO()
    Runner(pol, env, realtime=False, status=False, status_stream=buf2).run()
    assert buf2.getvalue() == ""


def test_run_job_writes_the_report_and_prints_it_last(tmp_path, capsys) -> None:
    from robolearn.runtime.jobs import run_job

    env = TickEnv(max_steps=12)
    report = run_job(TickPolicy(), lambda: env, run_dir=tmp_path / "run", episodes=2, realtime=False,
                     latency_s=0.1, mode="async", status=False)
    saved = __import__("json").loads((tmp_path / "run" / "report.json").read_text())
    assert saved["episodes"] == 2 and saved["ticks"] == 24 and len(saved["per_episode"]) == 2
    last = capsys.readouterr().out.strip().splitlines()[-1]
    line = __import__("json").loads(last)
    assert line["deadline_misses"] == report["deadline_misses"] and "per_episode" not in line


def test_realtime_latency_padding_makes_a_fast_policy_slow():
    """latency_s in real time pads each inference: a 10 ms policy then behaves like a 250 ms one."""
    import sim
    from rt_policies import ExpertChunkPolicy

    from robolearn.runtime.runner import Runner

    env = sim.make("push_t")
    policy = ExpertChunkPolicy()
    report = Runner(policy, env, rate_hz=20, mode="async", realtime=True, latency_s=0.12, status=False,
                    max_steps=30).run(episodes=1, seed=0)
    assert report["latency_ms_p50"] >= 115
    assert report["actions_dropped"] > 0  # the first actions of each chunk went stale while it "thought"


class _ReplanEnv(TickEnv):
    """Asks the runner for a replan from inside ``step``, as the teleop session does at a handback."""

    def __init__(self, replan_at: int, **kw) -> None:
        super().__init__(**kw)
        self.replan_at = replan_at
        self.runner: Runner | None = None

    def step(self, action):
        out = super().step(action)
        if self.t == self.replan_at:
            self.runner.request_replan()
        return out


@pytest.mark.parametrize("realtime", [False, True], ids=["virtual", "realtime"])
def test_request_replan_drops_the_queue_and_acts_on_a_chunk_from_the_next_observation(realtime) -> None:
    # The request comes during tick 9's step; tick 10 must use a chunk inferred from observation t=10, from its
    # first executable step (j = n_obs_steps - 1), never a queued action or a chunk that was in flight.
    env = _ReplanEnv(replan_at=10, max_steps=24)
    pol = TickPolicy(horizon=10, n_obs_steps=2, n_action_steps=8, sleep_s=0.06 if realtime else 0.0)
    runner = Runner(pol, env, rate_hz=20 if realtime else 10, mode="async", realtime=realtime,
                    latency_s=None if realtime else 0.25, status=False)
    env.runner = runner
    r = runner.run(episodes=1)
    assert r["error"] is None and r["per_episode"][0]["replans"] == 1
    assert (10, 10) in runner.chunk_ticks
    after = runner.chunk_ticks[runner.chunk_ticks.index((10, 10)):]
    assert all(obs_tick >= 10 for _, obs_tick in after)  # nothing planned before the request arrived later
    a = env.actions[10]
    assert (round(a[0]), round(a[1])) == (10, 1)
    if not realtime:  # deterministic: the old queue still had actions for tick 10, from an older chunk
        assert _executed(env) == list(range(24)) and r["deadline_misses"] == 0


def test_corrector_changes_each_queued_action_once_and_is_timed() -> None:
    """The executor's correction hook (residual RL's place): every action the queue gives is corrected once; a
    held action (deadline miss) is sent as it was, not corrected again."""
    seen: list[float] = []

    def corrector(newest, base, ids):
        seen.append(float(newest["t"][0, 0]))
        out = base.copy()
        out[:, 2] += 1000.0
        return out

    env, pol = TickEnv(max_steps=20), TickPolicy(horizon=8, n_obs_steps=2, n_action_steps=6)
    r = Runner(pol, env, mode="sync", realtime=False, latency_s=0.25, status=False, corrector=corrector).run()
    assert [a[2] for a in env.actions] == [1000.0] * 20  # held ticks included, never 2000
    assert r["deadline_misses"] > 0 and len(seen) == 20 - r["deadline_misses"]
    assert seen[:3] == [0.0, 1.0, 2.0]  # it saw the observation of the tick it corrected
    assert r["corrector_ms_p50"] is not None and r["corrector_ms_p99"] >= r["corrector_ms_p50"]
