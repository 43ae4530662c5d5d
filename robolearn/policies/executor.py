"""The one chunk executor: how any chunk policy is run in one or many environments.

Evaluation rollouts, the real-time runner (which keeps its clocks, deadlines, asynchronous inference, stale
dropping and ensembling on top), teleoperation's intervention mode (through the runner) and the RL fine-tuning
code all drive policies through :class:`ChunkExecutor`. Per environment it keeps:

- the observation history: the last ``n_obs_steps`` frames, the first frame repeated after a reset (as the
  training windows pad episode starts);
- the queue of executable actions: ``chunk[n_obs_steps-1 : n_obs_steps-1+n_action_steps]`` of the newest chunk
  (:func:`executable`; the chunk's step ``n_obs_steps - 1`` is the newest observation's);
- the episode it is in and how many chunks that episode has drawn, which seed the chunk's noise.

Every environment whose queue ran out gets its chunk from one batched ``predict_action`` call (or, with
``batch_invariant=True``, one call per environment: batched matrix products round differently with the batch size
-- up to 4e-6 on the U-Net here -- and a closed-loop rollout can amplify that, so evaluation asks for results that do
not depend on how many environments share a call).

Reproducible noise: chunk ``c`` of episode ``e`` in a run seeded ``s`` starts from :func:`chunk_noise` ``(s, e,
c)``, so the same policy, seed and episode give the same chunks whatever the number of environments, workers, or
which environment ran the episode. The runner and the fine-tuning code use the same rule.

Correction hook: ``corrector(obs, base_actions, env_ids) -> actions`` runs between "the base action for this step
is known" and "the environment steps" (a residual policy adds its correction there). ``obs`` holds each listed
environment's newest observation (every key the environment gave, not only the policy's), ``base_actions`` their
base actions ``(n, action_dim)``.

Non-finite numbers: an observation holding NaN or inf is refused (:class:`NonFiniteObservationError`, naming the
key); a chunk holding NaN or inf anywhere (e.g. NaN weights, or a huge observation that overflowed in
normalization) is never queued or executed: :meth:`ChunkExecutor.screen` counts it (``nonfinite_chunks``, and per
environment for its episode) and :meth:`ChunkExecutor.act` holds that environment's last action instead (zeros
when its episode has sent none yet) and lists it in ``refused``, so the caller decides what the episode becomes
(evaluation ends it as a failure; the runner holds, retries and stops after ``max_nonfinite_chunks``). A corrector
that returns NaN or inf raises :class:`NonFiniteChunkError`.

Episodes: ``policy.reset()`` is called when every environment resets at once (the protocol's ``reset`` has no
environment argument); the policies and wrappers here keep no per-episode state, so nothing else depends on it.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from robolearn.policies.config import ConfigError, check_geometry

Corrector = Callable[[dict[str, np.ndarray], np.ndarray, np.ndarray], np.ndarray]

# How a refused chunk's error message starts (the policy server sends it as ``"error: non-finite action chunk..."``,
# and the client turns that back into :class:`NonFiniteChunkError`).
NONFINITE_CHUNK = "non-finite action chunk"


class NonFiniteObservationError(ValueError):
    """An observation holds NaN or inf (the message names the key)."""


class NonFiniteChunkError(ValueError):
    """A policy (or corrector) produced NaN or inf actions; nothing of them may be executed."""


def check_finite_obs(key: str, a: np.ndarray) -> None:
    """Refuse a float observation holding NaN or inf, naming its key."""
    if a.dtype.kind in "fc" and not np.isfinite(a).all():
        bad = " and ".join(name for name, test in (("NaN", np.isnan), ("inf", np.isinf)) if test(a).any())
        raise NonFiniteObservationError(f"observation {key!r} is not finite (holds {bad}): refused")


def finite_rows(chunk: np.ndarray) -> np.ndarray:
    """Which chunks of a batch ``(n, horizon, A)`` hold only finite numbers."""
    c = np.asarray(chunk)
    return np.isfinite(c.reshape(c.shape[0], -1)).all(axis=1)


@runtime_checkable
class ChunkPredictor(Protocol):
    """What the executor needs from a policy: any object with these members works (a trained policy, a wrapper,
    a remote one, a test double). ``predict_action`` maps an observation history ``{key: (B, n_obs_steps, ...)}``
    and optional initial noise ``(B, horizon, action_dim)`` to an action chunk ``(B, horizon, action_dim)`` in raw
    action units. Optional extras read when present: ``obs_shapes`` (``{key: shape}``) and
    :meth:`WarmStartPredictor.predict_action_warm`."""

    horizon: int
    n_obs_steps: int
    n_action_steps: int
    action_dim: int
    obs_keys: Sequence[str]

    def predict_action(self, obs_history: Mapping[str, torch.Tensor],
                       noise: torch.Tensor | None = None) -> torch.Tensor: ...

    def reset(self) -> None: ...


@runtime_checkable
class WarmStartPredictor(ChunkPredictor, Protocol):
    """A policy that can start sampling from its previous chunk instead of pure noise (RTI-DP, Duan et al. 2025):

    ``prev_chunk`` (B, horizon, A) raw units is the chunk predicted ``shift`` control steps ago; the policy shifts
    it left by ``shift`` (padding the tail, e.g. by repeating the last action), noises it to the level of its
    last ``steps`` denoising steps with ``noise``, and runs only those. Returns (B, horizon, A) raw units.
    """

    def predict_action_warm(self, obs_history: Mapping[str, torch.Tensor], prev_chunk: torch.Tensor,
                            shift: int, steps: int, noise: torch.Tensor | None = None) -> torch.Tensor: ...


_MEMBERS = ("horizon", "n_obs_steps", "n_action_steps", "action_dim", "obs_keys", "predict_action", "reset")


def check_policy(policy: object, n_action_steps: int | None = None) -> None:
    """Fail early, naming what is missing or out of range, rather than deep inside a loop."""
    missing = [m for m in _MEMBERS if not hasattr(policy, m)]
    if missing:
        raise TypeError(f"{type(policy).__name__} is not a chunk policy: missing {missing}")
    n = policy.n_action_steps if n_action_steps is None else n_action_steps  # type: ignore[attr-defined]
    check_geometry(policy.horizon, policy.n_obs_steps, n, where=type(policy).__name__)  # type: ignore[attr-defined]


def executable_start(policy: Any) -> int:
    """Index in the chunk of the action for the newest observation's time."""
    return int(policy.n_obs_steps) - 1


def executable(chunk: Any, n_obs_steps: int, n_action_steps: int) -> Any:
    """The actions to execute now, ``chunk[:, n_obs_steps-1 : n_obs_steps-1+n_action_steps]`` (batch first)."""
    start = int(n_obs_steps) - 1
    return chunk[:, start:start + int(n_action_steps)]


def chunk_noise(seed: int, episode: int, chunk: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal initial noise (CPU, float32) for chunk ``chunk`` of episode ``episode`` of a run seeded
    ``seed``: a generator seeded from the three numbers through NumPy's SeedSequence (well mixed, so
    neighbouring seeds give unrelated noise)."""
    state = np.random.SeedSequence([int(seed) % 2**63, int(episode), int(chunk)]).generate_state(1, np.uint64)
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(state[0])))


def noise_shape(policy: Any, batch: int) -> tuple[int, ...]:
    shape = getattr(policy, "noise_shape", None)
    if callable(shape):
        return tuple(shape(batch))
    return (int(batch), int(policy.horizon), int(policy.action_dim))


class ObsHistory:
    """The last ``n`` observations of one environment (or one server connection), checked frame by frame."""

    def __init__(self, keys: Sequence[str], n: int, shapes: Mapping[str, Sequence[int]] | None = None) -> None:
        self.keys = list(keys)
        self.n = int(n)
        self.shapes = {k: tuple(int(s) for s in v) for k, v in shapes.items()} if shapes else None
        self._frames: deque[dict[str, np.ndarray]] = deque(maxlen=self.n)

    def __len__(self) -> int:
        return len(self._frames)

    def check_frame(self, obs: Mapping[str, object]) -> dict[str, np.ndarray]:
        """The policy's keys of ``obs`` as arrays (copied), with clear errors for missing keys / wrong shapes."""
        missing = [k for k in self.keys if k not in obs]
        if missing:
            raise KeyError(f"observation is missing key(s) {missing}; the policy needs {self.keys}")
        frame = {}
        for k in self.keys:
            a = np.array(obs[k])  # copy: the caller may reuse its buffers, and wire arrays are read-only
            if a.dtype.kind not in "biuf":
                raise TypeError(f"observation {k!r} must be numeric, got dtype {a.dtype}")
            want = self.shapes.get(k) if self.shapes else None
            if want is None and self._frames:
                want = self._frames[-1][k].shape
            if want is not None and a.shape != tuple(want):
                raise ValueError(f"observation {k!r} must have shape {tuple(want)}, got {a.shape}")
            check_finite_obs(k, a)
            frame[k] = a
        return frame

    def reset(self, obs: Mapping[str, object] | None = None) -> None:
        """Forget everything; with ``obs``, start from it (it fills the history until newer frames arrive)."""
        self._frames.clear()
        if obs is not None:
            self.push(obs)

    def push(self, obs: Mapping[str, object]) -> None:
        self._frames.append(self.check_frame(obs))

    def newest(self) -> dict[str, np.ndarray]:
        if not self._frames:
            raise RuntimeError("observation history is empty: push an observation first")
        return self._frames[-1]

    def stacked(self) -> dict[str, np.ndarray]:
        """``{key: (n, ...)}``, padded at the front with the oldest frame."""
        if not self._frames:
            raise RuntimeError("observation history is empty: push an observation first")
        frames = list(self._frames)
        frames = [frames[0]] * (self.n - len(frames)) + frames
        return {k: np.stack([f[k] for f in frames]) for k in self.keys}

    def batch(self) -> dict[str, torch.Tensor]:
        """``{key: (1, n, ...)}`` tensors, as ``predict_action`` takes them."""
        return {k: torch.from_numpy(v)[None] for k, v in self.stacked().items()}

    def state(self) -> list[dict[str, np.ndarray]]:
        return list(self._frames)

    def restore(self, frames: list[dict[str, np.ndarray]]) -> None:
        self._frames = deque(frames, maxlen=self.n)


@dataclass
class ChunkRequest:
    """One inference: the observation histories and noise of the listed environments, taken at request time so
    that the computation can run later or on another thread (the runner's asynchronous inference)."""

    env_ids: list[int]
    obs: dict[str, torch.Tensor]
    noise: torch.Tensor
    episodes: list[int]
    chunks: list[int]
    warm: tuple[torch.Tensor, int, int] | None = None  # (prev_chunk, shift, steps)


def takes_noise(method: Any) -> bool:
    """Whether a ``predict_action_warm`` accepts ``noise`` (policies written to the first runtime protocol take
    ``(obs_history, prev_chunk, shift, steps)`` only)."""
    import inspect

    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "noise" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


def check_chunk(out: Any, policy: Any, batch: int) -> np.ndarray:
    """A policy's output as a float32 ``(batch, horizon, action_dim)`` array, or an error naming the shape."""
    chunk = out.detach().float().cpu().numpy() if torch.is_tensor(out) else np.asarray(out, dtype=np.float32)
    want = (batch, int(policy.horizon), int(policy.action_dim))
    if chunk.shape != want:
        raise ValueError(f"{type(policy).__name__}.predict_action returned shape {chunk.shape}, expected {want}")
    return chunk


class ChunkExecutor:
    """Runs ``policy`` in ``num_envs`` environments (see the module docstring).

    ``seed``: the run's seed (noise rule). ``n_action_steps``: override the policy's (range-checked).
    ``corrector``: the per-step hook (default: the policy's own ``correct_actions``, when it has one: a per-step
    residual kind corrects itself wherever it runs). ``device``: where observation tensors go (default: the policy's, else CPU).
    ``batch_invariant``: one ``predict_action`` call per environment, so results do not depend on batching.
    """

    def __init__(self, policy: Any, num_envs: int = 1, *, seed: int = 0, n_action_steps: int | None = None,
                 corrector: Corrector | None = None, device: str | torch.device | None = None,
                 batch_invariant: bool = False) -> None:
        check_policy(policy, n_action_steps)
        if num_envs < 1:
            raise ConfigError(f"num_envs must be >= 1, got {num_envs}")
        self.policy = policy
        self.num_envs = int(num_envs)
        self.seed = int(seed)
        self.n_obs_steps = int(policy.n_obs_steps)
        self.n_action_steps = int(policy.n_action_steps if n_action_steps is None else n_action_steps)
        self.horizon, self.action_dim = int(policy.horizon), int(policy.action_dim)
        # A policy kind that corrects each step itself (a residual over a chunk policy) brings its own hook.
        self.corrector = corrector if corrector is not None else getattr(policy, "correct_actions", None)
        self.batch_invariant = bool(batch_invariant)
        if device is None:
            device = getattr(policy, "device", None) or "cpu"
        self.device = torch.device(device)
        shapes = getattr(policy, "obs_shapes", None)
        self.histories = [ObsHistory(list(policy.obs_keys), self.n_obs_steps, shapes) for _ in range(self.num_envs)]
        self.queues: list[deque[np.ndarray]] = [deque() for _ in range(self.num_envs)]
        self.episode = np.zeros(self.num_envs, dtype=np.int64)
        self.chunk_count = np.zeros(self.num_envs, dtype=np.int64)
        self._next_episode = 0
        self.inference_s = 0.0
        self.inference_calls = 0  # policy calls (one per environment with batch_invariant)
        warm = getattr(policy, "predict_action_warm", None)
        self._warm_takes_noise = callable(warm) and takes_noise(warm)
        self._latest: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        self.nonfinite_chunks = 0  # chunks refused for NaN/inf, in all environments since construction
        self.episode_nonfinite = np.zeros(self.num_envs, dtype=np.int64)  # ... in each environment's episode
        self.refused: list[int] = []  # environments whose new chunk the last act() refused (they held)
        self._last_sent: list[np.ndarray | None] = [None] * self.num_envs

    # ------------------------------------------------------------------ episodes and observations
    def _ids(self, env_ids: Sequence[int] | np.ndarray | None) -> list[int]:
        return list(range(self.num_envs)) if env_ids is None else [int(i) for i in env_ids]

    def reset(self, obs: Mapping[str, np.ndarray], env_ids: Sequence[int] | None = None,
              episodes: Sequence[int] | None = None) -> None:
        """Start new episodes in ``env_ids`` (default all) from batched first observations ``{key: (n, ...)}``
        (row ``j`` for ``env_ids[j]``). ``episodes``: their episode numbers for the noise rule (default: counted
        up from 0 in reset order). A reset of every environment also resets the policy."""
        ids = self._ids(env_ids)
        if episodes is not None and len(episodes) != len(ids):
            raise ValueError(f"got {len(episodes)} episode numbers for {len(ids)} environments")
        for j, i in enumerate(ids):
            ep = episodes[j] if episodes is not None else self._next_episode
            self.reset_env(i, {k: v[j] for k, v in obs.items()}, ep)
        if env_ids is None:
            self.policy.reset()

    def reset_env(self, i: int, obs: Mapping[str, Any], episode: int | None = None) -> None:
        """Start a new episode in environment ``i`` from its first observation (unbatched)."""
        if episode is None:
            episode = self._next_episode
        self._next_episode = max(self._next_episode, int(episode) + 1)
        self.histories[i].reset(obs)
        self._latest[i] = dict(obs)
        self.queues[i].clear()
        self.episode[i] = int(episode)
        self.chunk_count[i] = 0
        self.episode_nonfinite[i] = 0
        self._last_sent[i] = None

    def observe(self, obs: Mapping[str, np.ndarray], env_ids: Sequence[int] | None = None) -> None:
        """Push the next observation of each listed environment (batched, row ``j`` for ``env_ids[j]``)."""
        for j, i in enumerate(self._ids(env_ids)):
            self.observe_env(i, {k: v[j] for k, v in obs.items()})

    def observe_env(self, i: int, obs: Mapping[str, Any]) -> None:
        """Push the next observation of environment ``i`` (unbatched)."""
        self.histories[i].push(obs)
        self._latest[i] = dict(obs)

    def newest(self, env_ids: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """The newest observation of each listed environment, batched ``{key: (n, ...)}``: every key the
        environment gave (a corrector may look at more than the policy does)."""
        frames = [self._latest[i] for i in self._ids(env_ids)]
        keys = [k for k in frames[0] if all(k in f for f in frames)]
        return {k: np.stack([np.asarray(f[k]) for f in frames]) for k in keys}

    def clear_queue(self, env_ids: Sequence[int] | None = None) -> None:
        """Drop queued actions (the next step re-plans), e.g. after an operator took over."""
        for i in self._ids(env_ids):
            self.queues[i].clear()

    # ------------------------------------------------------------------ inference
    def request(self, env_ids: Sequence[int], warm: tuple[torch.Tensor, int, int] | None = None) -> ChunkRequest:
        """Snapshot the listed environments' histories and draw their chunks' noise (counting the chunks)."""
        ids = self._ids(env_ids)
        stacks = [self.histories[i].stacked() for i in ids]
        obs = {k: torch.from_numpy(np.stack([s[k] for s in stacks])).to(self.device) for k in stacks[0]}
        shape = noise_shape(self.policy, 1)[1:]
        episodes = [int(self.episode[i]) for i in ids]
        chunks = [int(self.chunk_count[i]) for i in ids]
        noise = torch.stack([chunk_noise(self.seed, e, c, shape) for e, c in zip(episodes, chunks)]).to(self.device)
        for i in ids:
            self.chunk_count[i] += 1
        return ChunkRequest(ids, obs, noise, episodes, chunks, warm)

    def compute(self, req: ChunkRequest) -> np.ndarray:
        """Run the policy on a request: chunks ``(n, horizon, action_dim)`` as float32 numpy (thread-safe as far
        as the policy is)."""
        import time

        t0 = time.perf_counter()
        if self.batch_invariant and len(req.env_ids) > 1:
            parts = [self._call({k: v[j:j + 1] for k, v in req.obs.items()}, req.noise[j:j + 1], req.warm, j)
                     for j in range(len(req.env_ids))]
            chunk = np.concatenate(parts)
            self.inference_calls += len(parts)
        else:
            chunk = self._call(req.obs, req.noise, req.warm, None)
            self.inference_calls += 1
        self.inference_s += time.perf_counter() - t0
        return chunk

    def _call(self, obs: dict[str, torch.Tensor], noise: torch.Tensor, warm: tuple[torch.Tensor, int, int] | None,
              row: int | None) -> np.ndarray:
        if warm is None:
            out = self.policy.predict_action(obs, noise)
        else:
            prev, shift, steps = warm
            prev = prev if row is None else prev[row:row + 1]
            extra = (noise,) if self._warm_takes_noise else ()
            out = self.policy.predict_action_warm(obs, prev, shift, steps, *extra)
        return check_chunk(out, self.policy, noise.shape[0])

    def executable(self, chunk: np.ndarray) -> np.ndarray:
        """The executable slice of chunks ``(n, horizon, A)`` with this executor's ``n_action_steps``."""
        return executable(chunk, self.n_obs_steps, self.n_action_steps)

    def screen(self, chunk: np.ndarray, env_ids: Sequence[int]) -> np.ndarray:
        """Which of the chunks ``(n, horizon, A)`` (row ``j`` for ``env_ids[j]``) may be executed: those holding
        only finite numbers. The others are counted (``nonfinite_chunks``, ``episode_nonfinite``)."""
        ok = finite_rows(chunk)
        for j, i in enumerate(self._ids(env_ids)):
            if not ok[j]:
                self.nonfinite_chunks += 1
                self.episode_nonfinite[i] += 1
        return ok

    def plan(self, env_ids: Sequence[int]) -> np.ndarray:
        """Infer new chunks for the listed environments and queue their executable actions; returns the chunks.
        A chunk with NaN or inf is counted and not queued (see :meth:`screen`): that environment's queue stays
        empty."""
        ids = self._ids(env_ids)
        chunk = self.compute(self.request(ids))
        ok = self.screen(chunk, ids)
        for j, i in enumerate(ids):
            self.queues[i].clear()
            if ok[j]:
                self.queues[i].extend(self.executable(chunk)[j])
        return chunk

    # ------------------------------------------------------------------ stepping
    def correct(self, env_ids: Sequence[int], base: np.ndarray) -> np.ndarray:
        """Apply the correction hook (identity without one) to the base actions of the listed environments."""
        if self.corrector is None:
            return base
        ids = np.asarray(self._ids(env_ids), dtype=np.int64)
        out = np.asarray(self.corrector(self.newest(ids), base, ids), dtype=base.dtype)
        if out.shape != base.shape:
            raise ValueError(f"the corrector returned actions of shape {out.shape}, expected {base.shape}")
        if not np.isfinite(out).all():
            bad = [int(i) for i, row in zip(ids, out.reshape(len(ids), -1)) if not np.isfinite(row).all()]
            raise NonFiniteChunkError(f"the corrector returned non-finite actions (NaN/inf) for environment(s) {bad}")
        return out

    def act(self, active: np.ndarray | Sequence[bool] | None = None) -> np.ndarray:
        """The next action of every environment ``(num_envs, action_dim)``: environments whose queue ran out get
        new chunks first (one inference for all of them), then the corrector sees the base actions. Inactive
        environments (``active[i]`` false) get zeros and draw nothing. An environment whose new chunk was refused
        (NaN/inf) holds its last action (zeros if its episode sent none yet), uncorrected, and is listed in
        ``refused``."""
        mask = np.ones(self.num_envs, bool) if active is None else np.asarray(active, bool)
        need = [i for i in range(self.num_envs) if mask[i] and not self.queues[i]]
        if need:
            self.plan(need)
        self.refused = [i for i in need if not self.queues[i]]
        ids = np.asarray([i for i in np.flatnonzero(mask) if i not in self.refused], dtype=np.int64)
        actions = np.zeros((self.num_envs, self.action_dim), dtype=np.float32)
        if len(ids):
            base = np.stack([self.queues[i].popleft() for i in ids]).astype(np.float32)
            actions[ids] = self.correct(ids, base)
        for i in self.refused:
            held = self._last_sent[i]
            if held is not None:
                actions[i] = held
        for i in np.flatnonzero(mask):
            self._last_sent[i] = actions[i].copy()
        return actions
