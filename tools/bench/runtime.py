"""Runtime benchmark: loop jitter, async vs sync with a slow policy on push_t, server overhead, server robustness.

    python tools/bench/runtime.py --out tools/bench/results/runtime.json          # about 3 minutes
    python tools/bench/runtime.py --quick                                         # about 1 minute

(a) tick-start lateness (jitter) p50/p99/max at 10 Hz and 50 Hz with a trivial policy;
(b) push_t at 10 Hz with a policy whose inference takes 250 ms (2.5 periods: the scripted expert's chunk, padded
    by sleeping), real time, async vs sync: deadline misses, dropped actions, success; and the same policy offline
    (virtual time, zero latency) as the baseline;
(c) round trip through PolicyServer + RemotePolicy on loopback vs the in-process predict_action;
(d) 1,000 malformed or random messages to the server, then a correct request.

The test policies come from tests/runtime/rt_policies.py (the same ones the tests use). Prints a table; the last line
of output is the JSON summary. Timing numbers depend on machine load: record it with the results.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "runtime"))

import msgpack  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from rt_policies import ExpertChunkPolicy, TickEnv, TickPolicy  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

import sim  # noqa: E402
from robolearn.runtime import PolicyServer, RemotePolicy, Runner, msgpack_numpy  # noqa: E402


def jitter(rate_hz: float, seconds: float) -> dict[str, Any]:
    ticks = int(rate_hz * seconds)
    env, pol = TickEnv(max_steps=ticks), TickPolicy(horizon=16, n_obs_steps=2, n_action_steps=8)
    r = Runner(pol, env, rate_hz=rate_hz, mode="async", realtime=True, status=False).run(episodes=1)
    return {k: r[k] for k in ("rate_hz", "ticks", "hz_achieved", "jitter_ms_p50", "jitter_ms_p99", "jitter_ms_max",
                              "deadline_misses")}


def push_t(mode: str, episodes: int, realtime: bool, sleep_s: float) -> dict[str, Any]:
    pol = ExpertChunkPolicy(sleep_s=sleep_s if realtime else 0.0)
    r = Runner(pol, sim.make("push_t"), rate_hz=10, mode=mode, realtime=realtime,
               latency_s=None if realtime else 0.0, status=False).run(episodes=episodes, seed=0)
    keys = ("mode", "realtime", "episodes", "success_rate", "deadline_misses", "actions_dropped", "ticks",
            "inferences", "latency_ms_p50", "latency_ms_p99", "jitter_ms_p99", "hz_achieved", "wall_s")
    out = {k: r[k] for k in keys}
    out["steps"] = [e["steps"] for e in r["per_episode"]]
    return out


def server_overhead(n: int) -> dict[str, Any]:
    pol = TickPolicy(horizon=16, n_obs_steps=2, n_action_steps=8)
    obs = {"t": torch.tensor([[[1.0], [2.0]]])}
    local = []
    for _ in range(n):
        t = time.perf_counter()
        pol.predict_action(obs)
        local.append(time.perf_counter() - t)
    with PolicyServer(TickPolicy(horizon=16, n_obs_steps=2, n_action_steps=8)) as srv:
        remote = RemotePolicy(srv.url)
        for _ in range(20):
            remote.predict_action(obs)  # warm up
        rt = []
        for _ in range(n):
            t = time.perf_counter()
            chunk = remote.predict_action(obs)
            rt.append(time.perf_counter() - t)
        same = bool(torch.equal(chunk, pol.predict_action(obs)))
        remote.close()
    p = lambda v, q: round(float(np.percentile(v, q)) * 1e3, 4)  # noqa: E731
    return {"calls": n, "in_process_ms_p50": p(local, 50), "in_process_ms_p99": p(local, 99),
            "round_trip_ms_p50": p(rt, 50), "round_trip_ms_p99": p(rt, 99),
            "added_ms_p50": round(p(rt, 50) - p(local, 50), 4), "added_ms_p99": round(p(rt, 99) - p(local, 99), 4),
            "same_chunk": same}


def _junk(rng: random.Random) -> bytes | str:
    kind = rng.randrange(7)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    if kind == 1:
        return "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(1, 50)))
    if kind == 2:
        return msgpack.packb([rng.random() for _ in range(rng.randrange(5))])
    if kind == 3:
        return msgpack_numpy.packb({"t": np.zeros(rng.randrange(2, 6), np.float32)})
    if kind == 4:
        return msgpack.packb({"t": {b"__ndarray__": True, b"data": b"\0" * rng.randrange(9), b"dtype":
                                    rng.choice(["<f4", "|O", "zz", "<c8"]), b"shape": [rng.randrange(-2, 3)]}})
    if kind == 5:
        return msgpack_numpy.packb({"x": 1, "t": "text"})
    return msgpack_numpy.packb({"t": np.zeros(1, np.float32), "pad": b"\0" * 70_000})  # over the 64 KiB limit


def robustness(n: int) -> dict[str, Any]:
    rng = random.Random(0)
    errors = answered = 0
    with PolicyServer(TickPolicy(), max_message_bytes=64 * 1024) as srv:
        ws = connect(srv.url, max_size=None, legacy=True)
        ws.recv(timeout=5)
        t = time.perf_counter()
        for _ in range(n):
            ws.send(_junk(rng))
            reply = ws.recv(timeout=10)
            if isinstance(reply, str):
                errors += 1
            else:
                answered += 1
        wall = time.perf_counter() - t
        ws.send(msgpack_numpy.packb({"t": np.array([5.0], np.float32), "reset": True}))
        good = msgpack_numpy.unpackb(ws.recv(timeout=10))
        ws.close()
        correct = float(good["actions"][0, 0]) == 5.0
    return {"messages": n, "error_replies": errors, "answered": answered, "still_correct": correct,
            "wall_s": round(wall, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "tools/bench/results/runtime.json"))
    ap.add_argument("--quick", action="store_true", help="shorter runs (about a minute)")
    ap.add_argument("--jitter-s", type=float, default=None)
    ap.add_argument("--episodes", type=int, default=None)
    args = ap.parse_args()
    jit_s = args.jitter_s or (5.0 if args.quick else 20.0)
    eps = args.episodes or (2 if args.quick else 5)
    load = os.getloadavg()
    res: dict[str, Any] = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                           "loadavg_start": [round(x, 2) for x in load], "quick": args.quick}
    res["jitter"] = [jitter(10, jit_s), jitter(50, jit_s)]
    for j in res["jitter"]:
        print(f"(a) jitter {j['rate_hz']:>4.0f} Hz over {j['ticks']} ticks: p50 {j['jitter_ms_p50']:.3f} ms, "
              f"p99 {j['jitter_ms_p99']:.3f} ms, max {j['jitter_ms_max']:.3f} ms, achieved {j['hz_achieved']} Hz")
    res["push_t"] = {"offline": push_t("sync", eps, False, 0.0), "async": push_t("async", eps, True, 0.25),
                     "sync": push_t("sync", eps, True, 0.25)}
    print(f"(b) push_t 10 Hz, 250 ms inference, {eps} episodes")
    print(f"    {'run':<8} {'success':>8} {'misses':>7} {'dropped':>8} {'ticks':>6} {'lat p50 ms':>11}")
    for name, r in res["push_t"].items():
        print(f"    {name:<8} {r['success_rate']:>8.2f} {r['deadline_misses']:>7} {r['actions_dropped']:>8} "
              f"{r['ticks']:>6} {r['latency_ms_p50']:>11.1f}")
    res["server_overhead"] = server_overhead(300 if args.quick else 1000)
    s = res["server_overhead"]
    print(f"(c) loopback round trip p50 {s['round_trip_ms_p50']:.3f} ms vs in-process {s['in_process_ms_p50']:.3f} ms: "
          f"added p50 {s['added_ms_p50']:.3f} ms, p99 {s['added_ms_p99']:.3f} ms (same chunk: {s['same_chunk']})")
    res["robustness"] = robustness(1000)
    r = res["robustness"]
    print(f"(d) {r['messages']} malformed messages: {r['error_replies']} error replies, {r['answered']} answered; "
          f"correct afterwards: {r['still_correct']}")
    res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2))
    os.replace(tmp, out)
    summary = {"jitter_ms_p99_10hz": res["jitter"][0]["jitter_ms_p99"],
               "jitter_ms_p99_50hz": res["jitter"][1]["jitter_ms_p99"],
               **{f"{k}_{m}": res["push_t"][k][m] for k in ("offline", "async", "sync")
                  for m in ("success_rate", "deadline_misses", "actions_dropped")},
               "server_added_ms_p50": s["added_ms_p50"], "malformed_survived": r["still_correct"],
               "out": str(out)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
