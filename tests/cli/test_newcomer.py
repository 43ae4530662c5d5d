"""Issue 15, the newcomer's path: CPU-sized defaults, threads, the task's score, video captions, messages that
lead, progress lines in logs, run folders where a checkpoint is expected, the vector-env main guard."""
from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from robolearn.cli import main
from robolearn.cli.config import compose, suggest_key

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints" / "v1_push_t_diffusion_unet"
PUSH_T_OBS = {"agent_pos": [2], "block_pose": [3], "block_yaw_sincos": [2]}


@pytest.mark.parametrize("policy", ["diffusion_unet", "flow_unet", "diffusion_transformer", "flow_transformer"])
def test_the_default_models_and_batches_are_cpu_sized(policy):
    from robolearn.cli.train import training_defaults
    from robolearn.policies import make_policy

    cfg = compose("train", ["task=push_t", f"policy={policy}"])
    policy_cfg = OmegaConf.to_container(cfg.policy, resolve=True)
    policy_cfg.pop("name")
    stats = {k: {"min": -np.ones(n), "max": np.ones(n), "mean": np.zeros(n), "std": np.ones(n)}
             for k, (n,) in {**PUSH_T_OBS, "action": [2]}.items()}
    model = make_policy({**policy_cfg, "obs": PUSH_T_OBS, "action_dim": 2}, stats)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 2_000_000, f"{policy}: {n_params:,} parameters is not CPU-sized"
    filled = training_defaults(cfg.training, model.config)
    assert filled == {"lr": 1e-3, "batch_size": 128, "eval_every": 750}  # 3000 steps: 4 evaluations
    # The paper-sized preset trains with Diffusion Policy's settings.
    paper = compose("train", ["task=push_t", f"policy={policy}", "policy.backbone.preset=dp",
                              "training.eval_every=0"])
    assert training_defaults(paper.training, {"backbone": {"name": model.config["backbone"]["name"],
                                                            "preset": "dp"}}) == {"lr": 1e-4, "batch_size": 256}
    given = compose("train", ["task=push_t", "training.lr=3e-4", "training.batch_size=32"])
    assert training_defaults(given.training, model.config) == {"eval_every": 750}
    assert (given.training.lr, given.training.batch_size) == (3e-4, 32)


def test_threads_default_per_command_and_refuse_nonsense():
    from robolearn.cli import CLIError
    from robolearn.cli.threads import DEFAULT_THREADS, apply_threads

    before = torch.get_num_threads()
    try:
        for command in ("eval", "run", "serve", "teleop", "finetune"):
            assert DEFAULT_THREADS[command] == 1
            assert apply_threads(command, None) == 1 and torch.get_num_threads() == 1
        assert apply_threads("eval", 2) == 2 and torch.get_num_threads() == 2
        with pytest.raises(CLIError, match="threads must be >= 1, got 0"):
            apply_threads("eval", 0)
        for name in ("train", "eval", "run", "serve", "teleop", "finetune", "quickstart"):
            schema_cfg = compose(name, ["method=residual"] if name == "finetune" else [])
            assert "threads" in schema_cfg, name
    finally:
        torch.set_num_threads(before)


def test_push_t_reports_diffusion_policys_coverage_score():
    import sim
    from robolearn.evaluation import evaluate
    from robolearn.policies import load_policy

    env = sim.make("push_t")
    _, info = env.reset(seed=0)
    assert info["score"] == pytest.approx(min(info["coverage"] / 0.95, 1.0))
    policy = load_policy(FIXTURE)
    result = evaluate(policy, lambda: sim.make("push_t", max_episode_steps=12), [0, 1], noise_seed=0)
    scores = [e["score"] for e in result["per_episode"]]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert result["score"] == pytest.approx(np.mean(scores), abs=1e-4)
    from robolearn.cli.eval import describe_result

    assert "coverage score" in describe_result({**result, "success_rate": 0.5})
    assert "coverage score" not in describe_result({**result, "score": None})


def test_video_frames_carry_step_reward_and_success():
    from robolearn.evaluation.video import overlay, step_caption

    frame = np.full((128, 160, 3), 200, np.uint8)
    captioned = overlay(frame, step_caption(12, 0.5, True), True)
    assert captioned.shape == frame.shape
    assert not np.array_equal(captioned[:14], frame[:14])  # the caption band
    assert np.array_equal(captioned[40:], frame[40:])  # the scene below it untouched
    assert (captioned[:14, :, 1].astype(int) - captioned[:14, :, 0] > 60).any()  # green: success
    assert step_caption(3, 0.25, False) == "step 3  reward 0.250"
    small = np.zeros((84, 84, 3), np.uint8)  # a camera observation: no room for text
    assert overlay(small, "step 1") is small


@pytest.mark.parametrize("argv, expected", [
    (["trian"], "did you mean 'train'?"),
    (["data", "infoo", "x"], "did you mean 'info'?"),
    (["train", "task=pusht"], "did you mean task=push_t?"),
    (["train", "training.step=5"], "did you mean 'training.steps'?"),
    (["train", "training.steps=5e3"], "training.steps takes a whole number, got '5e3': write 5000"),
    (["eval", "video=maybe"], "video takes true or false, got 'maybe'"),
])
def test_mistakes_get_the_message_that_leads(argv, expected, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusal (an unknown command)
        code = e.code
    assert code != 0
    assert expected in capsys.readouterr().err


def test_suggestions_are_only_near_matches():
    valid = ["training.steps", "training.lr", "training.batch_size", "eval.episodes"]
    assert suggest_key("training.foo", valid) is None
    assert suggest_key("training.step", valid) == "training.steps"
    assert suggest_key("trainig.steps", valid) == "training.steps"
    assert suggest_key("eval.episode", valid) == "eval.episodes"


def test_help_lists_policy_and_training_keys(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for key in ("horizon=16", "n_obs_steps=2", "n_action_steps=8", "preset=", "sampler.kind=ddim|ddpm",
                "training keys", "ema_power=0.75", "val_ratio=0.05", "batch_size=null"):
        assert key in out, key


def test_merge_names_the_flag_that_exists(store_factory, tmp_path, capsys):
    a = store_factory(name="a.zarr")
    b = store_factory(name="b.zarr")
    out = tmp_path / "out.zarr"
    assert main(["data", "merge", str(a.path), str(b.path), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["data", "merge", str(a.path), str(b.path), "--out", str(out)]) == 1
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert main(["data", "merge", str(a.path), str(b.path), "--out", str(out), "--overwrite"]) == 0


def test_a_run_folder_means_its_latest_checkpoint(tmp_path):
    from robolearn.policies import checkpoint_folder, load_policy

    run = tmp_path / "runs" / "train" / "push_t-x"
    shutil.copytree(FIXTURE, run / "checkpoints" / "step_0000010")
    (run / "checkpoints" / "latest").symlink_to("step_0000010")
    (run / "config.yaml").write_text("policy: {type: diffusion}\n")  # a run's config is not a checkpoint's
    assert checkpoint_folder(run) == run / "checkpoints" / "latest"
    assert checkpoint_folder(run / "checkpoints" / "latest") == run / "checkpoints" / "latest"
    assert load_policy(run).checkpoint_path == str((run / "checkpoints" / "step_0000010").resolve())


def test_progress_is_a_line_every_few_seconds_when_not_a_terminal():
    from robolearn.progress import LineProgress, progress_bar

    out = io.StringIO()
    bar = progress_bar(100, desc="train", unit="it", file=out)
    assert isinstance(bar, LineProgress)  # a StringIO is not a terminal
    bar.interval = 0.0
    bar.update(40)
    bar.set_postfix(loss="0.1234")
    bar.update(10)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("train 40/100 it (40%)")
    assert lines[-1].startswith("train 50/100 it (50%)") and lines[-1].endswith("loss=0.1234")
    quiet = LineProgress(10, desc="x", file=out, interval=3600)
    quiet.update(5)  # within the interval: nothing printed until close
    assert out.getvalue().count("\n") == len(lines)


def test_a_script_without_the_main_guard_is_told_so(tmp_path):
    script = tmp_path / "noguard.py"
    script.write_text("from sim.vector import make_vector_env\n"
                      "venv = make_vector_env('push_t', num_envs=2, num_workers=1)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0
    assert 'if __name__ == "__main__":' in proc.stderr
