"""``robolearn train`` and ``robolearn eval`` end to end on a real task (peg_insert), tiny models."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from robolearn.cli import main
from robolearn.policies import load_policy

TINY = ["policy.backbone.preset=tiny", "training.batch_size=16", "training.warmup_steps=2", "training.progress=false"]


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def peg_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "peg.zarr"
    assert main(["collect", "task=peg_insert", "episodes=4", f"out={out}", "progress=false"]) == 0
    return out


def train(data: Path, run_dir: Path, *extra: str) -> int:
    return main(["train", "task=peg_insert", f"dataset={data}", f"run_dir={run_dir}", *TINY, *extra])


def test_train_writes_checkpoint_metrics_plots_and_evaluates(peg_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(peg_data, run, "training.steps=12", "training.log_every=4", "training.val_every=6",
                 "training.ckpt_every=6", "eval.episodes=2", "eval.num_envs=2", "eval.workers=0",
                 "eval.videos=1", "task.eval.max_steps=40") == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["step"] == 12 and summary["finished"] and Path(summary["checkpoint"]).is_dir()
    assert 0.0 <= summary["success_rate"] <= 1.0 and summary["eval_episodes"] == 2
    assert (run / "checkpoints" / "latest").resolve() == Path(summary["checkpoint"]).resolve()
    for f in ("model.safetensors", "config.yaml", "normalizer.json", "version.json", "train_state.pt"):
        assert (run / "checkpoints" / "latest" / f).is_file(), f
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [4, 8, 12]
    assert any("val_loss" in m for m in metrics)
    assert [m["step"] for m in metrics if "success_rate" in m] == [3, 6, 9, 12]  # by default 4 evaluations
    assert {Path(p).name for p in summary["plots"]} == {"loss.png", "success.png"}
    assert Path(summary["videos"][0]).stat().st_size > 1000
    assert list((run / "tb").iterdir())  # TensorBoard events
    policy = load_policy(run / "checkpoints" / "latest", expected_type="diffusion")
    assert policy.obs_keys == ["ee_pos", "ee_yaw", "hole_pos", "hole_yaw", "peg_quat", "peg_tip_pos", "tip_to_hole"]


def test_resume_continues_the_exact_step_and_loss_curve(peg_data, tmp_path, capsys):
    common = ["training.steps=10", "training.log_every=1", "training.ckpt_every=5", "training.val_every=0",
              "eval.episodes=0", "policy=flow_unet"]
    assert train(peg_data, tmp_path / "straight", *common) == 0
    straight = [json.loads(ln) for ln in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    # Interrupted after step 7: the last checkpoint is step 5; steps 6-7 are logged but will be redone.
    assert train(peg_data, tmp_path / "cut", *common, "training.stop_after=7") == 0
    assert last_json(capsys.readouterr().out)["finished"] is False
    assert train(peg_data, tmp_path / "cut", *common, "resume=true") == 0
    assert last_json(capsys.readouterr().out)["step"] == 10
    resumed = [json.loads(ln) for ln in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed] == list(range(1, 11))
    np.testing.assert_allclose([m["loss"] for m in resumed], [m["loss"] for m in straight], rtol=1e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["dataset={tmp}/none.zarr"], "does not exist; make one with: robolearn collect"),
        (["task=push_t"], "was recorded for task 'peg_insert', not 'push_t'"),
        (["obs_keys=[ee_pos,gripper]"], "obs key 'gripper' is not in dataset"),
        (["policy.backbone.bogus=1"], "bogus"),
        (["policy.horizon_len=4"], "unknown policy config key(s) ['horizon_len']"),
        (["policy=flowunet"], "unknown policy 'flowunet' (did you mean policy=flow_unet?); choose one of"),
        (["training.stesp=3"], "did you mean 'training.steps'?"),
        (["resume=true"], "cannot resume: no checkpoint at"),
        (["training.keep_checkpoints=0"], "training.keep_checkpoints must be >= 1"),
        (["training.val_ratio=1.5"], "training.val_ratio must be in [0, 1)"),
    ],
)
def test_train_bad_input_fails_before_training(peg_data, tmp_path, capsys, extra, message):
    extra = [e.format(tmp=tmp_path) for e in extra]
    assert train(peg_data, tmp_path / "bad", *extra) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_resume_with_another_policy_type_is_refused(peg_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(peg_data, run, "training.steps=2", "eval.episodes=0") == 0
    assert train(peg_data, run, "training.steps=4", "eval.episodes=0", "policy=flow_unet", "resume=true") == 1
    assert "holds a 'diffusion' policy" in capsys.readouterr().err
    assert train(peg_data, run, "training.steps=4", "eval.episodes=0", "policy.horizon=12", "resume=true") == 1
    assert "differs from its checkpoint in horizon" in capsys.readouterr().err
    assert train(peg_data, run, "training.steps=4", "eval.episodes=0") == 1  # would overwrite
    assert "already holds checkpoints; pass resume=true" in capsys.readouterr().err


def test_eval_command(peg_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(peg_data, run, "training.steps=3", "eval.episodes=0") == 0
    capsys.readouterr()
    ckpt = run / "checkpoints" / "latest"
    argv = ["eval", f"checkpoint={ckpt}", "episodes=3", "num_envs=2", "workers=0", "sampler.steps=3",
            "video=true", "videos=1", f"run_dir={tmp_path / 'ev'}", "env.max_episode_steps=40"]
    assert main(argv) == 0
    s = last_json(capsys.readouterr().out)
    assert s["episodes"] == 3 and s["sampler"] == {"kind": "ddim", "steps": 3} and s["task"] == "peg_insert"
    per_episode = json.loads((tmp_path / "ev" / "eval" / f"step_{3:07d}.json").read_text())["per_episode"]
    assert len(per_episode) == 3 and all("success" in e and "return" in e for e in per_episode)
    assert Path(s["videos"][0]).exists()
    assert s["n_action_steps"] == 8  # the checkpoint's own
    assert main([argv[0], argv[1], "episodes=1", "num_envs=1", "workers=0", "sampler.steps=3", "n_action_steps=3",
                 "env.max_episode_steps=20", f"run_dir={tmp_path / 'ev3'}"]) == 0
    assert last_json(capsys.readouterr().out)["n_action_steps"] == 3
    assert main([*argv[:3], "n_action_steps=99"]) == 1
    assert "n_action_steps=99" in capsys.readouterr().err
    assert main(["eval", f"checkpoint={tmp_path / 'nope'}"]) == 1
    assert "checkpoint folder" in capsys.readouterr().err
    (ckpt / "normalizer.json").unlink()
    assert main(["eval", f"checkpoint={ckpt}"]) == 1
    assert "is missing normalizer.json" in capsys.readouterr().err


def test_eval_of_a_binary_config_is_one_error_line(peg_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(peg_data, run, "training.steps=1", "eval.episodes=0") == 0
    capsys.readouterr()
    ckpt = run / "checkpoints" / "latest"
    (ckpt / "config.yaml").write_bytes(bytes([0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, 0x00, 0xFF]))
    assert main(["eval", f"checkpoint={ckpt}", "episodes=1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"robolearn: error: {ckpt / 'config.yaml'} is not UTF-8 text") and err.count("\n") == 1


def test_train_on_an_empty_store_says_it_is_empty(peg_data, tmp_path, capsys):
    from robolearn.data import EpisodeStore

    full = EpisodeStore.open(peg_data)
    empty = tmp_path / "empty.zarr"
    EpisodeStore.create(empty, full.schema, fps=full.fps, task=full.task, env_config=full.env_config).close()
    assert train(empty, tmp_path / "run", "training.steps=1", "eval.episodes=0") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"robolearn: error: dataset {empty} holds no episodes; record some with: robolearn collect "
                          f"task=peg_insert episodes=200 out={empty}"), err
    assert not (tmp_path / "run").exists()


def test_train_on_several_stores_at_once(peg_data, tmp_path, capsys):
    import yaml

    noisy, push = tmp_path / "noisy.zarr", tmp_path / "push.zarr"
    for task, out, extra in (("peg_insert", noisy, ["expert.noise=0.3"]), ("push_t", push, [])):
        assert main(["collect", f"task={task}", "episodes=1", f"out={out}", "progress=false", *extra]) == 0
    run = tmp_path / "run"
    assert train(f"[{peg_data},{noisy}]", run, "training.steps=2", "training.val_every=0", "training.ckpt_every=2",
                 "training.val_ratio=0.2", "eval.episodes=0") == 0
    out = capsys.readouterr().out
    stores = [str(p.resolve()) for p in (peg_data, noisy)]
    assert f"on {stores[0]} + {stores[1]}: 4 train / 1 val episodes" in out  # 4 + 1 episodes, one split
    assert yaml.safe_load((run / "config.yaml").read_text())["dataset"] == stores
    # Stores that do not fit together are refused as `data merge` refuses them, naming both and the key.
    assert train(f"[{peg_data},{push}]", tmp_path / "bad", "training.steps=1", "eval.episodes=0") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"robolearn: error: cannot train on {stores[0]} and {push.resolve()}: schemas differ "
                          f"(key '"), err
    assert not (tmp_path / "bad").exists()


def test_ddp_two_gloo_processes(peg_data, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "robolearn.cli", "train", "task=peg_insert", f"dataset={peg_data}", f"run_dir={run}",
           "training.steps=4", "training.log_every=2", "eval.episodes=0", "device=cpu", *TINY]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = last_json(r.stdout)
    assert summary["world_size"] == 2 and summary["step"] == 4
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in logged] == [2, 4]  # rank 0 alone writes metrics
    assert logged[-1]["samples_s"] > 0


def test_image_observations_end_to_end(tmp_path, capsys):
    """push_t with a camera: uint8 frames in the store, the CNN encoder in the policy, rendering in evaluation."""
    data = tmp_path / "img.zarr"
    assert main(["collect", "task=push_t", "episodes=1", f"out={data}", "env.obs_mode=image", "env.image_size=32", "env.max_episode_steps=30", "keep_failures=true",
                 "progress=false"]) == 0
    capsys.readouterr()
    assert train(data, tmp_path / "run", "task=push_t", "training.steps=2", "eval.episodes=1", "eval.num_envs=1",
                 "eval.workers=0", "eval.videos=0", "policy.encoder.image_widths=[8,16]",
                 "policy.encoder.num_keypoints=8") == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["eval_episodes"] == 1
    policy = load_policy(Path(summary["checkpoint"]))
    assert policy.obs_shapes["image"] == (32, 32, 3) and "image" in policy.config["image_keys"]


def test_task_none_trains_diffusion_policys_push_t_store_and_serves_it(tmp_path, capsys):
    """No simulator: Diffusion Policy's own Push-T layout (float img, state, keypoint, action; zarr 2) trains with
    task=none, reports the validation loss, and the checkpoint serves through the policy server."""
    import numcodecs
    import zarr

    from robolearn.runtime.client import RemotePolicy
    from robolearn.runtime.server import PolicyServer

    lengths, rng = (20, 16, 18), np.random.default_rng(0)
    n = sum(lengths)
    root = zarr.open_group(str(tmp_path / "pusht_dp.zarr"), mode="w", zarr_format=2)
    blosc = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.NOSHUFFLE)
    data = root.create_group("data")
    for key, shape in (("img", (24, 24, 3)), ("state", (5,)), ("keypoint", (9, 2)), ("action", (2,))):
        arr = data.create_array(key, shape=(n, *shape), chunks=(n, *shape), dtype="float32", compressors=blosc)
        arr[:] = rng.random((n, *shape), dtype=np.float32) * (255 if key == "img" else 1)
    root.create_group("meta").create_array("episode_ends", shape=(3,), chunks=(3,), dtype="int64",
                                           compressors=blosc)[:] = np.cumsum(lengths)
    run = tmp_path / "run"
    assert main(["train", "task=none", f"dataset={tmp_path / 'pusht_dp.zarr'}", f"run_dir={run}", *TINY,
                 "training.steps=3", "training.val_every=3", "training.val_ratio=0.34",
                 "policy.encoder.image_widths=[8,16]", "policy.encoder.num_keypoints=8"]) == 0
    out = capsys.readouterr().out
    summary = last_json(out)
    assert summary["task"] == "none" and summary["success_rate"] is None and summary["val_loss"] > 0
    assert "validation loss" in out
    policy = load_policy(run)
    assert sorted(policy.obs_keys) == ["img", "keypoint", "state"] and policy.cfg.image_keys == ["img"]
    with PolicyServer(policy) as srv:
        remote = RemotePolicy(srv.url)
        obs = {"img": np.zeros((1, 2, 24, 24, 3), np.float32), "state": np.zeros((1, 2, 5), np.float32),
               "keypoint": np.zeros((1, 2, 9, 2), np.float32)}
        chunk = remote.predict_action(obs)
        assert np.asarray(chunk).shape == (1, policy.horizon, 2) and np.isfinite(np.asarray(chunk)).all()
        remote.close()
    assert main(["eval", f"checkpoint={run}"]) == 1
    assert "trained without a simulator (task=none)" in capsys.readouterr().err


def test_audit_against_a_checkpoint_then_train_with_its_weights(peg_data, tmp_path, capsys):
    run = tmp_path / "run"
    fast = ["training.steps=3", "eval.episodes=1", "eval.num_envs=1", "eval.workers=0", "eval.videos=0",
            "task.eval.max_steps=5", "logger=none"]
    assert train(peg_data, run, *fast) == 0
    capsys.readouterr()
    aud = tmp_path / "aud"
    assert main(["data", "audit", str(peg_data), f"checkpoint={run}", f"out={aud}", "videos=0", "progress=false"]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["action_divergence"]["method"] == "checkpoint"
    assert summary["action_divergence"]["checkpoint"].endswith("latest") or "step_" in \
        summary["action_divergence"]["checkpoint"]
    rows = [json.loads(ln) for ln in (aud / "scores.jsonl").read_text().splitlines()[:-1]]
    assert len(rows) == 4 and all(r["action_divergence"] is not None and r["action_divergence"] > 0 for r in rows)
    # the audit's weights drive a training run (zero for one episode: written by hand on top of the audit's)
    rows[0]["weight"] = 0.0
    (aud / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert train(peg_data, tmp_path / "weighted", *fast, f"training.episode_weights={aud / 'scores.jsonl'}") == 0
    captured = capsys.readouterr()
    assert "1 of 4 episodes at 0" in captured.err and last_json(captured.out)["finished"]
    assert train(peg_data, tmp_path / "bad", *fast, "training.intervention_weight=2") == 1
    assert "needs an 'intervention' flag" in capsys.readouterr().err
