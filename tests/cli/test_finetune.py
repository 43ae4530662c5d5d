"""``robolearn finetune method=residual`` and ``method=steer`` end to end on push_t with the tiny fixture checkpoints (real MuJoCo, real
PPO steps), the residual checkpoint through ``eval``, ``run``, ``serve`` and ``collect policy=``, and the errors
that must stop it before any rollout; the same for the steered checkpoint."""
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
from robolearn.rl.residual_policy import ResidualPolicy
from robolearn.rl.settings import PLAIN_SAC_STEER, SteerSettings

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


def short_run(tmp_path_factory, command, *extra: str) -> tuple[Path, Path, dict]:
    """``command(base, run, *extra)`` over a fresh copy of the flow fixture, its stdout captured (a module fixture
    has no capsys): (base, run folder, its summary)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("run")
    base = base_copy(root)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert command(base, root / "run", *extra) == 0
    return base, root / "run", last_json(out.getvalue())


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> tuple[Path, Path, dict]:
    """One short residual fine-tuning run over the flow fixture: (base, run folder, its summary)."""
    return short_run(tmp_path_factory, finetune, "env_steps=256", "eval.episodes=2", "ckpt_every=128")


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
    # checkpoints/best: the trained policy's best evaluation (the one at 256; the baseline at 0 is not a candidate)
    assert summary["best_env_steps"] == 256 and summary["best_checkpoint"] == str(run / "checkpoints" / "best")
    assert summary["best_success_rate"] == [r["eval_success_rate"] for r in records if r["env_steps"] == 256
                                            and "eval_success_rate" in r][0]
    assert load_policy(summary["best_checkpoint"]).policy_type == "residual"
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


def served_chunk(checkpoint: Path, obs: dict, noise: torch.Tensor) -> np.ndarray:
    """The chunk ``robolearn serve checkpoint=...`` (a real server process on loopback) answers for ``obs``."""
    from robolearn.runtime.client import RemotePolicy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([EXE, "serve", f"checkpoint={checkpoint}", f"port={port}"], stdout=subprocess.PIPE,
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
        got = np.asarray(remote.predict_action(obs, noise=noise))
        remote.close()
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=30)
    return got


def test_serve_sends_chunks_whose_current_action_is_corrected(visible):
    local = load_policy(visible)
    obs = {k: torch.rand(1, local.n_obs_steps, *s) for k, s in local.obs_shapes.items()}
    noise = torch.randn(local.noise_shape(1))
    got = served_chunk(visible, obs, noise)
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


def test_random_search_runs_on_a_real_task_and_resumes(tmp_path, capsys):
    base, run = base_copy(tmp_path), tmp_path / "run"
    ars = ["finetune.learner=ars", "finetune.ars_directions=2", "finetune.ars_top=1", "finetune.ars_states=1"]
    assert finetune(base, run, "env_steps=100", "eval.episodes=1", *ars) == 0
    summary = last_json(capsys.readouterr().out)
    policy = load_policy(summary["checkpoint"])
    assert isinstance(policy, ResidualPolicy) and policy.squash and policy.hidden == []  # linear, bounded
    # one iteration: 2 directions x 2 signs x 1 scene, 40-step episodes, 2 environments stepped together
    assert summary["env_steps"] == 160 and summary["iterations"] == 1
    assert finetune(base, run, "env_steps=200", "eval.episodes=0", "resume=true", *ars) == 0
    resumed = last_json(capsys.readouterr().out)
    assert resumed["resumed"] and resumed["env_steps"] == 320 and resumed["iterations"] == 2


def test_the_off_policy_learner_runs_resumes_and_is_not_resumed_as_ppo(tmp_path, capsys):
    base, run = base_copy(tmp_path), tmp_path / "run"
    td3 = ["finetune.learner=td3", "finetune.learning_starts=32", "finetune.critic_warmup=0",
           "finetune.batch_size=16", "finetune.utd=0.5", "finetune.critic_hidden=[32,32]"]
    assert finetune(base, run, "env_steps=128", "eval.episodes=1", *td3) == 0
    summary = last_json(capsys.readouterr().out)
    policy = load_policy(summary["checkpoint"])
    assert isinstance(policy, ResidualPolicy) and policy.squash  # the same kind, tanh-bounded
    assert summary["grad_steps"] == pytest.approx(0.5 * (128 - 32), abs=2) and summary["transitions"] > 0
    assert (Path(summary["checkpoint"]) / "replay.npz").is_file()
    assert finetune(base, run, "env_steps=256", "eval.episodes=0", "resume=true") == 1
    err = capsys.readouterr().err
    assert "finetune settings differ from its checkpoint in" in err and "learner ('td3' -> 'ppo')" in err, err
    assert finetune(base, run, "env_steps=256", "eval.episodes=0", "resume=true", *td3) == 0
    resumed = last_json(capsys.readouterr().out)
    assert resumed["resumed"] and resumed["env_steps"] == 256 and resumed["grad_steps"] > summary["grad_steps"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["checkpoint={tmp}/nowhere"], "base checkpoint {tmp}/nowhere does not exist"),
        (["checkpoint={tmp}"], "is missing config.yaml"),
        (["task=peg_insert"], "was trained on task 'push_t', not 'peg_insert'"),
        (["finetune.action_scale=0"], "finetune.action_scale must be > 0"),
        (["finetune.action_scale=-0.1"], "finetune.action_scale must be > 0"),
        (["finetune.learner=sac"], "finetune.learner must be 'ppo' (ResiP), 'td3' (off-policy) or 'ars'"),
        (["finetune.learner=ars", "finetune.ars_top=17"], "finetune.ars_top must be <= finetune.ars_directions (16)"),
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


# ---------------------------------------------------------------------------------------------- method=steer
STEER = ["num_envs=2", "workers=0", "env.max_episode_steps=40", "eval.num_envs=2", "eval.workers=0", "progress=false",
         "finetune.learning_starts=10", "finetune.batch_size=32"]
# The tests below were written for plain SAC on the noise, the defaults until 2026-12-05; they keep those settings
# (test_steer_defaults_are_the_recipe_that_steered runs today's defaults).
SAC = [f"finetune.{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
       for k, v in PLAIN_SAC_STEER.items()]


def steer(base: Path, run: Path, *extra: str) -> int:
    return main(["finetune", "method=steer", f"checkpoint={base}", f"run_dir={run}", *STEER, *SAC, *extra])


@pytest.fixture(scope="module")
def steered(tmp_path_factory) -> tuple[Path, Path, dict]:
    """One short steering run over the flow fixture: (base, run folder, its summary)."""
    return short_run(tmp_path_factory, steer, "env_steps=320", "eval.episodes=2", "ckpt_every=160")


def test_steer_writes_a_steered_checkpoint_with_its_replay_buffer(steered):
    base, run, summary = steered
    for key in ("success_rate_before", "success_rate_after", "env_steps", "wall_s", "checkpoint", "transitions",
                "grad_steps"):
        assert key in summary, key
    assert summary["method"] == "steer" and summary["env_steps"] == 320 and summary["grad_steps"] > 0
    latest = run / "checkpoints" / "latest"
    assert {p.name for p in latest.iterdir()} >= {"model.safetensors", "rl_state.pt", "replay.npz"}
    policy = load_policy(latest)
    assert policy.policy_type == "steered" and policy.base.checkpoint_path == str(base.resolve())
    assert all(not k.startswith("base.") for k in policy.checkpoint_state())
    with np.load(latest / "replay.npz") as z:
        assert z["replay.obs"].shape[0] == summary["transitions"]
    assert [r["env_steps"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "eval_success_rate" in r] == [0, 320]
    assert (run / "plots" / "success.png").is_file()
    best = load_policy(summary["best_checkpoint"])
    assert summary["best_env_steps"] == 320 and best.policy_type == "steered"
    assert not {"rl_state.pt", "replay.npz"} & {p.name for p in (run / "checkpoints" / "best").iterdir()}
    assert json.loads((run / "checkpoints" / "best" / "extra.json").read_text())["success_rate"] == \
        summary["best_success_rate"] == summary["success_rate_after"]


def test_steer_yaml_and_settings_defaults_agree(capsys):
    """configs/finetune/steer.yaml and SteerSettings are two spellings of the same defaults."""
    from dataclasses import asdict

    import yaml

    assert main(["finetune", "method=steer", "--cfg", "job"]) == 0
    composed = yaml.safe_load(capsys.readouterr().out)["finetune"]
    composed.pop("name")
    assert composed == asdict(SteerSettings())
    assert (composed["variant"], composed["utd"], composed["target_entropy"]) == ("na", 1.0, 0.0)


def test_steer_defaults_are_the_recipe_that_steered(tmp_path, capsys):
    """Without finetune.* keys a run is noise aliasing on Monte Carlo returns at -1 per step, a time limit valued
    as a failure, and a deployed policy that samples its noise and carries the action critic."""
    base, run = base_copy(tmp_path), tmp_path / "run"
    assert main(["finetune", "method=steer", f"checkpoint={base}", f"run_dir={run}", *STEER, "env_steps=160",
                 "eval.episodes=0", "env.max_episode_steps=20"]) == 0
    out = last_json(capsys.readouterr().out)
    policy = load_policy(out["checkpoint"])
    chunks = -(-20 // policy.n_action_steps)  # per 20-step episode; all 8 episodes ended, so all were stored
    assert out["grad_steps"] > 0 and out["transitions"] == 8 * chunks
    assert policy.act == "sample" and policy.q_a is not None  # na's action critic travels in the policy
    with np.load(Path(out["checkpoint"]) / "replay.npz") as z:  # an episode's chunks enter together, in order
        reward = z["replay.reward"][:, 0].reshape(8, chunks)
    # push_t's dense reward is in [0, 1], so less the offset of 1 a chunk of <= 8 steps sums to (-8, 0]; a time
    # limit is a failure, the offset paid forever after: about -1 / (1 - 0.99) = -100 more on each last chunk
    assert (reward[:, :-1] <= 0).all() and (reward[:, :-1] > -8).all() and (reward[:, -1] < -80).all(), reward


def test_steered_checkpoint_evaluates_runs_serves_and_drives_teleop(steered, tmp_path, capsys):
    from robolearn.data import EpisodeStore
    from robolearn.policies import save_policy

    _, run, _ = steered
    policy = load_policy(run / "checkpoints" / "latest")
    with torch.no_grad():  # a visible choice: the deterministic noise at +-1.2
        policy.actor.net[-1].bias[:policy.noise_dim] = torch.atanh(torch.tensor(0.8)) * torch.tensor(
            [(-1.0) ** j for j in range(policy.noise_dim)])
    ckpt = save_policy(policy, tmp_path / "steered", config={"task": "push_t"})
    assert main(["eval", f"checkpoint={ckpt}", "episodes=2", "num_envs=2", "workers=0",
                 f"run_dir={tmp_path / 'eval'}"]) == 0
    assert last_json(capsys.readouterr().out)["policy_type"] == "steered"
    assert main(["run", f"checkpoint={ckpt}", "realtime=false", "episodes=1", "status=false",
                 f"run_dir={tmp_path / 'run'}"]) == 0
    report = last_json(capsys.readouterr().out)
    assert report["finished_episodes"] == 1 and report["policy"] == "SteeredPolicy"
    obs = {k: torch.rand(1, policy.n_obs_steps, *s) for k, s in policy.obs_shapes.items()}
    noise = torch.randn(policy.noise_shape(1))
    got = served_chunk(ckpt, obs, noise)  # the client's noise is ignored: the actor chooses
    np.testing.assert_allclose(got, policy.predict_action(obs).numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, policy.base.predict_action(obs, noise).numpy(), atol=1e-3)
    head = {"format": "robolearn-teleop-events", "version": 2, "task": "push_t", "device": "keyboard",
            "sources": ["keyboard"], "seed": 5, "mode": "sync", "latency_s": 0.0, "rate_hz": 10.0, "policy": str(ckpt)}
    log = tmp_path / "teleop.jsonl"  # the steered policy drives 4 ticks, then F8 saves the episode
    log.write_text("".join(json.dumps(x) + "\n" for x in [head, {"t": 4, "keyboard": {"keys": ["F8"]}}, {"end": 5}]))
    assert main(["teleop", f"device=replay:{log}", f"policy={ckpt}", f"out={tmp_path / 't.zarr'}"]) == 0
    store = EpisodeStore.open(tmp_path / "t.zarr")
    ep = store.get_episode(0)
    store.close()
    first = {k: torch.as_tensor(ep[k][:1])[:, None].repeat(1, policy.n_obs_steps, *([1] * (ep[k].ndim - 1)))
             for k in policy.obs_keys}  # the first frame repeated: the executor's history at an episode's start
    want = policy.predict_action(first)[0, policy.n_obs_steps - 1].numpy()
    np.testing.assert_allclose(ep["action"][0], want, rtol=1e-5, atol=1e-5)
    assert main(["collect", "task=push_t", f"policy={ckpt}", "episodes=1", "keep_failures=true", "progress=false",
                 "env.max_episode_steps=10", f"out={tmp_path / 'c.zarr'}"]) == 0
    capsys.readouterr()
    store = EpisodeStore.open(tmp_path / "c.zarr")
    assert store.n_episodes == 1 and store.attrs["source"]["policy_type"] == "steered"
    store.close()


def test_steer_resume_continues_with_its_replay_buffer(tmp_path, capsys):
    base, run = base_copy(tmp_path), tmp_path / "run"
    assert steer(base, run, "env_steps=160", "eval.episodes=0") == 0
    first = last_json(capsys.readouterr().out)
    with np.load(Path(first["checkpoint"]) / "replay.npz") as z:
        old = z["replay.w"]
    assert steer(base, run, "env_steps=320", "eval.episodes=0", "resume=true", "finetune.lr=1e-3") == 1
    assert "finetune settings differ from its checkpoint in lr (0.0003 -> 0.001)" in capsys.readouterr().err
    assert steer(base, run, "env_steps=320", "eval.episodes=0", "resume=true") == 0
    second = last_json(capsys.readouterr().out)
    assert second["resumed"] and second["env_steps"] == 320 and second["transitions"] > first["transitions"]
    with np.load(Path(second["checkpoint"]) / "replay.npz") as z:
        np.testing.assert_array_equal(z["replay.w"][:len(old)], old)  # the buffer was carried over, then grown
        assert len(z["replay.w"]) == second["transitions"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["finetune.base_sampler=ddpm"], "use sampler 'ddim' (finetune.base_sampler=ddim)"),
        (["finetune.variant=ppo"], "finetune.variant must be 'sac'"),
        (["finetune.max_noise=0"], "finetune.max_noise must be > 0"),
        (["finetune.rollout_steps=64"], "unknown config key 'finetune.rollout_steps'"),
        (["finetune.rank=3"], "finetune.rank must be 1 for variant=sac"),
    ],
)
def test_steer_bad_input_stops_before_any_rollout(tmp_path, capsys, extra, message):
    base = base_copy(tmp_path, "v1_push_t_diffusion_unet")
    assert steer(base, tmp_path / "run", *extra) == 1
    err = capsys.readouterr().err
    assert err.startswith("robolearn: error: ") and message in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_noise_aliasing_run_ranks_at_deployment_and_eval_overrides_its_rank(steered, tmp_path, capsys):
    base = base_copy(tmp_path)
    assert steer(base, tmp_path / "run", "env_steps=160", "eval.episodes=2", "finetune.variant=na",
                 "finetune.rank=3") == 0
    first = last_json(capsys.readouterr().out)
    assert first["grad_steps"] > 0
    ckpt = Path(first["checkpoint"])
    policy = load_policy(ckpt)
    assert policy.rank == 3 and policy.q_a is not None  # the run's action critic travels in the policy
    state = torch.load(ckpt / "rl_state.pt", map_location="cpu", weights_only=False)
    for k, v in state["q_a"].items():  # and is the critic the run trained
        torch.testing.assert_close(policy.q_a.state_dict()[k], v)
    assert steer(base, tmp_path / "run", "env_steps=320", "eval.episodes=0", "finetune.variant=na",
                 "finetune.rank=3", "resume=true") == 0  # resumed: the critic goes on training from there
    second = last_json(capsys.readouterr().out)
    assert second["resumed"] and second["grad_steps"] > first["grad_steps"]
    later = load_policy(second["checkpoint"])
    state = torch.load(Path(second["checkpoint"]) / "rl_state.pt", map_location="cpu", weights_only=False)
    for k, v in state["q_a"].items():
        torch.testing.assert_close(later.q_a.state_dict()[k], v)
    assert any(not torch.equal(later.q_a.state_dict()[k], v) for k, v in policy.q_a.state_dict().items())
    assert main(["eval", f"checkpoint={ckpt}", "episodes=2", "num_envs=2", "workers=0", "rank=2",
                 "env.max_episode_steps=20", f"run_dir={tmp_path / 'eval'}"]) == 0
    result = last_json(capsys.readouterr().out)
    assert result["rank"] == 2 and json.loads((tmp_path / "eval" / "result.json").read_text())["rank"] == 2
    _, run, _ = steered  # variant=sac: no action critic to rank with
    assert main(["eval", f"checkpoint={run / 'checkpoints' / 'latest'}", "episodes=2", "rank=2"]) == 1
    assert "this steered policy holds none: train it with finetune.variant=na" in capsys.readouterr().err
    assert main(["eval", f"checkpoint={base}", "episodes=2", "rank=2"]) == 1
    assert "rank=2 applies to a steered checkpoint" in capsys.readouterr().err
    assert main(["serve", f"checkpoint={base}", "rank=2", "port=0"]) == 1
    assert "rank=2 applies to a steered checkpoint" in capsys.readouterr().err


def test_steer_over_a_ddim_diffusion_base_and_not_over_a_steered_one(steered, tmp_path, capsys):
    base = base_copy(tmp_path, "v1_push_t_diffusion_unet")
    assert steer(base, tmp_path / "run", "env_steps=80", "eval.episodes=0", "finetune.base_sampler=ddim",
                 "finetune.base_steps=4") == 0
    policy = load_policy(last_json(capsys.readouterr().out)["checkpoint"])
    assert type(policy.base).__name__ == "DiffusionPolicy" and policy.sampler_config == {"kind": "ddim", "steps": 4}
    _, run, _ = steered
    assert steer(run / "checkpoints" / "latest", tmp_path / "again") == 1
    assert "is already a steered policy" in capsys.readouterr().err
