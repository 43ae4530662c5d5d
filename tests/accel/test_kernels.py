"""robolearn.accel: kernel switching of the U-Net (round trip, agreement, the oneDNN op, gradients) and the
inference dtype of the backbone."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import profile

from robolearn.accel import (
    KERNELS,
    kernels_in_use,
    onednn_available,
    onednn_linear,
    prepare_for_inference,
    set_inference_dtype,
    use_kernels,
)
from robolearn.models import ConditionalUnet1D
from robolearn.models.unet import GemmConv1d, GemmUpsample1d
from robolearn.policies import make_policy

torch.set_num_threads(1)

ONEDNN_OP = "mkldnn::_linear_pointwise"


def s(d: int) -> dict[str, np.ndarray]:
    return {"min": -np.ones(d), "max": np.ones(d), "mean": np.zeros(d), "std": np.ones(d), "count": np.array(1.0)}


def unet_policy() -> Any:
    torch.manual_seed(0)
    cfg = {"type": "diffusion", "backbone": {"name": "unet", "preset": "tiny"}, "obs": {"state": [5]}, "action_dim": 2}
    policy = make_policy(cfg, {"state": s(5), "action": s(2)}).eval()
    for p in policy.backbone.parameters():  # away from zero-initialized layers, so outputs mean something
        p.data.add_(torch.randn_like(p) * 0.05)
    return policy


def layer_classes(m: nn.Module) -> dict[str, type]:
    return {name: type(mod) for name, mod in m.named_modules()}


def onednn_calls(fn: Any) -> int:
    with profile() as prof:
        fn()
    return sum(e.name == ONEDNN_OP for e in prof.events())


def test_kernels_round_trip_keeps_state_dict_and_names() -> None:
    policy = unet_policy()
    assert kernels_in_use(policy) == "gemm"  # the models' plain modules
    plain = layer_classes(policy)
    state = {k: v.clone() for k, v in policy.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in policy.state_dict().items()}
    for kernels in ("stock", "onednn", "gemm", "onednn", "stock"):
        assert use_kernels(policy, kernels) is policy
        assert kernels_in_use(policy) == kernels == kernels_in_use(policy.backbone)
        sd = policy.state_dict()
        assert list(sd) == list(state)
        assert all(torch.equal(sd[k], state[k]) and sd[k].data_ptr() == ptrs[k] for k in sd)  # weights untouched
        assert [n for n, _ in policy.named_modules()] == list(plain)
        for name, mod in policy.named_modules():
            assert isinstance(mod, plain[name])  # still a GemmConv1d / GemmUpsample1d / nn.Linear
    use_kernels(policy, "gemm")
    assert layer_classes(policy) == plain  # switching back restores the models' own classes
    # a module with no U-Net, and a bad name
    assert kernels_in_use(nn.Linear(3, 3)) is None and kernels_in_use(use_kernels(nn.Linear(3, 3), "stock")) is None
    with pytest.raises(ValueError, match="onednn"):
        use_kernels(policy, "fast")


def test_kernels_switch_only_unet_layers() -> None:
    policy = unet_policy()
    use_kernels(policy, "stock")
    unet = policy.backbone
    assert type(unet.film_time) is not nn.Linear and isinstance(unet.film_time, nn.Linear)
    assert type(unet.film_obs) is nn.Linear  # the per-chunk observation projection is not switched
    assert all(type(m) is nn.Linear for n, m in policy.named_modules() if isinstance(m, nn.Linear)
               and not n.endswith("film_time"))
    use_kernels(unet.film_time, "onednn")  # on its own a film_time is not a U-Net layer: untouched
    assert kernels_in_use(policy) == "stock"
    use_kernels(unet.down, "onednn")  # part of the U-Net switched separately
    assert kernels_in_use(policy) == "mixed" and kernels_in_use(unet.down) == "onednn"


@pytest.mark.parametrize("sampler,steps", [("ddim", 4), ("ddpm", 3)])
def test_kernel_sets_agree_on_predict_action(sampler: str, steps: int) -> None:
    policy = unet_policy()
    obs = {"state": torch.randn(2, policy.n_obs_steps, 5)}
    noise = torch.randn(policy.noise_shape(2))
    out = {}
    for kernels in KERNELS:
        use_kernels(policy, kernels)
        out[kernels] = policy.predict_action(obs, noise, sampler=sampler, steps=steps)
    assert out["gemm"].abs().mean() > 1e-3
    for kernels in ("stock", "onednn"):
        assert torch.allclose(out[kernels], out["gemm"], atol=1e-4), (kernels, (out[kernels] - out["gemm"]).abs().max())


@pytest.mark.skipif(not onednn_available(), reason="this PyTorch has no oneDNN inner product")
def test_onednn_kernels_use_the_onednn_op_only_without_autograd() -> None:
    policy = unet_policy()
    unet = policy.backbone
    n_convs = sum(isinstance(m, GemmConv1d) for m in unet.modules())
    x, t, c = torch.randn(1, 16, 2), torch.tensor([7.0]), torch.randn(1, unet.cond_dim)

    use_kernels(policy, "onednn")
    with torch.no_grad():
        assert onednn_calls(lambda: unet(x, t, c)) == n_convs + 1  # every convolution and film_time
    with torch.inference_mode():
        assert onednn_calls(lambda: unet(x, t, c)) == n_convs + 1
    assert onednn_calls(lambda: unet(x, t, c)) == 0  # autograd on: F.linear
    obs, noise = {"state": torch.randn(1, policy.n_obs_steps, 5)}, torch.randn(policy.noise_shape(1))
    assert onednn_calls(lambda: policy.predict_action(obs, noise, sampler="ddim", steps=2)) == 2 * (n_convs + 1)
    for kernels in ("gemm", "stock"):
        use_kernels(policy, kernels)
        with torch.no_grad():
            assert onednn_calls(lambda: unet(x, t, c)) == 0

    # the switched layer computes exactly the op on the unfolded input (the same numbers as before the move)
    conv = use_kernels(GemmConv1d(8, 6, 5, padding=2), "onednn")
    xc = torch.randn(1, 8, 4)
    cols = F.pad(xc, (2, 2)).unfold(2, 5, 1).permute(0, 2, 1, 3).reshape(4, 40)
    with torch.no_grad():
        expect = torch.ops.mkldnn._linear_pointwise(cols, conv.weight.view(6, 40), conv.bias, "none", [], "")
        assert torch.equal(conv(xc), expect.view(1, 4, 6).transpose(1, 2))
        a, w = torch.randn(4, 640), torch.randn(128, 640)  # conv-shaped product: agrees with F.linear
        assert torch.allclose(onednn_linear(a, w), F.linear(a, w), atol=1e-3)


def test_onednn_kernels_still_train() -> None:
    """Training with oneDNN kernels switched on falls back to F.linear: same loss, same gradients as "gemm"."""
    grads = {}
    for kernels in ("gemm", "onednn", "stock"):
        policy = unet_policy().train()
        use_kernels(policy, kernels)
        torch.manual_seed(1)
        batch = {"obs": {"state": torch.randn(4, policy.n_obs_steps, 5)},
                 "action": torch.rand(4, policy.horizon, 2) * 2 - 1}
        loss = policy.compute_loss(batch)
        loss.backward()
        grads[kernels] = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        assert "backbone.film_time.weight" in grads[kernels] and len(grads[kernels]) > 10
    assert grads["onednn"].keys() == grads["gemm"].keys()
    for n, g in grads["gemm"].items():
        assert torch.equal(grads["onednn"][n], g), n  # the very same ops
        assert torch.allclose(grads["stock"][n], g, atol=1e-4, rtol=1e-3), n


@pytest.mark.parametrize("T", [4, 5, 8])
def test_stock_upsample_is_conv_transpose(T: int) -> None:
    m = GemmUpsample1d(6)
    x = torch.randn(3, 6, T)
    ref = m(x)
    use_kernels(m, "stock")
    assert torch.equal(m(x), F.conv_transpose1d(x, m.weight, m.bias, stride=2, padding=1))
    assert torch.allclose(m(x), ref, atol=1e-5)


def test_set_inference_dtype_round_trip_and_refusal() -> None:
    policy = unet_policy()
    obs, noise = {"state": torch.randn(2, policy.n_obs_steps, 5)}, torch.randn(policy.noise_shape(2))
    ref = policy.predict_action(obs, noise, steps=4)
    assert set_inference_dtype(policy, "bf16") is policy
    assert policy.backbone_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in policy.named_parameters() if not n.startswith("backbone."))
    a = policy.predict_action(obs, noise, steps=4)
    assert a.dtype == torch.float32 and (a - ref).abs().mean() < 0.05 * ref.abs().mean()
    set_inference_dtype(policy, torch.float32)
    assert policy.backbone_dtype == torch.float32
    set_inference_dtype(policy, "fp16")
    assert policy.backbone_dtype == torch.float16
    with pytest.raises(ValueError, match="bfloat16.*float32"):
        set_inference_dtype(policy, "int8")
    with pytest.raises(ValueError):
        set_inference_dtype(policy, torch.int8)
    with pytest.raises(TypeError, match="backbone"):
        set_inference_dtype(nn.Linear(2, 2), "bf16")


def test_set_inference_dtype_reaches_through_wrappers() -> None:
    class Wrap(nn.Module):
        def __init__(self, base: nn.Module) -> None:
            super().__init__()
            self.base = base
            self.head = nn.Linear(2, 2)

    policy = unet_policy()
    outer = Wrap(Wrap(policy))
    set_inference_dtype(outer, "bfloat16")
    assert policy.backbone_dtype == torch.bfloat16 and outer.head.weight.dtype == torch.float32
    prepare_for_inference(outer)  # dtype float32 by default: casts back; kernels through the wrappers too
    assert policy.backbone_dtype == torch.float32 and kernels_in_use(outer) == "onednn"


def test_prepare_for_inference_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = unet_policy()
    assert prepare_for_inference(policy) is policy
    assert kernels_in_use(policy) == "onednn" and policy.backbone_dtype == torch.float32
    monkeypatch.setenv("ROBOLEARN_FAST_LINEAR", "0")
    prepare_for_inference(policy)
    assert kernels_in_use(policy) == "gemm"
    prepare_for_inference(policy, kernels="stock", dtype="bf16")  # explicit kernels win over the environment
    assert kernels_in_use(policy) == "stock" and policy.backbone_dtype == torch.bfloat16
    with pytest.raises(ValueError):
        prepare_for_inference(policy, kernels="onednn", dtype="half-ish")
    assert kernels_in_use(policy) == "stock"  # a refused call changes nothing
    assert prepare_for_inference(nn.Linear(2, 2)) is not None  # nothing to switch or cast: accepted


def test_inference_kernels_match_training_path_on_a_bare_backbone() -> None:
    """(Moved from tests/policies/test_models.py.) Switched on a bare U-Net, oneDNN kernels at inference give
    the training path's numbers, and the training path stays differentiable."""
    torch.manual_seed(0)
    m = ConditionalUnet1D(2, 12, down_dims=(32, 64, 128), kernel_size=5, n_groups=8, step_embed_dim=32)
    x, t, c = torch.randn(2, 16, 2), torch.tensor([3.0, 40.0]), torch.randn(2, 12)
    use_kernels(m, "onednn")
    assert kernels_in_use(m) == "onednn"
    with torch.inference_mode():
        fast = m(x, t, c)
    slow = m(x, t, c)  # grad enabled: F.linear
    assert slow.requires_grad
    assert torch.allclose(fast, slow.detach(), atol=1e-4), (fast - slow).abs().max()
