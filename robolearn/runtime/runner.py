"""A fixed-rate control loop that executes action chunks from a :class:`ChunkPredictor` on an environment.

The environment advances with the loop, one ``env.step`` per control tick, so the timing an environment sees is the
timing a robot would see. Tick ``k`` is due at ``start + k * period`` (absolute deadlines, see :mod:`clock`).

One tick::

    wait for tick k (record lateness = jitter) -> maybe start an inference from the history ending at o_k
    -> take a finished chunk into the action queue -> pop the action due at k (none: hold the last one and count
    a deadline miss) -> env.step -> push o_{k+1} into the history

Modes
-----
``sync``  stop-and-go: when the queue runs out, infer from the current observation and *wait* for the chunk; the
          robot holds its last action meanwhile and every tick that passes is a deadline miss. The chunk then
          starts at the tick it arrives (the robot did not move while waiting, so its first action is still the
          right one); nothing is dropped by default. Every tick with an inference in flight is a stall, also when
          actions are still queued (``blend="ensemble"`` queries before the queue runs out): the robot holds, and
          the queued actions wait with it (postponed one tick per stalled tick, :meth:`ActionQueue.delay`), so
          they still line up with the new chunk's. (Executing the queue meanwhile would be async mode without its
          stale dropping: chunks ensembled ticks apart, and no misses reported for a robot that never waited.)
``async`` inference runs in a background thread while the queued actions execute (torch releases the GIL). The
          next inference starts as late as possible: once the actions queued from this tick on cover no more than
          the expected latency, ``ceil(latency / period + trigger_margin)`` ticks, where latency is the max of
          the last ``latency_window`` latencies and ``trigger_margin`` (0.25 period) absorbs latency noise.
          A chunk computed from the observation of tick ``t0`` has its action ``i`` due at ``t0 + i``; those whose
          tick passed while the policy thought are dropped (``actions_dropped``), the rest align to the
          clock, as in Diffusion Policy's real-robot evaluation. ``drop_stale`` overrides the default (True for
          async, False for sync).

Each episode starts with the robot at rest: the first chunk is computed before the clock starts, so neither mode is
charged for it.

Blending (see :mod:`action_queue`): ``none`` newest chunk wins; ``ensemble`` ACT's temporal ensembling
(``ensemble_m``), which needs overlapping chunks, so a new inference also starts every ``ensemble_every`` ticks (1:
ACT's query-every-step; in async mode as soon as the previous one is done if it took longer; in sync mode every
``ensemble_every`` ticks after the last chunk arrived, i.e. executed steps, since the stalls are not); ``warmstart`` RTI-DP: the policy's ``predict_action_warm(obs, prev_chunk, shift, steps[, noise])`` starts
from the previous chunk shifted by the ticks elapsed since its observation and runs the last ``warm_steps``
denoising steps (the newest chunk then wins as in ``none``).

Real time or not
----------------
``rate_hz=None`` (the default) is the task's own control rate, ``env.unwrapped.fps`` (what the demonstrations were
recorded at and teleoperation runs at: push_t and peg_insert 10 Hz, the robosuite tasks 20 Hz).

``realtime=True`` sleeps to the deadlines and measures everything on ``perf_counter_ns``. ``realtime=False`` runs as
fast as possible on a :class:`VirtualClock` that advances one period per tick, and computes inference inline (no
thread) so runs are deterministic. The inference's latency is then ``latency_s`` if given, else its measured
compute time, and it is charged in ticks exactly as real time would: async chunks become usable
``ceil(latency / period)`` ticks after their observation; sync waits ``floor(latency / period)`` missed ticks (the
chunk arrives during that tick and is used at once). ``latency_s=0`` gives the offline, no-latency baseline.
In real time, ``latency_s`` pads every inference to at least that long, to rehearse a slower machine.

Replanning
----------
:meth:`Runner.request_replan` (e.g. when a teleoperator hands control back to the policy) drops the queued actions
and any inference in flight: at the next tick a chunk is inferred from that tick's observation, inline, like an
episode's first chunk (the environment is not stepped meanwhile, and the real clock restarts from that tick), and
its first action is executed at that very tick. So no action planned before the request is executed after it.

Execution core
--------------
The observation history, the chunk's executable slice, the noise of every chunk and the correction hook are the
:class:`~robolearn.policies.executor.ChunkExecutor`'s (one environment): chunk ``c`` of episode ``i`` of a run seeded
``seed`` draws the noise of ``(seed, i, c)``, as evaluation does, so ``realtime=False latency_s=0`` reproduces
``robolearn eval``'s episodes. A ``corrector`` (e.g. a residual policy) changes each action after it leaves the queue
and before the environment steps; its time is reported beside the inference latency as ``corrector_ms_*`` and
counted in the tick's work (the step-time estimate that sync mode keeps clear of each deadline).

Failures
--------
Non-finite numbers: an observation (from ``reset`` or ``step``) holding NaN or inf stops the run before anything is
computed from it, naming the key (``error``; the episode's ``status`` is ``"error"``). A chunk holding NaN or inf
anywhere (NaN weights; an observation so large that normalization overflowed) is never queued or executed: the
executor's :meth:`~robolearn.policies.executor.ChunkExecutor.screen` refuses it, the runner counts it
(``nonfinite_chunks``, per episode and in total), keeps executing what is queued from earlier chunks or, when
nothing is, holds the last action (a deadline miss) and starts a new inference at once. An episode's first chunk
(and a replan's) is retried inline before anything is sent. After ``max_nonfinite_chunks`` refused chunks in a
run (default 3) the run stops as below, with ``status: "nonfinite_actions"``. A remote policy whose server refused
a non-finite chunk counts the same way.

A policy exception stops the run at once: no action from the failed inference is sent, and with ``on_error="hold"``
(default) nothing more is sent, so the last commanded action stays in force (for the position targets these tasks
use, that stops the robot); ``on_error="zero"`` sends one all-zero action first (for velocity-controlled robots).
The report carries ``error`` and the episode's ``status`` is ``"policy_error"``. KeyboardInterrupt stops the loop
the same way with ``interrupted: true``. Either way :meth:`Runner.run` returns the report.

Threads
-------
A policy running on this process's CPU is watched for oversubscribed torch threads
(:mod:`robolearn.runtime.oversubscription`): when the recent inferences suggest it, one warning goes to stderr and
the report's ``oversubscription`` holds the numbers (else null); ``torch_threads`` is always reported. Only when the
measured latency is what the run is charged (real time, or virtual time without ``latency_s``).

Recording
---------
``record_actions=True`` keeps every action sent to the environment, per episode, in :attr:`Runner.episode_actions`
(``(seed, (steps, A) array)``), so the caller can replay an episode in a rendering environment afterwards (``robolearn
run video=true``) instead of rendering inside the control loop, where it would cost every tick its time.
"""
from __future__ import annotations

import collections
import math
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

from robolearn.policies.executor import (ChunkExecutor, ChunkPredictor, ChunkRequest, Corrector, NonFiniteChunkError,
                                         NonFiniteObservationError)
from robolearn.runtime.action_queue import BLENDS, ActionQueue, ticks_for
from robolearn.runtime.clock import RealClock, VirtualClock
from robolearn.runtime.oversubscription import ThreadMonitor, runs_on_cpu
from robolearn.runtime.stats import StatusLine, percentile_ms

MODES = ("sync", "async")


class PolicyError(RuntimeError):
    """The policy raised during inference; the runner stopped safely."""


class NonFiniteActionsError(PolicyError):
    """The policy returned ``max_nonfinite_chunks`` chunks holding NaN or inf; the runner stopped safely."""


def _number(name: str, value: Any, *, integer: bool = False, minimum: float = 0.0, strict: bool = False,
            what: str = "") -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if ok and integer:
        ok = float(value) == int(value)
    if ok:
        v = float(value)
        ok = math.isfinite(v) and (v > minimum if strict else v >= minimum)
    if not ok:
        bound = f"{'>' if strict else '>='} {minimum:g}"
        kind = "a whole number" if integer else "a finite number"
        raise ValueError(f"{name} must be {kind} {bound}{what}, got {value!r}")


def check_settings(*, rate_hz: Any = None, latency_s: Any = None, episodes: Any = None, duration_s: Any = None,
                   max_nonfinite_chunks: Any = None, max_steps: Any = None, warm_steps: Any = None) -> None:
    """Refuse numbers that make no sense, with a ValueError naming the key (``None``: not given, always fine).
    :class:`Runner` and ``robolearn run`` both call it, so both say the same."""
    if rate_hz is not None:
        _number("rate_hz", rate_hz, strict=True, what=" (control ticks per second; null: the task's own)")
    if latency_s is not None:
        _number("latency_s", latency_s, what=" (seconds; 0 is the offline, no-latency baseline)")
    if episodes is not None:
        _number("episodes", episodes, integer=True, minimum=1, what=" (null with duration_s: as many as fit)")
    if duration_s is not None:
        _number("duration_s", duration_s, strict=True, what=" (seconds of control time)")
    if max_nonfinite_chunks is not None:
        _number("max_nonfinite_chunks", max_nonfinite_chunks, integer=True, minimum=1)
    if max_steps is not None:
        _number("max_steps", max_steps, integer=True, minimum=1)
    if warm_steps is not None:
        _number("warm_steps", warm_steps, integer=True, minimum=1,
                what=" (blend=warmstart: the denoising steps run from the previous chunk)")


def warm_start_steps(policy: Any, warm_steps: int | None) -> int:
    """The warm start's step count (RTI-DP: the last ``warm_steps`` denoising steps, from the previous chunk).
    ``None`` is the default, 2 (or all of a 1-step sampler's); a given count above the steps of the policy's
    sampler (when it reports them: ``sampler_config``) is refused, since the policy would run fewer than asked."""
    sampler = getattr(policy, "sampler_config", None)
    total = int(sampler["steps"]) if isinstance(sampler, dict) and sampler.get("steps") is not None else None
    if warm_steps is None:
        return 2 if total is None else min(2, total)
    check_settings(warm_steps=warm_steps)
    if total is not None and int(warm_steps) > total:
        raise ValueError(f"warm_steps={int(warm_steps)} is more than the {total} denoising steps of "
                         f"{type(policy).__name__}'s sampler; a warm start runs the last warm_steps of them")
    return int(warm_steps)


@dataclass
class _Job:
    seq: int
    obs_tick: int
    request: ChunkRequest


@dataclass
class _Result:
    seq: int
    obs_tick: int
    chunk: np.ndarray | None  # (horizon, A)
    latency_s: float
    error: BaseException | None = None
    ready_tick: int = 0  # virtual mode: first tick at which the chunk may be used


@dataclass
class _Episode:
    index: int
    seed: int
    steps: int = 0
    success: bool = False
    ret: float = 0.0
    misses: int = 0
    dropped: int = 0
    replaced: int = 0
    inferences: int = 0
    replans: int = 0
    nonfinite: int = 0
    status: str = "running"
    wall_s: float = 0.0
    lateness_s: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"episode": self.index, "seed": self.seed, "steps": self.steps, "success": self.success,
                "return": round(self.ret, 6), "deadline_misses": self.misses, "actions_dropped": self.dropped,
                "actions_replaced": self.replaced, "inferences": self.inferences, "replans": self.replans,
                "nonfinite_chunks": self.nonfinite, "status": self.status, "wall_s": round(self.wall_s, 4)}


class _Worker:
    """One background thread that runs inference jobs in order."""

    def __init__(self, infer: Callable[[_Job], np.ndarray]) -> None:
        self._infer = infer
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self.results: queue.Queue[_Result] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="robolearn-inference", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            t = time.perf_counter()
            try:
                chunk, err = self._infer(job), None
            except BaseException as exc:  # reported to the control loop, which stops safely
                chunk, err = None, exc
            self.results.put(_Result(job.seq, job.obs_tick, chunk, time.perf_counter() - t, err))

    def submit(self, job: _Job) -> None:
        self._jobs.put(job)

    def stop(self, timeout: float = 1.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)


class Runner:
    """Runs ``policy`` on ``env`` (an environment, or a zero-argument factory of one) at ``rate_hz``.

    See the module docstring for the timing model. ``max_steps`` caps an episode (the env's own time limit applies
    too). ``status`` shows a live line on stderr. ``max_nonfinite_chunks``: refused (NaN/inf) chunks after which
    the run stops (see "Failures"). ``rate_hz=None``: the task's own rate. ``thread_check``: watch for
    oversubscribed torch threads (None: when the policy is a torch module on the CPU; see "Threads").
    ``record_actions``: keep the actions sent (see "Recording").
    """

    def __init__(
        self,
        policy: ChunkPredictor,
        env: Any,
        rate_hz: float | None = None,
        mode: str = "sync",
        blend: str = "none",
        realtime: bool = True,
        *,
        latency_s: float | None = None,
        ensemble_m: float = 0.01,
        ensemble_every: int = 1,
        warm_steps: int | None = None,
        drop_stale: bool | None = None,
        trigger_margin: float = 0.25,
        latency_window: int = 5,
        max_steps: int | None = None,
        on_error: str = "hold",
        status: bool = True,
        status_stream: Any = None,
        spin_s: float = 0.001,
        switch_interval_s: float | None = 0.0005,
        corrector: Corrector | None = None,
        max_nonfinite_chunks: int = 3,
        thread_check: bool | None = None,
        record_actions: bool = False,
    ) -> None:
        check_settings(rate_hz=rate_hz, latency_s=latency_s, max_nonfinite_chunks=max_nonfinite_chunks,
                       max_steps=max_steps, warm_steps=warm_steps)  # also when blend is not warmstart
        self.executor = ChunkExecutor(policy, 1, corrector=corrector)  # checks the policy's members and geometry
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if blend not in BLENDS:
            raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
        if blend == "warmstart" and not callable(getattr(policy, "predict_action_warm", None)):
            raise TypeError(
                f"blend='warmstart' needs a policy with predict_action_warm(obs_history, prev_chunk, shift, steps[, noise]); "
                f"{type(policy).__name__} has none (use blend='none' or 'ensemble')")
        if on_error not in ("hold", "zero"):
            raise ValueError(f"on_error must be 'hold' or 'zero', got {on_error!r}")
        if not hasattr(env, "step") and callable(env):
            env = env()
        self.policy = policy
        self.env = env
        if rate_hz is None:
            rate_hz = float(getattr(getattr(env, "unwrapped", env), "fps", 10.0))
            check_settings(rate_hz=rate_hz)
        self.rate_hz = float(rate_hz)
        self.period_s = 1.0 / self.rate_hz
        self.mode, self.blend, self.realtime = mode, blend, bool(realtime)
        self.latency_s = latency_s
        self.warm_steps = warm_start_steps(policy, warm_steps) if blend == "warmstart" else None
        self.drop_stale = (mode == "async") if drop_stale is None else bool(drop_stale)
        self.trigger_margin = float(trigger_margin)
        self.max_steps = max_steps
        self.on_error = on_error
        self.max_nonfinite_chunks = int(max_nonfinite_chunks)
        self._nonfinite_total = 0
        self.status = StatusLine(status, status_stream)
        self.clock = RealClock(self.period_s, spin_s) if self.realtime else VirtualClock(self.period_s)
        self.queue = ActionQueue("none" if blend == "warmstart" else blend, ensemble_m)
        self.history = self.executor.histories[0]
        self._recent_lat: collections.deque[float] = collections.deque(maxlen=max(1, latency_window))
        self._latencies: list[float] = []
        self._corrector_s: list[float] = []
        self._tick_corrector_s = 0.0
        self._seq = 0
        self._prev: _Result | None = None
        self._step_est = 0.0
        self._last_trigger = 0
        self._last_taken = 0  # tick the newest chunk was taken at (sync ensembling counts from it)
        self.switch_interval_s = switch_interval_s
        self.ensemble_every = max(1, int(ensemble_every))
        self._replan = False
        # (tick, observation tick) of every chunk taken into the queue in the current episode: which observation
        # the executed actions were planned from.
        self.chunk_ticks: list[tuple[int, int]] = []
        self.record_actions = bool(record_actions)
        self.episode_actions: list[tuple[int, np.ndarray]] = []
        self._sent: list[np.ndarray] = []  # the current episode's actions, when recorded
        # The latency is torch's threads' doing only for a local CPU policy, and is what the run is charged only
        # in real time or when measured (a given latency_s replaces it).
        check = runs_on_cpu(policy) if thread_check is None else bool(thread_check)
        self.threads = ThreadMonitor(self.period_s) if check and (self.realtime or latency_s is None) else None

    def request_replan(self) -> None:
        """Drop the queued actions and any inference in flight; the next tick starts from a fresh chunk inferred
        from its own observation (see "Replanning" in the module docstring). Call it from the control loop's
        thread (e.g. from inside ``env.step``), or between ticks."""
        self._replan = True

    # ------------------------------------------------------------------ inference
    def _infer(self, job: _Job) -> np.ndarray:
        t0 = time.perf_counter()
        start = ThreadMonitor.measure() if self.threads is not None else None
        chunk = self._predict(job)
        if start is not None and self.threads is not None:  # the compute only: the padding below is not threads'
            self.threads.record(start)
        if self.realtime and self.latency_s:
            # Rehearse a slower computer (or a remote GPU): the chunk is ready no sooner than latency_s.
            time.sleep(max(0.0, float(self.latency_s) - (time.perf_counter() - t0)))
        return chunk

    def _predict(self, job: _Job) -> np.ndarray:
        return self.executor.compute(job.request)[0]

    def _make_job(self, tick: int) -> _Job:
        """Snapshot the history and draw the chunk's noise now, in the control loop's thread."""
        self._seq += 1
        warm = None
        if self.blend == "warmstart" and self._prev is not None and self._prev.chunk is not None:
            warm = (torch.from_numpy(self._prev.chunk.copy())[None], tick - self._prev.obs_tick, self.warm_steps)
        return _Job(self._seq, tick, self.executor.request([0], warm=warm))

    def _simulated_latency(self, measured: float) -> float:
        return measured if self.latency_s is None else float(self.latency_s)

    def _run_inline(self, tick: int) -> _Result:
        job = self._make_job(tick)
        t = time.perf_counter()
        try:
            chunk, err = self._infer(job), None
        except Exception as exc:
            chunk, err = None, exc
        measured = time.perf_counter() - t
        lat = measured if self.realtime else self._simulated_latency(measured)
        res = _Result(job.seq, tick, chunk, lat, err)
        res.ready_tick = tick + ticks_for(lat, self.period_s, round_up=(self.mode == "async"))
        return res

    def _expected_ticks(self) -> int:
        """Ticks until a chunk started now is usable: the worst of the last few latencies, plus the margin."""
        lat = max(self._recent_lat) if self._recent_lat else 0.0
        return ticks_for(lat + self.trigger_margin * self.period_s, self.period_s)

    def _record_latency(self, lat: float) -> None:
        self._recent_lat.append(lat)
        self._latencies.append(lat)
        if self.threads is not None:
            found = self.threads.check()
            if found is not None:
                self.status.message(found.message("robolearn run"))

    # ------------------------------------------------------------------ the loop
    def run(self, episodes: int | None = 1, duration_s: float | None = None, seed: int = 0) -> dict[str, Any]:
        """Run ``episodes`` episodes (seeds ``seed, seed+1, ...``), or as many as fit in ``duration_s`` of control
        time when ``episodes`` is None; both given: whichever ends first. Returns the report dict."""
        check_settings(episodes=episodes, duration_s=duration_s)
        if episodes is None and duration_s is None:
            episodes = 1
        self._nonfinite_total = 0
        self.episode_actions = []
        worker = _Worker(self._infer) if self.realtime else None
        # A Python-heavy inference thread holds the GIL for up to sys.getswitchinterval() (5 ms by default) before
        # the woken control loop gets it back: shorten that while running in real time (restored afterwards).
        old_switch = sys.getswitchinterval()
        if self.realtime and self.switch_interval_s:
            sys.setswitchinterval(self.switch_interval_s)
        self.executor.seed = int(seed)
        done: list[_Episode] = []
        error: str | None = None
        interrupted = False
        t_run = time.perf_counter()
        control_time = 0.0
        try:
            i = 0
            while episodes is None or i < episodes:
                left = None if duration_s is None else duration_s - control_time
                if left is not None and left <= 0:
                    break
                ep = _Episode(i, seed + i)
                done.append(ep)
                try:
                    self._episode(ep, worker, left)
                finally:
                    control_time += ep.steps * self.period_s
                i += 1
                if ep.status == "duration":
                    break
        except KeyboardInterrupt:
            interrupted = True
            if done and done[-1].status == "running":
                done[-1].status = "interrupted"
        except PolicyError as exc:
            error = str(exc)
        except NonFiniteObservationError as exc:  # from env.reset / env.step: nothing was computed from it
            error = f"runner stopped: environment {type(self.env).__name__}: {exc}"
            if done and done[-1].status == "running":
                done[-1].status = "error"
        except Exception as exc:  # the env (or our own bug): still stop safely and report
            error = f"runner stopped: {type(exc).__name__}: {exc}"
            if done and done[-1].status == "running":
                done[-1].status = "error"
        finally:
            sys.setswitchinterval(old_switch)
            if worker is not None:
                worker.stop(timeout=0.2)
            self.status.close()
        return self._report(done, time.perf_counter() - t_run, error, interrupted)

    def _episode(self, ep: _Episode, worker: _Worker | None, time_left: float | None) -> None:
        t_wall = time.perf_counter()
        self._sent = []
        try:
            self._episode_loop(ep, worker, time_left)
        finally:
            ep.wall_s = time.perf_counter() - t_wall
            if self.record_actions:  # also an episode that stopped early: what the robot did
                sent = (np.stack(self._sent) if self._sent
                        else np.zeros((0, int(self.policy.action_dim)), dtype=np.float32))
                self.episode_actions.append((ep.seed, sent))

    def _episode_loop(self, ep: _Episode, worker: _Worker | None, time_left: float | None) -> None:
        obs, info = self.env.reset(seed=ep.seed)
        self.policy.reset()
        self.executor.reset_env(0, obs, episode=ep.index)
        self.queue.clear()
        self._prev = None
        self._replan = False
        self.chunk_ticks = []
        self.clock.start()
        ep.success = bool(info.get("success", False))
        # The robot is at rest until its first chunk exists: compute it before the clock starts.
        self._first_chunk(ep, 0)
        self.clock.start()
        pending: _Result | _Job | None = None
        last_action: np.ndarray | None = None
        k = 0
        while True:
            if self.max_steps is not None and k >= self.max_steps:
                ep.status = "max_steps"
                break
            if time_left is not None and k * self.period_s >= time_left - 1e-9:
                ep.status = "duration"
                break
            ep.lateness_s.append(self.clock.wait_tick(k))
            if self._replan:
                self._replan = False
                self._replan_now(ep, worker, pending, k)
                pending = None
            pending = self._infer_for_tick(ep, worker, pending, k)
            if self.mode == "sync" and pending is not None:
                last_action = self._stall(ep, k, last_action)
            else:
                last_action = self._action_for_tick(ep, k, last_action)
            action = last_action
            if self.record_actions:
                self._sent.append(np.array(action, dtype=np.float32))
            t_step = time.perf_counter()
            obs, reward, terminated, truncated, info = self.env.step(action)
            # the tick's own work (correction + step): sync mode stops waiting for a chunk this long before a deadline
            work = time.perf_counter() - t_step + self._tick_corrector_s
            self._step_est = 0.8 * self._step_est + 0.2 * work
            self.executor.observe_env(0, obs)
            k += 1
            ep.steps = k
            ep.ret += float(reward)
            ep.success = ep.success or bool(info.get("success", False))
            self._show(ep, k)
            if terminated or truncated:
                ep.status = "done"
                break
        if pending is not None and worker is not None:
            self._drain(worker)

    def _infer_for_tick(self, ep: _Episode, worker: _Worker | None, pending: _Result | _Job | None,
                        k: int) -> _Result | _Job | None:
        """Take a finished chunk first (its actions may cover this tick), then decide whether to start the next
        inference; a chunk started now may still serve this tick (sync waits for it; in virtual time a
        zero-latency chunk is ready at once). Returns the inference still pending."""
        for _ in range(2):
            if pending is not None:
                res = self._collect(pending, worker, k)
                if res is not None:
                    pending = None
                    base = res.obs_tick if self.drop_stale else k
                    self._take(res, ep, now_tick=k, base_tick=base)
            if pending is not None or not self._should_trigger(k):
                break
            ep.inferences += 1
            self._last_trigger = k
            if worker is None:
                pending = self._run_inline(k)
            else:
                pending = self._make_job(k)
                worker.submit(pending)
        return pending

    def _action_for_tick(self, ep: _Episode, k: int, last_action: np.ndarray | None) -> np.ndarray:
        """The queue's action for tick ``k``, through the corrector; none queued: a deadline miss, and the last
        action (as sent) holds."""
        action = self.queue.pop(k)
        self._tick_corrector_s = 0.0
        if action is None:
            ep.misses += 1
            action = last_action
        elif self.executor.corrector is not None:
            t_fix = time.perf_counter()
            action = self.executor.correct([0], action[None])[0]
            self._tick_corrector_s = time.perf_counter() - t_fix
            self._corrector_s.append(self._tick_corrector_s)
        if action is None:  # cannot happen after the first chunk; guard anyway
            raise RuntimeError("no action available at the first tick")
        return action

    def _stall(self, ep: _Episode, k: int, last_action: np.ndarray | None) -> np.ndarray:
        """Sync mode, an inference in flight: the robot waits for it (a deadline miss, the last action holds),
        whatever is queued. The queued actions wait too (their ticks move on by one), unless stale actions are
        dropped (``drop_stale``): then the one due now is lost and counted as dropped."""
        ep.misses += 1
        self._tick_corrector_s = 0.0
        if self.drop_stale:
            if self.queue.pop(k) is not None:
                ep.dropped += 1
        else:
            self.queue.delay(k)
        if last_action is None:  # cannot happen after the first chunk; guard anyway
            raise RuntimeError("no action available at the first tick")
        return last_action

    def _replan_now(self, ep: _Episode, worker: _Worker | None, pending: _Result | _Job | None, k: int) -> None:
        if isinstance(pending, _Job) and worker is not None:
            self._drain(worker)  # one inference at a time; what it returns was planned before the request
        self.queue.clear()
        self._prev = None
        ep.replans += 1
        self._first_chunk(ep, k)
        self.clock.rebase(k)

    def _first_chunk(self, ep: _Episode, k: int) -> None:
        """Infer inline from tick ``k``'s observation until a chunk is taken (a refused, non-finite one is retried:
        nothing is sent meanwhile; the limit on refused chunks ends the loop)."""
        while True:
            ep.inferences += 1
            self._last_trigger = k
            if self._take(self._run_inline(k), ep, now_tick=k, base_tick=k):
                return

    def _should_trigger(self, k: int) -> bool:
        remaining = self.queue.remaining(k)
        if remaining == 0:
            return True
        if self.blend == "ensemble":  # ensembling needs overlapping chunks: query every `ensemble_every` ticks
            # (sync: executed ticks, counted from the last chunk's arrival; counting from the last query would
            # start the next one at the very tick a chunk arrives, and the robot would never move)
            since = self._last_taken if self.mode == "sync" else self._last_trigger
            return k - since >= self.ensemble_every
        if self.mode == "sync":
            return False
        return remaining - 1 <= self._expected_ticks() - 1

    def _collect(self, pending: _Result | _Job, worker: _Worker | None, k: int) -> _Result | None:
        if worker is None:
            assert isinstance(pending, _Result)
            return pending if pending.ready_tick <= k else None
        # Real time. sync: wait for the chunk, but not past the moment this tick's (hold) step must be sent. async: never wait; a chunk is used from the first tick after it is done.
        if self.mode == "sync":
            guard = min(1.5 * self._step_est, 0.5 * self.period_s)
            timeout = (self.clock.deadline_ns(k + 1) - self.clock.now_ns()) / 1e9 - guard
            try:
                return worker.results.get(timeout=max(timeout, 0.0))
            except queue.Empty:
                return None
        try:
            return worker.results.get_nowait()
        except queue.Empty:
            return None

    def _drain(self, worker: _Worker) -> None:
        """Wait for an inference still running at the end of an episode, so the next episode starts clean."""
        try:
            worker.results.get(timeout=60.0)
        except queue.Empty:
            pass

    def _take(self, res: _Result, ep: _Episode, now_tick: int, base_tick: int) -> bool:
        """Queue a finished chunk's actions; False when it was refused (non-finite, counted)."""
        if res.error is not None and not isinstance(res.error, NonFiniteChunkError):
            self._stop_on_error(ep, res.error)
        self._record_latency(res.latency_s)
        if res.error is not None:  # a remote policy: its server refused a non-finite chunk
            self._refused(ep, res)
            return False
        assert res.chunk is not None
        if not self.executor.screen(res.chunk[None], [0])[0]:
            self._refused(ep, res)
            return False
        self._prev = res
        self._last_taken = now_tick
        self.chunk_ticks.append((now_tick, res.obs_tick))
        executable = self.executor.executable(res.chunk[None])[0]
        dropped, replaced = self.queue.add(executable, first_tick=base_tick, now_tick=now_tick)
        ep.dropped += dropped
        ep.replaced += replaced
        return True

    def _refused(self, ep: _Episode, res: _Result) -> None:
        ep.nonfinite += 1
        self._nonfinite_total += 1
        if self._nonfinite_total >= self.max_nonfinite_chunks:
            self._stop(ep, "nonfinite_actions", NonFiniteActionsError(
                f"policy {type(self.policy).__name__} returned {self._nonfinite_total} non-finite action chunks "
                f"(NaN or inf; max_nonfinite_chunks={self.max_nonfinite_chunks}; the last from the observation of tick "
                f"{res.obs_tick}, episode {ep.index}); none of their actions was executed; stopped, "
                f"{'holding the last action' if self.on_error == 'hold' else 'sent zero action'}"))

    def _stop_on_error(self, ep: _Episode, exc: BaseException) -> None:
        try:
            self._stop(ep, "policy_error", PolicyError(
                f"policy {type(self.policy).__name__} raised {type(exc).__name__}: {exc} (episode {ep.index}, "
                f"tick {ep.steps}); stopped, "
                f"{'holding the last action' if self.on_error == 'hold' else 'sent zero action'}"))
        except PolicyError as err:
            raise err from exc

    def _stop(self, ep: _Episode, status: str, err: PolicyError) -> None:
        ep.status = status
        if self.on_error == "zero" and ep.steps > 0:
            try:
                space = getattr(self.env, "action_space", None)
                shape = space.shape if space is not None else (int(self.policy.action_dim),)
                self.env.step(np.zeros(shape, dtype=np.float32))
            except Exception:  # the env may be what failed; the error to report is the policy's
                pass
        raise err

    def _show(self, ep: _Episode, k: int) -> None:
        if not self.status.enabled:
            return
        elapsed = self.clock.elapsed_s()
        hz = (k - 1) / elapsed if k > 1 and elapsed > 0 else float("nan")
        lat = self._latencies[-1] * 1e3 if self._latencies else float("nan")
        self.status.update(f"ep {ep.index} tick {k} | {hz:5.1f} Hz | latency {lat:6.1f} ms | misses {ep.misses} "
                           f"| dropped {ep.dropped}")

    # ------------------------------------------------------------------ report
    def _report(self, eps: list[_Episode], wall_s: float, error: str | None, interrupted: bool) -> dict[str, Any]:
        lateness = [x for e in eps for x in e.lateness_s]
        ticks = sum(e.steps for e in eps)
        # Achieved rate: tick starts per second, from the first to the last tick start of each episode.
        spans = [(e.steps - 1) * self.period_s + e.lateness_s[-1] - e.lateness_s[0] for e in eps
                 if len(e.lateness_s) > 1]
        loop_wall = sum(spans)
        hz_ticks = sum(len(e.lateness_s) - 1 for e in eps if len(e.lateness_s) > 1)
        finished = [e for e in eps if e.status in ("done", "max_steps", "duration")]
        report: dict[str, Any] = {
            "mode": self.mode,
            "blend": self.blend,
            "warm_steps": self.warm_steps,
            "rate_hz": self.rate_hz,
            "realtime": self.realtime,
            "policy": type(self.policy).__name__,
            "episodes": len(eps),
            "success_rate": (sum(e.success for e in eps) / len(eps)) if eps else None,
            "deadline_misses": sum(e.misses for e in eps),
            "actions_dropped": sum(e.dropped for e in eps),
            "actions_replaced": sum(e.replaced for e in eps),
            "inferences": sum(e.inferences for e in eps),
            "nonfinite_chunks": sum(e.nonfinite for e in eps),
            "ticks": ticks,
            "torch_threads": torch.get_num_threads(),
            "oversubscription": (self.threads.diagnosis.as_dict()
                                 if self.threads is not None and self.threads.diagnosis is not None else None),
            "latency_ms_p50": percentile_ms(self._latencies, 50),
            "latency_ms_p99": percentile_ms(self._latencies, 99),
            "latency_ms_max": percentile_ms(self._latencies, 100),
            "latency_source": "measured" if self.realtime or self.latency_s is None else "given",
            "corrector_ms_p50": percentile_ms(self._corrector_s, 50) if self._corrector_s else None,
            "corrector_ms_p99": percentile_ms(self._corrector_s, 99) if self._corrector_s else None,
            "jitter_ms_p50": percentile_ms(lateness, 50),
            "jitter_ms_p99": percentile_ms(lateness, 99),
            "jitter_ms_max": percentile_ms(lateness, 100),
            "hz_achieved": round(hz_ticks / loop_wall, 3) if self.realtime and loop_wall > 0 else None,
            "wall_s": round(wall_s, 3),
            "finished_episodes": len(finished),
            "interrupted": interrupted,
            "error": error,
            "per_episode": [e.as_dict() for e in eps],
        }
        return report


def run(policy: ChunkPredictor, env: Any, *, episodes: int | None = 1, duration_s: float | None = None,
        seed: int = 0, **settings: Any) -> dict[str, Any]:
    """Shorthand: ``Runner(policy, env, **settings).run(episodes, duration_s, seed)``."""
    return Runner(policy, env, **settings).run(episodes=episodes, duration_s=duration_s, seed=seed)


def summary_line(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report without per-episode detail, for one-line printing."""
    return {k: v for k, v in report.items() if k != "per_episode"}
