"""Backbones and observation encoders: shapes, parameter-count presets, GEMM-form equivalence, branches.

The inference kernels (oneDNN) are tested with robolearn.accel, in tests/accel/test_kernels.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robolearn.models import BRANCH_NAMES, ConditionalUnet1D, ObsEncoder, TransformerDenoiser, crop_images
from robolearn.models.unet import GemmConv1d, GemmUpsample1d

torch.set_num_threads(1)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_unet_dp_preset_has_diffusion_policy_size() -> None:
    # Push-T-like: obs_dim 20 x n_obs_steps 2 as the global condition, action dim 2. Built on the meta
    # device: no memory, no initialization cost.
    with torch.device("meta"):
        m = ConditionalUnet1D.from_preset("dp", action_dim=2, cond_dim=20 * 2)
    assert 55e6 <= n_params(m) <= 70e6, n_params(m)


def test_transformer_default_preset_size() -> None:
    with torch.device("meta"):
        m = TransformerDenoiser.from_preset("default", action_dim=2, cond_dim=256, horizon=16)
    assert 7e6 <= n_params(m) <= 11e6, n_params(m)
    assert len(m.blocks) == 8 and m.d_model == 256


@pytest.mark.parametrize("T", [16, 10, 7])
def test_unet_shapes_any_horizon(T: int) -> None:
    m = ConditionalUnet1D.from_preset("tiny", action_dim=3, cond_dim=5)
    x = torch.randn(4, T, 3)
    y = m(x, torch.rand(4) * 100, torch.randn(4, 5))
    assert y.shape == (4, T, 3)
    # no global condition at all
    m0 = ConditionalUnet1D.from_preset("tiny", action_dim=3, cond_dim=0)
    assert m0(x, torch.rand(4), None).shape == (4, T, 3)


def test_unet_conditioning_matters_and_prepare_matches() -> None:
    torch.manual_seed(0)
    m = ConditionalUnet1D.from_preset("tiny", action_dim=2, cond_dim=4)
    x, t, c = torch.randn(2, 8, 2), torch.tensor([3.0, 50.0]), torch.randn(2, 4)
    y = m(x, t, c)
    assert torch.allclose(y, m(x, t, m.prepare(c)), atol=1e-6)
    assert not torch.allclose(y, m(x, t, c + 1.0), atol=1e-4)
    assert not torch.allclose(y, m(x, t + 10.0, c), atol=1e-4)


@pytest.mark.parametrize("c_in,c_out,k,stride,pad,T", [(3, 5, 5, 1, 2, 16), (8, 8, 3, 2, 1, 16), (8, 8, 3, 2, 1, 7),
                                                        (4, 6, 1, 1, 0, 9)])
def test_gemm_conv_equals_torch_conv(c_in: int, c_out: int, k: int, stride: int, pad: int, T: int) -> None:
    m = GemmConv1d(c_in, c_out, k, stride=stride, padding=pad)
    x = torch.randn(2, c_in, T, requires_grad=True)
    y = m(x)
    ref = F.conv1d(x, m.weight, m.bias, stride, pad)
    assert torch.allclose(y, ref, atol=1e-5)
    y.square().sum().backward()  # differentiable for training
    assert x.grad is not None and m.weight.grad is not None


@pytest.mark.parametrize("T", [4, 5, 8])
def test_gemm_upsample_equals_conv_transpose(T: int) -> None:
    m = GemmUpsample1d(6)
    x = torch.randn(3, 6, T)
    assert torch.allclose(m(x), F.conv_transpose1d(x, m.weight, m.bias, stride=2, padding=1), atol=1e-5)


def test_transformer_shapes_and_cond_forms() -> None:
    m = TransformerDenoiser.from_preset("tiny", action_dim=2, cond_dim=12, horizon=16)
    x = torch.randn(3, 16, 2)
    assert m(x, torch.rand(3), torch.randn(3, 5, 12)).shape == (3, 16, 2)
    assert m(x, torch.rand(3), torch.randn(3, 12)).shape == (3, 16, 2)  # one global token
    assert m(x[:, :10], torch.rand(3), torch.randn(3, 12)).shape == (3, 10, 2)
    with pytest.raises(ValueError, match="cond|tokens"):
        m(x, torch.rand(3), torch.randn(3, 5, 7))


def test_transformer_branches_compose_to_forward() -> None:
    torch.manual_seed(0)
    m = TransformerDenoiser.from_preset("tiny", action_dim=2, cond_dim=8, horizon=8).eval()
    # make the zero-initialized time modulation and head non-trivial so the check means something
    for p in (*m.time_mod.parameters(), *m.final_mod.parameters(), *m.out_proj.parameters()):
        torch.nn.init.normal_(p, std=0.1)
    x, t, c = torch.randn(2, 8, 2), torch.tensor([5.0, 70.0]), torch.randn(2, 3, 8)
    expected = m(x, t, c)

    ctx = m.begin(x, t, c)
    h = ctx.x
    for blk, bc in zip(m.blocks, ctx.block_ctx):
        assert blk.branch_names == BRANCH_NAMES == ("self_attn", "cross_attn", "ff")
        sa = blk.self_attn_branch(h, bc.mod)
        h = h + sa
        ca_mem = blk.cross_attn_branch(h, bc.mod, memory=bc.memory)  # from raw memory tokens
        ca_kv = blk.cross_attn_branch(h, bc.mod, kv=bc.kv)  # from precomputed keys/values
        assert torch.allclose(ca_mem, ca_kv, atol=1e-6)
        h = h + ca_kv
        ff = blk.branch("ff", h, bc)
        assert ff.shape == h.shape and ff.abs().sum() > 0
        h = h + ff
    assert torch.allclose(m.head(h, ctx), expected, atol=1e-5)
    # skipping a branch changes the result: the branches are not no-ops
    h2 = ctx.x
    for blk, bc in zip(m.blocks, ctx.block_ctx):
        h2 = h2 + blk.self_attn_branch(h2, bc.mod)
        h2 = h2 + blk.ff_branch(h2, bc.mod)
    assert not torch.allclose(m.head(h2, ctx), expected, atol=1e-4)


def _two_camera_obs(B: int = 3, n: int = 2, H: int = 20) -> dict[str, torch.Tensor]:
    return {
        "state": torch.randn(B, n, 4),
        "front": torch.rand(B, n, H, H, 3) * 2 - 1,
        "wrist": torch.rand(B, n, H, H, 3) * 2 - 1,
    }


@pytest.mark.parametrize("shared", [False, True])
def test_image_encoder_two_cameras(shared: bool) -> None:
    shapes = {"state": (4,), "front": (20, 20, 3), "wrist": (20, 20, 3)}
    kw = dict(image_widths=(8, 16), num_keypoints=8, image_features=16, shared_trunk=shared)
    flat = ObsEncoder(shapes, 2, **kw)
    assert flat.image_keys == ["front", "wrist"] and flat.low_dim_keys == ["state"]
    assert len(flat.trunks) == (1 if shared else 2)
    obs = _two_camera_obs()
    flat.eval()
    out = flat(obs)
    assert out.shape == (3, flat.out_dim) and flat.out_dim == 2 * (4 + 2 * 16)
    # every camera contributes: changing the wrist image changes the features
    obs2 = dict(obs, wrist=obs["wrist"].flip(2))
    assert not torch.allclose(flat(obs2), out)
    tok = ObsEncoder(shapes, 2, output="tokens", token_dim=24, **kw)
    tokens = tok(obs)
    assert tokens.shape == (3, 2 * 3, 24) and tok.n_tokens == 6


def test_random_crop_only_in_training_mode() -> None:
    torch.manual_seed(0)
    enc = ObsEncoder({"front": (20, 20, 3), "wrist": (20, 20, 3)}, 1, image_widths=(8,), num_keypoints=4,
                     image_features=8, crop_ratio=0.8)
    obs = {k: v for k, v in _two_camera_obs(n=1).items() if k != "state"}
    enc.eval()
    a, b = enc(obs), enc(obs)
    assert torch.equal(a, b)  # center crop: deterministic
    enc.train()
    c, d = enc(obs), enc(obs)
    assert not torch.allclose(c, d)  # random windows differ between calls


def test_crop_images_windows() -> None:
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    center = crop_images(x, (4, 4), random=False)
    assert torch.equal(center, x[:, :, 1:5, 1:5])
    g = torch.Generator().manual_seed(0)
    r = crop_images(x, (4, 4), random=True, generator=g)
    assert r.shape == (2, 1, 4, 4)
    for i in range(2):  # each crop is some contiguous window of its own image
        top, left = divmod(int(r[i, 0, 0, 0].item() - x[i, 0, 0, 0].item()), 6)
        assert torch.equal(r[i], x[i, :, top : top + 4, left : left + 4])
