"""Vectorized environments: several environments per worker process, stepped in a loop.

Why not ``gymnasium.vector.AsyncVectorEnv``: it runs exactly one environment per process. On a small machine with
many cheap environments, a process per environment wastes memory (each robosuite process is ~300 MB) and pays a
pipe round trip per environment per step. Here ``num_workers`` processes each hold ``num_envs / num_workers``
environments and answer one message per step with their slice of the batch already stacked.

API: :class:`VectorEnv` is a ``gymnasium.vector.VectorEnv`` and follows gymnasium 1.4's contract as
``gymnasium.vector.SyncVectorEnv`` implements it, so code written against gymnasium vector environments runs
unchanged (``num_envs``, ``single_observation_space``, ``single_action_space``, ``observation_space``,
``action_space``, ``metadata["autoreset_mode"]``)::

    venv = make_vector_env("lift", num_envs=8, num_workers=2, seed=0)
    obs, infos = venv.reset()                     # obs: dict key -> array (num_envs, ...)
    obs, rew, terminated, truncated, infos = venv.step(actions)   # actions: (num_envs, action_dim)
    venv.close()

**Infos** are gymnasium's dict of arrays, built with gymnasium's own ``VectorEnv._add_info``: for every key an
environment reported, ``infos[key]`` has one row per environment and ``infos["_" + key]`` (bool, ``(num_envs,)``)
says which rows are set; a nested dict is laid out the same way, recursively. ``reset`` reports the reset
environments' reset infos.

**Autoreset** (``autoreset_mode=``, a ``gymnasium.vector.AutoresetMode`` or its string value):

- ``SAME_STEP`` (default, ``"SameStep"``): when an environment's episode ends in ``step`` (terminated or
  truncated) it is reset at once. The returned ``obs`` row is the *first* observation of the next episode;
  ``rew``, ``terminated`` and ``truncated`` describe the step just taken. ``infos["final_obs"]`` (object array,
  mask ``infos["_final_obs"]``) holds the finished episode's last observation and ``infos["final_info"]`` the
  finished step's info, nested as above (``infos["final_info"]["success"]``, ``["_success"]``, ...). The
  top-level keys of a finished environment are its *reset's* info, as in gymnasium: read the end of the episode
  (e.g. its success) from ``final_info``, not from ``infos["success"]``.
- ``DISABLED`` (``"Disabled"``): ``step`` never resets. A finished environment's row is its last observation and
  its top-level infos the finished step's info; reset it with
  ``reset(seed=[...], options={"reset_mask": mask})`` before the next ``step``, which otherwise raises a
  ``RuntimeError`` naming it (gymnasium asserts after stepping the environments before it; here nothing is
  stepped).
- ``NEXT_STEP`` is refused: it spends the step after an episode ends on a reset and ignores that step's action,
  and every action a collector or evaluator sends should count.

Ours, not gymnasium's: where an episode ended in this ``step`` (``_final_obs`` under ``SAME_STEP``, ``terminated |
truncated`` under ``DISABLED``), ``infos["episode_return"]`` (float) and ``infos["episode_length"]`` (int) hold its
totals, masks ``_episode_return`` / ``_episode_length``; the keys are absent when no episode ended.

**Partial reset.** ``reset(options={"reset_mask": mask, ...})`` (``np.bool_`` array of shape ``(num_envs,)``, at
least one ``True``; the same checks and error types as gymnasium) resets only the masked environments and returns
the whole batch: unmasked rows are the observations last returned; infos hold only the masked environments'.
Other option keys go to every reset environment's ``reset(options=...)`` (``options`` is not passed at all when
there are none, so environments whose ``reset`` takes no ``options`` keep working).

**Seeding.** ``reset(seed=s)`` seeds environment ``i`` with ``s + i``; a list gives one seed (or ``None``) per
environment (entries of unmasked environments are ignored). ``reset()`` with no seed seeds an environment that was
never reset with the seed given to :func:`make_vector_env` plus its index, and continues each environment's own
stream afterwards, so a run is reproducible end to end from one integer. Autoresets continue those streams too.

**Failures.** An exception inside a worker comes back as a ``RuntimeError`` carrying the worker's traceback; a
worker that dies (killed, segfault) gives a ``RuntimeError`` naming it and its exit code; no call waits forever
(``timeout`` seconds per reply, default 300).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from gymnasium.vector import VectorEnv as GymVectorEnv
from gymnasium.vector.utils import batch_space, concatenate, create_empty_array, iterate

EnvSpec = str | Callable[..., gym.Env]

SUPPORTED_AUTORESET_MODES = (AutoresetMode.SAME_STEP, AutoresetMode.DISABLED)
# Worker processes start with "spawn": each re-imports the main script, so a script that makes a vector env (or
# runs robolearn's evaluation with workers) at its top level starts it again in every worker, which Python refuses.
MAIN_GUARD_HINT = ("If this came from a script of yours: put the code that makes the vector env (or calls evaluation "
                   "with workers) under `if __name__ == \"__main__\":` -- every worker process re-imports the main "
                   "script -- or pass num_workers=0 to keep the environments in this process.")


def _make_env(spec: EnvSpec, overrides: dict[str, Any]) -> gym.Env:
    if callable(spec):
        return spec(**overrides)
    from sim.registry import make

    return make(spec, **overrides)


def _autoreset_mode(mode: str | AutoresetMode) -> AutoresetMode:
    supported = " and ".join(f"AutoresetMode.{m.name} ({m.value!r})" for m in SUPPORTED_AUTORESET_MODES)
    try:
        mode = mode if isinstance(mode, AutoresetMode) else AutoresetMode(mode)
    except ValueError:
        raise ValueError(f"unknown autoreset_mode {mode!r}; sim.vector supports {supported}") from None
    if mode not in SUPPORTED_AUTORESET_MODES:
        raise ValueError(
            f"autoreset_mode {mode} is not supported; sim.vector supports {supported}. Next-step autoreset spends "
            "the step after an episode ends on a reset and ignores that step's action; here every action sent "
            "counts. Use SAME_STEP (the last observation is in infos['final_obs']) or DISABLED (reset finished "
            "environments with reset(options={'reset_mask': mask}))."
        )
    return mode


def _cat(parts: Sequence[Any]) -> Any:
    """Join the workers' batched slices (dicts / tuples of arrays, as gymnasium batches them) along the env axis."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if isinstance(first, dict):
        return {k: _cat([p[k] for p in parts]) for k in first}
    if isinstance(first, tuple):
        return tuple(_cat([p[j] for p in parts]) for j in range(len(first)))
    return np.concatenate(parts)


class _EnvGroup:
    """The environments one worker owns, and the commands it answers (shared by subprocess and in-process use)."""

    def __init__(self, spec: EnvSpec, overrides: dict[str, Any], n: int, same_step: bool) -> None:
        self.envs = [_make_env(spec, overrides) for _ in range(n)]
        self.same_step = same_step
        self.obs_space = self.envs[0].observation_space

    def describe(self) -> tuple[gym.Space, gym.Space, dict[str, Any], str | None]:
        env = self.envs[0]
        return env.observation_space, env.action_space, dict(env.metadata), getattr(env, "render_mode", None)

    def reset(self, seeds: Sequence[int | None], mask: Sequence[bool], options: dict | None) -> list[tuple]:
        """``(obs, info)`` of each masked environment, in order."""
        kw = {} if options is None else {"options": options}
        return [
            env.reset(seed=None if s is None else int(s), **kw) for env, s, m in zip(self.envs, seeds, mask) if m
        ]

    def step(self, actions: np.ndarray):
        obs, rews, terms, truncs, infos, finals = [], [], [], [], [], []
        for env, a in zip(self.envs, actions):
            o, r, te, tr, info = env.step(a)
            final = None
            if self.same_step and (te or tr):
                final = (o, info)
                o, info = env.reset()
            obs.append(o)
            rews.append(r)
            terms.append(te)
            truncs.append(tr)
            infos.append(info)
            finals.append(final)
        batch = concatenate(self.obs_space, obs, create_empty_array(self.obs_space, n=len(obs), fn=np.zeros))
        return batch, np.asarray(rews, np.float64), np.asarray(terms, bool), np.asarray(truncs, bool), infos, finals

    def call(self, name: str, args: tuple, kwargs: dict) -> list[Any]:
        out = []
        for env in self.envs:
            attr = getattr(env.unwrapped if not hasattr(env, name) else env, name)
            out.append(attr(*args, **kwargs) if callable(attr) else attr)
        return out

    def close(self) -> None:
        for env in self.envs:
            env.close()


def _worker(conn, spec: EnvSpec, overrides: dict[str, Any], n: int, same_step: bool) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    group = None
    try:
        group = _EnvGroup(spec, overrides, n, same_step)
        conn.send(("ok", group.describe()))
        while True:
            cmd, payload = conn.recv()
            if cmd == "close":
                conn.send(("ok", None))
                break
            try:
                if cmd == "reset":
                    result = group.reset(*payload)
                elif cmd == "step":
                    result = group.step(payload)
                elif cmd == "call":
                    result = group.call(*payload)
                else:
                    raise ValueError(f"unknown command {cmd!r}")
                conn.send(("ok", result))
            except Exception:  # report and keep serving; the parent decides
                conn.send(("error", traceback.format_exc()))
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        pass
    except Exception:
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:
            pass
    finally:
        if group is not None:
            group.close()
        conn.close()


class VectorEnv(GymVectorEnv):
    """``num_envs`` environments split over ``num_workers`` processes (``0``: all in this process).

    A ``gymnasium.vector.VectorEnv`` with ``autoreset_mode`` ``SAME_STEP`` (default) or ``DISABLED``; see the module
    docstring for the contract.
    """

    def __init__(
        self,
        task: EnvSpec,
        num_envs: int,
        num_workers: int | None = None,
        seed: int | None = 0,
        context: str = "spawn",
        timeout: float | None = 300.0,
        autoreset_mode: str | AutoresetMode = AutoresetMode.SAME_STEP,
        **overrides: Any,
    ) -> None:
        self._local: _EnvGroup | None = None
        self._conns: list[Any] = []
        self._procs: list[mp.process.BaseProcess] = []
        self.closed = False
        self.autoreset_mode = _autoreset_mode(autoreset_mode)
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if num_workers is None:
            num_workers = min(num_envs, os.cpu_count() or 1)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        num_workers = min(num_workers, num_envs)
        self.num_envs = num_envs
        self.num_workers = num_workers
        self.timeout = timeout
        self._seed = seed
        self._never_reset = np.ones(num_envs, dtype=bool)  # these get the construction seed on a seedless reset
        same_step = self.autoreset_mode == AutoresetMode.SAME_STEP
        if num_workers == 0:
            self._local = _EnvGroup(task, overrides, num_envs, same_step)
            self._sizes = [num_envs]
            obs_space, act_space, metadata, render_mode = self._local.describe()
        else:
            base, extra = divmod(num_envs, num_workers)
            self._sizes = [base + (1 if w < extra else 0) for w in range(num_workers)]
            ctx = mp.get_context(context)
            for w, n in enumerate(self._sizes):
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=_worker, args=(child, task, overrides, n, same_step), daemon=True, name=f"vecenv-{w}"
                )
                proc.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(proc)
            try:
                obs_space, act_space, metadata, render_mode = self._recv_all()[0]
            except Exception as e:
                self.close()
                if "died" in str(e) and context != "fork":
                    raise RuntimeError(f"{e}\n{MAIN_GUARD_HINT}") from None
                raise
        self.metadata = {**metadata, "autoreset_mode": self.autoreset_mode}
        self.render_mode = render_mode
        self.single_observation_space: gym.Space = obs_space
        self.single_action_space: gym.Space = act_space
        self.observation_space = batch_space(obs_space, num_envs)
        self.action_space = batch_space(act_space, num_envs)
        self._obs = create_empty_array(obs_space, n=num_envs, fn=np.zeros)  # last batch returned
        self._returns = np.zeros(num_envs, dtype=np.float64)
        self._lengths = np.zeros(num_envs, dtype=np.int64)
        self._needs_reset = np.zeros(num_envs, dtype=bool)  # episode ended under DISABLED, not reset yet

    # -- transport ----------------------------------------------------------------------------------------------
    def _dead(self, w: int, why: str) -> RuntimeError:
        proc = self._procs[w]
        proc.join(timeout=1.0)
        code = proc.exitcode
        return RuntimeError(
            f"vector env worker {w} (pid {proc.pid}) {why}; exit code {code}. The other workers are closed; make a new "
            "vector env."
        )

    def _send(self, w: int, msg: tuple) -> None:
        try:
            self._conns[w].send(msg)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError) as e:
            err = self._dead(w, f"is gone ({type(e).__name__})")
            self.close()
            raise err from None

    def _recv(self, w: int) -> Any:
        conn, proc = self._conns[w], self._procs[w]
        try:
            waited = 0.0
            while not conn.poll(1.0):
                waited += 1.0
                if not proc.is_alive():
                    raise EOFError
                if self.timeout is not None and waited >= self.timeout:
                    err = RuntimeError(f"vector env worker {w} (pid {proc.pid}) did not answer in {self.timeout} s")
                    self.close()
                    raise err
            status, payload = conn.recv()
        except (EOFError, ConnectionResetError, BrokenPipeError, OSError):
            err = self._dead(w, "died")
            self.close()
            raise err from None
        if status == "error":
            raise RuntimeError(f"vector env worker {w} raised:\n{payload}")
        return payload

    def _recv_all(self) -> list[Any]:
        results, first_err = [], None
        for w in range(len(self._conns)):
            try:
                results.append(self._recv(w))
            except RuntimeError as e:  # drain the others so the pipes stay in step
                if self.closed:
                    raise
                first_err = first_err or e
                results.append(None)
        if first_err is not None:
            raise first_err
        return results

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("vector env is closed")

    def _split(self, rows: Sequence[Any] | np.ndarray) -> list[Any]:
        out, start = [], 0
        for n in self._sizes:
            out.append(rows[start : start + n])
            start += n
        return out

    # -- API ----------------------------------------------------------------------------------------------------
    def reset(self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None):
        """Reset all environments, or those in ``options["reset_mask"]``; returns ``(obs, infos)`` (module docstring).

        ``options`` is not modified (gymnasium's ``SyncVectorEnv`` pops ``"reset_mask"`` from it).
        """
        self._check_open()
        n = self.num_envs
        if seed is None:
            seeds: list[int | None] = [None] * n
        elif isinstance(seed, (int, np.integer)):
            seeds = [int(seed) + i for i in range(n)]
        else:
            seeds = [None if s is None else int(s) for s in seed]
            if len(seeds) != n:
                raise ValueError(
                    f"If seeds are passed as a list the length must match num_envs={n} but got length={len(seeds)}."
                )
        env_options = None if options is None else dict(options)
        if env_options is not None and "reset_mask" in env_options:
            mask = env_options.pop("reset_mask")
            if not isinstance(mask, np.ndarray):
                raise TypeError(f"`options['reset_mask']` must be a numpy array, got {type(mask)}")
            if mask.shape != (n,):
                raise ValueError(f"`options['reset_mask']` must have shape `({n},)`, got {mask.shape}")
            if mask.dtype != np.bool_:
                raise TypeError(f"`options['reset_mask']` must have `dtype=np.bool_`, got {mask.dtype}")
            if not np.any(mask):
                raise ValueError(
                    "`options['reset_mask']` must contain a boolean array with at least one True value, got "
                    f"reset_mask={mask}"
                )
            mask = mask.copy()
            env_options = env_options or None
        else:
            mask = np.ones(n, dtype=bool)
        if seed is None and self._seed is not None:
            seeds = [self._seed + i if self._never_reset[i] else None for i in range(n)]
        seeds = [s if m else None for s, m in zip(seeds, mask)]
        parts = self._run("reset", [(s, m, env_options) for s, m in zip(self._split(seeds), self._split(mask))])
        results = [r for p in parts for r in p]
        index = np.flatnonzero(mask)
        if len(index) == n:
            rows = [o for o, _ in results]
        else:
            rows = list(iterate(self.observation_space, self._obs))
            for i, (o, _) in zip(index, results):
                rows[i] = o
        self._obs = concatenate(
            self.single_observation_space, rows, create_empty_array(self.single_observation_space, n=n, fn=np.zeros)
        )
        self._never_reset[mask] = False
        self._needs_reset[mask] = False
        self._returns[mask] = 0.0
        self._lengths[mask] = 0
        infos: dict[str, Any] = {}
        for i, (_, info) in zip(index, results):
            infos = self._add_info(infos, info, int(i))
        return self._copy_obs(), infos

    def step(self, actions: np.ndarray):
        """Step every environment once; autoreset as ``autoreset_mode`` says (see the module docstring)."""
        self._check_open()
        actions = np.asarray(actions)
        if actions.shape[0] != self.num_envs:
            raise ValueError(f"actions has {actions.shape[0]} rows for {self.num_envs} environments")
        if self._needs_reset.any():
            idx = np.flatnonzero(self._needs_reset).tolist()
            raise RuntimeError(
                f"environment(s) {idx} finished their episode and autoreset_mode is DISABLED: reset them with "
                f"reset(options={{'reset_mask': mask}}) before the next step (nothing was stepped)"
            )
        parts = self._run("step", self._split(actions))
        obs = _cat([p[0] for p in parts])
        rew = np.concatenate([p[1] for p in parts])
        term = np.concatenate([p[2] for p in parts])
        trunc = np.concatenate([p[3] for p in parts])
        step_infos = [i for p in parts for i in p[4]]
        finals = [f for p in parts for f in p[5]]
        self._obs = obs
        done = term | trunc
        self._returns += rew
        self._lengths += 1
        infos: dict[str, Any] = {}
        for i in range(self.num_envs):
            if done[i]:
                totals = {"episode_return": float(self._returns[i]), "episode_length": int(self._lengths[i])}
                self._returns[i], self._lengths[i] = 0.0, 0
                if finals[i] is not None:  # SAME_STEP: step_infos[i] is already the reset's info
                    final_obs, final_info = finals[i]
                    infos = self._add_info(infos, {"final_obs": final_obs, "final_info": final_info, **totals}, i)
                    infos = self._add_info(infos, step_infos[i], i)
                else:
                    infos = self._add_info(infos, step_infos[i], i)
                    infos = self._add_info(infos, totals, i)
            else:
                infos = self._add_info(infos, step_infos[i], i)
        if self.autoreset_mode == AutoresetMode.DISABLED:
            self._needs_reset = done.copy()
        return self._copy_obs(), rew, term, trunc, infos

    def call(self, name: str, *args: Any, **kwargs: Any) -> list[Any]:
        """``getattr(env, name)(*args, **kwargs)`` (or the attribute itself) for every environment, in order."""
        self._check_open()
        parts = self._run("call", [(name, args, kwargs)] * max(1, self.num_workers))
        return [x for p in parts for x in p]

    def get_attr(self, name: str) -> tuple[Any, ...]:
        """Attribute ``name`` of every environment, as gymnasium's vector envs give it."""
        return tuple(self.call(name))

    def close(self, **kwargs: Any) -> None:
        if self.closed:
            return
        self.closed = True
        if self._local is not None:
            self._local.close()
            return
        for conn, proc in zip(self._conns, self._procs):
            try:
                if proc.is_alive():
                    conn.send(("close", None))
            except Exception:
                pass
        for conn, proc in zip(self._conns, self._procs):
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=1.0)
            conn.close()

    def __enter__(self) -> "VectorEnv":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- internals ----------------------------------------------------------------------------------------------
    def _copy_obs(self) -> Any:
        return _copy_tree(self._obs)

    def _run(self, cmd: str, payloads: list[Any]) -> list[Any]:
        if self._local is not None:
            group = self._local
            if cmd == "reset":
                return [group.reset(*payloads[0])]
            if cmd == "step":
                return [group.step(payloads[0])]
            return [group.call(*payloads[0])]
        for w, p in enumerate(payloads):
            self._send(w, (cmd, p))
        return self._recv_all()


def _copy_tree(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _copy_tree(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_copy_tree(v) for v in x)
    return x.copy() if isinstance(x, np.ndarray) else x


def make_vector_env(
    task: EnvSpec,
    num_envs: int,
    num_workers: int | None = None,
    seed: int | None = 0,
    autoreset_mode: str | AutoresetMode = AutoresetMode.SAME_STEP,
    **overrides: Any,
) -> VectorEnv:
    """``num_envs`` copies of ``task`` (a registry name such as ``"lift"``, or a picklable factory) in
    ``num_workers`` subprocesses (default: one per core, at most ``num_envs``; ``0``: in this process).

    ``autoreset_mode`` is ``AutoresetMode.SAME_STEP`` (default) or ``AutoresetMode.DISABLED`` (see the module
    docstring). ``overrides`` go to every environment (``sim.make(task, **overrides)``); ``context`` (default
    ``"spawn"``) and ``timeout`` (seconds per reply, default 300) are also accepted.
    """
    return VectorEnv(
        task, num_envs, num_workers=num_workers, seed=seed, autoreset_mode=autoreset_mode, **overrides
    )
