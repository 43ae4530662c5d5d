"""Does the inference latency suggest that torch's CPU threads are oversubscribed?

torch starts one intra-op thread per core, and each of them spins at every barrier waiting for the others. When
the cores are shared (other jobs, MuJoCo, the control loop), a thread that is descheduled holds every other one up:
on a loaded 2-core machine a DDIM-10 chunk took 1,617 ms with 2 threads and 163 ms with one (issue 15). Nothing
fails; the policy is just ten times slower, so the runner and the server say so once, with the numbers.

The rule (:func:`diagnose`), on medians of the last inferences (``window``, at least ``min_samples``):

- only when torch runs more than one thread (with one, ``threads=1`` cannot help) and the inference is slow
  enough to matter: at least half a control period (the server, which does not know its client's rate, assumes
  20 Hz);
- never when the threads got nearly all the CPU they asked for (``efficiency >= 0.9``, where efficiency is the
  process's CPU time during an inference over ``threads x wall time``): then they were not waiting for cores;
- *crowded*: the 1-minute load average minus what this process itself used (``own_cpu``, CPUs on average since
  the run started) leaves ``others`` runnable threads; ``others + threads > cores + 0.5`` means the threads torch
  asks for do not fit beside them. The load average counts threads waiting for a core as well as running ones, so
  an oversubscribed process's own waiting threads show up in ``others`` too;
- *starved*: the threads got less than half the CPU time they asked for (``efficiency < 0.5``) while the machine
  was full (load average at least the number of cores).

Either of the last two warns. Why these and not a fixed latency threshold: a slow model on a quiet machine is not
oversubscribed, and a model whose small operations never use the thread pool has a low efficiency on a quiet
machine too (only one of its threads works), so neither number alone is evidence; the load says whether anyone
competes. Limits: the load average is machine-wide and lags (a 1-minute average), so a run that just started on a
machine that just got busy is judged on the minute before; a CPU quota (a container's ``--cpus``) below the
visible cores is not seen. The measurement costs two clock reads per inference.
"""
from __future__ import annotations

import collections
import math
import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Diagnosis", "ThreadMonitor", "diagnose", "runs_on_cpu", "usable_cores"]

EFFICIENT = 0.9  # threads that got this share of the CPU they asked for were not waiting for cores
STARVED = 0.5  # ... and below this share they mostly were
SLACK_CORES = 0.5  # load-average noise: "do not fit" means more than half a core over
SERVER_PERIOD_S = 0.05  # the server does not know its clients' rate: judge latency against 20 Hz


@dataclass(frozen=True)
class Diagnosis:
    """The numbers behind a warning (JSON-able with :meth:`as_dict`) and the warning itself."""

    latency_ms: float
    torch_threads: int
    cpu_efficiency: float | None  # process CPU time during inference / (threads x wall time)
    load_1min: float | None
    own_cpu: float | None  # CPUs this process used on average since it started measuring
    cores: int
    period_ms: float
    reasons: tuple[str, ...]  # "crowded", "starved"
    suggested_threads: int  # at most this many fit beside the other load (1 when unknown)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        return d

    def message(self, who: str) -> str:
        parts = [f"{who}: warning: inference takes {self.latency_ms:.0f} ms (median) with torch using "
                 f"{self.torch_threads} threads"]
        if self.cpu_efficiency is not None:
            parts.append(f", which got {100 * self.cpu_efficiency:.0f}% of the CPU time they asked for")
        if self.load_1min is not None:
            parts.append(f"; load average {self.load_1min:.1f} on {self.cores} cores")
        parts.append(": torch's threads look oversubscribed (waiting for cores taken by each other or by other "
                     "processes), which can make inference many times slower. Try threads=1")
        if self.suggested_threads > 1:
            parts.append(f" (or at most threads={self.suggested_threads})")
        return "".join(parts) + "."


def diagnose(*, latency_s: float, cpu_s: float | None, threads: int, cores: int, load_1min: float | None,
             own_cpu: float | None, period_s: float) -> Diagnosis | None:
    """The module docstring's rule on given numbers (medians of recent inferences): a :class:`Diagnosis` when
    they suggest oversubscription, else None. Pure, so it is tested without timing anything."""
    if threads <= 1 or not latency_s > 0 or latency_s < 0.5 * period_s:
        return None
    efficiency = None if cpu_s is None else max(0.0, cpu_s) / (threads * latency_s)
    if efficiency is not None and efficiency >= EFFICIENT:
        return None
    others = None
    if load_1min is not None:
        others = max(0.0, load_1min - (own_cpu or 0.0))
    reasons = []
    if others is not None and others + threads > cores + SLACK_CORES:
        reasons.append("crowded")
    if efficiency is not None and efficiency < STARVED and load_1min is not None and load_1min >= cores:
        reasons.append("starved")
    if not reasons:
        return None
    fit = 1 if others is None else max(1, min(threads - 1, math.floor(cores - others)))
    return Diagnosis(latency_ms=round(latency_s * 1e3, 1), torch_threads=int(threads),
                     cpu_efficiency=None if efficiency is None else round(efficiency, 3),
                     load_1min=None if load_1min is None else round(load_1min, 2),
                     own_cpu=None if own_cpu is None else round(own_cpu, 2), cores=int(cores),
                     period_ms=round(period_s * 1e3, 1), reasons=tuple(reasons), suggested_threads=fit)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which ``taskset`` and containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _load_1min() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def _median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


class ThreadMonitor:
    """Collects (wall, process CPU) times of inferences and warns once when :func:`diagnose` says so.

    ``measure()`` / ``record(start)`` around each inference, from any thread; ``check()`` from one thread (the
    control loop, or the server's inference worker) returns the diagnosis the first time there is one, and
    ``diagnosis`` keeps it for the report."""

    def __init__(self, period_s: float, *, window: int = 20, min_samples: int = 5, check_every: int = 5) -> None:
        self.period_s = float(period_s)
        self.min_samples = int(min_samples)
        self.check_every = max(1, int(check_every))
        self._samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=max(window, min_samples))
        self._count = 0
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self._cpu0 = time.process_time()
        self.diagnosis: Diagnosis | None = None

    @staticmethod
    def measure() -> tuple[float, float]:
        """The start of an inference: (wall, process CPU) now."""
        return time.perf_counter(), time.process_time()

    def record(self, start: tuple[float, float]) -> None:
        """The inference that began at ``start`` just ended."""
        wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
        with self._lock:
            self._samples.append((wall, cpu))
            self._count += 1

    def check(self) -> Diagnosis | None:
        """A diagnosis the first time the recent inferences warrant one (then never again), else None."""
        with self._lock:
            if self.diagnosis is not None or self._count < self.min_samples or self._count % self.check_every:
                return None
            samples = list(self._samples)
        import torch

        elapsed = time.perf_counter() - self._t0
        own = (time.process_time() - self._cpu0) / elapsed if elapsed > 0 else None
        latency = _median([w for w, _ in samples])
        share = _median([c / w for w, c in samples if w > 0] or [1.0])  # per inference: one slow outlier cannot decide
        found = diagnose(latency_s=latency, cpu_s=share * latency,
                         threads=torch.get_num_threads(), cores=usable_cores(), load_1min=_load_1min(), own_cpu=own,
                         period_s=self.period_s)
        self.diagnosis = found
        return found


def runs_on_cpu(policy: Any) -> bool:
    """A local torch module whose weights are on the CPU: the only kind whose latency torch's threads decide (a
    remote policy's latency is the network's and the server's; a GPU's is the GPU's)."""
    params = getattr(policy, "parameters", None)
    if not callable(params):
        return False
    try:
        first = next(iter(params()), None)
    except Exception:  # a wrapper whose parameters() cannot be listed: do not guess
        return False
    return first is not None and getattr(first.device, "type", None) == "cpu"
