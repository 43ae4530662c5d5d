"""Behaviour kept across the execution-core refactor: two checkpoints written by the code before it (format 1,
``tests/fixtures/checkpoints``) load and compute what that code computed (``tests/fixtures/golden.npz``, made by
``tests/fixtures/make_golden.py`` at commit b5bed30): the same chunks for fixed noise, the same warm starts, and
the same push_t episodes -- actions to 1e-6, returns and success -- through today's evaluation room."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
sys.path.insert(0, str(FIXTURES))

from make_golden import EPISODES, NAMES, SEED, chunk_noise, fixed_obs  # noqa: E402

from robolearn.accel import prepare_for_inference  # noqa: E402
from robolearn.evaluation import evaluate  # noqa: E402
from robolearn.policies import load_policy, read_run_config  # noqa: E402
from sim.vector import make_vector_env  # noqa: E402

GOLDEN = np.load(FIXTURES / "golden.npz")


def _load(name: str):
    # the CLI's path: any kind through load_policy, then the inference kernels (those the old code always used)
    return prepare_for_inference(load_policy(FIXTURES / "checkpoints" / name))


@pytest.mark.parametrize("name", NAMES)
def test_old_checkpoint_chunks_and_warm_starts_are_unchanged(name: str) -> None:
    policy = _load(name)
    obs, noise = fixed_obs(policy), chunk_noise(1, 2, 3, policy.noise_shape(1))
    kind, steps = policy.sampler_config["kind"], policy.sampler_config["steps"]
    for s in (steps, 3):
        got = policy.predict_action(obs, noise, sampler=kind, steps=s).numpy()
        np.testing.assert_allclose(got, GOLDEN[f"{name}/chunk_{kind}{s}"], rtol=0, atol=1e-6)
    other = {"diffusion": ("ddpm", 5), "flow": ("midpoint", 3)}[policy.policy_type]
    got = policy.predict_action(obs, noise, sampler=other[0], steps=other[1], generator=torch.Generator().manual_seed(11))
    np.testing.assert_allclose(got.numpy(), GOLDEN[f"{name}/chunk_other"], rtol=0, atol=1e-6)
    prev = policy.predict_action(obs, noise)
    warm = policy.predict_action_warm(obs, prev, 3, 2, noise).numpy()
    np.testing.assert_allclose(warm, GOLDEN[f"{name}/warm"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_old_checkpoint_evaluates_to_the_same_episodes(name: str) -> None:
    # two environments in two worker processes; that one environment in this process gives the same episodes is
    # tests/evaluation/test_evaluate.py's business
    policy = _load(name)
    run = read_run_config(FIXTURES / "checkpoints" / name)
    with make_vector_env(run["task"], num_envs=2, num_workers=2, autoreset_mode="Disabled",
                         **run["env_config"]) as venv:
        result = evaluate(policy, venv, [SEED + j for j in range(EPISODES)], keep_steps=True)
    for j, ep in enumerate(result["per_episode"]):
        assert ep["episode"] == j and ep["seed"] == SEED + j
        np.testing.assert_allclose(ep["actions"], GOLDEN[f"{name}/ep{j}_actions"], rtol=0, atol=1e-6)
        assert ep["return"] == pytest.approx(float(GOLDEN[f"{name}/ep{j}_return"]), abs=1e-4)
        assert ep["success"] == bool(GOLDEN[f"{name}/ep{j}_success"])


def test_the_fixture_checkpoints_are_the_old_format() -> None:
    import json

    for name in NAMES:
        version = json.loads((FIXTURES / "checkpoints" / name / "version.json").read_text())
        assert version == {"robolearn": "0.1.0", "format": 1, "policy_type": version["policy_type"]}
        assert "module" not in version  # written before the registry: loading must not need it
        assert not (FIXTURES / "checkpoints" / name / "train_state.pt").exists()
