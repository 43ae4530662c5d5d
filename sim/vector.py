"""Vectorized environments: several environments per worker process, stepped in a loop.

Why not ``gymnasium.vector.AsyncVectorEnv``: it runs exactly one environment per process. On a small machine with
many cheap environments, a process per environment wastes memory (each robosuite process is ~300 MB) and pays a
pipe round trip per environment per step. Here ``num_workers`` processes each hold ``num_envs / num_workers``
environments and answer one message per step with their slice of the batch already stacked.

API (gymnasium-vector-like)::

    venv = make_vector_env("lift", num_envs=8, num_workers=2, seed=0)
    obs, infos = venv.reset()                     # obs: dict key -> array (num_envs, ...)
    obs, rew, terminated, truncated, infos = venv.step(actions)   # actions: (num_envs, action_dim)
    venv.close()

**Autoreset: same step.** When an environment's episode ends in ``step`` (terminated or truncated), it is reset at
once: the returned ``obs`` row is the *first* observation of the next episode, and the episode's last observation
is in ``infos["final_obs"][i]`` (a dict; ``None`` for environments that did not finish, ``infos["_final_obs"]`` is
the mask). ``rew``, ``terminated``, ``truncated`` and ``infos["success"]`` describe the step just taken, i.e. the
end of the finished episode. ``infos["episode_return"]`` / ``infos["episode_length"]`` hold the finished
episode's totals where ``_final_obs`` is set (0 elsewhere). This is gymnasium's ``AutoresetMode.SAME_STEP``: unlike
next-step autoreset there is no dead step whose action is ignored, so every action a collector sends counts.

**Seeding.** ``reset(seed=s)`` seeds environment ``i`` with ``s + i``; ``reset()`` with no seed uses the seed given
to :func:`make_vector_env` on the first call and continues each environment's own stream afterwards, so a run is
reproducible end to end from one integer. Autoresets continue those streams too.

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
from gymnasium.vector.utils import batch_space

EnvSpec = str | Callable[..., gym.Env]


def _make_env(spec: EnvSpec, overrides: dict[str, Any]) -> gym.Env:
    if callable(spec):
        return spec(**overrides)
    from sim.registry import make

    return make(spec, **overrides)


def _stack(dicts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([d[k] for d in dicts]) for k in dicts[0]}


class _EnvGroup:
    """The environments one worker owns, and the commands it answers (shared by subprocess and in-process use)."""

    def __init__(self, spec: EnvSpec, overrides: dict[str, Any], n: int) -> None:
        self.envs = [_make_env(spec, overrides) for _ in range(n)]
        self.returns = np.zeros(n)
        self.lengths = np.zeros(n, dtype=np.int64)

    def spaces(self) -> tuple[gym.Space, gym.Space]:
        return self.envs[0].observation_space, self.envs[0].action_space

    def reset(self, seeds: Sequence[int | None]) -> tuple[dict[str, np.ndarray], list[dict]]:
        out = [env.reset(seed=None if s is None else int(s)) for env, s in zip(self.envs, seeds)]
        self.returns[:] = 0.0
        self.lengths[:] = 0
        return _stack([o for o, _ in out]), [i for _, i in out]

    def step(self, actions: np.ndarray):
        obs, rews, terms, truncs, infos = [], [], [], [], []
        for i, (env, a) in enumerate(zip(self.envs, actions)):
            o, r, te, tr, info = env.step(a)
            self.returns[i] += r
            self.lengths[i] += 1
            info = dict(info)
            if te or tr:
                info["final_obs"] = o
                info["episode_return"] = float(self.returns[i])
                info["episode_length"] = int(self.lengths[i])
                self.returns[i] = 0.0
                self.lengths[i] = 0
                o, _ = env.reset()
            obs.append(o)
            rews.append(r)
            terms.append(te)
            truncs.append(tr)
            infos.append(info)
        return _stack(obs), np.asarray(rews, np.float64), np.asarray(terms, bool), np.asarray(truncs, bool), infos

    def call(self, name: str, args: tuple, kwargs: dict) -> list[Any]:
        out = []
        for env in self.envs:
            attr = getattr(env.unwrapped if not hasattr(env, name) else env, name)
            out.append(attr(*args, **kwargs) if callable(attr) else attr)
        return out

    def close(self) -> None:
        for env in self.envs:
            env.close()


def _worker(conn, spec: EnvSpec, overrides: dict[str, Any], n: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    group = None
    try:
        group = _EnvGroup(spec, overrides, n)
        conn.send(("ok", group.spaces()))
        while True:
            cmd, payload = conn.recv()
            if cmd == "close":
                conn.send(("ok", None))
                break
            try:
                if cmd == "reset":
                    result = group.reset(payload)
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


class VectorEnv:
    """``num_envs`` environments split over ``num_workers`` processes (``0``: all in this process)."""

    def __init__(
        self,
        task: EnvSpec,
        num_envs: int,
        num_workers: int | None = None,
        seed: int | None = 0,
        context: str = "spawn",
        timeout: float | None = 300.0,
        **overrides: Any,
    ) -> None:
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
        self._first_reset = True
        self._closed = False
        self._conns: list[Any] = []
        self._procs: list[mp.process.BaseProcess] = []
        if num_workers == 0:
            self._local: _EnvGroup | None = _EnvGroup(task, overrides, num_envs)
            self._sizes = [num_envs]
            obs_space, act_space = self._local.spaces()
        else:
            self._local = None
            base, extra = divmod(num_envs, num_workers)
            self._sizes = [base + (1 if w < extra else 0) for w in range(num_workers)]
            ctx = mp.get_context(context)
            for w, n in enumerate(self._sizes):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(child, task, overrides, n), daemon=True, name=f"vecenv-{w}")
                proc.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(proc)
            try:
                obs_space, act_space = self._recv_all()[0]
            except Exception:
                self.close()
                raise
        self.single_observation_space: gym.Space = obs_space
        self.single_action_space: gym.Space = act_space
        self.observation_space = batch_space(obs_space, num_envs)
        self.action_space = batch_space(act_space, num_envs)

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
                if self._closed:
                    raise
                first_err = first_err or e
                results.append(None)
        if first_err is not None:
            raise first_err
        return results

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("vector env is closed")

    def _split(self, rows: Sequence[Any] | np.ndarray) -> list[Any]:
        out, start = [], 0
        for n in self._sizes:
            out.append(rows[start : start + n])
            start += n
        return out

    # -- API ----------------------------------------------------------------------------------------------------
    def reset(self, *, seed: int | Sequence[int] | None = None, options: dict | None = None):
        """Reset all environments; returns ``(obs, infos)`` with ``infos["success"]`` of shape ``(num_envs,)``."""
        self._check_open()
        if seed is None and self._first_reset:
            seed = self._seed
        self._first_reset = False
        if seed is None:
            seeds: list[int | None] = [None] * self.num_envs
        elif isinstance(seed, (int, np.integer)):
            seeds = [int(seed) + i for i in range(self.num_envs)]
        else:
            seeds = [None if s is None else int(s) for s in seed]
            if len(seeds) != self.num_envs:
                raise ValueError(f"got {len(seeds)} seeds for {self.num_envs} environments")
        parts = self._run("reset", self._split(seeds))
        obs = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
        infos_list = [i for p in parts for i in p[1]]
        return obs, self._merge_infos(infos_list)

    def step(self, actions: np.ndarray):
        """Step every environment once (same-step autoreset, see the module docstring)."""
        self._check_open()
        actions = np.asarray(actions)
        if actions.shape[0] != self.num_envs:
            raise ValueError(f"actions has {actions.shape[0]} rows for {self.num_envs} environments")
        parts = self._run("step", self._split(actions))
        obs = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
        rew = np.concatenate([p[1] for p in parts])
        term = np.concatenate([p[2] for p in parts])
        trunc = np.concatenate([p[3] for p in parts])
        infos_list = [i for p in parts for i in p[4]]
        return obs, rew, term, trunc, self._merge_infos(infos_list)

    def call(self, name: str, *args: Any, **kwargs: Any) -> list[Any]:
        """``getattr(env, name)(*args, **kwargs)`` (or the attribute itself) for every environment, in order."""
        self._check_open()
        parts = self._run("call", [(name, args, kwargs)] * max(1, self.num_workers))
        return [x for p in parts for x in p]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
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
    def _run(self, cmd: str, payloads: list[Any]) -> list[Any]:
        if self._local is not None:
            group = self._local
            if cmd == "reset":
                return [group.reset(payloads[0])]
            if cmd == "step":
                return [group.step(payloads[0])]
            return [group.call(*payloads[0])]
        for w, p in enumerate(payloads):
            self._send(w, (cmd, p))
        return self._recv_all()

    def _merge_infos(self, infos: list[dict]) -> dict[str, Any]:
        n = self.num_envs
        out: dict[str, Any] = {}
        done = np.array(["final_obs" in i for i in infos], dtype=bool)
        final_obs = np.empty(n, dtype=object)
        final_obs[:] = [i.get("final_obs") for i in infos]
        out["final_obs"], out["_final_obs"] = final_obs, done
        out["episode_return"] = np.array([i.get("episode_return", 0.0) for i in infos], dtype=np.float64)
        out["episode_length"] = np.array([i.get("episode_length", 0) for i in infos], dtype=np.int64)
        keys = {k for i in infos for k in i} - {"final_obs", "episode_return", "episode_length"}
        for k in sorted(keys):
            vals = [i.get(k) for i in infos]
            if all(isinstance(v, (bool, np.bool_)) for v in vals):
                out[k] = np.array(vals, dtype=bool)
            elif all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in vals):
                out[k] = np.array(vals)
            else:
                arr = np.empty(n, dtype=object)
                arr[:] = vals
                out[k] = arr
        return out


def make_vector_env(
    task: EnvSpec,
    num_envs: int,
    num_workers: int | None = None,
    seed: int | None = 0,
    **overrides: Any,
) -> VectorEnv:
    """``num_envs`` copies of ``task`` (a registry name such as ``"lift"``, or a picklable factory) in
    ``num_workers`` subprocesses (default: one per core, at most ``num_envs``; ``0``: in this process).

    ``overrides`` go to every environment (``sim.make(task, **overrides)``); ``context`` (default ``"spawn"``) and
    ``timeout`` (seconds per reply, default 300) are also accepted.
    """
    return VectorEnv(task, num_envs, num_workers=num_workers, seed=seed, **overrides)
