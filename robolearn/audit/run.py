"""The whole audit of one store: read it, score every episode, combine the scores.

``overall`` puts the scores that say "this episode is unlike the rest" on one scale: for each of action
divergence, transition diversity, idle share and action jerk, a robust z-score (distance from the store's median
in units of 1.4826 x the median absolute deviation, which is the standard deviation for normal data, floored at a
tenth of the standard deviation and of the median, and for idle share at 0.05, so a score that is the same almost
everywhere does not blow up), and ``overall`` is the largest of them, with
``worst_score`` naming which. ``weight`` (what ``training.episode_weights`` reads) is 1 for an episode whose action
divergence is within 2 robust deviations above the median and falls off as ``exp(-(z - 2) / 2)`` beyond.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from robolearn.audit import divergence as div
from robolearn.audit import signals
from robolearn.audit.features import AuditData, load

RANKED = ("action_divergence", "transition_diversity", "idle_share", "action_jerk")


# The smallest deviation that counts as one unit, per score: an episode idle for 1% of its steps in a store where
# nobody idles is not 40 deviations out, whatever the median absolute deviation (0) says.
MIN_SCALE = {"idle_share": 0.05}


def robust_z(values: np.ndarray, min_scale: float = 0.0) -> np.ndarray:
    """(value - median) / (1.4826 x median absolute deviation), the scale floored at a tenth of the standard
    deviation, a tenth of the median's size and ``min_scale``."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    if len(finite) < 2:
        return np.zeros_like(v)
    med = float(np.median(finite))
    mad = 1.4826 * float(np.median(np.abs(finite - med)))
    floor = max(0.1 * float(np.std(finite)), 0.1 * abs(med), min_scale, 1e-12)
    return (v - med) / max(mad, floor)


def audit_store(store: Any, *, policy: Any = None, folds: int = 5, fit_steps: int = 1500, seed: int = 0,
                max_queries: int = 40_000, progress: Callable[[str, int | None], Any] | None = None
                ) -> tuple[list[dict[str, Any]], dict[str, Any], AuditData]:
    """Score every episode of ``store``. ``progress(desc, total)`` returns a bar with ``update``/``close`` (or is
    None). Returns the per-episode rows (JSON-ready), a summary and the data read."""
    timings: dict[str, float] = {}

    def stage(desc: str, total: int | None) -> Any:
        return progress(desc, total) if progress else None

    t0 = time.perf_counter()
    bar = stage("read (rows)", None)
    data = load(store, tick=bar.update if bar else None)
    if bar:
        bar.close()
    timings["read_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = signals.plain_signals(data)
    timings["signals_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if policy is None:
        k = max(2, min(int(folds), data.n_episodes))
        bar = stage("action divergence (cross-fit)", k * fit_steps)
        dv = div.cross_fit(data, folds=folds, steps=fit_steps, seed=seed, tick=bar.update if bar else None)
    else:
        bar = stage("action divergence (checkpoint)", None)
        dv = div.against_checkpoint(data, store, policy, max_queries=max_queries // 2, seed=seed,
                                    tick=bar.update if bar else None)
    if bar:
        bar.close()
    timings["action_divergence_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bar = stage("transition diversity", None)
    td = signals.transition_diversity(data, max_queries=max_queries, seed=seed, tick=bar.update if bar else None)
    if bar:
        bar.close()
    timings["transition_diversity_s"] = time.perf_counter() - t0
    scores = {"action_divergence": dv["per_episode"], "transition_diversity": td["per_episode"], **plain}
    z = {k: robust_z(scores[k], MIN_SCALE.get(k, 0.0)) for k in RANKED}
    zmat = np.stack([np.nan_to_num(z[k], nan=-np.inf) for k in RANKED], axis=1)
    overall = zmat.max(axis=1)
    worst = [RANKED[i] for i in zmat.argmax(axis=1)]
    zdiv = np.nan_to_num(z["action_divergence"], nan=0.0)
    weight = np.exp(-np.maximum(0.0, zdiv - 2.0) / 2.0)
    rows = []
    for e in range(data.n_episodes):
        a = data.attrs[e] if e < len(data.attrs) else {}
        row: dict[str, Any] = {"episode": e, "seed": a.get("seed"), "length": int(data.lengths[e])}
        for k, v in scores.items():
            if k == "length":
                continue
            x = float(v[e])
            row[k] = None if not np.isfinite(x) else (int(x) if k == "idle_steps" else
                                                      bool(x) if k == "success" else round(x, 6))
        row["overall"] = round(float(overall[e]), 4) if np.isfinite(overall[e]) else None
        row["worst_score"] = worst[e]
        row["weight"] = round(float(weight[e]), 6)
        rows.append(row)
    summary = {
        "store": str(store.path), "task": store.task, "episodes": data.n_episodes, "steps": data.n_steps,
        "state_keys": data.state_keys, "state_from_cameras": data.images, "action_key": data.action_key,
        "action_divergence": {k: v for k, v in dv.items() if k != "per_episode"},
        "transition_diversity": {"store_mean": round(td["store"], 6) if np.isfinite(td["store"]) else None,
                                 "queries": td["queries"], "reference": td.get("reference")},
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "median": {k: _med(scores[k]) for k in (*RANKED, "length")},
        "success_rate": _med(scores["success"], mean=True),
        "intervention_share": _med(scores["intervention_share"], mean=True),
    }
    return rows, summary, data


def _med(v: np.ndarray, mean: bool = False) -> float | None:
    f = np.asarray(v, dtype=np.float64)
    f = f[np.isfinite(f)]
    if not len(f):
        return None
    return round(float(f.mean() if mean else np.median(f)), 6)
