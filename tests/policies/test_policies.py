"""Chunk policies end to end on tiny stores: training, deterministic sampling, checkpoints and their errors."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from robolearn.accel import set_inference_dtype
from robolearn.data import EpisodeStore, KeySpec, SequenceDataset
from robolearn.policies import (
    CheckpointError,
    ChunkPolicy,
    ConfigError,
    DiffusionPolicy,
    FlowPolicy,
    load_policy,
    make_policy,
    read_checkpoint_config,
    read_run_config,
    save_policy,
)

torch.set_num_threads(1)

LOW_SCHEMA = {
    "state": KeySpec((3,), "float32", "obs"),
    "action": KeySpec((2,), "float32", "action"),
}
IMG_SCHEMA = {**LOW_SCHEMA, "cam": KeySpec((12, 12, 3), "uint8", "obs")}


def make_store(path: Path, schema: dict[str, KeySpec] = LOW_SCHEMA, episodes: int = 4, length: int = 40) -> EpisodeStore:
    """Smooth trajectories whose action (scaled away from [-1, 1] so normalization matters) follows the state."""
    store = EpisodeStore.create(path, schema, fps=10, task="unit")
    rng = np.random.default_rng(0)
    for _ in range(episodes):
        t = np.linspace(0, 2 * np.pi, length, dtype=np.float32)
        phase = rng.uniform(0, 2 * np.pi)
        state = np.stack([np.sin(t + phase), np.cos(t + phase), t / 7], axis=1).astype(np.float32)
        ep = {"state": state, "action": (5.0 * state[:, :2] + 3.0).astype(np.float32)}
        if "cam" in schema:
            ep["cam"] = rng.integers(0, 256, (length, 12, 12, 3), dtype=np.uint8)
        store.append_episode(ep)
    return store


def config(ptype: str, bb: str = "unet", **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "type": ptype,
        "backbone": {"name": bb, "preset": "tiny"},
        "horizon": 8,
        "n_obs_steps": 2,
        "n_action_steps": 4,
        "obs": {"state": [3]},
        "action_dim": 2,
    }
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> EpisodeStore:
    return make_store(tmp_path_factory.mktemp("pol") / "low.zarr")


@pytest.fixture(scope="module")
def dataset(store: EpisodeStore) -> SequenceDataset:
    return SequenceDataset(store, horizon=8, n_obs_steps=2, n_action_steps=4)


def obs_batch(dataset: SequenceDataset, n: int = 3) -> dict[str, torch.Tensor]:
    b = dataset.get_batch(np.arange(n) * 5)
    return {k: torch.from_numpy(v) for k, v in b["obs"].items()}


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("ptype,backbone", [("diffusion", "unet"), ("flow", "unet"), ("flow", "transformer")])
def test_loss_falls(store: EpisodeStore, dataset: SequenceDataset, ptype: str, backbone: str) -> None:
    torch.manual_seed(0)
    policy = make_policy(config(ptype, backbone), store.stats())
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3, weight_decay=1e-6)
    losses = []
    for batch in dataset.batches(32, seed=0, epochs=None):
        loss = policy.compute_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if len(losses) == 250:
            break
    first, last = np.mean(losses[:20]), np.mean(losses[-30:])
    assert np.isfinite(losses).all()
    assert last < 0.3 * first, (first, last)


def test_trained_policy_predicts_in_raw_units(store: EpisodeStore, dataset: SequenceDataset) -> None:
    """After some training, DDIM chunks land near the demonstrated (raw-unit) actions, far from [-1, 1]."""
    torch.manual_seed(0)
    policy = make_policy(config("diffusion", diffusion={"prediction_type": "sample"}), store.stats())
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    for i, batch in enumerate(dataset.batches(32, seed=1, epochs=None)):
        loss = policy.compute_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i == 300:
            break
    policy.eval()
    b = dataset.get_batch(np.arange(0, 60, 6))
    chunk = policy.predict_action({k: torch.from_numpy(v) for k, v in b["obs"].items()})
    target = torch.from_numpy(b["action"])
    err = (chunk - target).abs().mean().item()
    spread = (target - target.mean(dim=(0, 1))).abs().mean().item()
    assert chunk.shape == target.shape
    assert err < 0.2 * spread, (err, spread)


# ---------------------------------------------------------------------------------------------- sampling
SAMPLERS = [("diffusion", "unet", "ddim"), ("diffusion", "unet", "ddpm"), ("diffusion", "transformer", "ddim"),
            ("flow", "unet", "euler"), ("flow", "unet", "midpoint"), ("flow", "transformer", "euler")]


@pytest.mark.parametrize("ptype,backbone,kind", SAMPLERS)
def test_sampling_is_a_deterministic_function_of_noise(
    store: EpisodeStore, dataset: SequenceDataset, ptype: str, backbone: str, kind: str
) -> None:
    torch.manual_seed(0)
    policy = make_policy(config(ptype, backbone), store.stats()).eval()
    if backbone == "transformer":  # zero-initialized head would make every output identical
        for p in policy.backbone.out_proj.parameters():
            torch.nn.init.normal_(p, std=0.5)
    obs = obs_batch(dataset)
    noise = torch.randn(policy.noise_shape(3), generator=torch.Generator().manual_seed(1))
    a = policy.predict_action(obs, noise, sampler=kind, steps=5)
    torch.manual_seed(123)  # the global RNG must not matter
    b = policy.predict_action(obs, noise.clone(), sampler=kind, steps=5)
    assert a.shape == (3, 8, 2)
    assert torch.equal(a, b)
    other = policy.predict_action(obs, torch.randn(policy.noise_shape(3)), sampler=kind, steps=5)
    assert not torch.allclose(a, other)
    fewer = policy.predict_action(obs, noise, sampler=kind, steps=2)
    assert not torch.allclose(a, fewer)  # the step count is honoured


@pytest.mark.parametrize("prediction,clip", [("epsilon", True), ("epsilon", False), ("sample", True)])
@pytest.mark.parametrize("steps", [100, 37, 10])
def test_ddpm_update_is_bitwise_diffusers_step(prediction: str, clip: bool, steps: int) -> None:
    """The DDPM sampler's precomputed update against diffusers' own ``DDPMScheduler.step``, over whole runs with
    per-row generators (the variance noise included)."""
    from diffusers import DDPMScheduler

    from robolearn.policies.diffusion import DDPMUpdate

    ref = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", prediction_type=prediction,
                        clip_sample=clip, clip_sample_range=1.0, variance_type="fixed_small")
    ref.set_timesteps(steps)
    assert DDPMUpdate.handles(ref)
    ours = DDPMUpdate(ref)
    x = y = torch.randn(3, 16, 2, generator=torch.Generator().manual_seed(0))
    g_ref = [torch.Generator().manual_seed(i) for i in range(3)]
    g_ours = [torch.Generator().manual_seed(i) for i in range(3)]
    for t in ref.timesteps:
        out = 1.5 * torch.randn(3, 16, 2)  # large enough that clipping bites
        x = ref.step(out, int(t), x, generator=g_ref, return_dict=False)[0]
        y = ours.step(out, int(t), y, generator=g_ours)[0]
        assert torch.equal(x, y), int(t)
    assert not DDPMUpdate.handles(DDPMScheduler(variance_type="fixed_large"))  # others keep diffusers' step


@pytest.mark.parametrize("prediction,clip", [("epsilon", True), ("epsilon", False), ("sample", True)])
@pytest.mark.parametrize("steps", [100, 37, 10, 3])
def test_ddim_update_is_bitwise_diffusers_step(prediction: str, clip: bool, steps: int) -> None:
    """The DDIM sampler's precomputed update against diffusers' own ``DDIMScheduler.step`` at eta=0, whole runs."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from robolearn.policies.diffusion import DDIMUpdate

    train = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", prediction_type=prediction,
                          clip_sample=clip, clip_sample_range=1.0, variance_type="fixed_small")
    ref = DDIMScheduler.from_config(train.config, set_alpha_to_one=True, steps_offset=0)
    ref.set_timesteps(steps)
    assert DDIMUpdate.handles(ref)
    ours = DDIMUpdate(ref)
    x = y = torch.randn(3, 16, 2, generator=torch.Generator().manual_seed(0))
    for t in ref.timesteps:
        out = 1.5 * torch.randn(3, 16, 2)  # large enough that clipping bites
        x = ref.step(out, int(t), x, eta=0.0, return_dict=False)[0]
        y = ours.step(out, int(t), y, eta=0.0)[0]
        assert torch.equal(x, y), int(t)
    with pytest.raises(ValueError, match="eta=0"):
        ours.step(out, int(ref.timesteps[0]), y, eta=0.5)
    assert not DDIMUpdate.handles(DDIMScheduler(thresholding=True))  # others keep diffusers' step


@pytest.mark.parametrize("kind,steps,update_name", [("ddim", 10, "DDIMUpdate"), ("ddpm", 7, "DDPMUpdate")])
def test_diffusion_policy_samples_through_its_precomputed_update_with_diffusers_results(
    store: EpisodeStore, dataset: SequenceDataset, kind: str, steps: int, update_name: str
) -> None:
    """Each sampler's chunk (and DDIM's warm start) is the one diffusers' own ``step()`` in its place gives."""
    from robolearn.policies import diffusion

    torch.manual_seed(0)
    policy = make_policy(config("diffusion"), store.stats()).eval()
    obs = obs_batch(dataset)
    noise = torch.randn(policy.noise_shape(3), generator=torch.Generator().manual_seed(1))
    ours = policy.predict_action(obs, noise, sampler=kind, steps=steps)
    warm = policy.predict_action_warm(obs, ours, 2, 3, noise)  # DDIM steps of the configured ddim-10
    update, timesteps = policy._samplers[(kind, steps)]
    assert isinstance(update, getattr(diffusion, update_name))
    policy._samplers[(kind, steps)] = (update.scheduler, timesteps)  # diffusers' own step() in its place
    assert torch.equal(policy.predict_action(obs, noise, sampler=kind, steps=steps), ours)
    if kind == "ddim":
        assert torch.equal(policy.predict_action_warm(obs, ours, 2, 3, noise), warm)


def test_sampler_override_and_validation(store: EpisodeStore) -> None:
    d = make_policy(config("diffusion"), store.stats())
    assert d.sampler_config == {"kind": "ddim", "steps": 10}
    d.set_sampler(steps=3)
    assert d.sampler_config == {"kind": "ddim", "steps": 3}
    d.set_sampler(kind="ddpm", steps=100)
    assert d.sampler_config == {"kind": "ddpm", "steps": 100}
    with pytest.raises(ValueError, match="steps"):
        d.set_sampler(steps=101)
    with pytest.raises(ValueError, match="sampler"):
        d.set_sampler(kind="euler")
    f = make_policy(config("flow"), store.stats())
    f.set_sampler("midpoint", 1)
    assert f.sampler_config == {"kind": "midpoint", "steps": 1}
    with pytest.raises(ValueError, match="integrator"):
        f.set_sampler(kind="ddim")


def test_flow_one_euler_step_is_one_velocity_call(store: EpisodeStore, dataset: SequenceDataset) -> None:
    """The ODE convention: x1 = noise + v(noise, t=0) for one Euler step (clipping off)."""
    policy = make_policy(config("flow", flow={"clip_sample": False}), store.stats()).eval()
    obs = obs_batch(dataset, 2)
    noise = torch.randn(policy.noise_shape(2))
    with torch.no_grad():
        cond = policy.encode_obs(obs)
        v = policy.backbone(noise, torch.zeros(2), cond)
        expected = policy.normalizer.unnormalize("action", noise + v)
    assert torch.allclose(policy.predict_action(obs, noise, steps=1), expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "beta"])
def test_flow_time_sampling(store: EpisodeStore, kind: str) -> None:
    policy = make_policy(config("flow", flow={"time_sampling": kind}), store.stats())
    torch.manual_seed(0)
    t = policy.sample_time(20000, torch.device("cpu"))
    assert 0.0 <= t.min() and t.max() <= 1.0
    if kind == "beta":  # pi0: never above s = 0.999, more mass on the noisy end (t near 0 here)
        assert t.max() <= 0.999
        assert abs(t.mean().item() - 0.999 * (1 - 0.6)) < 0.01  # E[Beta(1.5, 1)] = 0.6
        assert (t < 0.5).float().mean() > 0.6
    elif kind == "uniform":
        assert abs(t.mean().item() - 0.5) < 0.01
    else:
        assert (t - 0.5).abs().mean() < 0.25 - 0.02  # concentrated around the middle vs uniform


def test_executable_slice_and_interface(store: EpisodeStore) -> None:
    policy = make_policy(config("diffusion", horizon=16, n_obs_steps=2, n_action_steps=8), store.stats())
    assert isinstance(policy, ChunkPolicy) and isinstance(policy, DiffusionPolicy)
    assert policy.obs_keys == ["state"] and policy.action_dim == 2 and policy.noise_shape(5) == (5, 16, 2)
    chunk = torch.arange(16.0).view(1, 16, 1).expand(2, 16, 2)
    exe = policy.executable(chunk)
    assert exe.shape == (2, 8, 2) and exe[0, 0, 0] == 1.0 and exe[0, -1, 0] == 8.0
    policy.reset()
    with pytest.raises(KeyError, match="state"):
        policy.predict_action({"other": torch.zeros(1, 2, 3)})
    with pytest.raises(ValueError, match="state"):
        policy.predict_action({"state": torch.zeros(1, 3, 3)})
    # numpy observations are accepted too (what an environment loop has at hand)
    out = policy.eval().predict_action({"state": np.zeros((1, 2, 3), np.float32)}, steps=2)
    assert out.shape == (1, 16, 2)


def test_config_errors_name_the_key(store: EpisodeStore) -> None:
    with pytest.raises(ConfigError, match="bogus"):
        make_policy({**config("diffusion"), "bogus": 1}, store.stats())
    with pytest.raises(ConfigError, match="backbone"):
        make_policy(config("diffusion", backbone={"name": "unet", "preset": "tiny", "widths": 3}), store.stats())
    with pytest.raises(ConfigError, match="preset"):
        make_policy(config("flow", backbone={"name": "unet", "preset": "huge"}), store.stats())
    with pytest.raises(ConfigError, match="type"):
        make_policy(config("gan"), store.stats())
    with pytest.raises(KeyError, match="nope"):
        make_policy(config("flow", obs={"nope": [3]}), store.stats())


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("ptype,backbone", [("diffusion", "unet"), ("flow", "transformer")])
def test_save_load_identical_actions(tmp_path: Path, ptype: str, backbone: str) -> None:
    store = make_store(tmp_path / "img.zarr", IMG_SCHEMA, episodes=2, length=12)
    cfg = config(ptype, backbone, obs={"state": [3], "cam": [12, 12, 3]},
                 encoder={"image_widths": [8, 16], "num_keypoints": 4, "image_features": 8})
    torch.manual_seed(0)
    policy = make_policy(cfg, store.stats())
    for p in policy.backbone.parameters():  # not the (zero-initialized) init: a real weight round trip
        p.data.add_(torch.randn_like(p) * 0.05)
    policy.set_sampler(steps=4)
    policy.eval()
    ds = SequenceDataset(store, horizon=8, n_obs_steps=2, n_action_steps=4)
    obs = {k: torch.from_numpy(v) for k, v in ds.get_batch([0, 3])["obs"].items()}
    assert obs["cam"].dtype == torch.uint8
    noise = torch.randn(policy.noise_shape(2))
    expected = policy.predict_action(obs, noise)

    folder = save_policy(policy, tmp_path / "ckpt", config={"seed": 1}, extra={"step": 7})
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.yaml", "normalizer.json", "version.json", "extra.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt")]  # no temporary left behind
    version = json.loads((folder / "version.json").read_text())
    assert version["policy_type"] == ptype and version["format"] == 1

    loaded = load_policy(folder, expected_type=ptype)
    assert type(loaded) is type(policy) and not loaded.training
    assert loaded.sampler_config == {"kind": policy.sampler_config["kind"], "steps": 4}
    assert torch.equal(loaded.predict_action(obs, noise), expected)
    # the normalizer travels inside the weights and its JSON: raw -> normalized is identical
    assert any(k.startswith("normalizer.") for k in loaded.state_dict())
    for key in ("state", "cam", "action"):
        s0, o0 = policy.normalizer.params(key)
        s1, o1 = loaded.normalizer.params(key)
        assert torch.equal(s0, s1) and torch.equal(o0, o1)


def test_save_with_ema_weights_and_overwrite(store: EpisodeStore, dataset: SequenceDataset, tmp_path: Path) -> None:
    policy = make_policy(config("diffusion"), store.stats()).eval()
    ema = {k: (v + 0.01 if v.is_floating_point() and not k.startswith("normalizer.") else v.clone())
           for k, v in policy.state_dict().items()}
    folder = tmp_path / "c"
    save_policy(policy, folder)
    save_policy(policy, folder, ema_state_dict=ema, write_extra=lambda d: (d / "train_state.pt").write_bytes(b"x"))
    assert (folder / "train_state.pt").read_bytes() == b"x"
    loaded = load_policy(folder)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ema[k]), k
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # the old copy was removed after the rename
    with pytest.raises(CheckpointError, match="ema_state_dict"):
        save_policy(policy, folder, ema_state_dict={"x": torch.zeros(1)})
    # torch's own EMA wrapper (``module.`` prefix, ``n_averaged`` counter) is accepted as it is
    avg = AveragedModel(policy, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    for p in policy.backbone.parameters():
        p.data.add_(1.0)
    avg.update_parameters(policy)
    save_policy(policy, tmp_path / "avg", ema_state_dict=avg.state_dict())
    loaded = load_policy(tmp_path / "avg")
    for k, v in avg.module.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_checkpoint_errors_are_clear(store: EpisodeStore, tmp_path: Path) -> None:
    policy = make_policy(config("flow"), store.stats())
    folder = save_policy(policy, tmp_path / "flow_ckpt")

    with pytest.raises(CheckpointError, match="does not exist"):
        load_policy(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="'flow' policy, expected 'diffusion'"):
        load_policy(folder, expected_type="diffusion")
    assert isinstance(load_policy(folder, expected_type="flow"), FlowPolicy)

    broken = tmp_path / "broken"
    save_policy(policy, broken)
    (broken / "normalizer.json").unlink()
    with pytest.raises(CheckpointError, match="normalizer.json"):
        load_policy(broken)

    bad_yaml = save_policy(policy, tmp_path / "bad_yaml")
    (bad_yaml / "config.yaml").write_text("policy: [unclosed\n  - : :")
    with pytest.raises(CheckpointError, match="config.yaml"):
        load_policy(bad_yaml)

    no_policy = save_policy(policy, tmp_path / "no_policy")
    (no_policy / "config.yaml").write_text("run: {}\n")
    with pytest.raises(CheckpointError, match="config.yaml.*policy"):
        load_policy(no_policy)

    # weights that do not fit the config: a config edited to a wider backbone
    wrong = save_policy(policy, tmp_path / "wrong")
    text = (wrong / "config.yaml").read_text().replace("- 16\n", "- 24\n", 1)
    (wrong / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match="model.safetensors.*shape"):
        load_policy(wrong)

    garbage = save_policy(policy, tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_policy(garbage)


def test_binary_config_is_a_checkpoint_error(store: EpisodeStore, tmp_path: Path) -> None:
    folder = save_policy(make_policy(config("flow"), store.stats()), tmp_path / "binary")
    (folder / "config.yaml").write_bytes(bytes([0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, 0x00, 0xFF]))
    for read in (load_policy, read_checkpoint_config, read_run_config):
        with pytest.raises(CheckpointError, match=r"binary/config\.yaml is not UTF-8 text"):
            read(folder)


def test_non_finite_weights_are_refused_naming_the_first_tensor(store: EpisodeStore, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    policy = make_policy(config("diffusion"), store.stats())
    folder = save_policy(policy, tmp_path / "diverged")
    weights = folder / "model.safetensors"
    floats = [k for k, v in policy.checkpoint_state().items() if v.is_floating_point()]
    first, later = floats[3], floats[-2]  # in the model's order
    state = load_file(str(weights))
    state[later].view(-1)[0] = float("inf")
    save_file(state, str(weights), metadata={"policy_type": "diffusion"})
    with pytest.raises(CheckpointError, match=rf"{weights}: tensor '{later}' holds 1 inf value"):
        load_policy(folder)
    state[first].view(-1)[-1] = float("nan")
    save_file(state, str(weights), metadata={"policy_type": "diffusion"})
    with pytest.raises(CheckpointError, match=rf"{weights}: tensor '{first}' holds 1 NaN value"):
        load_policy(folder)


@pytest.mark.parametrize("ptype,bb", [("diffusion", "unet"), ("flow", "transformer")])
def test_bfloat16_inference_backbone(store: EpisodeStore, dataset: SequenceDataset, ptype: str, bb: str) -> None:
    torch.manual_seed(0)
    policy = make_policy(config(ptype, bb), store.stats()).eval()
    for p in policy.backbone.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    obs = obs_batch(dataset)
    noise = torch.randn(policy.noise_shape(3))
    ref = policy.predict_action(obs, noise, steps=4)
    set_inference_dtype(policy, "bf16")
    assert policy.backbone_dtype == torch.bfloat16
    assert policy.normalizer.params("action")[0].dtype == torch.float32  # only the backbone is cast
    a = policy.predict_action(obs, noise, steps=4)
    assert a.dtype == torch.float32 and torch.equal(a, policy.predict_action(obs, noise, steps=4))
    spread = ref.abs().mean()
    assert (a - ref).abs().mean() < 0.05 * spread
    with pytest.raises(RuntimeError, match="float32"):
        policy.compute_loss(dataset.get_batch([0, 1]))


def test_failed_save_leaves_previous_checkpoint_intact(store: EpisodeStore, tmp_path: Path) -> None:
    policy = make_policy(config("diffusion"), store.stats())
    folder = save_policy(policy, tmp_path / "ck", extra={"step": 1})

    def crash(_: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_policy(policy, folder, extra={"step": 2}, write_extra=crash)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary folder left behind
    assert json.loads((folder / "extra.json").read_text()) == {"step": 1}
    load_policy(folder)


@pytest.mark.parametrize("ptype", ["diffusion", "flow"])
def test_warm_start_runs_few_steps_from_the_previous_chunk(ptype):
    """RTI-DP warm start: deterministic given the noise, near the previous chunk when few steps remain."""
    stats = {"state": {"min": -np.ones(3), "max": np.ones(3), "mean": np.zeros(3), "std": np.ones(3)},
             "action": {"min": -np.ones(2), "max": np.ones(2), "mean": np.zeros(2), "std": np.ones(2)}}
    cfg = {"type": ptype, "backbone": {"name": "unet", "preset": "tiny"}, "obs": {"state": [3]}, "action_dim": 2,
           "horizon": 8, "n_obs_steps": 2, "n_action_steps": 4}
    torch.manual_seed(0)
    policy = make_policy(cfg, stats).eval()
    obs = {"state": torch.randn(1, 2, 3)}
    prev = torch.linspace(-0.5, 0.5, 16).reshape(1, 8, 2)
    noise = torch.randn(policy.noise_shape(1))
    a = policy.predict_action_warm(obs, prev, shift=4, steps=1, noise=noise)
    b = policy.predict_action_warm(obs, prev, shift=4, steps=1, noise=noise)
    assert a.shape == (1, 8, 2)
    torch.testing.assert_close(a, b)
    shifted = torch.cat([prev[:, 4:], prev[:, -1:].expand(1, 4, 2)], dim=1)
    cold = policy.predict_action(obs, noise=noise)
    # One of ten steps from the shifted chunk stays much closer to it than sampling from scratch does.
    assert (a - shifted).abs().mean() < (cold - shifted).abs().mean()
    with pytest.raises(ValueError, match="prev_chunk must have shape"):
        policy.predict_action_warm(obs, prev[:, :4], shift=1, steps=1)
