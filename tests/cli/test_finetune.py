"""``robolearn finetune method=residual`` end to end on push_t with the tiny fixture checkpoints (real MuJoCo, real
PPO steps), the residual checkpoint through ``eval``, ``run``, ``serve`` and ``collect policy=``, and the errors
that must stop it before any rollout."""
from __future__ import annotations

import json
import os
import shutil
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

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints"
EXE = str(Path(sys.executable).with_name("robolearn"))
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Small and fast: 2 envs in this process, 40-step episodes, 64-step rollouts (128 env steps per update).
SMALL = ["num_envs=2", "workers=0", "finetune.rollout_steps=64", "env.max_episode_steps=40", "eval.num_envs=2",
         "eval.workers=0", "progress=false"]


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def base_copy(tmp_path: Path, name: str = "v1_push_t_flow_transformer") -> Path:
    dst = tmp_path / "base"
    shutil.copytree(FIXTURES / name, dst)
    return dst


def finetune(base: Path, run: Path, *extra: str) -> int:
    return main(["finetune", "method=residual", f"checkpoint={base}", f"run_dir={run}", *SMALL, *extra])


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> tuple[Path, Path, dict]:
    """One short fine-tuning run over the flow fixture: (base, run folder, its summary)."""
    root = tmp_path_factory.mktemp("ft")
    base = base_copy(root)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert finetune(base, root / "run", "env_steps=256", "eval.episodes=2", "ckpt_every=128") == 0
    return base, root / "run", last_json(out.getvalue())


def test_finetune_writes_a_residual_checkpoint_metrics_and_plots(finetuned):
    base, run, summary = finetuned
    for key in ("success_rate_before", "success_rate_after", "env_steps", "wall_s", "checkpoint", "env_steps_per_s",
                "run_dir"):
        assert key in summary, key
    assert summary["env_steps"] == 256 and summary["updates"] == 2 and summary["run_dir"] == str(run)
    assert 0.0 <= summary["success_rate_before"] <= 1.0 and 0.0 <= summary["success_rate_after"] <= 1.0
    latest = run / "checkpoints" / "latest"
    assert latest.resolve() == Path(summary["checkpoint"]).resolve()
    assert {p.name for p in latest.iterdir()} >= {"model.safetensors", "config.yaml", "version.json", "rl_state.pt"}
    policy = load_policy(latest)
    assert policy.policy_type == "residual" and type(policy.base).__name__ == "FlowPolicy"
    assert policy.base.checkpoint_path == str(base.resolve())
    assert all(not k.startswith("base.") for k in policy.checkpoint_state())  # its own weights only
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["env_steps"] for r in records if "update" in r] == [128, 256]
    assert [r["env_steps"] for r in records if "eval_success_rate" in r] == [0, 256]
    assert (run / "plots" / "success.png").is_file() and list((run / "tb").iterdir())
    assert json.loads((run / "result.json").read_text())["checkpoint"] == summary["checkpoint"]


def test_residual_checkpoint_evaluates_and_runs_through_the_cli(finetuned, tmp_path, capsys):
    _, run, _ = finetuned
    latest = run / "checkpoints" / "latest"
    assert main(["eval", f"checkpoint={latest}", "episodes=2", "num_envs=2", "workers=0",
                 f"run_dir={tmp_path / 'eval'}"]) == 0
    ev = last_json(capsys.readouterr().out)
    assert ev["policy_type"] == "residual" and ev["episodes"] == 2 and ev["step"] == 256
    assert main(["run", f"checkpoint={latest}", "realtime=false", "episodes=1", "status=false",
                 f"run_dir={tmp_path / 'run'}"]) == 0
    report = last_json(capsys.readouterr().out)
    assert report["finished_episodes"] == 1 and report["policy"] == "ResidualPolicy"
    assert report["corrector_ms_p50"] is not None  # the residual corrected every executed step


@pytest.fixture(scope="module")
def visible(finetuned, tmp_path_factory) -> Path:
    """The fine-tuned residual with a large constant correction (the short run barely moved it), saved."""
    from robolearn.policies import save_policy

    _, run, _ = finetuned
    policy = load_policy(run / "checkpoints" / "latest")
    with torch.no_grad():
        policy.actor.mean[-1].bias.fill_(3.0)
    return save_policy(policy, tmp_path_factory.mktemp("visible") / "residual", config={"task": "push_t"})


def test_teleop_intervention_mode_runs_the_residual_each_step(finetuned, visible, tmp_path, capsys):
    from robolearn.data import EpisodeStore

    base, _, _ = finetuned
    head = {"format": "robolearn-teleop-events", "version": 2, "task": "push_t", "device": "keyboard",
            "sources": ["keyboard"], "seed": 5, "mode": "sync", "latency_s": 0.0, "rate_hz": 10.0}
    actions = {}
    for name, ckpt in (("base", base), ("residual", visible)):
        log = tmp_path / f"{name}.jsonl"  # the policy drives 4 ticks, then F8 saves the episode
        log.write_text("".join(json.dumps(x) + "\n" for x in [{**head, "policy": str(ckpt)},
                                                               {"t": 4, "keyboard": {"keys": ["F8"]}}, {"end": 5}]))
        assert main(["teleop", f"device=replay:{log}", f"policy={ckpt}", f"out={tmp_path / name}.zarr"]) == 0
        store = EpisodeStore.open(tmp_path / f"{name}.zarr")
        actions[name] = store.get_episode(0)
        store.close()
    capsys.readouterr()
    residual = load_policy(visible)
    first = {k: v[:1] for k, v in actions["residual"].items()}  # the same scene: seed 5
    want = residual.correct_actions(first, actions["base"]["action"][:1])
    np.testing.assert_allclose(actions["residual"]["action"][:1], want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(actions["residual"]["action"][0], actions["base"]["action"][0])


def test_serve_sends_chunks_whose_current_action_is_corrected(visible):
    from robolearn.runtime.client import RemotePolicy

    local = load_policy(visible)
    served_ckpt = visible
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([EXE, "serve", f"checkpoint={served_ckpt}", f"port={port}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        remote = RemotePolicy(f"ws://127.0.0.1:{port}")
        obs = {k: torch.rand(1, local.n_obs_steps, *s) for k, s in local.obs_shapes.items()}
        noise = torch.randn(local.noise_shape(1))
        got = np.asarray(remote.predict_action(obs, noise=noise))
        remote.close()
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=30)
    base_chunk = local.predict_action(obs, noise).numpy()
    now = local.n_obs_steps - 1
    np.testing.assert_allclose(got, local.corrected_chunk(obs, noise).numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(got[:, now], base_chunk[:, now])
    np.testing.assert_allclose(np.delete(got, now, axis=1), np.delete(base_chunk, now, axis=1), rtol=1e-5, atol=1e-5)


def test_resume_continues_and_refuses_changed_settings(tmp_path, capsys):
    base, run = base_copy(tmp_path), tmp_path / "run"
    assert finetune(base, run, "env_steps=128", "eval.episodes=0") == 0
    capsys.readouterr()
    assert finetune(base, run, "env_steps=256", "eval.episodes=0", "resume=true", "finetune.gamma=0.99") == 1
    assert "finetune settings differ from its checkpoint in gamma (0.999 -> 0.99)" in capsys.readouterr().err
    assert main(["finetune", "method=residual", f"run_dir={run}", "resume=true", "env_steps=256",
                 "eval.episodes=0", *SMALL]) == 0  # checkpoint= comes from the run
    summary = last_json(capsys.readouterr().out)
    assert summary["resumed"] and summary["env_steps"] == 256 and summary["updates"] == 2
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["env_steps"] for r in records if "update" in r] == [128, 256]
    assert finetune(base, run, "env_steps=256", "eval.episodes=0") == 1  # never restarted over checkpoints
    assert "already holds checkpoints; pass resume=true" in capsys.readouterr().err


def test_finetune_over_a_diffusion_base(tmp_path, capsys):
    base = base_copy(tmp_path, "v1_push_t_diffusion_unet")
    assert finetune(base, tmp_path / "run", "env_steps=128", "eval.episodes=0", "finetune.actor_hidden=[32,32]") == 0
    summary = last_json(capsys.readouterr().out)
    policy = load_policy(summary["checkpoint"])
    assert type(policy.base).__name__ == "DiffusionPolicy" and policy.hidden == [32, 32]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["checkpoint={tmp}/nowhere"], "base checkpoint {tmp}/nowhere does not exist"),
        (["checkpoint={tmp}"], "is missing config.yaml"),
        (["task=peg_insert"], "was trained on task 'push_t', not 'peg_insert'"),
        (["finetune.action_scale=0"], "finetune.action_scale must be > 0"),
        (["finetune.action_scale=-0.1"], "finetune.action_scale must be > 0"),
        (["finetune.gama=0.9"], "did you mean 'finetune.gamma'?"),
        (["method=dsrl"], "unknown method 'dsrl'; choose one of: residual"),
        (["num_envs=0"], "num_envs must be >= 1"),
        (["resume=true"], "cannot resume: no checkpoint in"),
    ],
)
def test_bad_input_stops_before_any_rollout(tmp_path, capsys, extra, message):
    base = base_copy(tmp_path)
    extra = [e.format(tmp=tmp_path) for e in extra]
    argv = ["finetune", "method=residual", f"run_dir={tmp_path / 'run'}", *SMALL, *extra]
    if not any(e.startswith("checkpoint=") for e in extra):
        argv.insert(2, f"checkpoint={base}")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("robolearn: error: ") and message.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_residual_is_not_a_base(finetuned, tmp_path, capsys):
    _, run, _ = finetuned
    assert main(["finetune", "method=residual", f"checkpoint={run / 'checkpoints' / 'latest'}",
                 f"run_dir={tmp_path / 'run'}", *SMALL]) == 1
    assert "already corrects each step" in capsys.readouterr().err


def test_cfg_job_shows_the_composed_config_and_checks_it(capsys):
    assert main(["finetune", "method=residual", "checkpoint=x", "finetune.gamma=0.99", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "finetune:\n" in out and "  gamma: 0.99" in out and "  clip_coef: 0.2" in out and "checkpoint: x" in out
    assert main(["finetune", "method=residual", "finetune.action_scale=0", "--cfg", "job"]) == 1
    assert "finetune.action_scale must be > 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- collect policy=
def test_collect_records_a_policys_rollouts_deterministically_and_resumes(finetuned, tmp_path, capsys):
    from robolearn.cli.collect import schema_for
    from robolearn.data import EpisodeStore

    _, run, _ = finetuned
    latest = run / "checkpoints" / "latest"
    common = ["collect", "task=push_t", f"policy={latest}", "keep_failures=true", "progress=false",
              "env.max_episode_steps=20"]
    assert main([*common, "episodes=2", f"out={tmp_path / 'a.zarr'}"]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["episodes"] == 2 and summary["policy"] == str(latest)
    assert main([*common, "episodes=2", "workers=2", f"out={tmp_path / 'b.zarr'}"]) == 0  # other processes
    a, b = EpisodeStore.open(tmp_path / "a.zarr"), EpisodeStore.open(tmp_path / "b.zarr")
    import sim

    env = sim.make("push_t", **{**a.env_config})
    assert a.schema == schema_for(env)  # scripted collection's schema
    env.close()
    assert a.attrs["source"]["kind"] == "policy" and a.attrs["source"]["policy_type"] == "residual"
    assert a.env_config["max_episode_steps"] == 20
    for j in range(2):  # an episode depends on its seed only, not on the number of workers
        np.testing.assert_array_equal(a.get_episode(j)["action"], b.get_episode(j)["action"])
    a.close()
    b.close()
    assert main([*common, "episodes=1", f"out={tmp_path / 'a.zarr'}"]) == 0  # appends, after the last seed
    again = EpisodeStore.open(tmp_path / "a.zarr")
    assert again.n_episodes == 3 and again.attrs["collect"]["next_seed"] == 3
    again.close()


def test_collect_policy_keeps_successes_only_by_default_and_refuses_another_task(tmp_path, capsys):
    base = base_copy(tmp_path)
    argv = ["collect", "task=push_t", f"policy={base}", "episodes=1", "max_attempts=1", "progress=false",
            "env.max_episode_steps=10", f"out={tmp_path / 's.zarr'}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "only 0 of 1 episodes kept after 1 attempts" in out and last_json(out)["episodes"] == 0
    assert main(["collect", "task=peg_insert", f"policy={base}", "episodes=1", f"out={tmp_path / 'p.zarr'}"]) == 1
    assert "trained on task 'push_t', not 'peg_insert' (pass task=push_t)" in capsys.readouterr().err
    assert main(["collect", "task=push_t", f"policy={base}", "expert.noise=0.2", f"out={tmp_path / 'p.zarr'}"]) == 1
    assert "expert.noise applies to the scripted expert" in capsys.readouterr().err
