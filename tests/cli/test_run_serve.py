"""``robolearn run`` and ``robolearn serve`` with a real (tiny) checkpoint, real MuJoCo and real sockets."""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
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


def test_run_at_the_tasks_rate_records_a_video_of_the_episode(checkpoint, tmp_path, capsys):
    import imageio.v2 as imageio

    argv = ["run", f"checkpoint={checkpoint}", "realtime=false", "latency_s=0", "episodes=1", "status=false",
            "video=true", "env.max_episode_steps=6", f"run_dir={tmp_path}"]
    assert main(argv) == 0
    assert "peg_insert at 10 Hz (the task's control rate)" in capsys.readouterr().err  # rate_hz=null
    report = json.loads((tmp_path / "report.json").read_text())
    ep = report["per_episode"][0]
    assert report["rate_hz"] == 10.0 and ep["steps"] == 6
    assert report["videos"] == [str(tmp_path / "videos" / "ep0.mp4")] == [ep["video"]]
    assert ep["video_matches_run"]  # the replay of the sent actions is the run: same steps, return, success
    with imageio.get_reader(ep["video"]) as reader:
        assert reader.count_frames() == ep["steps"] + 1  # the first state and one frame per step


@pytest.mark.parametrize(
    "argv, message",
    [
        (["mode=fast"], "mode must be sync or async"),
        (["checkpoint=/nonexistent"], "checkpoint folder /nonexistent does not exist"),
        (["policy=http://x"], "give exactly one of"),
        (["warm_steps=2"], "warm_steps=2 applies to blend=warmstart (RTI-DP), not blend=none"),
        (["blend=warmstart", "warm_steps=0"], "warm_steps must be a whole number >= 1"),
        (["blend=warmstart", "warm_steps=1000"], "warm_steps=1000 is more than the"),
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
        assert "peg_insert at 10 Hz (the task's control rate)" in r.stderr  # a remote policy runs at it too
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
    assert report["warm_steps"] == (2 if blend == "warmstart" else None)  # the runner's default


def test_run_warm_steps_reach_the_runner(checkpoint, tmp_path, capsys):
    """warm_steps=N is the runner's: the report names it (default 2 above), and the run warm-starts with it."""
    assert load_policy(checkpoint).sampler_config["steps"] >= 3
    argv = ["run", f"checkpoint={checkpoint}", "realtime=false", "mode=sync", "blend=warmstart", "episodes=1",
            "warm_steps=3", "status=false", f"run_dir={tmp_path}"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["warm_steps"] == 3 and report["inferences"] > 1 and report["error"] is None


# ---------------------------------------------------------------------------------------------- issue 11
FIXTURE_PUSH_T = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints" / "v1_push_t_diffusion_unet"


def _weights_copy(checkpoint: Path, dest: Path, value: float) -> Path:
    """The checkpoint with every floating-point weight of the network (not the normalizer) set to ``value``, written
    as training writes it (safetensors)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(checkpoint, dest)
    state = load_file(str(dest / "model.safetensors"))
    save_file({k: torch.full_like(v, value) if v.is_floating_point() and not k.startswith("normalizer.") else v
               for k, v in state.items()}, str(dest / "model.safetensors"))
    return dest


class _PegDouble:
    """A peg_insert-shaped chunk policy (test double) whose chunks hold NaN from call ``nan_from`` on."""

    horizon, n_obs_steps, n_action_steps, action_dim = 8, 2, 4, 4
    obs_keys = ["ee_pos", "hole_pos"]
    obs_shapes = {"ee_pos": (3,), "hole_pos": (3,)}

    def __init__(self, nan_from: int = 1) -> None:
        self.nan_from, self.calls = nan_from, 0

    def reset(self) -> None:
        pass

    def predict_action(self, obs, noise=None):
        self.calls += 1
        out = torch.zeros(obs["ee_pos"].shape[0], self.horizon, self.action_dim)
        return out * float("nan") if self.calls >= self.nan_from else out


def test_run_nan_checkpoint_exits_nonzero_and_sends_no_nan_to_mujoco(checkpoint, tmp_path, monkeypatch, capsys):
    bad = _weights_copy(checkpoint, tmp_path / "nan_ckpt", float("nan"))
    monkeypatch.chdir(tmp_path)  # MuJoCo writes MUJOCO_LOG.TXT here when it gets NaN controls
    rc = main(["run", f"checkpoint={bad}", "realtime=false", "episodes=1", "status=false",
               f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "non-finite" in err.lower() or "nan" in err.lower(), err
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()
    report = tmp_path / "run" / "report.json"
    if report.exists():  # the checkpoint loaded (a load-time check of the weights refuses it first)
        saved = json.loads(report.read_text())
        assert saved["nonfinite_chunks"] == 3 and saved["ticks"] == 0


def test_run_checkpoint_with_overflowing_output_holds_counts_and_exits_nonzero(checkpoint, tmp_path, monkeypatch,
                                                                                capsys):
    # finite weights (the checkpoint loads) whose activations overflow: every chunk is NaN/inf
    bad = _weights_copy(checkpoint, tmp_path / "huge_ckpt", 1e30)
    monkeypatch.chdir(tmp_path)
    rc = main(["run", f"checkpoint={bad}", "realtime=false", "episodes=2", "status=false",
               f"run_dir={tmp_path / 'run'}"])
    out, err = capsys.readouterr()
    assert rc == 1 and "non-finite action chunks" in err and "max_nonfinite_chunks=3" in err, err
    assert last_json(out)["nonfinite_chunks"] == 3  # the summary still comes last on stdout
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["nonfinite_chunks"] == 3 and saved["ticks"] == 0 and saved["episodes"] == 1
    assert saved["per_episode"][0]["status"] == "nonfinite_actions"
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()


def test_run_remote_nan_policy_holds_counts_and_exits_nonzero(tmp_path, monkeypatch, capsys):
    from robolearn.runtime import PolicyServer

    monkeypatch.chdir(tmp_path)
    with PolicyServer(_PegDouble(nan_from=3)) as srv:
        rc = main(["run", f"policy=ws://127.0.0.1:{srv.port}", "task=peg_insert", "realtime=false",
                   "mode=sync", "latency_s=0", "max_nonfinite_chunks=2", "episodes=1", "status=false",
                   f"run_dir={tmp_path / 'run'}"])
        assert srv.nonfinite_chunks == 2
    out, err = capsys.readouterr()
    assert rc == 1 and "non-finite" in err and "max_nonfinite_chunks=2" in err, err
    summary = last_json(out)  # the summary line still comes last on stdout
    assert summary["nonfinite_chunks"] == 2
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["nonfinite_chunks"] == 2 and saved["ticks"] == 9  # two good chunks executed, then held once
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()


def test_server_with_a_real_checkpoint_refuses_nonfinite_input_and_output(checkpoint):
    from robolearn.runtime import PolicyServer, msgpack_numpy

    local = load_policy(checkpoint)
    with PolicyServer(local) as srv:
        from websockets.sync.client import connect

        ws = connect(f"ws://127.0.0.1:{srv.port}", max_size=None, legacy=True)
        ws.recv(timeout=5)
        frame = {k: np.zeros(s, np.float32) for k, s in local.obs_shapes.items()}
        key = sorted(frame)[0]

        def ask(**changes):
            ws.send(msgpack_numpy.packb({**frame, **changes}))
            reply = ws.recv(timeout=30)
            return reply if isinstance(reply, str) else msgpack_numpy.unpackb(reply)

        assert np.isfinite(ask()["actions"]).all()
        for value in (np.nan, np.inf):
            reply = ask(**{key: np.full_like(frame[key], value)})
            assert isinstance(reply, str) and repr(key) in reply and "not finite" in reply, reply
        reply = ask(**{key: np.full_like(frame[key], 3e38)})  # finite, but inf after normalization
        assert isinstance(reply, str) and reply.startswith("error: non-finite action chunk"), reply
        noise = np.full(local.noise_shape(1)[1:], np.nan, np.float32)
        reply = ask(noise=noise)
        assert isinstance(reply, str) and "noise" in reply and "not finite" in reply, reply
        assert np.isfinite(ask()["actions"]).all()  # still serving
        ws.close()
        assert srv.nonfinite_chunks == 1


def test_eval_of_a_checkpoint_with_nonfinite_output_says_so(checkpoint, tmp_path, monkeypatch, capsys):
    bad = _weights_copy(checkpoint, tmp_path / "huge_ckpt", 1e30)
    monkeypatch.chdir(tmp_path)
    rc = main(["eval", f"checkpoint={bad}", "episodes=2", "num_envs=1", "workers=0", f"run_dir={tmp_path / 'ev'}"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    line = out.strip().splitlines()[-1]
    assert "Infinity" not in line and "NaN" not in line, line  # strict JSON
    summary = json.loads(line)
    assert summary["nonfinite_chunks"] == 2 and summary["success_rate"] == 0.0
    for key in ("checkpoint", "task", "policy_type", "sampler", "n_action_steps", "seed", "step", "success_rate",
                "mean_return", "mean_max_reward", "mean_length", "episodes", "eval_s", "videos", "run_dir"):
        assert key in summary, key  # the existing summary keys stay
    assert "warning: eval" in err and "2 non-finite action chunk(s)" in err, err
    per_episode = json.loads(next((tmp_path / "ev" / "eval").glob("step_*.json")).read_text())["per_episode"]
    assert [e["nonfinite_chunks"] for e in per_episode] == [1, 1]
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()


def test_trainings_evaluator_reports_nonfinite_chunks(checkpoint, tmp_path, monkeypatch, capsys):
    from robolearn.cli.evaluation import Evaluator
    from robolearn.cli.runtime import checkpoint_run_config

    monkeypatch.chdir(tmp_path)
    policy = load_policy(checkpoint)
    with torch.no_grad():
        for p in policy.parameters():
            p.fill_(float("nan"))
    run_cfg = checkpoint_run_config(checkpoint)
    ev = Evaluator("peg_insert", dict(run_cfg.get("env_config") or {}), episodes=2, num_envs=1, workers=0,
                   seed=5, videos=0, run_dir=tmp_path / "train", device=torch.device("cpu"), progress=False)
    try:
        summary = ev(policy, 7)
    finally:
        ev.close()
    assert summary["nonfinite_chunks"] == 2 and summary["success_rate"] == 0.0
    err = capsys.readouterr().err
    assert "warning" in err and "non-finite" in err and "@7" in err, err


def test_run_checkpoint_of_another_task_fails_before_starting(checkpoint, tmp_path, capsys):
    rc = main(["run", f"checkpoint={FIXTURE_PUSH_T}", "task=peg_insert", "realtime=false", "status=false",
               f"run_dir={tmp_path / 'a'}"])
    err = capsys.readouterr().err
    assert rc == 1 and "agent_pos" in err and "block_pose" in err, err
    assert not (tmp_path / "a").exists()  # nothing ran
    rc = main(["run", f"checkpoint={checkpoint}", "task=push_t", "realtime=false", "status=false",
               f"run_dir={tmp_path / 'b'}"])
    err = capsys.readouterr().err
    assert rc == 1 and "ee_pos" in err and not (tmp_path / "b").exists(), err


def test_remote_policy_of_another_task_or_action_size_fails_before_starting(tmp_path, capsys):
    from robolearn.runtime import PolicyServer

    class WrongSize(_PegDouble):
        action_dim = 2

    with PolicyServer(_PegDouble(nan_from=10**9)) as srv:
        rc = main(["run", f"policy=ws://127.0.0.1:{srv.port}", "task=push_t", "realtime=false", "status=false",
                   f"run_dir={tmp_path / 'a'}"])
        err = capsys.readouterr().err
        assert rc == 1 and "ee_pos" in err and not (tmp_path / "a").exists(), err
    with PolicyServer(WrongSize(nan_from=10**9)) as srv:
        rc = main(["run", f"policy=ws://127.0.0.1:{srv.port}", "task=peg_insert", "realtime=false",
                   "status=false", f"run_dir={tmp_path / 'b'}"])
        err = capsys.readouterr().err
        assert rc == 1 and "action" in err and "4" in err and "2" in err and not (tmp_path / "b").exists(), err
        assert srv.requests_served == 0


@pytest.mark.parametrize("setting, key", [
    ("rate_hz=nan", "rate_hz"), ("rate_hz=inf", "rate_hz"), ("rate_hz=0", "rate_hz"), ("rate_hz=-10", "rate_hz"),
    ("duration_s=-1", "duration_s"), ("duration_s=0", "duration_s"), ("episodes=-1", "episodes"),
    ("episodes=0", "episodes"), ("latency_s=-0.5", "latency_s"), ("latency_s=inf", "latency_s"),
    ("max_nonfinite_chunks=0", "max_nonfinite_chunks"),
])
def test_run_refuses_nonsense_numbers_naming_the_key(checkpoint, tmp_path, capsys, setting, key):
    rc = main(["run", f"checkpoint={checkpoint}", setting, "realtime=false", "status=false",
               f"run_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith(f"robolearn: error: {key} must be"), err
    assert not (tmp_path / "r").exists()


def test_serve_beyond_loopback_needs_a_token_or_an_explicit_allowance(checkpoint, capsys):
    assert main(["serve", f"checkpoint={checkpoint}", "host=0.0.0.0", f"port={_free_port()}"]) == 1
    err = capsys.readouterr().err
    assert "without a token" in err and "allow_unauthenticated" in err, err
    # port=0: the server picks a free port and says which (a port chosen here could be taken meanwhile)
    server = subprocess.Popen([EXE, "serve", f"checkpoint={checkpoint}", "host=0.0.0.0", "port=0",
                               "allow_unauthenticated=true"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Read stderr line by line under a watchdog, as start_paused in tests/training/test_checkpoint_recovery.py does
    # (select() on the pipe misses a line already pulled into the text buffer along with the warning before it).
    lines: list[str] = []
    port = None
    watchdog = threading.Timer(90, server.kill)
    watchdog.start()
    try:
        for line in server.stderr:  # type: ignore[union-attr]
            lines.append(line)
            m = re.search(r"serving .* on ws://0\.0\.0\.0:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
    finally:
        watchdog.cancel()
    try:
        assert port is not None, "".join(lines)
        remote = RemotePolicy(f"ws://127.0.0.1:{port}")
        assert remote.action_dim == 4
        remote.close()
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    err = "".join(lines) + server.stderr.read()  # type: ignore[union-attr]
    assert server.returncode == 0, err
    assert "warning" in err.lower() and "without a token" in err, err


def test_run_samples_with_a_bf16_backbone_when_asked(checkpoint, tmp_path, capsys):
    argv = ["run", f"checkpoint={checkpoint}", "realtime=false", "mode=sync", "episodes=1", "status=false",
            f"run_dir={tmp_path}", "dtype=bf16"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "dtype=bf16: the denoiser backbone samples in torch.bfloat16" in captured.err
    assert last_json(captured.out)["episodes"] == 1


def test_run_and_serve_refuse_gpu_options_without_a_gpu_before_loading(checkpoint, tmp_path, capsys):
    for cmd in ("run", "serve"):
        extra = ["realtime=false", "episodes=1", f"run_dir={tmp_path / cmd}"] if cmd == "run" else \
            [f"port={_free_port()}"]
        assert main([cmd, f"checkpoint={checkpoint}", "graph=true", *extra]) == 1
        err = capsys.readouterr().err
        assert "graph=true samples through CUDA graphs and needs the policy on a GPU (device=cuda)" in err, err
        assert main([cmd, f"checkpoint={checkpoint}", "device=cuda:7", *extra]) == 1
        assert "device=cuda:7 asked for, but torch sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["run", "policy=ws://127.0.0.1:9", "task=push_t", "device=cpu", "graph=false"]) == 1
    assert "Connection refused" in capsys.readouterr().err  # the defaults pass through to the connection
