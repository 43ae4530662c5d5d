"""The teleoperation session: one control tick at a time, the same code with a person, a replay log or a policy.

Per tick (:meth:`TeleopSession.tick`)::

    poll the device (its raw input goes to the event log) -> handle its events (start, save, discard, reset,
    take over, hand back, gripper, quit) -> step the environment with the operator's action (or the policy's)
    -> record the step -> show the state in the viewer

States of an episode: ``ready`` (a fresh scene, frozen until Enter starts recording), ``recording``, ``done``
(the task ended it: success or time limit; frozen until saved, discarded or reset). Save appends the episode to
the store atomically and moves on to a new scene; discard retries the same scene (same seed); reset skips to a
new one. With a policy (intervention mode) every episode records from its first step, the policy drives until
the operator takes over, and each step's ``intervention`` flag says who chose its action.

Who calls :meth:`tick`:

- plain teleoperation: :func:`run_teleop`, at the control rate on a real clock (or a virtual one for replays);
- intervention mode: :class:`robolearn.runtime.runner.Runner`, through :class:`SessionEnv`, which looks like an
  environment to it: the runner keeps its clock, its asynchronous inference and its action queue, and the
  session substitutes the operator's action while they drive. Between episodes (waiting for save or discard)
  :func:`run_intervention` ticks the session itself.

Nothing here needs a viewer: without one the session runs headless (replays, tests), and the viewer only adds
the window, the keyboard and the overlay.

Handback (intervention mode): the actions the runner queued were planned before or during the takeover, from
observations the operator has since changed. So the tick of the handback is still the operator's, and the session
asks the runner (``on_handback``, :meth:`~robolearn.runtime.runner.Runner.request_replan`) to drop its queue: the
first policy step after a handback comes from a chunk inferred from the observation after the handback.

Mouse: the viewer's drag-to-perturb writes forces into the simulation's ``xfrc_applied``; the session clears them
before each step it records, so a recorded episode holds only what the device commanded.
"""
from __future__ import annotations

import datetime
import sys
import threading
import time
from typing import Any, Callable

import numpy as np

from robolearn.runtime.clock import RealClock, VirtualClock
from robolearn.teleop.devices import Command
from robolearn.teleop.tasks import TaskControl

READY, RECORDING, DONE = "ready", "recording", "done"


class TeleopError(RuntimeError):
    """The session stopped on an error (a store that refused the episode, a policy that failed)."""


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


class TeleopSession:
    """State machine, recorder and overlay of a teleoperation session (see the module docstring).

    ``device`` has ``poll(tick) -> Command`` and ``halt()`` (a :class:`~robolearn.teleop.devices.DeviceSet` or a
    :class:`~robolearn.teleop.devices.ReplayDevice`); ``store`` is an :class:`~robolearn.data.EpisodeStore` open
    for append; ``viewer`` is optional (a :class:`~robolearn.teleop.viewer.TeleopViewer`, already open).
    """

    def __init__(
        self,
        env: Any,
        control: TaskControl,
        device: Any,
        store: Any,
        *,
        device_label: str,
        seed: int = 0,
        policy_label: str | None = None,
        record_intervention: bool = True,
        autosave: bool = False,
        max_episodes: int | None = None,
        viewer: Any = None,
        handles: Callable[[Any], tuple[Any, Any]] | None = None,
        episode_attrs: dict[str, Any] | None = None,
        echo: bool = True,
        on_handback: Callable[[], None] | None = None,
    ) -> None:
        self.env = env
        self.control = control
        self.device = device
        self.store = store
        self.device_label = device_label
        self.policy_mode = policy_label is not None
        self.policy_label = policy_label
        self.record_intervention = record_intervention
        self.autosave = autosave
        self.max_episodes = max_episodes
        self.viewer = viewer
        self._handles = handles
        self.extra_attrs = dict(episode_attrs or {})
        self.echo = echo
        self.on_handback = on_handback
        self.fps = float(getattr(getattr(env, "unwrapped", env), "fps", control.fps))
        self.next_seed = int(seed)
        self.seed = int(seed)
        self.tick_index = 0
        self.state = READY
        self.driver = "policy" if self.policy_mode else "human"
        self.episode_over = True  # no episode yet: the first tick (or the runner's reset) begins one
        self.quit = False
        self.quit_reason: str | None = None
        self.saved = 0
        self.saved_steps = 0
        self.discarded = 0
        self.message = ""
        self.obs: dict[str, np.ndarray] = {}
        self.info: dict[str, Any] = {}
        self.failure: BaseException | None = None
        self.interrupt = False  # set from another thread (Ctrl-C while the loop runs on a worker thread)
        self.done_reason = ""
        self.save_error: str | None = None
        self.handbacks: list[int] = []  # ticks at which the operator handed control back
        self._mj_data: Any = None
        self._tick_starts: list[float] = []
        self._tick_work: list[float] = []
        self._clear_buffer()

    # ------------------------------------------------------------------ episodes
    def _clear_buffer(self) -> None:
        self._rows: dict[str, list[np.ndarray]] = {}
        self._actions: list[np.ndarray] = []
        self._rewards: list[float] = []
        self._flags: list[bool] = []
        self._success = False
        self._started_at: str | None = None

    @property
    def recorded_steps(self) -> int:
        return len(self._actions)

    def begin_episode(self, seed: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Reset the environment to a scene (``seed``; default the session's next one) and wait for the operator."""
        self.seed = self.next_seed if seed is None else int(seed)
        self.next_seed = self.seed
        obs, info = self.env.reset(seed=self.seed)
        if self.viewer is not None and self._handles is not None:
            self.viewer.reload(*self._handles(self.env))  # a no-op unless the env rebuilt its model
        self.obs, self.info = obs, dict(info)
        self._mj_data = self._handles(self.env)[1] if self._handles is not None else None
        self.control.reset(obs)
        self.device.halt()
        self.episode_over = False
        self.done_reason = ""
        self.save_error = None
        self.driver = "policy" if self.policy_mode else "human"
        self._clear_buffer()
        self.state = READY
        if self.policy_mode:
            self._start_recording()
        return obs, info

    def _start_recording(self) -> None:
        self.state = RECORDING
        self._clear_buffer()
        self._started_at = _now_iso()
        self._success = bool(self.info.get("success", False))

    def _end_episode(self, next_seed: bool) -> None:
        self.episode_over = True
        self.next_seed = self.seed + 1 if next_seed else self.seed

    def _say(self, text: str) -> None:
        self.message = text
        if self.echo:
            print(f"teleop [tick {self.tick_index}]: {text}", file=sys.stderr, flush=True)

    def _quit(self, reason: str) -> None:
        if self.quit:
            return
        if self.recorded_steps and not self.episode_over:
            self._say(f"quit ({reason}): dropped the unsaved episode ({self.recorded_steps} steps)")
        self.quit, self.quit_reason = True, reason
        self.episode_over = True

    def save(self) -> int:
        """Append the recorded episode to the store (atomically: it exists whole or not at all)."""
        n = self.recorded_steps
        episode: dict[str, np.ndarray] = {k: np.stack(v) for k, v in self._rows.items()}
        episode["action"] = np.stack(self._actions)
        episode["reward"] = np.asarray(self._rewards, dtype=np.float32)
        if self.record_intervention:
            episode["intervention"] = np.asarray(self._flags, dtype=bool)
        attrs = {
            "source": "intervention" if self.policy_mode else "teleop",
            "device": self.device_label,
            "started_at": self._started_at,
            "saved_at": _now_iso(),
            "seed": self.seed,
            "steps": n,
            "success": bool(self._success),
            "intervention_steps": int(np.sum(self._flags)),
            **({"policy": self.policy_label} if self.policy_mode else {}),
            **self.extra_attrs,
        }
        # The seed counts as used before the episode lands: a crash in between skips a scene, never repeats one.
        state = dict(self.store.attrs.get("teleop") or {})
        state["next_seed"] = max(self.seed + 1, int(state.get("next_seed", 0)))
        self.store.update_attrs({"teleop": state})
        index = self.store.append_episode(episode, attrs=attrs)
        self.saved += 1
        self.saved_steps += n
        return index

    # ------------------------------------------------------------------ events
    def _handle(self, event: str) -> None:
        active = self.state in (RECORDING, DONE) and self.recorded_steps > 0
        if event == "quit":
            self._quit(self.quit_reason or getattr(self.device, "quit_reason", None) or "quit key")
        elif event == "start":
            if self.state == READY:
                self._start_recording()
                self._say(f"recording (scene {self.seed})")
            elif self.state == DONE:
                self._say("the episode is over: F8 saves it, Delete discards it")
        elif event == "save":
            if not active:
                self._say("nothing recorded yet: Enter starts recording")
                return
            try:
                index = self.save()
            except Exception as e:  # the store refused it (disk full, lost, locked): keep the episode, say why
                self.save_error = f"{type(e).__name__}: {e}"
                if self.state == RECORDING:
                    self.state, self.done_reason = DONE, "save failed"
                self._say(f"SAVE FAILED, the episode ({self.recorded_steps} steps) is kept: F8 tries again, "
                          f"Delete discards it. {self.save_error}")
                return
            self.save_error = None
            self._say(f"saved episode {index} ({self.recorded_steps} steps, "
                      f"{'success' if self._success else 'no success'})")
            self._end_episode(next_seed=True)
            if self.max_episodes is not None and self.saved >= self.max_episodes:
                self._quit(f"{self.saved} episodes saved")
        elif event == "discard":
            if self.state == READY:
                self._say("nothing to discard")
                return
            self.discarded += 1
            self._say(f"discarded {self.recorded_steps} steps; same scene again")
            self._end_episode(next_seed=False)
        elif event == "reset":
            if active:
                self.discarded += 1
                self._say(f"reset: dropped the unsaved episode ({self.recorded_steps} steps)")
            else:
                self._say("reset: new scene")
            self._end_episode(next_seed=True)
        elif event in ("takeover", "handback", "driver"):
            if not self.policy_mode:
                self._say("take over / hand back need a policy (policy=CHECKPOINT)")
                return
            want = {"takeover": "human", "handback": "policy"}.get(
                event, "human" if self.driver == "policy" else "policy")
            if want != self.driver:
                self.driver = want
                if want == "policy":
                    self.handbacks.append(self.tick_index)
                    if self.on_handback is not None:
                        self.on_handback()
                self._say("operator drives" if want == "human" else "policy drives")
        elif event == "gripper":
            self.control.toggle_gripper()

    # ------------------------------------------------------------------ the tick
    def tick(self, policy_action: np.ndarray | None = None) -> tuple[dict, float, bool, bool, dict]:
        """One control tick (see the module docstring). Returns what an environment's ``step`` would; to the
        runner ``truncated`` also means "this episode is over for the session" (saved, discarded, reset, quit)."""
        t0 = time.perf_counter()
        self._tick_starts.append(t0)
        if not self.quit:
            # Quit without asking the devices (a replay quits at this tick too, before that tick's inputs).
            if self.interrupt:
                self._quit("interrupted (Ctrl-C)")
            elif self.viewer is not None and not self.viewer.is_running():
                self._quit("window closed")
            if self.quit and hasattr(self.device, "mark_quit"):
                self.device.mark_quit(self.tick_index, self.quit_reason)
        if not self.policy_mode and self.episode_over and not self.quit:
            self.begin_episode()
        if self.driver == "policy":
            self.device.halt()  # motion keys pressed while the policy drives do not pile up for a takeover
        cmd = self.device.poll(self.tick_index) if not self.quit else Command()
        was_human = self.driver == "human"
        for ev in cmd.events:
            if self.episode_over and ev != "quit":
                continue  # the episode ended earlier in this tick; what follows belongs to no episode
            self._handle(ev)
        result: tuple[dict, float, bool, bool, dict] = (self.obs, 0.0, False, True, self.info)
        # The tick of a handback is still the operator's: the policy's action for it was planned before.
        human = self.driver == "human" or was_human
        can_step = not self.episode_over and self.state == RECORDING and (human or policy_action is not None)
        if can_step:
            if human:
                action = self.control.action(cmd.twist)
            else:
                action = np.clip(np.asarray(policy_action, dtype=np.float64), self.control.low,
                                 self.control.high).astype(np.float32)
                self.control.follow(action)
            before = self.obs
            if self._mj_data is not None:
                self._mj_data.xfrc_applied[:] = 0.0  # the viewer's mouse perturbation is not the operator's action
            obs, reward, terminated, truncated, info = self.env.step(action)
            for k, v in before.items():
                self._rows.setdefault(k, []).append(np.array(v))
            self._actions.append(np.asarray(action, dtype=self.env.action_space.dtype))
            self._rewards.append(float(reward))
            self._flags.append(human)
            self.obs, self.info = obs, dict(info)
            self._success = self._success or bool(info.get("success", False))
            result = (obs, float(reward), bool(terminated), bool(truncated), self.info)
            if terminated or truncated:
                self.state = DONE
                self.done_reason = "success" if info.get("success", False) else "time limit"
                if self.autosave:
                    self._handle("save")
                else:
                    self._say(f"episode over ({self.done_reason}, {self.recorded_steps} steps): F8 saves, "
                              f"Delete discards")
        if self.viewer is not None:
            self.viewer.update(self.overlay())
        self.tick_index += 1
        self._tick_work.append(time.perf_counter() - t0)
        return result

    # ------------------------------------------------------------------ display
    def overlay(self) -> list[tuple[str, str, str]]:
        """What the viewer shows: (corner, left column, right column)."""
        if self.state == RECORDING:
            state = "RECORDING"
        elif self.state == DONE:
            state = f"DONE ({self.done_reason}): F8 save, Del discard"
        else:
            state = "READY: Enter starts recording"
        n = self.recorded_steps
        driver = self.driver
        if self.policy_mode:
            driver = "OPERATOR (F10 hands back)" if self.driver == "human" else "policy (F9 takes over)"
        labels = ["State", "Saved episodes", "Episode length", "Success", "Driver", "Device", "Scene (seed)"]
        values = [state, str(self.saved), f"{n} steps ({n / self.fps:.1f} s)",
                  "yes" if self.info.get("success", False) else "no", driver, self.device_label, str(self.seed)]
        if self.control.has_gripper:
            labels.append("Gripper")
            values.append(self.control.status())
        keys = [("Enter", "start"), ("F8", "save"), ("Del", "discard"), ("PgDn", "new scene"), ("Esc", "quit")]
        if self.policy_mode:
            keys += [("F9", "take over"), ("F10", "hand back")]
        keys.append(("arrows", "move"))
        if self.control.has_vertical:
            keys.append(("Home/End", "up / down"))
        keys.append(("Space", "stop"))
        if self.control.has_rotation:
            keys.append(("7/6", "yaw"))
        if self.control.has_tilt:
            keys.append(("9/8, F11/F12", "pitch, roll"))
        if self.control.has_gripper:
            keys.append(("Insert", "gripper"))
        texts = [("topleft", "\n".join(labels), "\n".join(values)),
                 ("bottomleft", "\n".join(k for k, _ in keys), "\n".join(v for _, v in keys))]
        if self.message:
            texts.append(("topright", self.message, ""))
        return texts

    # ------------------------------------------------------------------ report
    def summary(self) -> dict[str, Any]:
        starts = np.asarray(self._tick_starts)
        work = np.asarray(self._tick_work) * 1e3
        hz = (len(starts) - 1) / (starts[-1] - starts[0]) if len(starts) > 1 and starts[-1] > starts[0] else None
        return {
            "episodes_saved": self.saved,
            "steps_saved": self.saved_steps,
            "episodes_discarded": self.discarded,
            "ticks": self.tick_index,
            "hz_achieved": round(float(hz), 2) if hz is not None else None,
            "tick_work_ms_p50": round(float(np.percentile(work, 50)), 3) if len(work) else None,
            "tick_work_ms_p99": round(float(np.percentile(work, 99)), 3) if len(work) else None,
            "quit_reason": self.quit_reason,
        }


class SessionEnv:
    """The session seen as an environment by the real-time runner: ``step(policy_action)`` is one session tick."""

    def __init__(self, session: TeleopSession) -> None:
        self.session = session
        self.action_space = session.env.action_space
        self.observation_space = session.env.observation_space
        self.unwrapped = getattr(session.env, "unwrapped", session.env)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        try:
            return self.session.begin_episode(seed)
        except BaseException as e:
            self.session.failure = e
            raise

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        try:
            return self.session.tick(action)
        except BaseException as e:
            self.session.failure = e
            raise


class Pacer:
    """Ticks on the runner's clocks (:mod:`robolearn.runtime.clock`: absolute deadlines, so lateness does not
    accumulate; a virtual clock that never waits when not ``realtime``, for replays). After a stall longer than a
    period (a slow save, a busy machine) it skips the missed ticks instead of rushing through them."""

    def __init__(self, period_s: float, realtime: bool) -> None:
        self.clock = RealClock(period_s) if realtime else VirtualClock(period_s)
        self.period_s = float(period_s)
        self.k = 0
        self.skipped = 0

    def wait(self) -> None:
        if self.k == 0:
            self.clock.start()
        late = self.clock.wait_tick(self.k)
        if late > self.period_s:
            skip = int(late // self.period_s)
            self.k += skip
            self.skipped += skip
        self.k += 1


def warm_up(policy: Any, obs: dict[str, np.ndarray]) -> float:
    """One inference on ``obs`` before the session starts, so that the first chunk of the first episode is not
    also torch's first call (seconds on a CPU, during which the window would not move). Returns seconds."""
    from robolearn.policies.executor import ChunkExecutor

    executor = ChunkExecutor(policy, 1)
    executor.reset_env(0, obs)
    t0 = time.perf_counter()
    executor.compute(executor.request([0]))
    policy.reset()
    return time.perf_counter() - t0


def _on_worker_thread(session: TeleopSession, loop: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``loop`` on a thread of its own while the calling (main) thread only waits, turning Ctrl-C into a quit
    at the next tick.

    Why not on the main thread: with MuJoCo's passive viewer open, work on the main thread ran much slower here
    (torch inference 25 times: 4 s instead of 0.15 s for the same chunk; robosuite steps about 3 times), measured
    repeatedly with mujoco 3.9 under Xvfb, while the same calls on any other thread were unaffected.
    """
    result: dict[str, Any] = {}
    failure: list[BaseException] = []
    done = threading.Event()

    def body() -> None:
        try:
            result.update(loop())
        except BaseException as e:  # handed to the main thread
            failure.append(e)
        finally:
            done.set()

    worker = threading.Thread(target=body, name="robolearn-teleop", daemon=True)
    worker.start()
    interrupted = False
    # Waiting on an Event, not on Thread.join: a KeyboardInterrupt inside join() can leave is_alive() False while
    # the thread still runs (CPython 3.11), and then the store would be closed under a writing session.
    while not done.is_set():
        try:
            done.wait(0.1)
        except KeyboardInterrupt:
            interrupted = True
            session.interrupt = True
    worker.join()
    if failure:
        raise failure[0]
    if interrupted:
        result["interrupted"] = True
    return result


def run_teleop(session: TeleopSession, rate_hz: float, realtime: bool) -> dict[str, Any]:
    """Plain teleoperation until quit (key, closed window, end of a replay, ``episodes=`` reached) or Ctrl-C."""

    def loop() -> dict[str, Any]:
        pacer = Pacer(1.0 / rate_hz, realtime)
        while not session.quit:
            pacer.wait()
            session.tick()
        return {**session.summary(), "skipped_ticks": pacer.skipped, "interrupted": False}

    return _on_worker_thread(session, loop)


def run_intervention(session: TeleopSession, policy: Any, rate_hz: float, realtime: bool, *, mode: str = "async",
                     latency_s: float | None = None, blend: str = "none") -> dict[str, Any]:
    """Intervention mode: the runner executes ``policy`` on :class:`SessionEnv` (its clock, asynchronous
    inference and action queue); between episodes, while an ended one waits for save or discard, the session
    ticks on its own."""
    from robolearn.runtime.runner import Runner

    def loop() -> dict[str, Any]:
        runner = Runner(policy, SessionEnv(session), rate_hz=rate_hz, mode=mode, blend=blend, realtime=realtime,
                        latency_s=latency_s, status=False)
        session.on_handback = runner.request_replan  # no stale chunk after a handback
        pacer = Pacer(1.0 / rate_hz, realtime)
        misses = dropped = replans = 0
        latencies: list[float] = []
        while not session.quit:
            if session.episode_over:
                report = runner.run(episodes=1, seed=session.next_seed)
                if session.failure is not None:
                    raise session.failure
                if report.get("error"):
                    raise TeleopError(str(report["error"]))
                misses += int(report.get("deadline_misses") or 0)
                replans += sum(int(e.get("replans") or 0) for e in report.get("per_episode") or [])
                dropped += int(report.get("actions_dropped") or 0)
                if report.get("latency_ms_p50") is not None:
                    latencies.append(float(report["latency_ms_p50"]))
            else:
                pacer.wait()
                session.tick()
        return {**session.summary(), "skipped_ticks": pacer.skipped, "interrupted": False, "mode": mode,
                "latency_s": latency_s, "deadline_misses": misses, "actions_dropped": dropped, "replans": replans,
                "latency_ms_p50": round(float(np.median(latencies)), 3) if latencies else None}

    return _on_worker_thread(session, loop)
