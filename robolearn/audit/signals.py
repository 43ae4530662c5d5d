"""Plain per-episode signals and transition diversity.

Plain signals, per episode:

- ``length``: steps;
- ``idle_steps`` / ``idle_share``: steps where the state barely moves (its standardized change is under a tenth of
  the store's median step change): a hesitating operator, a frozen sensor, a robot held still;
- ``action_jerk``: the mean size of the action's second difference ``a[t+1] - 2 a[t] + a[t-1]`` (standardized
  units): smooth demonstrations score low, shaky or noisy ones high;
- ``success``: the episode's recorded ``success`` attribute, else whether any reward was positive, else unknown;
- ``intervention_share``: the share of steps a person drove (stores with an ``intervention`` flag).

Transition diversity (Belkhale et al.): for sampled steps, the nearest neighbours in (state, action) space (the
action scaled to weigh as much as the state) among
*other* episodes' steps, and how far this step's next-state change lies from theirs: the squared distance to the
neighbours' mean change, in units of the store's mean squared change. An episode whose transitions are not what
similar states and actions lead to elsewhere (sensor glitches, teleported objects, mislabelled actions) scores
high; a dataset with low transition diversity everywhere is consistent. Neighbours are searched with scipy's
k-d tree in the first 16 principal components of (state, action), on at most ``max_queries`` steps spread over the
episodes against at most ``max_reference`` steps, and always in other episodes (the episodes are split into five
groups; a step's neighbours come from the other four).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from robolearn.audit.features import AuditData, fold_of_episodes

IDLE_FRACTION = 0.1   # a step is idle when its state change is under this share of the median step change
PCA_DIMS = 16
NEIGHBOURS = 10


def per_episode_mean(values: np.ndarray, episode: np.ndarray, n_episodes: int) -> np.ndarray:
    """Mean of ``values`` (NaN ignored) per episode; NaN where an episode has none."""
    ok = np.isfinite(values)
    total = np.bincount(episode[ok], weights=values[ok], minlength=n_episodes)
    count = np.bincount(episode[ok], minlength=n_episodes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def plain_signals(data: AuditData) -> dict[str, np.ndarray]:
    """``length``, ``idle_steps``, ``idle_share``, ``action_jerk``, ``success``, ``intervention_share`` per episode
    (float arrays; NaN where unknown)."""
    E = data.n_episodes
    step = np.linalg.norm(data.delta, axis=1)  # NaN at last steps
    finite = step[np.isfinite(step)]
    typical = float(np.median(finite)) if finite.size else 0.0
    idle = np.where(np.isfinite(step), (step <= IDLE_FRACTION * typical).astype(np.float64), np.nan)
    idle_steps = np.bincount(data.episode[np.isfinite(idle)], weights=idle[np.isfinite(idle)], minlength=E)
    a = data.action
    jerk = np.full(len(a), np.nan)
    if len(a) >= 3:
        second = a[2:] - 2.0 * a[1:-1] + a[:-2]
        same = (data.episode[2:] == data.episode[:-2])
        jerk[1:-1] = np.where(same, np.linalg.norm(second, axis=1), np.nan)
    out = {
        "length": data.lengths.astype(np.float64),
        "idle_steps": idle_steps,
        "idle_share": idle_steps / np.maximum(data.lengths - 1, 1),
        "action_jerk": per_episode_mean(jerk, data.episode, E),
        "success": _success(data),
        "intervention_share": (per_episode_mean(data.intervention.astype(np.float64), data.episode, E)
                               if data.intervention is not None else np.full(E, np.nan)),
    }
    return out


def _success(data: AuditData) -> np.ndarray:
    out = np.full(data.n_episodes, np.nan)
    for i, a in enumerate(data.attrs[: data.n_episodes]):
        if isinstance(a.get("success"), (bool, np.bool_, int)):
            out[i] = float(bool(a["success"]))
    if data.reward is not None:
        best = np.full(data.n_episodes, -np.inf)
        np.maximum.at(best, data.episode, np.nan_to_num(data.reward, nan=-np.inf))
        unknown = np.isnan(out)
        out[unknown] = (best[unknown] > 0).astype(np.float64)
    return out


def sample_rows(data: AuditData, budget: int, rng: np.random.Generator, *, need_next: bool = False) -> np.ndarray:
    """About ``budget`` rows spread over the episodes (at least 3 per episode where it has them), sorted."""
    per = max(3, int(np.ceil(budget / max(1, data.n_episodes))))
    rows = []
    for s, n in zip(data.starts, data.lengths):
        usable = n - 1 if need_next else n
        if usable <= 0:
            continue
        take = min(per, usable)
        rows.append(s + np.sort(rng.choice(usable, size=take, replace=False)))
    return np.concatenate(rows) if rows else np.zeros(0, np.int64)


def transition_diversity(data: AuditData, *, max_queries: int = 40_000, max_reference: int = 400_000,
                         seed: int = 0, tick: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Per-episode transition diversity (see the module docstring) and the store's mean (``store``)."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    E = data.n_episodes
    has_next = np.isfinite(data.delta[:, 0])
    pool = np.flatnonzero(has_next)
    if E < 2 or len(pool) < NEIGHBOURS + 1:
        return {"per_episode": np.full(E, np.nan), "store": float("nan"), "queries": 0}
    ref = pool if len(pool) <= max_reference else np.sort(rng.choice(pool, size=max_reference, replace=False))
    queries = sample_rows(data, max_queries, rng, need_next=True)
    # state and action weigh the same in the search, however many dimensions each has (a 40-number state would
    # otherwise drown a 7-number action, and the next state depends on both)
    balance = np.sqrt(data.state.shape[1] / max(1, data.action.shape[1]))
    z = np.concatenate([data.state, balance * data.action], axis=1)
    center = z[ref].mean(axis=0)
    # principal directions from the reference rows (at most 20k of them: enough for 16 components)
    fit = ref if len(ref) <= 20_000 else rng.choice(ref, size=20_000, replace=False)
    _, _, vt = np.linalg.svd(z[fit] - center, full_matrices=False)
    basis = vt[: min(PCA_DIMS, vt.shape[0])].T
    scale = float(np.mean(np.sum(data.delta[ref] ** 2, axis=1))) or 1.0
    # Neighbours come from other episodes only: the episodes are split into groups, and a query's neighbours are
    # searched among the other groups' steps (an episode's own next steps are always its nearest).
    groups = max(2, min(5, E))
    group = fold_of_episodes(E, groups, seed)
    dev = np.full(len(queries), np.nan)
    for g in range(groups):
        r = ref[group[data.episode[ref]] != g]
        mine = np.flatnonzero(group[data.episode[queries]] == g)
        if len(r) == 0 or len(mine) == 0:
            continue
        tree = cKDTree((z[r] - center) @ basis)
        k = min(len(r), NEIGHBOURS)
        for lo in range(0, len(mine), 4096):
            qi = mine[lo:lo + 4096]
            q = queries[qi]
            _, idx = tree.query((z[q] - center) @ basis, k=k)
            nb = r[np.asarray(idx).reshape(len(q), k)]               # (b, k) rows of other episodes
            mean = data.delta[nb].mean(axis=1)                       # (b, D)
            dev[qi] = np.sum((data.delta[q] - mean) ** 2, axis=1) / scale
            if tick:
                tick(len(q))
    per = per_episode_mean(dev, data.episode[queries], E)
    return {"per_episode": per, "store": float(np.nanmean(dev)) if np.isfinite(dev).any() else float("nan"),
            "queries": int(len(queries)), "reference": int(len(ref))}
