"""``robolearn run`` and ``robolearn serve`` with a real (tiny) checkpoint, real MuJoCo and real sockets."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from robolearn.cli import main
from robolearn.policies import load_policy
from robolearn.runtime.client import RemotePolicy

EXE = str(Path(sys.executable).with_name("robolearn"))


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rt")
    data = root / "peg.zarr"
    assert main(["collect", "task=peg_insert", "episodes=2", f"out={data}", "progress=false"]) == 0
    assert main(["train", "task=peg_insert", f"dataset={data}", f"run_dir={root / 'run'}", "training.steps=3",
                 "policy.backbone.preset=tiny", "training.batch_size=8", "training.progress=false",
                 "eval.episodes=0"]) == 0
    return root / "run" / "checkpoints" / "latest"


def test_run_virtual_time_writes_report(checkpoint, tmp_path, capsys):
    argv = ["run", f"checkpoint={checkpoint}", "realtime=false", "latency_s=0.25", "mode=async", "episodes=1",
            "status=false", f"run_dir={tmp_path}"]
    assert main(argv) == 0
    summary = last_json(capsys.readouterr().out)
    for key in ("deadline_misses", "actions_dropped", "latency_ms_p50", "latency_ms_p99", "jitter_ms_p99",
                "success_rate", "episodes"):
        assert key in summary, key
    assert summary["episodes"] == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["actions_dropped"] > 0  # 250 ms of latency at 10 Hz: the first actions of each chunk are stale


@pytest.mark.parametrize(
    "argv, message",
    [
        (["mode=fast"], "mode must be sync or async"),
        (["checkpoint=/nonexistent"], "checkpoint folder /nonexistent does not exist"),
        (["policy=http://x"], "give exactly one of"),
    ],
)
def test_run_bad_input(checkpoint, capsys, argv, message):
    base = [] if any(a.startswith("checkpoint=") for a in argv) else [f"checkpoint={checkpoint}"]
    assert main(["run", *base, *argv]) == 1
    assert message in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_remote_policy_and_runner(checkpoint, tmp_path):
    port = _free_port()
    # Ctrl-C must reach the server even when the tests run as a shell's background job (SIGINT ignored).
    server = subprocess.Popen([EXE, "serve", f"checkpoint={checkpoint}", f"port={port}", "token=s3cret"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        local = load_policy(checkpoint)
        with pytest.raises(PermissionError):
            RemotePolicy(f"ws://127.0.0.1:{port}", token="wrong")
        remote = RemotePolicy(f"ws://127.0.0.1:{port}", token="s3cret")
        obs = {k: torch.randn(1, local.n_obs_steps, *s) for k, s in local.obs_shapes.items()}
        noise = torch.randn(local.noise_shape(1))
        want = local.predict_action(obs, noise=noise).numpy()
        got = np.asarray(remote.predict_action(obs, noise=noise))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        remote.close()
        r = subprocess.run([EXE, "run", f"policy=ws://127.0.0.1:{port}", "task=peg_insert", "token=s3cret",
                            "realtime=false", "episodes=1", "status=false", f"run_dir={tmp_path}"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert last_json(r.stdout)["episodes"] == 1
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    served = last_json(out)
    assert served["served"] >= 2


@pytest.mark.parametrize("blend", ["ensemble", "warmstart"])
def test_run_blends_with_a_real_policy(checkpoint, tmp_path, capsys, blend):
    argv = ["run", f"checkpoint={checkpoint}", "realtime=false", "mode=async", f"blend={blend}", "episodes=1",
            "status=false", f"run_dir={tmp_path}"]
    assert main(argv) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["episodes"] == 1 and summary.get("error") in (None, "")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["inferences"] > 1
