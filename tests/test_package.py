"""robolearn as a real package: a wheel built with `pip wheel .`, installed without -e into a fresh virtual
environment, runs its commands from anywhere (the configs ship inside it); a missing optional part names its
extra."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel; the other dependencies are seen through a .pth line pointing at this
    environment's site-packages (copying torch and MuJoCo would take minutes). A path line does not run that
    folder's own .pth files, so the checkout's editable install is not visible there."""
    root = tmp_path_factory.mktemp("pkg")
    src = root / "src"  # a copy of what the wheel is built from: an in-tree build would leave build/ in the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("robolearn", "sim"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    dist = root / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist)], check=True, capture_output=True, cwd=root, timeout=300)
    wheels = list(dist.glob("robolearn_mujoco-*.whl"))
    assert len(wheels) == 1, wheels
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site_dir = next((venv / "lib").glob("python3*/site-packages"))
    (site_dir / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "-q", str(wheels[0])], check=True, capture_output=True, cwd=root, timeout=300)
    return venv


def run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ROBOLEARN_CONFIG_DIR")}
    return subprocess.run([str(venv / "bin" / "robolearn"), *args], capture_output=True, text=True, cwd=cwd,
                          env={**env, "MUJOCO_GL": "egl"}, timeout=300)


def test_the_wheel_runs_every_command_without_the_checkout(installed, tmp_path):
    where = subprocess.run([str(installed / "bin" / "python"), "-c", "import robolearn, sim; print(robolearn.__file__);"
                            "print(sim.__file__)"], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert str(REPO) not in where.stdout and str(installed) in where.stdout  # the wheel's copy, not the checkout
    out = tmp_path / "pt.zarr"
    r = run(installed, "collect", "task=push_t", "episodes=1", f"out={out}", "progress=false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["episodes"] == 1
    r = run(installed, "train", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "n_obs_steps=2" in r.stdout and "settings (key=value" in r.stdout
    r = run(installed, "data", "info", str(out), "--json", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["episodes"] == 1


def test_a_missing_extra_is_named():
    from robolearn.extras import MissingExtra, require

    with pytest.raises(MissingExtra, match=r"pip install 'robolearn-mujoco\[server\]'"):
        require("no_such_module_for_robolearn", "server", "robolearn serve")
