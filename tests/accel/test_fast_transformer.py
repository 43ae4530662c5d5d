"""The transformer's fused inference path (robolearn.accel.fast_transformer, kernels "onednn"): same function as
the models' code, the fused pieces are really used, new weights are picked up, training is untouched."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch.profiler import profile

from robolearn.accel import kernels_in_use, prepare_for_inference, use_kernels
from robolearn.accel.fast_transformer import FastTransformerCond, FastTransformerDenoiser
from robolearn.models.transformer import DenoiserBlock, TransformerDenoiser
from robolearn.policies import make_policy

torch.set_num_threads(1)


def s(d: int) -> dict[str, np.ndarray]:
    return {"min": -np.ones(d), "max": np.ones(d), "mean": np.zeros(d), "std": np.ones(d), "count": np.array(1.0)}


def policy(ptype: str = "diffusion", sampler: dict | None = None, seed: int = 0, n_obs: int = 2) -> Any:
    """A tiny transformer policy with every layer randomized (adaLN-Zero starts some at zero)."""
    torch.manual_seed(seed)
    cfg = {"type": ptype, "backbone": {"name": "transformer", "preset": "tiny"}, "obs": {"state": [5]},
           "n_obs_steps": n_obs, "action_dim": 2,
           "sampler": sampler or {"kind": "ddim", "steps": 6}}
    p = make_policy(cfg, {"state": s(5), "action": s(2)}).eval()
    for layer in p.backbone.modules():
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, 0.0, 0.15)
            torch.nn.init.normal_(layer.bias, 0.0, 0.05)
    return p


def obs(batch: int, n_obs: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    return {"state": torch.randn(batch, n_obs, 5, generator=torch.Generator().manual_seed(seed))}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("ptype,sampler", [("diffusion", {"kind": "ddim", "steps": 6}),
                                           ("diffusion", {"kind": "ddpm", "steps": 8}),
                                           ("flow", {"kind": "midpoint", "steps": 3})])
@pytest.mark.parametrize("absorb", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_path_computes_the_models_function(ptype, sampler, absorb, batch):
    p = policy(ptype, sampler)
    o, noise = obs(batch), torch.randn(p.noise_shape(batch))
    ref = p.predict_action(o, noise)
    prepare_for_inference(p)
    assert type(p.backbone) is FastTransformerDenoiser and kernels_in_use(p) == "onednn"
    if not absorb:
        p.backbone.ABSORB_RATIO = 10**9  # per instance: the cross-attention keeps its projections
    with torch.inference_mode():
        prepared = p.backbone.prepare(p.encode_obs(o))
    assert isinstance(prepared, FastTransformerCond) and (prepared.absorbed is not None) == absorb
    out = p.predict_action(o, noise)
    assert out.shape == ref.shape and not torch.equal(out, ref)  # other kernels, other rounding...
    assert rel(out, ref) < 1e-5  # ...the same function
    assert torch.equal(p.predict_action(o, noise), out)  # the kept timestep conditioning changes nothing


def test_fused_path_uses_onednn_and_keeps_the_timestep_conditioning():
    p = prepare_for_inference(policy())
    o, noise = obs(1), torch.randn(p.noise_shape(1))
    p.predict_action(o, noise)
    with profile() as prof:
        p.predict_action(o, noise)
    names = [e.name for e in prof.events()]
    n_blocks = len(p.backbone.blocks)
    # 4 products a block per step (qkv, sa_out, ff in, ff out; the cross-attention's are absorbed), 6 steps
    assert names.count("mkldnn::_linear_pointwise") == 4 * n_blocks * 6
    # the time MLP's SiLU ran on the first chunk only: the second found every timestep kept
    assert names.count("aten::silu") == 0
    use_kernels(p, "stock")
    with profile() as prof:
        p.predict_action(o, noise)
    names = [e.name for e in prof.events()]
    assert names.count("mkldnn::_linear_pointwise") == 0 and names.count("aten::silu") == 2 * 6  # two SiLUs a step


def test_new_weights_are_picked_up_after_switching():
    p, q = prepare_for_inference(policy(seed=0)), policy(seed=5)
    o, noise = obs(2), torch.randn(p.noise_shape(2))
    before = p.predict_action(o, noise)  # packs weights, keeps timestep vectors
    ref = q.predict_action(o, noise)
    p.load_state_dict(q.state_dict())  # in-place copies: the same tensors, new versions
    after = p.predict_action(o, noise)
    assert rel(after, ref) < 1e-5 and rel(before, ref) > 1e-2
    with torch.no_grad():  # an in-place edit of one weight is seen too
        p.backbone.blocks[0].ff[0].weight.mul_(1.5)
        q.backbone.blocks[0].ff[0].weight.mul_(1.5)
    assert rel(p.predict_action(o, noise), q.predict_action(o, noise)) < 1e-5


def test_training_and_mixed_timesteps_take_the_models_path():
    p, q = policy(), policy()
    use_kernels(p, "onednn")
    x = torch.randn(3, p.horizon, 2)
    t = torch.tensor([3.0, 40.0, 77.0])  # a training batch: mixed timesteps
    cond = torch.randn(3, 2, p.backbone.cond_dim)
    with torch.no_grad():
        assert torch.equal(p.backbone(x, t, cond), q.backbone(x, t, cond))
    # with autograd on (training), even at one timestep: the models' code, gradients and all
    t1 = torch.full((3,), 10.0)
    a, b = p.backbone(x, t1, cond), q.backbone(x, t1, cond)
    assert torch.equal(a, b)
    a.square().mean().backward()
    b.square().mean().backward()
    ga = p.backbone.blocks[0].qkv.weight.grad
    assert ga is not None and torch.equal(ga, q.backbone.blocks[0].qkv.weight.grad)


def test_switching_round_trip_keeps_weights_and_names():
    p = policy()
    state = {k: v.clone() for k, v in p.state_dict().items()}
    names = [n for n, _ in p.named_modules()]
    assert kernels_in_use(p) == "gemm"
    for kernels in ("onednn", "stock", "gemm", "onednn"):
        use_kernels(p, kernels)
        assert kernels_in_use(p) == kernels
        assert isinstance(p.backbone, TransformerDenoiser)
        assert all(isinstance(b, DenoiserBlock) for b in p.backbone.blocks)
        sd = p.state_dict()
        assert list(sd) == list(state) and all(torch.equal(sd[k], state[k]) for k in sd)
        assert [n for n, _ in p.named_modules()] == names
    use_kernels(p, "gemm")
    assert type(p.backbone) is TransformerDenoiser and all(type(b) is DenoiserBlock for b in p.backbone.blocks)
