"""Fixtures of the teleop tests: event logs written by hand, the robolearn command, a display-less environment."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

EXE = str(Path(sys.executable).with_name("robolearn"))


def _write_log(path: Path, ticks: dict[int, list[str]], *, task: str = "push_t", seed: int | None = 3,
              end: int | None = None, device: str = "keyboard", sources: list[str] | None = None,
              raws: dict[int, dict[str, Any]] | None = None, header: dict[str, Any] | None = None) -> Path:
    """A replay log as ``record_events=`` writes it: keyboard key names per control tick (and other raw inputs);
    ``header``: more header fields (policy, mode, latency_s, ...)."""
    head: dict[str, Any] = {"format": "robolearn-teleop-events", "version": 2, "task": task, "device": device,
                            "sources": sources or ["keyboard"], **(header or {})}
    if seed is not None:
        head["seed"] = seed
    lines = [head]
    for t in sorted(set(ticks) | set(raws or {})):
        rec: dict[str, Any] = {"t": t}
        if t in ticks:
            rec["keyboard"] = {"keys": ticks[t]}
        rec.update((raws or {}).get(t, {}))
        lines.append(rec)
    if end is not None:
        lines.append({"end": end})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture
def write_log() -> Callable[..., Path]:
    return _write_log


@pytest.fixture
def robolearn_exe() -> str:
    return EXE


@pytest.fixture
def headless_env() -> dict[str, str]:
    """The environment of a child process with no display at all."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["MUJOCO_GL"] = "egl"
    return env
