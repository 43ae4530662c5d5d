"""Rules over audit scores (``action_divergence>q90``), the thresholds they resolve to, and score files.

A rule is ``SCORE OP VALUE``: ``SCORE`` one of :data:`SCORES`, ``OP`` one of ``> >= < <= == !=``, ``VALUE`` a
number, ``true``/``false`` (for ``success``), ``qNN`` (the NN-th percentile of that score over the store, e.g.
``q90`` or ``q97.5``) or ``auto``: the threshold that best splits the store's scores into two groups (Otsu's
criterion on the logarithm of positive scores), used only when the scores really form two groups (a two-Gaussian
mixture beats one Gaussian by more than 10 in BIC, and its components are apart: Ashman's D > 2); otherwise
``auto`` matches nothing and says so. ``str(rule)`` writes the rule back in the same form, so rules
round-trip through a store's attributes.

A score file is JSON lines, one object per episode with at least ``episode`` (its index in the store); ``data
audit`` writes ``scores.jsonl`` with every score, the episode's ``length`` and ``seed``, and a ``weight``.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

SCORES = ("action_divergence", "transition_diversity", "overall", "length", "idle_steps", "idle_share",
          "action_jerk", "success", "intervention_share")
OPS = (">=", "<=", "==", "!=", ">", "<")
_RULE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|!=|>|<)\s*(\S+)\s*$")
AUTO_MIN_SEPARATION = 2.0  # Ashman's D above which two groups count as apart


class RuleError(ValueError):
    """A rule that cannot be parsed or applied; the message quotes it."""


@dataclass(frozen=True)
class Rule:
    score: str
    op: str
    value: float | None = None      # a plain number
    quantile: float | None = None   # percentile 0..100
    auto: bool = False

    def __str__(self) -> str:
        if self.auto:
            text = "auto"
        elif self.quantile is not None:
            text = "q" + _num(self.quantile)
        else:
            text = _num(float(self.value))  # type: ignore[arg-type]
        return f"{self.score}{self.op}{text}"

    def matches(self, values: np.ndarray, threshold: float) -> np.ndarray:
        """Which values satisfy ``value OP threshold`` (NaN, an unknown score, never does)."""
        with np.errstate(invalid="ignore"):
            out = {">": values > threshold, ">=": values >= threshold, "<": values < threshold,
                   "<=": values <= threshold, "==": values == threshold, "!=": values != threshold}[self.op]
        return out & np.isfinite(values)


def _num(v: float) -> str:
    """Shortest text that reads back as exactly ``v``."""
    short = f"{v:g}"
    return short if float(short) == v else repr(v)


def parse_rule(text: str) -> Rule:
    m = _RULE.match(text or "")
    if not m:
        raise RuleError(f"cannot read the rule {text!r}: write SCORE OP VALUE, e.g. 'action_divergence>q90', "
                        f"'idle_share>=0.5' or 'success==false' (OP: {' '.join(OPS)})")
    score, op, raw = m.groups()
    if score not in SCORES:
        near = difflib.get_close_matches(score, SCORES, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise RuleError(f"rule {text!r}: unknown score {score!r}{hint} (scores: {', '.join(SCORES)})")
    low = raw.lower()
    if low == "auto":
        if op not in (">", ">=", "<", "<="):
            raise RuleError(f"rule {text!r}: 'auto' splits the scores in two; use it with > >= < <=")
        return Rule(score, op, auto=True)
    if low in ("true", "false"):
        return Rule(score, op, value=1.0 if low == "true" else 0.0)
    if low.startswith("q"):
        try:
            q = float(low[1:])
        except ValueError:
            raise RuleError(f"rule {text!r}: {raw!r} is not a percentile: write q followed by 0-100, e.g. q90"
                            ) from None
        if not 0.0 <= q <= 100.0:
            raise RuleError(f"rule {text!r}: percentile {q:g} is outside 0-100")
        return Rule(score, op, quantile=q)
    try:
        value = float(raw)
    except ValueError:
        raise RuleError(f"rule {text!r}: {raw!r} is not a number, a percentile (q90), true/false or auto") from None
    if not math.isfinite(value):
        raise RuleError(f"rule {text!r}: the value must be finite")
    return Rule(score, op, value=value)


def _mixture(x: np.ndarray, split: int, iters: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Two-Gaussian mixture of sorted ``x`` by EM, started from the split ``x[:split] | x[split:]``: weights, means,
    standard deviations and the log-likelihood."""
    w = np.array([split, len(x) - split], np.float64) / len(x)
    mu = np.array([x[:split].mean(), x[split:].mean()])
    sd = np.array([x[:split].std(), x[split:].std()])
    floor = 1e-3 * (x.std() + 1e-12)
    ll = -np.inf
    for _ in range(iters):
        sd = np.maximum(sd, floor)
        dens = w / (sd * np.sqrt(2 * np.pi)) * np.exp(-0.5 * ((x[:, None] - mu) / sd) ** 2) + 1e-300
        total = dens.sum(axis=1, keepdims=True)
        new_ll = float(np.log(total).sum())
        r = dens / total
        n = r.sum(axis=0) + 1e-12
        w, mu = n / len(x), (r * x[:, None]).sum(axis=0) / n
        sd = np.sqrt((r * (x[:, None] - mu) ** 2).sum(axis=0) / n)
        if new_ll - ll < 1e-9 * abs(new_ll):
            break
        ll = new_ll
    return w, mu, np.maximum(sd, floor), ll


def auto_threshold(values: np.ndarray) -> dict[str, Any]:
    """Split ``values`` (on the log scale when every value is positive) into two groups: Otsu's split (the largest
    between-group variance), accepted only when a two-Gaussian mixture fitted from it explains the values clearly
    better than one Gaussian (BIC lower by more than 10) and its components are apart (Ashman's D above
    :data:`AUTO_MIN_SEPARATION`). ``threshold`` is None otherwise, with ``why``."""
    v = np.sort(np.asarray(values, dtype=np.float64)[np.isfinite(values)])
    if len(v) < 8:
        return {"threshold": None, "why": f"only {len(v)} finite scores: too few to find two groups"}
    log = bool(v[0] > 0)
    x = np.log(v) if log else v
    n = len(x)
    csum = np.cumsum(x)
    best, best_i = -1.0, None
    for i in range(2, n - 1):   # low group x[:i], high group x[i:], each at least 2
        if x[i] == x[i - 1]:
            continue
        m1, m2 = csum[i - 1] / i, (csum[-1] - csum[i - 1]) / (n - i)
        between = i * (n - i) * (m1 - m2) ** 2
        if between > best:
            best, best_i = between, i
    if best_i is None:
        return {"threshold": None, "why": "every score is the same"}
    w, mu, sd, ll2 = _mixture(x, best_i)
    sd1 = max(float(x.std()), 1e-12)
    ll1 = float(np.sum(-0.5 * ((x - x.mean()) / sd1) ** 2 - np.log(sd1 * np.sqrt(2 * np.pi))))
    bic_gain = (-2 * ll1 + 2 * np.log(n)) - (-2 * ll2 + 5 * np.log(n))
    d = math.sqrt(2.0) * abs(mu[1] - mu[0]) / math.sqrt(sd[0] ** 2 + sd[1] ** 2)
    cut = 0.5 * (v[best_i - 1] + v[best_i]) if not log else math.sqrt(v[best_i - 1] * v[best_i])
    out = {"threshold": float(cut), "ashman_d": round(float(d), 3), "bic_gain": round(float(bic_gain), 2),
           "low_group": int(best_i), "high_group": int(n - best_i), "log_scale": log}
    if bic_gain <= 10 or d < AUTO_MIN_SEPARATION:
        out.update(threshold=None, why=f"the scores do not form two groups (two Gaussians fit better by "
                                       f"{bic_gain:.1f} in BIC, Ashman's D {d:.2f}; needs > 10 and > "
                                       f"{AUTO_MIN_SEPARATION:g}): nothing matches")
    return out


def resolve(rule: Rule, values: np.ndarray) -> dict[str, Any]:
    """The rule's threshold over this store's ``values`` (a number, a percentile, or ``auto``'s split)."""
    finite = np.asarray(values, dtype=np.float64)[np.isfinite(values)]
    if rule.auto:
        return auto_threshold(values)
    if rule.quantile is not None:
        if not len(finite):
            return {"threshold": None, "why": f"no episode has a {rule.score} score"}
        return {"threshold": float(np.quantile(finite, rule.quantile / 100.0))}
    return {"threshold": float(rule.value)}  # type: ignore[arg-type]


def select_episodes(scores: Sequence[dict[str, Any]], drop: Iterable[str | Rule] = (),
                    keep: Iterable[str | Rule] = ()) -> dict[str, Any]:
    """Apply rules to a score table (one dict per episode, in episode order). An episode is dropped when any
    ``drop`` rule matches it or any ``keep`` rule does not. Returns ``kept``, ``dropped`` (episode indices),
    ``rules`` (each with its threshold and how many it matched)."""
    drop_rules = [r if isinstance(r, Rule) else parse_rule(r) for r in drop]
    keep_rules = [r if isinstance(r, Rule) else parse_rule(r) for r in keep]
    if not drop_rules and not keep_rules:
        raise RuleError("no rule given: pass --drop RULE (e.g. 'action_divergence>q90') or --keep RULE")
    n = len(scores)
    out_mask = np.zeros(n, bool)
    report = []
    for kind, rules in (("drop", drop_rules), ("keep", keep_rules)):
        for r in rules:
            values = np.array([_number(s.get(r.score)) for s in scores], dtype=np.float64)
            if not np.isfinite(values).any():
                raise RuleError(f"rule {str(r)!r}: no episode has a {r.score!r} score in this file "
                                f"(scores present: {', '.join(sorted(k for k in scores[0] if k in SCORES))})")
            res = resolve(r, values)
            t = res["threshold"]
            hit = r.matches(values, t) if t is not None else np.zeros(n, bool)
            out_mask |= hit if kind == "drop" else ~hit
            report.append({"rule": str(r), "kind": kind, **res, "matched": int(hit.sum()),
                           "unknown": int((~np.isfinite(values)).sum())})
    episodes = np.array([int(s["episode"]) for s in scores])
    return {"kept": episodes[~out_mask].tolist(), "dropped": episodes[out_mask].tolist(), "rules": report}


def _number(v: Any) -> float:
    if v is None:
        return float("nan")
    if isinstance(v, bool):
        return float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def read_scores(path: str | os.PathLike, *, n_episodes: int | None = None,
                lengths: Sequence[int] | None = None, store: str = "the store") -> list[dict[str, Any]]:
    """A score file as a list of dicts ordered by episode. With ``n_episodes`` (and ``lengths``) the file must
    describe exactly that store: one line per episode (same lengths where the file records them)."""
    p = Path(path)
    if p.is_dir():
        p = p / "scores.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"score file {p} does not exist (robolearn data audit STORE writes one)")
    rows: dict[int, dict[str, Any]] = {}
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}, line {i}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or "episode" not in row:
                if isinstance(row, dict) and "summary" in row:
                    continue  # data audit's last line
                raise ValueError(f"{p}, line {i}: expected an object with an 'episode' index, got {line.strip()[:80]}")
            try:
                ep = int(row["episode"])
            except (TypeError, ValueError):
                raise ValueError(f"{p}, line {i}: 'episode' must be an integer, got {row['episode']!r}") from None
            if ep in rows:
                raise ValueError(f"{p}, line {i}: episode {ep} appears twice")
            rows[ep] = row
    if n_episodes is not None:
        missing = [e for e in range(n_episodes) if e not in rows]
        extra = [e for e in rows if not 0 <= e < n_episodes]
        if missing or extra:
            what = (f"has no line for episode {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                                               else "")) if missing else \
                f"has episode {extra[0]}, beyond {store}'s {n_episodes}"
            raise ValueError(f"score file {p} {what}: it does not describe {store} ({n_episodes} episodes); "
                             f"audit the store again")
        if lengths is not None:
            for e in range(n_episodes):
                have = rows[e].get("length")
                if have is not None and int(have) != int(lengths[e]):
                    raise ValueError(f"score file {p} says episode {e} has {int(have)} steps but {store} has "
                                     f"{int(lengths[e])}: the store changed since the audit; audit it again")
    return [rows[e] for e in sorted(rows)]


def episode_weights(path: str | os.PathLike, n_episodes: int, lengths: Sequence[int] | None = None,
                    store: str = "the store", key: str = "weight") -> np.ndarray:
    """Per-episode training weights from a score file's ``weight`` column (every episode, finite, >= 0, not all 0)."""
    rows = read_scores(path, n_episodes=n_episodes, lengths=lengths, store=store)
    w = np.empty(n_episodes, np.float64)
    for e, row in enumerate(rows):
        if key not in row:
            raise ValueError(f"score file {path}: episode {e} has no {key!r} (write one number per episode)")
        v = _number(row[key])
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"score file {path}: episode {e} has {key} {row[key]!r}; weights must be finite and >= 0")
        w[e] = v
    if not (w > 0).any():
        raise ValueError(f"score file {path}: every weight is 0: nothing would be learned")
    return w
