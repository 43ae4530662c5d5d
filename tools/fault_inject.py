#!/usr/bin/env python
"""Fault injection against robolearn's writers and readers: kill them, corrupt what they wrote, fill the disk.

Every case runs the real command line (``robolearn ...``) or the real library call in a subprocess and then
checks three things:

- **data intact**: no committed episode or complete checkpoint was lost or changed (each is compared with a
  reference copy, array by array); a store may end in the state before the operation or after it, never between;
- **clean error**: every command that failed said so in one line ``robolearn: error: ...`` with exit status 1;
- **traceback**: any ``Traceback`` on standard error is counted against the case.

Case groups:

``kill-drop``, ``kill-merge``, ``kill-checkpoint``, ``kill-collect``
    the operation runs with ``os.rename``, ``os.replace``, ``os.link``, ``os.unlink``, ``os.rmdir`` and
    ``shutil.rmtree`` wrapped so that the process SIGKILLs itself just before its k-th such call, for every k
    (``--quick``: a sample) until the operation completes; then ``data info``/``data validate`` (or a load) run on
    what is left, the operation is retried, and the data is checked.
``corrupt``
    each chunk file and metadata file of a small store is deleted, truncated to half, or overwritten with garbage;
    ``data validate``, ``data info`` and ``data drop`` run on it; nothing else in the store may change.
``disk-full``
    collect, drop and merge on a small tmpfs (``mount -t tmpfs -o size=...``; skipped where it cannot be mounted).

    python tools/fault_inject.py --out tools/bench/results/fault_inject.json
    python tools/fault_inject.py --quick            # a sample of the kill points (about five minutes)

Prints a table, then a one-line JSON summary as the last line of standard output.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402

EXE = [sys.executable, "-m", "robolearn.cli"]
ENV = {**os.environ, "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}

# Runs `python -c KILLER <kill-at> <module:function or "cli"> args...`: the k-th filesystem rename/unlink kills it.
KILLER = textwrap.dedent(
    """
    import os, shutil, signal, sys
    k = int(sys.argv[1]); count = [0]
    def wrap(fn):
        def inner(*a, **kw):
            count[0] += 1
            if count[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **kw)
        return inner
    for name in ("rename", "replace", "link", "unlink", "rmdir"):
        setattr(os, name, wrap(getattr(os, name)))
    shutil.rmtree = wrap(shutil.rmtree)
    if k == 0:  # a counting run: say how many points the operation passed
        import atexit
        atexit.register(lambda: sys.stderr.write(f"FAULT_POINTS={count[0]}\\n"))
    target, args = sys.argv[2], sys.argv[3:]
    if target == "cli":
        from robolearn.cli import main
        sys.exit(main(args))
    module, _, func = target.partition(":")
    import importlib
    getattr(importlib.import_module(module), func)(*args)
    """
)


@dataclass
class Case:
    group: str
    name: str
    data_intact: bool = True
    clean: bool = True  # every failing command ended in one `robolearn: error:` line, exit 1
    traceback: bool = False
    detail: str = ""
    outputs: list[str] = field(default_factory=list)


def run(args: list[str], kill_at: int | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    if kill_at is None:
        cmd = [*EXE, *args]
    else:
        cmd = [sys.executable, "-c", KILLER, str(kill_at), "cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout, cwd=ROOT)


def run_py(target: str, args: list[str], kill_at: int = 0, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", KILLER, str(kill_at), target, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout, cwd=ROOT)


def judge(case: Case, proc: subprocess.CompletedProcess) -> None:
    """Record what one command did: a traceback, or a failure that is not one clean error line."""
    err = proc.stderr or ""
    case.outputs.append(f"rc={proc.returncode} {err.strip().splitlines()[-1] if err.strip() else ''}"[:300])
    if "Traceback (most recent call last)" in err:
        case.traceback = True
    if proc.returncode == 0:
        return
    if proc.returncode != 1 or "robolearn: error:" not in err:
        case.clean = False


def tree_digest(path: Path) -> dict[str, str]:
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.name != ".robolearn.lock":
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def episodes_of(path: Path) -> list[dict[str, np.ndarray]] | None:
    """The committed episodes of a store, or None when it does not open cleanly (subprocess-free: the library)."""
    from robolearn.data import EpisodeStore, StoreError

    try:
        with EpisodeStore.open(path) as s:
            return [s.get_episode(i) for i in range(s.n_episodes)]
    except (StoreError, OSError, ValueError):
        return None


def same_episodes(a: list[dict[str, np.ndarray]] | None, b: list[dict[str, np.ndarray]]) -> bool:
    return a is not None and len(a) == len(b) and all(
        set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def is_prefix(a: list[dict[str, np.ndarray]] | None, b: list[dict[str, np.ndarray]]) -> bool:
    return a is not None and len(a) <= len(b) and same_episodes(a, b[: len(a)])


def kill_points(make: Callable[[Path], None], op: Callable[[Path, int], subprocess.CompletedProcess],
                check: Callable[[Path, Case], None], group: str, work: Path, quick: bool) -> list[Case]:
    """Count the operation's rename/unlink points, then run it killed at each (``quick``: the first 12, every 7th
    after, and the last 15, where the folder renames are), checking each outcome, and once to completion."""
    d = work / f"{group}-count"
    d.mkdir(parents=True)
    make(d)
    proc = op(d, 0)
    shutil.rmtree(d, ignore_errors=True)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("FAULT_POINTS=")]
    total = int(lines[-1].split("=")[1]) if lines else 0
    points = list(range(1, total + 1))
    if quick:
        points = sorted({k for k in points if k <= 12 or k % 7 == 0 or k > total - 15})
    cases: list[Case] = []
    for k in [*points, None]:
        d = work / f"{group}-{k}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        make(d)
        proc = op(d, 0 if k is None else k)
        case = Case(group, f"killed at point {k} of {total}" if k is not None else f"not killed ({total} points)")
        if k is None or proc.returncode != -9:
            judge(case, proc)
        check(d, case)
        cases.append(case)
        shutil.rmtree(d, ignore_errors=True)
    return cases


# ---------------------------------------------------------------------------------------------- stores
def make_store(path: Path, lengths: tuple[int, ...] = (6, 4, 5, 7, 3, 5), seed0: int = 0) -> list[dict]:
    from datagen import SCHEMA, make_episode

    from robolearn.data import EpisodeStore

    eps = [make_episode(n, seed=seed0 + i) for i, n in enumerate(lengths)]
    with EpisodeStore.create(path, SCHEMA, fps=10, task="fault") as s:
        for ep in eps:
            s.append_episode(ep)
    return eps


def group_drop(work: Path, quick: bool) -> list[Case]:
    ref = make_store(work / "ref_drop.zarr")
    kept = [ep for i, ep in enumerate(ref) if i not in (1, 3)]

    def make(d: Path) -> None:
        shutil.copytree(work / "ref_drop.zarr", d / "s.zarr")

    def op(d: Path, k: int) -> subprocess.CompletedProcess:
        return run(["data", "drop", str(d / "s.zarr"), "--episodes", "1,3"], kill_at=k)

    def check(d: Path, case: Case) -> None:
        store = d / "s.zarr"
        for args in (["data", "info", str(store)], ["data", "validate", str(store)]):
            judge(case, run(args))
        now = episodes_of(store)
        if same_episodes(now, ref) or now is None:  # the drop did not happen (or left a backup): the user retries
            judge(case, run(["data", "drop", str(store), "--episodes", "1,3"]))
            now = episodes_of(store)
        backup = d / ".s.zarr.drop-backup"
        if same_episodes(now, kept):
            return
        if now is None and same_episodes(episodes_of(backup), ref):
            case.detail = "original kept in the drop backup, as the error said"
            return
        case.data_intact = False
        case.detail = f"store holds {None if now is None else len(now)} episodes"

    return kill_points(make, op, check, "kill-drop", work, quick)


def group_merge(work: Path, quick: bool) -> list[Case]:
    a = make_store(work / "ref_a.zarr", (5, 6, 4))
    b = make_store(work / "ref_b.zarr", (3, 7), seed0=10)
    da, db = tree_digest(work / "ref_a.zarr"), tree_digest(work / "ref_b.zarr")

    def make(d: Path) -> None:
        shutil.copytree(work / "ref_a.zarr", d / "a.zarr")
        shutil.copytree(work / "ref_b.zarr", d / "b.zarr")

    def op(d: Path, k: int) -> subprocess.CompletedProcess:
        return run(["data", "merge", str(d / "a.zarr"), str(d / "b.zarr"), "--out", str(d / "c.zarr")], kill_at=k)

    def check(d: Path, case: Case) -> None:
        out = d / "c.zarr"
        if out.exists():
            judge(case, run(["data", "validate", str(out)]))
        judge(case, run(["data", "merge", str(d / "a.zarr"), str(d / "b.zarr"), "--out", str(out), "--overwrite"]))
        sources_ok = tree_digest(d / "a.zarr") == da and tree_digest(d / "b.zarr") == db
        if not (sources_ok and same_episodes(episodes_of(out), a + b)):
            case.data_intact = False
            case.detail = f"sources unchanged: {sources_ok}; merged episodes: {len(episodes_of(out) or [])}"

    return kill_points(make, op, check, "kill-merge", work, quick)


def group_collect(work: Path, quick: bool) -> list[Case]:
    ref_path = work / "ref_collect.zarr"
    proc = run(["collect", "task=push_t", "episodes=3", f"out={ref_path}", "progress=false", "seed=0"])
    if proc.returncode != 0:
        return [Case("kill-collect", "reference collection", False, False, "Traceback" in proc.stderr, proc.stderr[-300:])]
    ref = episodes_of(ref_path) or []

    def make(d: Path) -> None:
        pass

    def op(d: Path, k: int) -> subprocess.CompletedProcess:
        return run(["collect", "task=push_t", "episodes=3", f"out={d / 's.zarr'}", "progress=false", "seed=0"],
                   kill_at=k)

    def check(d: Path, case: Case) -> None:
        store = d / "s.zarr"
        before = episodes_of(store) if store.exists() else []
        if store.exists():
            judge(case, run(["data", "validate", str(store)]))
        if not is_prefix(before, ref):
            case.data_intact = False
            case.detail = "episodes after the kill are not the first ones collected"
            return
        judge(case, run(["collect", "task=push_t", "episodes=3", f"out={store}", "progress=false", "seed=0"]))
        after = episodes_of(store) or []
        if not is_prefix(before, after) or len(after) < 3:
            case.data_intact = False
            case.detail = f"resumed collection: {len(before or [])} -> {len(after)} episodes"

    return kill_points(make, op, check, "kill-collect", work, quick)


# ---------------------------------------------------------------------------------------------- checkpoints
SAVE = "tools.fault_inject:save_checkpoint"


def save_checkpoint(src: str, dst: str, bump: str) -> None:
    """Overwrite checkpoint ``dst`` with the policy of ``src``, one weight shifted by ``bump``."""
    import torch

    from robolearn.policies import load_policy, save_policy

    policy = load_policy(src)
    with torch.no_grad():
        next(policy.parameters()).add_(float(bump))
    save_policy(policy, dst, config={"task": "push_t", "env_config": {}})


def group_checkpoint(work: Path, quick: bool) -> list[Case]:
    import torch

    from robolearn.policies import CheckpointError, load_policy

    fixture = ROOT / "tests" / "fixtures" / "checkpoints" / "v1_push_t_diffusion_unet"
    first = next(load_policy(fixture).parameters()).detach().clone()

    def make(d: Path) -> None:
        proc = run_py(SAVE, [str(fixture), str(d / "ckpt"), "1.0"])
        assert proc.returncode == 0, proc.stderr

    def op(d: Path, k: int) -> subprocess.CompletedProcess:
        return run_py(SAVE, [str(fixture), str(d / "ckpt"), "2.0"], kill_at=k)

    def check(d: Path, case: Case) -> None:
        try:
            got = next(load_policy(d / "ckpt").parameters()).detach()
        except CheckpointError as e:
            case.data_intact = False
            case.detail = f"no loadable checkpoint left: {e}"
            return
        if not (torch.equal(got, first + 1.0) or torch.equal(got, first + 2.0)):
            case.data_intact = False
            case.detail = "the checkpoint holds neither the old nor the new weights"
        again = run_py(SAVE, [str(fixture), str(d / "ckpt"), "3.0"])
        judge(case, again)

    return kill_points(make, op, check, "kill-checkpoint", work, quick)


# ---------------------------------------------------------------------------------------------- corruption
def group_corrupt(work: Path, quick: bool) -> list[Case]:
    ref_path = work / "ref_corrupt.zarr"
    make_store(ref_path, (6, 4, 5))
    files = [p.relative_to(ref_path) for p in sorted(ref_path.rglob("*")) if p.is_file() and p.name != ".robolearn.lock"]
    if quick:
        files = files[::3]
    cases = []
    for rel in files:
        for how in ("delete", "truncate", "garbage"):
            d = work / "corrupt"
            shutil.rmtree(d, ignore_errors=True)
            store = d / "s.zarr"
            shutil.copytree(ref_path, store)
            target = store / rel
            data = target.read_bytes()
            if how == "delete":
                target.unlink()
            elif how == "truncate":
                target.write_bytes(data[: len(data) // 2])
            else:
                target.write_bytes(os.urandom(max(16, len(data))))
            others = {k: v for k, v in tree_digest(store).items() if k != str(rel)}
            case = Case("corrupt", f"{how} {rel}")
            for args in (["data", "validate", str(store)], ["data", "info", str(store)],
                         ["data", "drop", str(store), "--episodes", "0"]):
                proc = run(args)
                judge(case, proc)
                if args[1] == "validate" and proc.returncode == 0 and how != "delete" and rel.name != "zarr.json":
                    case.detail = "validate found nothing wrong"
            after = {k: v for k, v in tree_digest(store).items() if k != str(rel)} if store.exists() else {}
            dropped = set(others) - set(after)
            if dropped or any(after.get(k) != v for k, v in others.items() if k in after):
                # a successful drop of episode 0 rewrites the store: that is not damage if the rest is intact
                survivors = episodes_of(store)
                if survivors is None or len(survivors) != 2:
                    case.data_intact = False
                    case.detail = f"files changed or removed besides the corrupted one: {sorted(dropped)[:3]}"
            cases.append(case)
    shutil.rmtree(work / "corrupt", ignore_errors=True)
    return cases


# ---------------------------------------------------------------------------------------------- disk full
def group_disk_full(work: Path, quick: bool) -> list[Case]:
    mnt = work / "tmpfs"
    mnt.mkdir(exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if ok.returncode != 0:
        return [Case("disk-full", "skipped: cannot mount a tmpfs here", detail=ok.stderr.decode()[-200:])]
    cases = []
    try:
        case = Case("disk-full", "collect push_t (camera images) until the disk is full")
        store = mnt / "s.zarr"
        proc = run(["collect", "task=push_t", "episodes=100", f"out={store}", "progress=false", "seed=0",
                    "env.obs_mode=image"])
        judge(case, proc)
        now = episodes_of(store) if store.exists() else []
        if now is None:
            case.data_intact = False
            case.detail = "the store does not open after the disk filled"
        else:
            case.detail = f"{len(now)} episodes kept; rc {proc.returncode}"
        cases.append(case)
        # drop and merge on the full disk
        for name, args in (("drop on a full disk", ["data", "drop", str(store), "--episodes", "0"]),
                           ("merge on a full disk", ["data", "merge", str(store), str(store), "--out",
                                                     str(mnt / "m.zarr")])):
            case = Case("disk-full", name)
            before = episodes_of(store)
            judge(case, run(args))
            after = episodes_of(store)
            if before is not None and not (same_episodes(after, before) or (name.startswith("drop") and
                                                                         same_episodes(after, before[1:]))):
                case.data_intact = False
            cases.append(case)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
    return cases


GROUPS = {"kill-drop": group_drop, "kill-merge": group_merge, "kill-checkpoint": group_checkpoint,
          "kill-collect": group_collect, "corrupt": group_corrupt, "disk-full": group_disk_full}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="JSON results")
    p.add_argument("--quick", action="store_true", help="a sample of the kill points and corrupted files")
    p.add_argument("--groups", nargs="*", default=list(GROUPS), choices=list(GROUPS))
    args = p.parse_args(argv)
    t0 = time.time()
    cases: list[Case] = []
    with tempfile.TemporaryDirectory(prefix="robolearn-fault-") as tmp:
        for g in args.groups:
            t = time.time()
            got = GROUPS[g](Path(tmp), args.quick)
            cases += got
            print(f"{g}: {len(got)} cases in {time.time() - t:.0f} s", file=sys.stderr, flush=True)
    rows = []
    for g in args.groups:
        cs = [c for c in cases if c.group == g]
        rows.append({"group": g, "cases": len(cs), "data_intact": sum(c.data_intact for c in cs),
                     "clean_errors": sum(c.clean for c in cs), "tracebacks": sum(c.traceback for c in cs)})
    bad = [c for c in cases if not c.data_intact or not c.clean or c.traceback]
    for c in bad[:40]:
        print(f"  FAULT {c.group} / {c.name}: intact={c.data_intact} clean={c.clean} traceback={c.traceback} "
              f"{c.detail} | {' || '.join(c.outputs[-3:])}")
    head = f"{'group':<16} {'cases':>6} {'data intact':>12} {'clean errors':>13} {'tracebacks':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['group']:<16} {r['cases']:>6} {r['data_intact']:>12} {r['clean_errors']:>13} {r['tracebacks']:>11}")
    total = {"cases": len(cases), "data_intact": sum(c.data_intact for c in cases),
             "clean_errors": sum(c.clean for c in cases), "tracebacks": sum(c.traceback for c in cases)}
    result = {"bench": "fault_inject", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "quick": args.quick, "seconds": round(time.time() - t0, 1), "rows": rows, "total": total,
              "faults": [asdict(c) for c in bad]}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({"bench": "fault_inject", **total, "out": str(args.out) if args.out else None}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
