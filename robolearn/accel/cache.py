"""Block-wise adaptive caching (BAC, Ji et al., "Block-wise Adaptive Caching for Accelerating Diffusion Policy",
ICLR 2026) of the transformer denoiser's sub-blocks across denoising steps.

Every block of :class:`~robolearn.models.transformer.TransformerDenoiser` is three residual branches
(self-attention, cross-attention, feed-forward), named ``"<block>.<branch>"`` here (``"3.ff"``). Neighbouring
denoising steps compute nearly the same branch outputs, so a branch's output can be computed at a few *update
steps* and reused at the steps between them. What is cached is the branch's output -- the term added to the
residual stream -- so the stream itself is always recomputed from the fresh input embedding.

The pieces, each usable alone:

- :class:`CacheSchedule`: per branch the update steps (indices into the sampler's schedule of ``total`` backbone
  calls), the sampler it was made for (``"ddpm-100"``) and a fingerprint of the backbone's weights. It refuses to
  run another sampler or another checkpoint's backbone, naming both.
- :func:`calibrate`: one pass over a few hundred observations, every branch computed at every step, accumulating
  each branch's step x step similarity (cosine, or negative relative L1) of its outputs.
- :func:`dp_update_steps`: the Adaptive Caching Scheduler. The ``k`` update steps (step 0 always among them) that
  maximize the summed similarity between each skipped step's output and the cached output it reuses, by dynamic
  programming (exact, O(k S^2)).
- :func:`bubbling_union`: the Bubbling Union Algorithm. Branches ranked by caching error; each of the ``top``
  worst that has a feed-forward branch downstream also updates at that feed-forward branch's update steps
  (``i.self_attn`` and ``i.cross_attn`` at ``i.ff``'s, ``i.ff`` at ``i+1.ff``'s), so a stale upstream output is
  refreshed before the feed-forward layer that would amplify it.
- :func:`searched_schedule`: one set of update steps for every branch chosen by the chunk itself -- every set of
  ``k`` steps tried on calibration observations, the one whose chunks stay closest to the uncached ones kept
  (few-step samplers only: DDIM-10 at k=5 is 126 sets).
- :func:`uniform_schedule` (every branch at the same evenly spaced steps: the baseline) and :func:`all_steps`
  (every step an update: equals the uncached policy exactly).
- :class:`CachedDenoiser`: calls the base backbone's branches itself, computing at update steps and reusing
  otherwise; the first call of every sampling run computes everything (a warm start begins mid-schedule). It
  also keeps the timestep's conditioning (every block's adaLN modulation) per timestep: a sampler visits the
  same timesteps for every chunk. That part is exact; ``robolearn bench latency`` reports it separately
  (``latency_ms_memo_only``: every step computed, only the timestep conditioning kept). On the transformer's
  fused inference path (:mod:`robolearn.accel.fast_transformer`) it drives the fused branches directly on the
  2-D residual stream and keeps the outputs in one tensor, so a run of skipped branches costs one sum and one
  addition, not one addition each.
- :class:`CachedPolicy`: the registered policy kind ``"cached"`` around a trained base (its checkpoint names the
  base and holds the schedule, no weights).
"""
from __future__ import annotations

import hashlib
import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from robolearn.accel.kernels import _backbone_owner
from robolearn.policies.registry import register_policy
from robolearn.policies.wrapper import PolicyWrapper

METHODS = ("bac", "shared", "searched", "uniform", "none")
SEARCH_LIMIT = 3000  # candidate step sets searched_schedule tries at most (C(total - 1, updates - 1))
METRICS = ("cosine", "l1")
SCHEDULE_VERSION = 1


class CacheError(ValueError):
    """A schedule that does not fit the policy or the call (other checkpoint, other sampler, bad contents)."""


# ---------------------------------------------------------------------------------------------- branches
def branch_keys(backbone: nn.Module) -> list[str]:
    """``["0.self_attn", "0.cross_attn", "0.ff", "1.self_attn", ...]``: the branches in the order they run."""
    blocks, names = _blocks_of(backbone)
    return [f"{i}.{name}" for i in range(len(blocks)) for name in names]


def _blocks_of(backbone: nn.Module) -> tuple[Sequence[nn.Module], tuple[str, ...]]:
    blocks = getattr(backbone, "blocks", None)
    names = getattr(backbone, "branch_names", None)
    if blocks is None or names is None or not all(hasattr(b, "branch") for b in blocks) \
            or not callable(getattr(backbone, "begin", None)):
        raise CacheError(f"block caching needs a transformer backbone made of residual branches (blocks with "
                         f"branch(), begin()/head()); this policy's backbone is {type(backbone).__name__} -- train "
                         f"with policy=diffusion_transformer or flow_transformer")
    return blocks, tuple(names)


def next_ff(key: str, n_blocks: int) -> str | None:
    """The feed-forward branch directly downstream of ``key``: ``i.ff`` for block ``i``'s attention branches,
    ``i+1.ff`` for ``i.ff``, None after the last block."""
    i, name = key.split(".", 1)
    j = int(i) if name != "ff" else int(i) + 1
    return f"{j}.ff" if j < n_blocks else None


def backbone_fingerprint(backbone: nn.Module) -> str:
    """SHA-256 (hex, first 16 digits) of the backbone's parameters and buffers, names and values: the same
    trained weights give the same fingerprint wherever they are loaded from."""
    h = hashlib.sha256()
    for name, t in sorted(backbone.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- schedules
@dataclass
class CacheSchedule:
    """Which denoising steps recompute which branch.

    ``updates``: branch key -> sorted update steps in ``[0, total)``, step 0 first. ``sampler``: the schedule
    the steps index (``"ddpm-100"``; a warm start's calls count from its offset into it). ``fingerprint``: the
    backbone's (:func:`backbone_fingerprint`), or None for a schedule not tied to weights (uniform, none).
    ``info``: how it was made (calibration size, metric, predicted errors), kept for the record.
    """

    method: str
    sampler: str
    total: int
    updates: dict[str, tuple[int, ...]]
    fingerprint: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CacheError(f"cache method {self.method!r} is not one of {list(METHODS)}")
        if not isinstance(self.total, int) or self.total < 1:
            raise CacheError(f"a cache schedule needs total >= 1 denoising steps, got {self.total!r}")
        clean: dict[str, tuple[int, ...]] = {}
        for key, steps in self.updates.items():
            s = sorted({int(x) for x in steps})
            if not s or s[0] != 0:
                raise CacheError(f"branch {key!r}: the update steps must include step 0 (got {list(steps)[:8]})")
            if s[-1] >= self.total:
                raise CacheError(f"branch {key!r}: update step {s[-1]} is outside the schedule's "
                                 f"{self.total} steps ({self.sampler})")
            clean[key] = tuple(s)
        self.updates = clean

    @property
    def compute_fraction(self) -> float:
        """Branch computations made, as a fraction of the uncached policy's (1.0: no saving)."""
        if not self.updates:
            return 1.0
        return sum(len(s) for s in self.updates.values()) / (len(self.updates) * self.total)

    def to_dict(self) -> dict[str, Any]:
        return {"version": SCHEDULE_VERSION, "method": self.method, "sampler": self.sampler, "total": self.total,
                "fingerprint": self.fingerprint, "updates": {k: list(v) for k, v in self.updates.items()},
                "info": _plain(self.info)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CacheSchedule":
        if not isinstance(d, Mapping):
            raise CacheError(f"a cache schedule is a mapping, got {type(d).__name__}")
        missing = [k for k in ("method", "sampler", "total", "updates") if k not in d]
        if missing:
            raise CacheError(f"cache schedule is missing {missing}")
        if int(d.get("version", SCHEDULE_VERSION)) != SCHEDULE_VERSION:
            raise CacheError(f"cache schedule version {d.get('version')!r} is not {SCHEDULE_VERSION}")
        updates = d["updates"]
        if not isinstance(updates, Mapping):
            raise CacheError("cache schedule 'updates' must map branch names to lists of steps")
        try:
            ups = {str(k): tuple(int(x) for x in v) for k, v in updates.items()}
        except (TypeError, ValueError) as e:
            raise CacheError(f"cache schedule 'updates' must hold lists of integer steps: {e}") from None
        return cls(str(d["method"]), str(d["sampler"]), int(d["total"]), ups,
                   None if d.get("fingerprint") is None else str(d["fingerprint"]), dict(d.get("info") or {}))

    def check_backbone(self, backbone: nn.Module, *, fingerprint: str | None = None) -> None:
        """Refuse a backbone with other branches or (for a calibrated schedule) other weights."""
        keys = branch_keys(backbone)
        if self.updates and set(keys) != set(self.updates):
            extra = sorted(set(self.updates) - set(keys))[:4]
            lacking = sorted(set(keys) - set(self.updates))[:4]
            raise CacheError(f"cache schedule was made for a backbone with other blocks: schedule-only branches "
                             f"{extra}, backbone-only branches {lacking}")
        if self.fingerprint is not None:
            fp = fingerprint or backbone_fingerprint(backbone)
            if fp != self.fingerprint:
                raise CacheError(f"cache schedule was calibrated for another checkpoint (backbone fingerprint "
                                 f"{self.fingerprint}, this one's is {fp}); calibrate one for it: robolearn accel "
                                 f"calibrate checkpoint=<this checkpoint>")

    def check_sampler(self, sampler: str, total: int | None = None) -> None:
        """Refuse a sampling run of another schedule (``total``: its backbone calls, None to check the name)."""
        if sampler != self.sampler or (total is not None and total != self.total):
            kind, _, steps = sampler.rpartition("-")
            calls = "" if total is None else f" ({total} backbone calls)"
            raise CacheError(f"cache schedule was calibrated for sampler {self.sampler} ({self.total} backbone "
                             f"calls), but this call samples with {sampler}{calls}; calibrate one for it: robolearn "
                             f"accel calibrate checkpoint=<base> sampler={kind} steps={steps}")

    def update_mask(self, keys: Sequence[str]) -> np.ndarray:
        """(len(keys), total) booleans: True where a branch recomputes."""
        m = np.zeros((len(keys), self.total), dtype=bool)
        for r, k in enumerate(keys):
            m[r, list(self.updates.get(k, range(self.total)))] = True
        return m


def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def all_steps(keys: Iterable[str], sampler: str, total: int) -> CacheSchedule:
    """Every step an update step for every branch: the cached policy equals the uncached one exactly."""
    return CacheSchedule("none", sampler, total, {k: tuple(range(total)) for k in keys})


def uniform_steps(total: int, updates: int) -> tuple[int, ...]:
    """``updates`` steps spread evenly over ``[0, total)``, step 0 first (every n-th step when n divides)."""
    k = max(1, min(int(updates), total))
    return tuple(sorted({int(math.floor(i * total / k)) for i in range(k)}))


def uniform_schedule(keys: Iterable[str], sampler: str, total: int, updates: int) -> CacheSchedule:
    """Every branch recomputed at the same ``updates`` evenly spaced steps (uniform caching, the baseline)."""
    steps = uniform_steps(total, updates)
    return CacheSchedule("uniform", sampler, total, {k: steps for k in keys}, info={"updates": len(steps)})


# ---------------------------------------------------------------------------------------------- scheduler
def dp_update_steps(sim: np.ndarray, k: int, weights: Sequence[float] | None = None) -> tuple[int, ...]:
    """The Adaptive Caching Scheduler for one branch: ``k`` update steps maximizing the total similarity.

    ``sim[i, j]``: similarity of the branch's output at step ``j`` to its output at step ``i``. Updating at
    ``c_0 = 0 < c_1 < ... < c_{k-1}`` makes every step ``j`` in ``[c_m, c_{m+1})`` reuse the output of ``c_m``;
    the objective is ``sum_m sum_{j in (c_m, c_{m+1})} sim[c_m, j]`` (an update step is exact). Solved exactly by
    dynamic programming over (segments used, end of the last segment). Ties go to the earliest update steps.

    ``weights`` (one per step; our extension, not BAC's): minimize ``sum_j weights[j] * (sim[j, j] - sim[c, j])``
    over the skipped steps instead, the similarity each one loses weighted by how much an error at that step
    moves the sampler's result (:func:`step_sensitivity`). Equal weights give BAC's own choice where every
    step's self-similarity is the same (cosine 1, negative L1 0: every calibration).
    """
    sim = np.asarray(sim, dtype=np.float64)
    S = sim.shape[0]
    if sim.shape != (S, S) or S < 1:
        raise ValueError(f"similarity matrix must be square, got shape {sim.shape}")
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (S,) or not np.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"step weights must be {S} finite numbers >= 0, got {w.tolist()}")
        sim = -w[None, :] * (np.diag(sim)[None, :] - sim)  # the weighted similarity lost, as a reward
    k = max(1, min(int(k), S))
    # seg[a, b]: reward of one segment updating at a and covering steps a..b-1 (b in a+1..S)
    cums = np.cumsum(sim, axis=1)
    seg = np.full((S, S + 1), -np.inf)
    for a in range(S):
        seg[a, a + 1:] = cums[a, a:] - cums[a, a]  # sum of sim[a, a+1 .. b-1]
    # best[m, b]: best reward covering [0, b) with m segments (m update steps, the first at 0)
    best = np.full((k + 1, S + 1), -np.inf)
    arg = np.zeros((k + 1, S + 1), dtype=np.int64)
    best[1, 1:] = seg[0, 1:]
    for m in range(2, k + 1):
        for b in range(m, S + 1):
            a = np.arange(m - 1, b)  # the last segment starts at a (needs m-1 segments before it)
            vals = best[m - 1, a] + seg[a, b]
            i = int(np.argmax(vals))
            best[m, b], arg[m, b] = vals[i], a[i]
    steps, b = [], S
    for m in range(k, 1, -1):
        a = int(arg[m, b])
        steps.append(a)
        b = a
    return tuple([0, *sorted(steps)])


def caching_error(sim: np.ndarray, steps: Sequence[int], weights: Sequence[float] | None = None) -> float:
    """Mean over all steps of the similarity lost by reusing the last update's output (0 where recomputed):
    ``mean_j (sim[j, j] - sim[u(j), j])`` with ``u(j)`` the last update step at or before ``j`` (each term times
    ``weights[j]`` when given)."""
    sim = np.asarray(sim, dtype=np.float64)
    S = sim.shape[0]
    ups = sorted(set(int(s) for s in steps))
    if not ups or ups[0] != 0:
        raise ValueError("update steps must include step 0")
    src = np.zeros(S, dtype=np.int64)
    for a, b in zip(ups, [*ups[1:], S]):
        src[a:b] = a
    j = np.arange(S)
    lost = sim[j, j] - sim[src, j]
    return float(np.mean(lost if weights is None else np.asarray(weights, dtype=np.float64) * lost))


def bubbling_union(updates: Mapping[str, Sequence[int]], errors: Mapping[str, float], n_blocks: int, top: int
                   ) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """The Bubbling Union Algorithm: the ``top`` branches with the largest caching error that have a
    feed-forward branch downstream (:func:`next_ff`) also update at that branch's update steps.

    Returns the new updates and the branches that took the union, worst first. Only the original schedules
    are unioned (no chains): ``i.self_attn`` gets ``i.ff``'s steps as the scheduler chose them.
    """
    out = {k: tuple(sorted(set(v))) for k, v in updates.items()}
    candidates = [k for k in updates if next_ff(k, n_blocks) in updates]
    ranked = sorted(candidates, key=lambda k: (-float(errors.get(k, 0.0)), candidates.index(k)))
    chosen = ranked[:max(0, int(top))]
    for k in chosen:
        out[k] = tuple(sorted(set(updates[k]) | set(updates[next_ff(k, n_blocks)])))  # type: ignore[index]
    return out, chosen


def bac_schedule(similarity: Mapping[str, np.ndarray], n_blocks: int, sampler: str, updates: int, *,
                 bubble: int = 4, fingerprint: str | None = None, info: Mapping[str, Any] | None = None,
                 weights: Sequence[float] | None = None) -> CacheSchedule:
    """BAC's schedule from calibrated similarities: the scheduler per branch, then Bubbling Union (``weights``:
    per-step weights of the similarity lost, :func:`dp_update_steps`)."""
    S = next(iter(similarity.values())).shape[0]
    per = {k: dp_update_steps(sim, updates, weights) for k, sim in similarity.items()}
    errors = {k: caching_error(similarity[k], per[k], weights) for k in per}
    merged, chosen = bubbling_union(per, errors, n_blocks, bubble)
    after = {k: caching_error(similarity[k], merged[k], weights) for k in merged}
    meta = dict(info or {})
    meta.update(updates=int(updates), bubble=int(bubble), bubbled=chosen,
                error_before_union={k: round(v, 6) for k, v in errors.items()},
                error={k: round(v, 6) for k, v in after.items()})
    return CacheSchedule("bac", sampler, S, merged, fingerprint, meta)


def shared_schedule(similarity: Mapping[str, np.ndarray], sampler: str, updates: int, *,
                    fingerprint: str | None = None, info: Mapping[str, Any] | None = None,
                    weights: Sequence[float] | None = None) -> CacheSchedule:
    """One adaptive set of update steps for every branch: the scheduler's dynamic program on the branches' mean
    similarity matrix. Between uniform caching (the same steps for all, evenly spaced) and BAC (steps chosen per
    branch): the steps adapt to where the outputs change, but every branch is refreshed at the same step, so the
    residual stream never sums outputs computed at different steps."""
    keys = list(similarity)
    mean = np.mean([np.asarray(similarity[k], dtype=np.float64) for k in keys], axis=0)
    steps = dp_update_steps(mean, updates, weights)
    meta = dict(info or {})
    meta.update(updates=int(updates), steps=list(steps),
                error={k: round(caching_error(similarity[k], steps, weights), 6) for k in keys})
    return CacheSchedule("shared", sampler, int(mean.shape[0]), {k: steps for k in keys}, fingerprint, meta)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per chunk of a batch ``(B, ...)``: ``||out - ref|| / ||ref||`` (how far caching moved each chunk)."""
    return (out - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1).clamp_min(1e-12)


#: one batch of observations, its initial noise and the uncached chunk the policy makes from that noise
Reference = tuple[Mapping[str, Any], torch.Tensor, torch.Tensor]


def uncached_references(policy: Any, observations: Iterable[Mapping[str, Any]], seed: int) -> list[Reference]:
    """Each batch with an initial noise (drawn in order from ``seed``) and its uncached chunk: computed once, for
    every schedule compared on them by :func:`chunk_error`."""
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    with torch.no_grad():
        for batch in observations:
            noise = torch.randn(policy.noise_shape(int(next(iter(batch.values())).shape[0])), generator=gen)
            out.append((batch, noise, policy.predict_action(batch, noise)))
    return out


def chunk_error(policy: Any, schedule: CacheSchedule, refs: Sequence[Reference]) -> float:
    """Mean over the chunks of ``refs`` of :func:`relative_error` between ``policy`` cached by ``schedule`` and
    uncached, from the same initial noise (a schedule's cost in accuracy, where it matters downstream)."""
    cached = CachedPolicy(policy, schedule)
    with torch.no_grad():
        total = sum(float(relative_error(cached.predict_action(b, n), r).sum()) for b, n, r in refs)
    return total / sum(int(r.shape[0]) for _, _, r in refs)


def search_candidates(total: int, updates: int, sampler: str) -> int:
    """How many step sets :func:`searched_schedule` would try (step 0 and ``updates - 1`` of the other
    ``total - 1`` steps); refuses a bad ``updates`` or more than :data:`SEARCH_LIMIT` sets, before any work."""
    k = int(updates)
    if not 1 <= k <= total:
        raise CacheError(f"updates={k} must be between 1 and the {total} denoiser calls of {sampler}")
    n = math.comb(total - 1, k - 1)
    if n > SEARCH_LIMIT:
        raise CacheError(f"a searched schedule tries every set of {k} of {sampler}'s {total} steps: {n:.3g} "
                         f"sets, more than the {SEARCH_LIMIT} it allows; use method=bac or uniform for this sampler, "
                         f"or search a few-step one (e.g. sampler=ddim steps=10)")
    return n


def searched_schedule(policy: Any, observations: Sequence[Mapping[str, Any]], updates: int, *, seed: int = 0,
                      info: Mapping[str, Any] | None = None,
                      progress: Callable[[int], None] | None = None) -> CacheSchedule:
    """One set of ``updates`` update steps for every branch (step 0 and ``updates - 1`` others), chosen by what
    matters downstream: every such set is tried on ``observations`` (batches of observation histories) with the
    same initial noise, and the set whose chunks are closest to the uncached ones (mean relative L2 error) wins.

    Why: a branch's similarity between steps does not say how much a stale output at that step moves the chunk
    (a DDIM step near the end barely moves it; a reused output also feeds later steps), so similarity-driven
    schedules can lose to evenly spaced ones at few steps; the chunk error itself cannot. Exhaustive, so only for
    few-step samplers: more than :data:`SEARCH_LIMIT` candidate sets (DDPM-100 at 25 updates has ~10^23) is
    refused. ``progress(n)`` is called after each candidate."""
    sc = policy.sampler_config
    name = f"{sc['kind']}-{sc['steps']}"
    total = backbone_calls(policy, str(sc["kind"]), int(sc["steps"]))
    k = int(updates)
    candidates = search_candidates(total, k, name)
    batches = list(observations)
    if not batches:
        raise CacheError("a searched schedule needs observations to compare chunks on")
    keys = branch_keys(policy.backbone)
    uniform_k = uniform_steps(total, k)
    refs = uncached_references(policy, batches, seed)
    count = sum(int(r.shape[0]) for _, _, r in refs)
    best, best_err, uniform_err = uniform_k, float("inf"), None
    for rest in itertools.combinations(range(1, total), k - 1):
        steps_k = (0, *rest)
        # trial schedules carry no fingerprint: the policy is the one searched, so its weights need no hash
        err = chunk_error(policy, CacheSchedule("searched", name, total, {key: steps_k for key in keys}), refs)
        if steps_k == uniform_k:
            uniform_err = err
        if err < best_err:
            best, best_err = steps_k, err
        if progress is not None:
            progress(1)
    meta = dict(info or {})
    meta.update(updates=k, steps=list(best), candidates=candidates, action_rel_error=round(best_err, 6),
                uniform_action_rel_error=None if uniform_err is None else round(uniform_err, 6), observations=count)
    return CacheSchedule("searched", name, total, {key: best for key in keys},
                         backbone_fingerprint(policy.backbone), meta)


# ---------------------------------------------------------------------------------------------- the cached call
class CachedDenoiser:
    """Calls ``backbone``'s blocks itself, recomputing each branch only at its update steps.

    Called like the backbone by the denoising loop (``(x, t, prepared, step=DenoiseStep)``); without ``step``
    (a plain call) it computes everything. Not a module: it owns no weights (the backbone stays the base's).
    Keeps the cached outputs of the run in progress, so one instance serves one caller at a time.
    ``calls``/``computed``: branch evaluations requested and made (their ratio is the compute actually done).
    """

    def __init__(self, backbone: nn.Module, schedule: CacheSchedule) -> None:
        self.backbone = backbone
        self.blocks, self.names = _blocks_of(backbone)
        self.schedule = schedule
        self.keys = [[f"{i}.{n}" for n in self.names] for i in range(len(self.blocks))]
        mask = schedule.update_mask([k for row in self.keys for k in row]).reshape(
            len(self.blocks), len(self.names), schedule.total)
        # per step, [block][branch] as plain lists: read 24 times a step, where a numpy scalar read costs more
        # than the branch bookkeeping around it
        self._cols = [mask[:, :, c].tolist() for c in range(schedule.total)]
        self._cache: list[list[torch.Tensor | None]] = []
        self._time: "OrderedDict[tuple, Any]" = OrderedDict()
        self.calls = self.computed = 0
        # the fused loop's per-step plans over the flattened branches (block-major): see _plan
        self._branches = [(i, blk, name) for i, blk in enumerate(self.blocks) for name in self.names]
        self._plans = [self._plan(mask[:, :, c].reshape(-1).tolist()) for c in range(schedule.total)]
        self._plan_all = self._plan([True] * len(self._branches))
        self._store: torch.Tensor | None = None  # (branches, rows, D): the fused loop's kept outputs

    @staticmethod
    def _plan(update: list[bool]) -> list[Any]:
        """One step of the fused loop from its per-branch update flags: ``-1 - n`` computes branch ``n``, ``n``
        adds its kept output, ``(start, stop)`` adds the kept outputs of a run of skipped branches at once."""
        plan: list[Any] = []
        start = None
        for n, due in enumerate(update + [True]):
            if due:
                if start is not None:
                    plan.append(start if n - start == 1 else (start, n))
                    start = None
                if n < len(update):
                    plan.append(-1 - n)  # compute branch n (negative: told apart from a lone kept one)
            elif start is None:
                start = n
        return plan

    def prepare(self, cond: Any) -> Any:
        return self.backbone.prepare(cond)

    #: timestep conditionings kept (per timestep value and batch size, batches up to MEMO_BATCH only)
    MEMO_ENTRIES, MEMO_BATCH = 512, 4

    def _time_conditioning(self, t: torch.Tensor) -> Any:
        """The backbone's ``time_conditioning(t)``, kept per (timestep, batch size): a sampler visits the same
        timesteps for every chunk, and this part of a step depends on nothing else. Computed exactly as the
        plain call computes it (same rows), so an all-updates schedule stays bitwise equal to the plain policy."""
        bb = self.backbone
        if not hasattr(bb, "time_conditioning") or t.shape[0] > self.MEMO_BATCH or t.device.type != "cpu" \
                or not bool((t == t[0]).all()):
            return None
        key = (float(t[0]), t.shape[0], next(iter(bb.parameters())).dtype)
        tc = self._time.get(key)
        if tc is None:
            tc = self._time[key] = bb.time_conditioning(t)
            if len(self._time) > self.MEMO_ENTRIES:
                self._time.popitem(last=False)
        return tc

    def reset_counts(self) -> None:
        self.calls = self.computed = 0

    #: drive the fused branches of a backbone that has them (:meth:`_fused_call`); the calibration recorder,
    #: which needs every branch's output through :meth:`_compute`, does not
    fused_loop = True

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any, step: Any = None) -> torch.Tensor:
        bb = self.backbone
        if step is None:
            return bb(x, t, cond)
        self.schedule.check_sampler(step.sampler, step.offset + step.total)
        if self.fused_loop and hasattr(bb, "fused_step"):
            fs = bb.fused_step(x, t, cond)
            if fs is not None:
                return self._fused_call(fs, step)
        if step.index == 0:
            self._cache = [[None] * len(self.names) for _ in self.blocks]
            self._store = None  # the fused loop's outputs belong to another run
        update = self._cols[step.schedule_index]
        ctx = bb.begin(x, t, cond, self._time_conditioning(t))
        h = ctx.x
        computed = 0
        for i, (blk, bc) in enumerate(zip(self.blocks, ctx.block_ctx)):
            row, due = self._cache[i], update[i]
            for j in range(len(row)):
                out = row[j]
                if out is None or due[j] or out.shape != h.shape:
                    out = row[j] = self._compute(i, j, blk, h, bc)
                    computed += 1
                h = h + out
        self.calls += len(self.blocks) * len(self.names)
        self.computed += computed
        return bb.head(h, ctx)

    def _compute(self, i: int, j: int, blk: nn.Module, h: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Branch ``j`` of block ``i`` on the residual stream ``h``."""
        return blk.branch(self.names[j], h, ctx)

    def _fused_call(self, fs: Any, step: Any) -> torch.Tensor:
        """One step on the fused path (:meth:`FastTransformerDenoiser.fused_step`): the residual stream stays
        (rows, D), branches are called directly, and their outputs are kept in one (branches, rows, D) tensor, so
        a run of skipped branches adds its kept outputs in one reduction and one addition. With every branch
        due, the additions are the uncached forward's, in its order: bitwise equal to it. With branches skipped,
        the one reduction rounds differently from the generic loop's one-by-one additions (equal to float
        rounding, tested)."""
        h = fs.h
        store = self._store
        if step.index == 0 or store is None or store.shape[1:] != h.shape:  # a new run: compute everything
            store = self._store = h.new_empty((len(self._branches),) + tuple(h.shape))
            plan = self._plan_all
        else:
            plan = self._plans[step.schedule_index]
        T, computed = fs.T, 0
        vecs, kv, absorbed = fs.block_vecs, fs.kv, fs.absorbed
        for op in plan:
            if type(op) is tuple:
                h = h + store[op[0]:op[1]].sum(0)
            elif op >= 0:
                h = h + store[op]
            else:
                n = -1 - op
                i, blk, name = self._branches[n]
                out = store[n] = blk.fused_branch(name, h, vecs[i], T, kv[i], absorbed[i])
                computed += 1
                h = h + out
        self.calls += len(self._branches)
        self.computed += computed
        return self.backbone.fused_head(h, fs)


# ---------------------------------------------------------------------------------------------- calibration
class _Recorder(CachedDenoiser):
    """The uncached computation (every step an update step), keeping every branch's output of every step."""

    fused_loop = False

    def __init__(self, backbone: nn.Module, sampler: str, total: int) -> None:
        super().__init__(backbone, all_steps(branch_keys(backbone), sampler, total))
        self.outputs: dict[tuple[int, int], list[torch.Tensor]] = {}

    def _compute(self, i: int, j: int, blk: nn.Module, h: torch.Tensor, ctx: Any) -> torch.Tensor:
        out = super()._compute(i, j, blk, h, ctx)
        self.outputs.setdefault((i, j), []).append(out.float().reshape(out.shape[0], -1))
        return out


def _similarity_sum(o: torch.Tensor, metric: str) -> torch.Tensor:
    """``o``: (S, B, F) one branch's outputs -> the (S, S) sum over the batch of per-sample similarities."""
    if metric == "cosine":
        u = o / o.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return torch.einsum("ibf,jbf->ij", u, u)
    # negative relative L1, per sample: -|o_i - o_j|_1 / |o_j|_1 (the error of standing in for step j)
    oT = o.transpose(0, 1)  # (B, S, F)
    d = torch.cdist(oT, oT, p=1)  # (B, S, S)
    scale = oT.abs().sum(-1).clamp_min(1e-12)  # (B, S)
    return -(d / scale[:, None, :]).sum(0)


@dataclass
class Calibration:
    """Per branch the (S, S) mean similarity of its outputs between steps (``similarity[key][i, j]``: step ``j``
    against step ``i``), and what was run to get it."""

    similarity: dict[str, np.ndarray]
    sampler: str
    total: int
    metric: str
    observations: int
    n_blocks: int
    fingerprint: str
    step_weights: np.ndarray | None = None  # per step, :func:`step_sensitivity` (None: BAC's equal weights)


class _Perturbed:
    """The backbone, except that its output at denoiser call ``call`` gets ``scale`` times its own size (per row)
    added in a random direction drawn from ``generator``."""

    def __init__(self, backbone: nn.Module, call: int, scale: float, generator: torch.Generator) -> None:
        self.backbone, self.call, self.scale, self.generator = backbone, int(call), float(scale), generator

    def prepare(self, cond: Any) -> Any:
        return self.backbone.prepare(cond)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any, step: Any = None) -> torch.Tensor:
        out = self.backbone(x, t, cond)
        if step is None or step.index != self.call:
            return out
        d = torch.randn(out.shape, generator=self.generator, dtype=torch.float32).to(out)
        rows = (-1,) + (1,) * (out.dim() - 1)
        size = out.float().reshape(out.shape[0], -1).norm(dim=1).reshape(rows)
        unit = d.reshape(d.shape[0], -1).norm(dim=1).clamp_min(1e-12).reshape(rows)
        return out + (self.scale * size / unit).to(out) * d


#: observations :func:`step_sensitivity` averages over (the first ones of a calibration)
SENSITIVITY_ROWS = 32


def step_sensitivity(policy: Any, observations: Iterable[Mapping[str, Any]], *, sampler: str, steps: int,
                     seed: int = 0, scale: float = 0.05, rows: int = SENSITIVITY_ROWS) -> np.ndarray:
    """How much each denoiser call of the sampler matters to the chunk it makes (our extension, not BAC's): for
    each call ``j``, the chunk's relative change when the denoiser's output at call ``j`` alone is moved by
    ``scale`` of its own size in a random direction, per unit of ``scale``, averaged over the first ``rows``
    observations; normalized to mean 1. The motivation: DDIM's last update scales its call's noise estimate by
    sqrt(1 - alpha_bar) of the least noisy timestep (~0.025), so an untrained model's chunk barely depends on that
    call; a trained model's later steps also pull earlier errors back, so the profile is measured, not assumed.
    :func:`dp_update_steps` takes these as weights so that the scheduler spends its updates where an error would
    move the chunk."""
    total = backbone_calls(policy, sampler, steps)
    gain = np.zeros(total, dtype=np.float64)
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    seen = 0
    with torch.no_grad():
        for batch in observations:
            B = min(int(next(iter(batch.values())).shape[0]), rows - seen)
            if B <= 0:
                break
            part = {k: v[:B] for k, v in batch.items()}
            noise = torch.randn(policy.noise_shape(B), generator=gen)
            ref = policy.predict_action(part, noise, sampler=sampler, steps=steps).float()
            for j in range(total):
                pert = _Perturbed(policy.backbone, j, scale, torch.Generator().manual_seed(int(seed) * 1009 + j))
                got = policy.predict_action(part, noise, sampler=sampler, steps=steps, denoiser=pert).float()
                gain[j] += float(relative_error(got, ref).sum()) / scale
            seen += B
    if seen == 0:
        raise CacheError("step sensitivity got no observations")
    gain /= seen
    if not np.isfinite(gain).all() or gain.mean() <= 0:
        raise CacheError(f"step sensitivity is degenerate: {gain.tolist()}")
    return gain / gain.mean()


def calibrate(policy: Any, observations: Iterable[Mapping[str, Any]], *, sampler: str | None = None,
              steps: int | None = None, metric: str = "cosine", seed: int = 0,
              progress: Callable[[int], None] | None = None, step_weights: bool = False) -> Calibration:
    """Run ``policy`` (a chunk policy with a transformer backbone) uncached on batches of ``observations``
    (observation histories, raw units), recording each branch's output at every denoising step, and average
    each branch's step x step similarity over the observations. ``progress(n)`` is called after each batch.
    ``step_weights``: also measure :func:`step_sensitivity` on the first :data:`SENSITIVITY_ROWS` observations."""
    if metric not in METRICS:
        raise CacheError(f"similarity metric {metric!r} is not one of {list(METRICS)}")
    kind = policy.cfg.sampler.kind if sampler is None else sampler
    n = policy.cfg.sampler.steps if steps is None else int(steps)
    rec = _Recorder(policy.backbone, f"{kind}-{n}", backbone_calls(policy, kind, n))
    keys = branch_keys(policy.backbone)
    gen = torch.Generator().manual_seed(int(seed))
    sums: dict[str, torch.Tensor] = {}
    count, total = 0, None
    kept: list[Mapping[str, Any]] = []  # the batches step_sensitivity will see
    for batch in observations:
        B = int(next(iter(batch.values())).shape[0])
        if step_weights and count < SENSITIVITY_ROWS:
            kept.append(batch)
        rec.outputs = {}
        noise = torch.randn(policy.noise_shape(B), generator=gen)
        policy.predict_action(batch, noise, sampler=kind, steps=n, denoiser=rec)
        for (i, j), outs in rec.outputs.items():
            o = torch.stack(outs)  # (S, B, F)
            total = o.shape[0]
            key = f"{i}.{rec.names[j]}"
            s = _similarity_sum(o, metric)
            sums[key] = s if key not in sums else sums[key] + s
        count += B
        if progress is not None:
            progress(B)
    if count == 0 or total is None:
        raise CacheError("calibration got no observations")
    sim = {k: (sums[k] / count).double().numpy() for k in keys}
    weights = step_sensitivity(policy, kept, sampler=kind, steps=n, seed=seed) if step_weights else None
    return Calibration(sim, f"{kind}-{n}", int(total), metric, count, len(rec.blocks),
                       backbone_fingerprint(policy.backbone), weights)


def schedule_from_calibration(cal: Calibration, method: str = "bac", updates: int | None = None, *,
                              bubble: int = 4, warm_steps: int | None = None) -> CacheSchedule:
    """A schedule of ``method`` with ``updates`` update steps per branch (default: a quarter of the steps).

    ``warm_steps=W`` (our composition with the warm start, RTI-DP): schedule only the denoiser calls of the last
    ``W`` sampler steps (two per midpoint step), the ones a warm start runs, as if they were the whole sampler
    (:func:`warm_window`); ``updates`` then counts update steps within them (default a quarter of them, at least 1)."""
    total = cal.total if warm_steps is None else warm_calls(cal.sampler, cal.total, warm_steps)
    k = default_updates(total) if updates is None else int(updates)
    if not 1 <= k <= total:
        what = "sampler's" if warm_steps is None else "warm start's"
        raise CacheError(f"updates={k} must be between 1 and the {what} {total} denoiser calls")
    start = cal.total - total
    sim = {kk: np.asarray(v)[start:, start:] for kk, v in cal.similarity.items()}
    info: dict[str, Any] = {"metric": cal.metric, "observations": cal.observations}
    w = cal.step_weights
    if w is not None:
        info["step_weights"] = [round(float(v), 6) for v in w]
        w = np.asarray(w)[start:]
    keys = list(sim)
    if method == "bac":
        sched = bac_schedule(sim, cal.n_blocks, cal.sampler, k, bubble=bubble, fingerprint=cal.fingerprint,
                             info=info, weights=w)
    elif method == "shared":
        sched = shared_schedule(sim, cal.sampler, k, fingerprint=cal.fingerprint, info=info, weights=w)
    else:
        if method == "uniform":
            sched = uniform_schedule(keys, cal.sampler, total, k)
        elif method == "none":
            sched = all_steps(keys, cal.sampler, total)
        else:
            raise CacheError(f"cache method {method!r} is not one of {list(METHODS)}")
        sched.info.update(info, error={kk: round(caching_error(sim[kk], sched.updates[kk], w), 6) for kk in keys})
    return sched if warm_steps is None else warm_window(sched, cal.total, warm_steps=int(warm_steps))


def warm_calls(sampler: str, calls: int, warm_steps: int) -> int:
    """The denoiser calls of a warm start of ``warm_steps`` steps of ``sampler`` (``"midpoint-5"``), whose full run
    makes ``calls`` of them (a midpoint step makes two); a count outside 1..steps is refused."""
    n_steps = int(sampler.rpartition("-")[2])
    if not 1 <= int(warm_steps) <= n_steps:
        raise CacheError(f"warm_steps={warm_steps} must be between 1 and the {n_steps} steps of {sampler}")
    return int(warm_steps) * (int(calls) // n_steps)


def warm_window(window: CacheSchedule, total: int, *, warm_steps: int | None = None) -> CacheSchedule:
    """A schedule made for the last ``W = window.total`` of ``total`` steps (its step 0 is step ``total - W``), as
    a schedule of all ``total`` steps: every earlier step recomputes every branch, so a full sampling run (an
    episode's first chunk) is cached only within the window, and a warm start of ``W`` steps — whose calls are the
    schedule's last ``W`` steps, the first of them computing everything — is cached as the window's schedule
    says. Its ``info`` records ``warm_steps`` (the sampler steps the window stands for, ``W`` unless given: a
    midpoint step is two calls) and ``warm_compute_fraction`` (a warm start's share of branch computations)."""
    W = int(window.total)
    if not 1 <= W <= int(total):
        raise CacheError(f"a warm window of {W} steps does not fit a {total}-step schedule")
    start = int(total) - W
    ups = {k: tuple(range(start)) + tuple(start + s for s in v) for k, v in window.updates.items()}
    info = dict(window.info, warm_steps=W if warm_steps is None else int(warm_steps),
                warm_compute_fraction=round(window.compute_fraction, 6))
    if "steps" in info:  # shared: its one set of steps, now in the full schedule's numbering
        info["steps"] = [start + int(x) for x in info["steps"]]
    return CacheSchedule(window.method, window.sampler, int(total), ups, window.fingerprint, info)


def default_updates(total: int) -> int:
    """A quarter of the steps, at least 1."""
    return max(1, int(round(total / 4)))


# ---------------------------------------------------------------------------------------------- the policy kind
def backbone_calls(policy: Any, sampler: str, steps: int) -> int:
    """Backbone calls of one ``sampler``-``steps`` run of ``policy``, as its sampler announces them."""
    return int(policy.solver(policy.make_noise(1), sampler, int(steps), None)[1])


class DenoiserRoute:
    """``predict_action`` and ``predict_action_warm`` of the chunk policy ``self.sampling_policy`` with every
    denoiser call going through ``self.denoiser`` (block caching, CUDA graphs)."""

    sampling_policy: Any
    denoiser: Any

    def predict_action(self, obs_history: Mapping[str, Any], noise: torch.Tensor | None = None,
                       **kwargs: Any) -> torch.Tensor:
        return self.sampling_policy.predict_action(obs_history, noise, denoiser=self.denoiser, **kwargs)

    def predict_action_warm(self, obs_history: Mapping[str, Any], prev_chunk: torch.Tensor, shift: int, steps: int,
                            noise: torch.Tensor | None = None, generator: torch.Generator | None = None
                            ) -> torch.Tensor:
        return self.sampling_policy.predict_action_warm(obs_history, prev_chunk, shift, steps, noise, generator,
                                                        denoiser=self.denoiser)


@register_policy("cached")
class CachedPolicy(DenoiserRoute, PolicyWrapper):
    """A trained transformer chunk policy whose denoiser reuses branch outputs per :class:`CacheSchedule`.

    The base is untouched: its sampler is set to the schedule's (the one it was calibrated for), and its
    backbone is driven through a :class:`CachedDenoiser`. Another sampler or step count is refused with a
    message saying how to calibrate for it. The checkpoint holds the schedule in its config and no weights.
    """

    def __init__(self, base: Any, schedule: CacheSchedule | Mapping[str, Any]) -> None:
        super().__init__(base)
        if not isinstance(schedule, CacheSchedule):
            schedule = CacheSchedule.from_dict(schedule)
        if _backbone_owner(base) is not base:
            raise CacheError(f"block caching wraps a base chunk policy with a denoiser backbone, not a "
                             f"{type(base).__name__}")
        schedule.check_backbone(base.backbone)
        kind, _, steps = schedule.sampler.rpartition("-")
        try:
            base.set_sampler(kind, int(steps))
        except Exception as e:  # noqa: BLE001 - a schedule naming a sampler this policy cannot run
            raise CacheError(f"cache schedule's sampler {schedule.sampler!r} does not fit the base: {e}") from None
        self.schedule = schedule
        self.denoiser = CachedDenoiser(base.backbone, schedule)

    def wrapper_config(self) -> dict[str, Any]:
        return {"schedule": self.schedule.to_dict()}

    def set_sampler(self, kind: str | None = None, steps: int | None = None) -> None:
        cur = self.base.sampler_config
        k = cur["kind"] if kind is None else kind
        n = cur["steps"] if steps is None else int(steps)
        self.schedule.check_sampler(f"{k}-{n}")

    @property
    def sampling_policy(self) -> Any:
        return self.base

    def extra_repr(self) -> str:
        s = self.schedule
        return f"type={self.policy_type}, method={s.method}, sampler={s.sampler}, compute={s.compute_fraction:.2f}"
