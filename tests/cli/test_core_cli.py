"""The execution core through the command line: repeatable evaluations, composed configs, errors naming keys."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from robolearn.cli import main

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints" / "v1_push_t_flow_transformer"
TASKS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "robolearn" / "configs" / "task").glob("*.yaml"))
POLICIES = ["diffusion_unet", "diffusion_transformer", "flow_unet", "flow_transformer"]


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_eval_prints_the_same_results_twice_and_for_any_number_of_envs(tmp_path: Path, capsys) -> None:
    results = []
    for k, (num_envs, workers) in enumerate([(1, 0), (4, 2), (1, 0)]):
        argv = ["eval", f"checkpoint={FIXTURE}", "episodes=4", "seed=7", f"num_envs={num_envs}",
                f"workers={workers}", "env.max_episode_steps=60", f"run_dir={tmp_path / str(k)}"]
        assert main(argv) == 0
        s = last_json(capsys.readouterr().out)
        (per_episode_file,) = (tmp_path / str(k) / "eval").glob("step_*.json")
        per_episode = json.loads(per_episode_file.read_text())["per_episode"]
        results.append((s["success_rate"], s["mean_return"], s["mean_max_reward"],
                        [(e["episode"], e["seed"], e["return"], e["length"]) for e in per_episode]))
    assert results[0] == results[1] == results[2]
    assert [e[1] for e in results[0][3]] == [7, 8, 9, 10]
    assert len({e[2] for e in results[0][3]}) > 1  # not a degenerate all-equal run


@pytest.mark.parametrize("task", TASKS)
def test_train_composes_every_task_with_every_policy(task: str, capsys) -> None:
    assert set(TASKS) >= {"push_t", "peg_insert", "lift", "can", "square"}
    for policy in POLICIES:
        assert main(["train", f"task={task}", f"policy={policy}", "--cfg", "job"]) == 0
        out = capsys.readouterr().out
        assert f"  name: {task}\n" in out and f"  name: {policy}\n" in out and "training:" in out
        assert "Traceback" not in out


def test_config_errors_name_the_key(tmp_path: Path, capsys) -> None:
    assert main(["train", "task=xyzzy"]) == 1
    assert "unknown task 'xyzzy'; choose one of: can, lift, none, peg_insert, push_t, square" in capsys.readouterr().err
    assert main(["train", "task=push_t", "task.evl.episodes=3"]) == 1
    assert "task.evl.episodes" in capsys.readouterr().err
    argv = ["eval", f"checkpoint={FIXTURE}", "episodes=1", "sampler.kind=ddim", f"run_dir={tmp_path}"]
    assert main(argv) == 1
    assert "policy.sampler.kind must be a flow integrator" in capsys.readouterr().err


def test_eval_dtype_and_graph_options(tmp_path: Path, capsys) -> None:
    """dtype=bf16 samples with a bfloat16 backbone (same seeds: a run that completes and says so); graph=true
    without a GPU and an unknown dtype are refused before any episode, naming the key and what to do."""
    from robolearn.cli.runtime import apply_inference, load_checkpoint

    argv = ["eval", f"checkpoint={FIXTURE}", "episodes=2", "seed=7", "num_envs=2", "workers=0",
            "env.max_episode_steps=30", f"run_dir={tmp_path / 'bf16'}", "dtype=bf16"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    s = last_json(captured.out)
    assert s["dtype"] == "bf16" and s["graph"] is False and s["episodes"] == 2
    assert "dtype=bf16: the denoiser backbone samples in torch.bfloat16" in captured.err
    assert main(argv[:-2] + [f"run_dir={tmp_path / 'g'}", "graph=true", "device=cpu"]) == 1
    err = capsys.readouterr().err
    assert "graph=true" in err and "device=cuda" in err and "Traceback" not in err
    assert not (tmp_path / "g").exists()
    assert main(argv[:-2] + [f"run_dir={tmp_path / 'd'}", "dtype=float64"]) == 1
    assert "dtype='float64' is not one of float32, bf16, fp16" in capsys.readouterr().err
    import torch

    policy = load_checkpoint(FIXTURE)
    obs = {k: torch.zeros(1, policy.n_obs_steps, *shape) for k, shape in policy.obs_shapes.items()}
    noise = policy.make_noise(1, torch.Generator().manual_seed(0))
    full = policy.predict_action(obs, noise)
    assert apply_inference(policy, FIXTURE, "float32") is policy
    assert next(policy.backbone.parameters()).dtype == torch.float32  # float32 leaves it as it is
    policy = apply_inference(policy, FIXTURE, "bf16")
    assert next(policy.backbone.parameters()).dtype == torch.bfloat16
    chunk = policy.predict_action(obs, noise)
    assert chunk.dtype == torch.float32 and torch.isfinite(chunk).all()
    assert 0 < float((chunk - full).norm() / full.norm()) < 0.1  # lossy, and close


def test_run_refuses_dtype_for_a_remote_policy(capsys) -> None:
    assert main(["run", "policy=ws://127.0.0.1:9", "task=push_t", "dtype=bf16"]) == 1
    assert "dtype= applies to a checkpoint=" in capsys.readouterr().err
