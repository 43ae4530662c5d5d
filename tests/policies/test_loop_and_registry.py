"""The one denoising loop (every backbone call told its step), typed configs, and the policy registry with a
wrapper kind defined in the tests (``tests/plugins/wrapper_policies.py``)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from robolearn.policies import (
    CheckpointError,
    ConfigError,
    DenoiseStep,
    load_policy,
    make_policy,
    policy_config,
    read_run_config,
    registered_types,
    save_policy,
)

TESTS = Path(__file__).resolve().parents[1]
PLUGINS = TESTS / "plugins"  # only the test wrapper: tests/ itself would shadow the sim package in subprocesses
sys.path.insert(0, str(PLUGINS))
from wrapper_policies import OffsetPolicy  # noqa: E402

torch.set_num_threads(1)


def stats(d: int) -> dict[str, np.ndarray]:
    return {"min": -np.ones(d) * 2, "max": np.ones(d) * 3, "mean": np.zeros(d), "std": np.ones(d),
            "count": np.array(1.0)}


STATS = {"state": stats(3), "action": stats(2)}


def build(ptype: str, bb: str = "unet", **over: Any) -> Any:
    cfg = {"type": ptype, "backbone": {"name": bb, "preset": "tiny"}, "horizon": 8, "n_obs_steps": 2,
           "n_action_steps": 4, "obs": {"state": [3]}, "action_dim": 2, **over}
    torch.manual_seed(0)
    return make_policy(cfg, STATS).eval()


class Recorder(nn.Module):
    """Wraps a backbone and records the ``step`` every call is given."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.steps: list[DenoiseStep] = []

    def prepare(self, cond: Any) -> Any:
        return self.inner.prepare(cond)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any, step: DenoiseStep | None = None) -> torch.Tensor:
        assert step is not None
        self.steps.append(step)
        return self.inner(x, t, cond)


OBS = {"state": torch.linspace(-1, 1, 12).reshape(2, 2, 3)}


@pytest.mark.parametrize("ptype,kind,steps,calls", [("diffusion", "ddim", 10, 10), ("diffusion", "ddpm", 5, 5),
                                                    ("flow", "euler", 4, 4), ("flow", "midpoint", 3, 6)])
def test_every_backbone_call_knows_its_step(ptype: str, kind: str, steps: int, calls: int) -> None:
    policy = build(ptype)
    policy.backbone = Recorder(policy.backbone)
    noise = torch.randn(policy.noise_shape(2), generator=torch.Generator().manual_seed(0))
    a = policy.predict_action(OBS, noise, sampler=kind, steps=steps)
    rec = policy.backbone.steps
    assert [(s.index, s.total, s.offset) for s in rec] == [(i, calls, 0) for i in range(calls)]
    assert {s.sampler for s in rec} == {f"{kind}-{steps}"}
    rec.clear()
    assert torch.equal(a, policy.predict_action(OBS, noise, sampler=kind, steps=steps))  # deterministic in noise
    other = policy.predict_action(OBS, torch.randn(policy.noise_shape(2)), sampler=kind, steps=steps)
    assert not torch.equal(a, other)


@pytest.mark.parametrize("ptype,kind,calls_per_step", [("diffusion", "ddim", 1), ("flow", "midpoint", 2)])
def test_warm_starts_go_through_the_loop_with_their_offset(ptype: str, kind: str, calls_per_step: int) -> None:
    policy = build(ptype)
    policy.set_sampler(kind, 5)
    policy.backbone = Recorder(policy.backbone)
    prev = policy.predict_action(OBS)
    policy.backbone.steps.clear()
    policy.predict_action_warm(OBS, prev, shift=2, steps=2)
    rec = policy.backbone.steps
    total = 2 * calls_per_step
    assert [(s.index, s.total, s.schedule_index) for s in rec] == [
        (i, total, 3 * calls_per_step + i) for i in range(total)]


def test_ddpm_given_noise_is_repeatable_and_varies_with_the_noise() -> None:
    policy = build("diffusion", sampler={"kind": "ddpm", "steps": 20})
    n1, n2 = torch.randn(policy.noise_shape(2)), torch.randn(policy.noise_shape(2))
    assert torch.equal(policy.predict_action(OBS, n1), policy.predict_action(OBS, n1))
    assert not torch.equal(policy.predict_action(OBS, n1), policy.predict_action(OBS, n2))
    assert policy.stochastic_samplers == ("ddpm",)
    # each row's step noise comes from its own noise: a row computed alone is the row computed in a batch
    alone = policy.predict_action({"state": OBS["state"][1:]}, n1[1:])
    assert torch.allclose(alone[0], policy.predict_action(OBS, n1)[1], atol=1e-4)
    salted = build("diffusion", sampler={"kind": "ddpm", "steps": 20}, diffusion={"ddpm_seed": 5})
    assert not torch.equal(salted.predict_action(OBS, n1), policy.predict_action(OBS, n1))  # ddpm_seed counts


def test_config_defaults_live_in_the_dataclass_and_errors_name_the_key() -> None:
    cfg = policy_config({"type": "flow", "obs": {"s": [3]}, "action_dim": 2})
    assert (cfg.horizon, cfg.n_obs_steps, cfg.n_action_steps) == (16, 2, 8)
    assert cfg.sampler.kind == "euler" and cfg.flow.time_sampling == "beta" and cfg.backbone["preset"] == "cpu"
    assert policy_config(cfg.to_dict()).to_dict() == cfg.to_dict()  # the saved form round-trips
    bad = [({"n_action_steps": 20}, "policy.n_action_steps must be in \\[1, 15\\]"),
           ({"n_obs_steps": 0}, "policy.n_obs_steps"),
           ({"sampler": {"kind": "ddim"}}, "policy.sampler.kind must be a flow integrator"),
           ({"sampler": {"steps": 0}}, "policy.sampler.steps"),
           ({"flow": {"time_sampling": "x"}}, "policy.flow.time_sampling"),
           ({"horizn": 4}, "did you mean 'horizon'"),
           ({"diffusion": {"num_train_timesteps": 10}}, "'diffusion' section but 'type' is 'flow'")]
    for over, match in bad:
        with pytest.raises(ConfigError, match=match):
            policy_config({"type": "flow", "obs": {"s": [3]}, "action_dim": 2, **over})
    with pytest.raises(ConfigError, match="policy.sampler.steps must be in \\[1, 100\\]"):
        policy_config({"type": "diffusion", "obs": {"s": [3]}, "action_dim": 2, "sampler": {"steps": 101}})


# ---------------------------------------------------------------------------------------------- registry
@pytest.fixture()
def base_ckpt(tmp_path: Path) -> Path:
    policy = build("diffusion")
    return save_policy(policy, tmp_path / "base", config={"task": "push_t", "env_config": {}})


def test_a_wrapper_round_trips_and_names_its_base(base_ckpt: Path, tmp_path: Path) -> None:
    assert {"diffusion", "flow", "test_offset"} <= set(registered_types())
    base = load_policy(base_ckpt)
    wrapped = OffsetPolicy(base, scale=2.0)
    with torch.no_grad():
        wrapped.offset.copy_(torch.tensor([0.5, -1.0]))
    folder = save_policy(wrapped, tmp_path / "wrappers" / "offset")
    version = json.loads((folder / "version.json").read_text())
    assert version["policy_type"] == "test_offset" and version["module"] == "wrapper_policies"
    doc = (folder / "config.yaml").read_text()
    assert "../../base" in doc and "sha256" in doc and not (folder / "normalizer.json").exists()
    loaded = load_policy(folder)
    assert isinstance(loaded, OffsetPolicy) and loaded.scale == 2.0
    noise = torch.randn(base.noise_shape(2))
    want = base.predict_action(OBS, noise) + torch.tensor([1.0, -2.0])
    assert torch.allclose(loaded.predict_action(OBS, noise), want, atol=1e-6)
    assert read_run_config(folder)["task"] == "push_t"  # the base's run section shows through
    assert (loaded.horizon, loaded.n_action_steps, loaded.obs_keys) == (8, 4, ["state"])


def test_a_missing_or_changed_base_is_refused_naming_both(base_ckpt: Path, tmp_path: Path) -> None:
    folder = save_policy(OffsetPolicy(load_policy(base_ckpt)), tmp_path / "offset")
    saved = tmp_path / "saved_base"
    shutil.copytree(base_ckpt, saved)
    retrained = build("diffusion")
    with torch.no_grad():
        next(retrained.backbone.parameters()).add_(1.0)
    save_policy(retrained, base_ckpt, config={"task": "push_t"})
    with pytest.raises(CheckpointError, match=f"{folder}.*base checkpoint {base_ckpt.resolve()}.*changed"):
        load_policy(folder)
    shutil.rmtree(base_ckpt)
    with pytest.raises(CheckpointError, match=f"{folder} wraps the base checkpoint {base_ckpt.resolve()}, which "
                                              "does not exist"):
        load_policy(folder)
    shutil.copytree(saved, base_ckpt)
    assert isinstance(load_policy(folder), OffsetPolicy)  # the original base back: loads again


def test_unknown_kinds_and_unsaved_bases_are_clear_errors(base_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="was not loaded from a checkpoint folder"):
        save_policy(OffsetPolicy(build("diffusion")), tmp_path / "x")
    folder = save_policy(OffsetPolicy(load_policy(base_ckpt)), tmp_path / "y")
    v = json.loads((folder / "version.json").read_text())
    (folder / "version.json").write_text(json.dumps({**v, "module": "no_such_module", "policy_type": "nope"}))
    (folder / "config.yaml").write_text((folder / "config.yaml").read_text().replace("test_offset", "nope"))
    with pytest.raises(CheckpointError, match="'nope' is registered by module 'no_such_module', which cannot be "
                                              "imported"):
        load_policy(folder)
    cyc_a = save_policy(OffsetPolicy(load_policy(base_ckpt)), tmp_path / "cyc_a")
    cyc_b = save_policy(OffsetPolicy(load_policy(base_ckpt)), tmp_path / "cyc_b")
    for one, other in ((cyc_a, "../cyc_b"), (cyc_b, "../cyc_a")):  # each names the other as its base
        (one / "config.yaml").write_text((one / "config.yaml").read_text().replace("../base", other))
    for reader in (read_run_config, load_policy):
        with pytest.raises(CheckpointError, match="nest deeper|changed"):
            reader(cyc_a)
    (cyc_a / "config.yaml").write_text((cyc_a / "config.yaml").read_text().replace("../cyc_b", "."))
    with pytest.raises(CheckpointError, match="is the checkpoint itself"):
        read_run_config(cyc_a)


def test_eval_cli_runs_a_wrapper_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint of a kind defined outside robolearn works through `robolearn eval` (its module imports by
    name), and a deleted base stops it with a message naming the base."""
    fixture = TESTS / "fixtures" / "checkpoints" / "v1_push_t_flow_transformer"
    base = shutil.copytree(fixture, tmp_path / "base")
    folder = save_policy(OffsetPolicy(load_policy(base), scale=0.0), tmp_path / "offset")
    env = {**os.environ, "PYTHONPATH": str(PLUGINS), "MUJOCO_GL": "egl"}
    exe = str(Path(sys.executable).with_name("robolearn"))
    cmd = [exe, "eval", f"checkpoint={folder}", "episodes=2", "num_envs=1", "workers=0", f"run_dir={tmp_path / 'e'}",
           "env.max_episode_steps=30"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["policy_type"] == "test_offset" and summary["episodes"] == 2 and summary["task"] == "push_t"
    # The rest in this process (the subprocess above is what shows the kind importing by name; here the plugin is
    # already imported): another interpreter cost ~7 s each.
    from robolearn.cli import main

    capsys.readouterr()
    assert main(["run", f"checkpoint={folder}", "realtime=false", "latency_s=0", "status=false",
                 "env.max_episode_steps=20", f"run_dir={tmp_path / 'r'}"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["ticks"] == 20 and report["policy"] == "OffsetPolicy" and report["error"] is None
    shutil.rmtree(base)
    assert main(cmd[1:]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"wraps the base checkpoint {base.resolve()}, which does not exist" in err
