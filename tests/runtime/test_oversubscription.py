"""The oversubscription heuristic on given numbers (no timing): when the runner and the server warn that torch's
threads compete for cores, and when they stay quiet."""
from __future__ import annotations

import json

import torch
from rt_policies import TickPolicy

from robolearn.runtime.oversubscription import diagnose, runs_on_cpu

PERIOD = 0.1  # 10 Hz


def test_the_issues_loaded_two_core_case_warns_with_the_numbers_and_the_remedy() -> None:
    # issue 15: DDIM-10 took 1,617 ms with 2 threads on a loaded 2-core machine (163 ms with one); the threads got
    # a third of the CPU they asked for, and other jobs kept the load near 4
    d = diagnose(latency_s=1.617, cpu_s=0.33 * 2 * 1.617, threads=2, cores=2, load_1min=3.9, own_cpu=0.8,
                 period_s=PERIOD)
    assert d is not None and set(d.reasons) == {"crowded", "starved"}
    msg = d.message("robolearn run")
    for part in ("1617 ms", "2 threads", "33%", "load average 3.9 on 2 cores", "threads=1"):
        assert part in msg, (part, msg)
    assert d.suggested_threads == 1
    assert json.loads(json.dumps(d.as_dict()))["reasons"] == ["crowded", "starved"]


def test_one_thread_or_a_fast_inference_never_warns() -> None:
    loaded = dict(cpu_s=0.05, cores=2, load_1min=8.0, own_cpu=0.5)
    assert diagnose(latency_s=0.5, threads=1, period_s=PERIOD, **loaded) is None  # threads=1 is the remedy
    assert diagnose(latency_s=0.02, threads=2, period_s=PERIOD, **loaded) is None  # a fifth of a period: harmless


def test_a_slow_model_on_a_quiet_machine_is_not_oversubscribed() -> None:
    # both threads busy all the time (the process itself makes the load of 2): slow, but nobody competes
    assert diagnose(latency_s=0.8, cpu_s=0.95 * 2 * 0.8, threads=2, cores=2, load_1min=2.1, own_cpu=2.0,
                    period_s=PERIOD) is None
    # small operations that never reach torch's thread pool: 1 of 16 threads works (efficiency 1/16), but the
    # machine is idle, so the low efficiency alone is no evidence
    assert diagnose(latency_s=0.3, cpu_s=0.3, threads=16, cores=16, load_1min=1.2, own_cpu=1.1,
                    period_s=PERIOD) is None


def test_threads_that_got_their_cpu_are_not_waiting_for_cores() -> None:
    assert diagnose(latency_s=0.3, cpu_s=0.92 * 4 * 0.3, threads=4, cores=4, load_1min=9.0, own_cpu=3.7,
                    period_s=PERIOD) is None


def test_crowded_by_other_load_suggests_how_many_threads_fit() -> None:
    # 16 cores, other jobs keep 4 busy, torch asks for 16: they do not fit; 12 would
    d = diagnose(latency_s=0.2, cpu_s=None, threads=16, cores=16, load_1min=6.0, own_cpu=2.0, period_s=PERIOD)
    assert d is not None and d.reasons == ("crowded",) and d.suggested_threads == 12
    assert "threads=1" in d.message("robolearn serve") and "at most threads=12" in d.message("robolearn serve")
    # the same load with 12 threads fits (4 + 12 <= 16 + 0.5)
    assert diagnose(latency_s=0.2, cpu_s=None, threads=12, cores=16, load_1min=6.0, own_cpu=2.0,
                    period_s=PERIOD) is None


def test_only_local_cpu_torch_policies_are_watched() -> None:
    assert runs_on_cpu(torch.nn.Linear(2, 2))
    assert not runs_on_cpu(TickPolicy())  # no weights: a stand-in (or a remote policy) that torch does not run
