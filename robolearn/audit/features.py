"""An episode store as the audit reads it: normalized state, action and next-state change, in memory.

The state is the store's low-dimensional observation keys, concatenated; a store with cameras only uses each
camera pooled to 8 x 8 pixels per channel (enough to tell stillness from motion and gross state, at 192 numbers a
frame). Every dimension is standardized by its mean and standard deviation over the store; constant dimensions
are left out (they carry nothing and would divide by zero). Actions are standardized the same way, so every score
is in units of the store's own spread and comparable across keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from robolearn.data.schema import StoreError
from robolearn.data.store import EpisodeStore

POOL = 8  # camera frames are pooled to POOL x POOL per channel when no low-dimensional state exists
_BLOCK_ROWS = 4096


@dataclass
class AuditData:
    """Row-aligned arrays over every step of the store (N steps, E episodes)."""

    path: str
    task: str | None
    state_keys: list[str]
    state: np.ndarray          # (N, D) standardized
    action: np.ndarray         # (N, A) standardized
    delta: np.ndarray          # (N, D) state[t+1] - state[t] within an episode; NaN at an episode's last step
    episode: np.ndarray        # (N,) episode index of each row
    starts: np.ndarray         # (E,) first row of each episode
    lengths: np.ndarray        # (E,)
    intervention: np.ndarray | None = None  # (N,) bool, where the store has a flag of that name
    reward: np.ndarray | None = None        # (N,) float
    attrs: list[dict[str, Any]] = field(default_factory=list)  # per-episode attributes (seed, success, ...)
    action_key: str = "action"
    images: bool = False       # the state is pooled camera frames

    @property
    def n_episodes(self) -> int:
        return len(self.lengths)

    @property
    def n_steps(self) -> int:
        return len(self.episode)


def _standardize(x: np.ndarray, what: str) -> np.ndarray:
    x = x.astype(np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    keep = std > 1e-8 * np.maximum(1.0, np.abs(mean))
    if not keep.any():
        raise StoreError(f"every dimension of the {what} is constant over the store: nothing to audit")
    return ((x[:, keep] - mean[keep]) / std[keep]).astype(np.float32)


def _pooled(store: EpisodeStore, key: str, tick: Callable[[int], None] | None) -> np.ndarray:
    """``key``'s frames pooled to POOL x POOL per channel, read in blocks (a camera store may not fit in memory)."""
    h, w, c = store.schema[key].shape
    ph, pw = max(1, h // POOL), max(1, w // POOL)
    gh, gw = h // ph, w // pw
    out = np.empty((store.n_steps, gh * gw * c), np.float32)
    for lo in range(0, store.n_steps, _BLOCK_ROWS):
        hi = min(store.n_steps, lo + _BLOCK_ROWS)
        frames = np.asarray(store.read_rows(key, lo, hi), dtype=np.float32)[:, : gh * ph, : gw * pw]
        out[lo:hi] = frames.reshape(hi - lo, gh, ph, gw, pw, c).mean(axis=(2, 4)).reshape(hi - lo, -1)
        if tick:
            tick(hi - lo)
    return out


def load(store: EpisodeStore, *, action_key: str | None = None, state_keys: list[str] | None = None,
         tick: Callable[[int], None] | None = None) -> AuditData:
    """Read ``store`` for the audit. ``state_keys`` default: every low-dimensional ``obs`` key (cameras pooled when
    there is none). ``tick(n)`` is called as rows are read (a progress bar)."""
    schema = store.schema
    if store.n_episodes == 0:
        raise StoreError(f"store {store.path} holds no episodes: nothing to audit")
    actions = [k for k, s in schema.items() if s.role == "action"]
    if action_key is None:
        if not actions:
            raise StoreError(f"store {store.path} has no key with role 'action'; keys: {', '.join(schema)}")
        action_key = "action" if "action" in actions else actions[0]
    elif action_key not in schema:
        raise StoreError(f"store {store.path} has no key {action_key!r}; keys: {', '.join(schema)}")
    images = False
    if state_keys is None:
        state_keys = [k for k, s in schema.items() if s.role == "obs" and not s.is_image]
        if not state_keys:
            state_keys = [k for k, s in schema.items() if s.role == "obs" and s.is_image]
            images = True
    else:
        missing = [k for k in state_keys if k not in schema]
        if missing:
            raise StoreError(f"store {store.path} has no key {missing[0]!r}; keys: {', '.join(schema)}")
        images = any(schema[k].is_image for k in state_keys)
    if not state_keys:
        raise StoreError(f"store {store.path} has no observation keys (role 'obs') to audit; keys: "
                         + ", ".join(f"{k} ({s.role})" for k, s in schema.items()))
    parts = []
    for key in state_keys:
        if schema[key].is_image:
            parts.append(_pooled(store, key, tick))
        else:
            x = np.asarray(store.load([key])[key], dtype=np.float32).reshape(store.n_steps, -1)
            parts.append(x)
            if tick:
                tick(store.n_steps)
    raw_state = np.concatenate(parts, axis=1)
    raw_action = np.asarray(store.load([action_key])[action_key], dtype=np.float32).reshape(store.n_steps, -1)
    for name, arr in (("state", raw_state), ("action", raw_action)):
        bad = ~np.isfinite(arr).all(axis=1)
        if bad.any():
            row = int(np.argmax(bad))
            ep = int(np.searchsorted(store.episode_ends, row, side="right"))
            raise StoreError(f"store {store.path}: {name} ({action_key if name == 'action' else ', '.join(state_keys)}) "
                             f"is NaN or infinite at row {row} (episode {ep}); drop that episode first "
                             f"(robolearn data drop {store.path} --episodes {ep})")
    state = _standardize(raw_state, "state (" + ", ".join(state_keys) + ")")
    action = _standardize(raw_action, f"action ({action_key})") if raw_action.std(axis=0).max() > 0 else \
        np.zeros_like(raw_action)
    lengths = np.asarray(store.episode_lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    episode = np.repeat(np.arange(len(lengths)), lengths)
    delta = np.full_like(state, np.nan)
    delta[:-1] = state[1:] - state[:-1]
    delta[starts + lengths - 1] = np.nan  # no next state at an episode's last step
    flags = {k for k, s in schema.items() if s.role == "flag"}
    intervention = (np.asarray(store.load(["intervention"])["intervention"]).reshape(-1).astype(bool)
                    if "intervention" in flags else None)
    rewards = [k for k, s in schema.items() if s.role == "reward"]
    reward = (np.asarray(store.load([rewards[0]])[rewards[0]], dtype=np.float64).reshape(store.n_steps, -1)[:, 0]
              if rewards else None)
    attrs = [dict(a or {}) for a in store.all_episode_attrs()]
    return AuditData(path=str(store.path), task=store.task, state_keys=list(state_keys), state=state, action=action,
                     delta=delta, episode=episode, starts=starts, lengths=lengths, intervention=intervention,
                     reward=reward, attrs=attrs, action_key=action_key, images=images)


def fold_of_episodes(n_episodes: int, folds: int, seed: int) -> np.ndarray:
    """Fold index (0..folds-1) of each episode: a seeded random permutation cut into near-equal parts."""
    perm = np.random.default_rng(seed).permutation(n_episodes)
    out = np.empty(n_episodes, np.int64)
    out[perm] = np.arange(n_episodes) % folds
    return out
