"""Inference kernels for a trained policy: which matrix-product kernel the U-Net's layers run on, which code path
the transformer denoiser takes, and the backbone's dtype.

At batch 1 every convolution of the 1-D U-Net is a product of a large weight matrix with only 4-16 rows of
unfolded input, so a denoiser call is bound by streaming the weights (64M float32 parameters = 256 MB for
the ``"dp"`` preset). Three kernel sets compute the same function (they agree to float rounding):

``"stock"``
    PyTorch's own ``nn.Conv1d`` / ``nn.ConvTranspose1d`` / ``nn.Linear`` forwards: the path Diffusion
    Policy's model code takes; the latency benchmark's same-run baseline.
``"gemm"``
    The models' plain forwards (:class:`~robolearn.models.unet.GemmConv1d`,
    :class:`~robolearn.models.unet.GemmUpsample1d`): each convolution unfolded into one ``F.linear``. For the
    short sequences of an action chunk PyTorch's CPU convolution takes its im2col path, about 2x slower at
    these shapes (1024 -> 1024 channels, k=5, T=4: 6.9 ms vs 3.3 ms, one thread). What training runs.
``"onednn"``
    The GEMM form with oneDNN's fp32 inner product (``torch.ops.mkldnn._linear_pointwise``, the op inductor
    emits for frozen CPU linears) in place of ``F.linear``'s MKL sgemm for the unfolded convolutions and the
    U-Net's step-FiLM projection (``film_time``). It streams a large weight about twice as fast when only a
    few rows multiply it: one cache-cold (1024 x 5120) weight times 4 rows took 1.04 ms vs 2.03 ms, 2 threads
    on the development machine. Only without autograd, on CPU, float32, 2-D input, and where PyTorch has the
    op; anything else (training, a GPU, a bfloat16 backbone) falls back to ``F.linear``, so a policy switched
    to ``"onednn"`` still trains and still runs anywhere. The default of :func:`prepare_for_inference`.

The transformer denoiser has the same three sets: ``"gemm"`` and ``"stock"`` run the models' own code (its
``nn.Linear`` layers on MKL's sgemm: Diffusion Policy's path), ``"onednn"`` the fused inference path of
:mod:`robolearn.accel.fast_transformer` (prepacked oneDNN inner products, each timestep's conditioning kept,
modulated LayerNorms in one call, the cross-attention's projections absorbed into the chunk's keys and values):
0.57-0.59x the time of Diffusion Policy's ``TransformerForDiffusion`` for a batch-1 DDIM-10 chunk, against
0.86-0.89x for the models' own code, in the same two runs (``tools/bench/transformer_vs_dp.py``, 2 threads, this
2-core development machine, 2026-12-02).

The switch changes only which code each layer runs -- :func:`use_kernels` reassigns the instance's class to a
subclass that overrides methods only (``forward``; for the transformer also its step methods) -- so parameters,
buffers, state_dict keys, module names and ``isinstance`` checks are unchanged, weights are never touched, and
switching back restores the models' own classes. Switch before serving, not while another thread is calling the policy.

Environment: ``ROBOLEARN_FAST_LINEAR=0`` makes :func:`prepare_for_inference` default to ``"gemm"`` instead of
``"onednn"`` (for comparisons, or a machine where oneDNN misbehaves); an explicit ``kernels=`` wins.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robolearn.accel.fast_transformer import FastDenoiserBlock, FastTransformerDenoiser
from robolearn.models.transformer import DenoiserBlock, TransformerDenoiser
from robolearn.models.unet import ConditionalUnet1D, GemmConv1d, GemmUpsample1d

KERNELS = ("onednn", "gemm", "stock")

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN's inner product (else ``"onednn"`` runs ``F.linear``)."""
    return _ONEDNN


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, computed by oneDNN's inner product when there is no autograd, on CPU float32 2-D ``x``."""
    if (
        _ONEDNN
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() == 2
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


# ---------------------------------------------------------------------------------------------- the variants
# Each variant subclasses the models' class and overrides ``forward`` only (or nothing: a tag). ``_accel_kernels``
# names the kernel set; ``_accel_base`` is the models' class that switching to "gemm" restores.


class _OneDNNConv1d(GemmConv1d):
    """:class:`GemmConv1d` whose matrix product runs on :func:`onednn_linear`."""

    _accel_kernels = "onednn"
    _accel_base = GemmConv1d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The same unfold as GemmConv1d.forward (tests check the two agree), with onednn_linear for F.linear.
        B, C, _ = x.shape
        k, s, p = self.kernel_size[0], self.stride[0], self.padding[0]
        if p:
            x = F.pad(x, (p, p))
        cols = x.unfold(2, k, s)
        T_out = cols.shape[2]
        cols = cols.permute(0, 2, 1, 3).reshape(B * T_out, C * k)
        y = onednn_linear(cols, self.weight.view(self.out_channels, C * k), self.bias)
        return y.view(B, T_out, self.out_channels).transpose(1, 2)


class _StockConv1d(GemmConv1d):
    """:class:`GemmConv1d` on PyTorch's ``nn.Conv1d`` kernel."""

    _accel_kernels = "stock"
    _accel_base = GemmConv1d
    forward = nn.Conv1d.forward


def _tag(name: str, base: type[nn.Module], kernels: str) -> type[nn.Module]:
    """A subclass of ``base`` that changes no code and only says which kernel set the layer is switched to (so
    ``kernels_in_use`` can tell): where a set has nothing of its own for that layer. Module-level, by name, so
    a switched model still pickles."""
    return type(name, (base,), {"_accel_kernels": kernels, "_accel_base": base, "__module__": __name__,
                                "__doc__": f"{base.__name__} unchanged, switched to {kernels!r}: a tag."})


# The upsampling's product is a batched matmul, not a 2-D inner product: oneDNN has nothing to offer it.
_OneDNNUpsample1d = _tag("_OneDNNUpsample1d", GemmUpsample1d, "onednn")


class _StockUpsample1d(GemmUpsample1d):
    """:class:`GemmUpsample1d` on PyTorch's ``nn.ConvTranspose1d`` kernel."""

    _accel_kernels = "stock"
    _accel_base = GemmUpsample1d
    forward = nn.ConvTranspose1d.forward


class _OneDNNLinear(nn.Linear):
    """The U-Net's ``film_time`` projection on :func:`onednn_linear`."""

    _accel_kernels = "onednn"
    _accel_base = nn.Linear

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return onednn_linear(input, self.weight, self.bias)


# "stock" is the models' own code for these, as "gemm" is: nn.Linear's forward (Diffusion Policy's path).
_StockLinear = _tag("_StockLinear", nn.Linear, "stock")
_StockTransformerDenoiser = _tag("_StockTransformerDenoiser", TransformerDenoiser, "stock")
_StockDenoiserBlock = _tag("_StockDenoiserBlock", DenoiserBlock, "stock")


_VARIANTS: dict[type[nn.Module], dict[str, type[nn.Module]]] = {
    GemmConv1d: {"onednn": _OneDNNConv1d, "gemm": GemmConv1d, "stock": _StockConv1d},
    GemmUpsample1d: {"onednn": _OneDNNUpsample1d, "gemm": GemmUpsample1d, "stock": _StockUpsample1d},
    nn.Linear: {"onednn": _OneDNNLinear, "gemm": nn.Linear, "stock": _StockLinear},
    # The transformer: "onednn" is the fused inference path of robolearn/accel/fast_transformer.py.
    TransformerDenoiser: {"onednn": FastTransformerDenoiser, "gemm": TransformerDenoiser,
                          "stock": _StockTransformerDenoiser},
    DenoiserBlock: {"onednn": FastDenoiserBlock, "gemm": DenoiserBlock, "stock": _StockDenoiserBlock},
}


def _base_class(m: nn.Module) -> type[nn.Module]:
    return getattr(type(m), "_accel_base", type(m))


_LAYERS = {cls for base in (GemmConv1d, GemmUpsample1d, TransformerDenoiser, DenoiserBlock)
           for cls in _VARIANTS[base].values()}
_FILM = set(_VARIANTS[nn.Linear].values())


def _switchable(module: nn.Module) -> list[nn.Module]:
    """Every GemmConv1d / GemmUpsample1d under ``module``, each ConditionalUnet1D's ``film_time``, and every
    TransformerDenoiser and its DenoiserBlocks.

    Subclasses of those layers other than our own variants are left alone: their forward is someone's choice.
    """
    found: dict[int, nn.Module] = {}
    for m in module.modules():
        if type(m) in _LAYERS:
            found[id(m)] = m
        elif isinstance(m, ConditionalUnet1D) and type(m.film_time) in _FILM:
            found[id(m.film_time)] = m.film_time
    return list(found.values())


def use_kernels(module: nn.Module, kernels: str = "onednn") -> nn.Module:
    """Switch the U-Net layers and transformer denoisers under ``module`` to the kernel set ``kernels`` and
    return ``module``.

    ``kernels``: ``"onednn"`` (inference default), ``"gemm"`` (the models' plain forwards: what training runs)
    or ``"stock"`` (PyTorch's ``Conv1d``/``ConvTranspose1d``/``Linear``: Diffusion Policy's path, the
    benchmark's baseline); see the module docstring for why and the measured numbers. ``module``: a policy, a
    wrapper around one, a backbone, or any module containing them; modules with neither are returned
    unchanged. Reversible, and the state_dict is unchanged: only each layer's class (hence its ``forward``)
    is switched, to a subclass of the models' own class.
    """
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; choose one of {list(KERNELS)}")
    for m in _switchable(module):
        m.__class__ = _VARIANTS[_base_class(m)][kernels]
    return module


def kernels_in_use(module: nn.Module) -> str | None:
    """The kernel set of the U-Net layers and transformer denoisers under ``module``: ``"onednn"``, ``"gemm"`` or
    ``"stock"``; ``None`` when it has neither; ``"mixed"`` when parts of it were switched separately."""
    names = {getattr(type(m), "_accel_kernels", "gemm") for m in _switchable(module)}
    if not names:
        return None
    return names.pop() if len(names) == 1 else "mixed"


# ---------------------------------------------------------------------------------------------- dtype
_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
    "float32": torch.float32, "fp32": torch.float32,
}


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"unknown inference dtype {dtype!r}; choose one of {list(_DTYPES)} "
                     "(or torch.bfloat16 / torch.float16 / torch.float32)")


def _backbone_owner(policy: Any) -> Any | None:
    """``policy`` if it has a ``backbone``; else, through wrappers' ``.base``, the innermost that has one."""
    obj, seen = policy, set()
    while not hasattr(obj, "backbone") and hasattr(obj, "base") and id(obj) not in seen:
        seen.add(id(obj))
        obj = obj.base
    return obj if hasattr(obj, "backbone") else None


def set_inference_dtype(policy: Any, dtype: torch.dtype | str) -> Any:
    """Cast the policy's denoiser backbone (only) to ``dtype`` for faster sampling; returns ``policy``.

    ``dtype``: "bfloat16"/"bf16", "float16"/"fp16", "float32"/"fp32" or the torch dtype; anything else is a
    ValueError. For a wrapper policy (a ``.base`` and no ``.backbone``) the innermost wrapped policy's
    backbone is cast.

    Batch-1 denoising on a CPU is bound by reading the weights (64M float32 parameters = 256 MB per call), so
    bfloat16 weights roughly halve a call where the CPU has native bf16 matrix products (AVX512-BF16, AMX).
    The observation encoder, normalizer and sampler arithmetic stay float32; the sampler casts the noisy chunk
    to the backbone's dtype and its output back. Lossy and meant for deployment: save checkpoints before
    casting, and training refuses a non-float32 backbone. ``"float32"`` casts back (the rounding stays).
    """
    dt = _resolve_dtype(dtype)
    owner = _backbone_owner(policy)
    if owner is None:
        raise TypeError(f"{type(policy).__name__} has no denoiser backbone (nor wraps a policy that has one)")
    owner.backbone.to(dt)
    return policy


def default_kernels() -> str:
    """``"onednn"``, or ``"gemm"`` when the environment sets ``ROBOLEARN_FAST_LINEAR=0``."""
    return "gemm" if os.environ.get("ROBOLEARN_FAST_LINEAR", "1") == "0" else "onednn"


def prepare_for_inference(policy: Any, *, kernels: str | None = None, dtype: torch.dtype | str = "float32") -> Any:
    """Set a loaded policy up for sampling: U-Net kernels (:func:`use_kernels`) and backbone dtype
    (:func:`set_inference_dtype`); returns ``policy``. What the CLI applies to every loaded checkpoint.

    ``kernels=None`` means ``"onednn"`` unless the environment sets ``ROBOLEARN_FAST_LINEAR=0`` (then
    ``"gemm"``). ``dtype="float32"`` leaves a float32 backbone as it is. Leaves train/eval mode alone and never
    edits weights (except the lossy cast a non-float32 ``dtype`` asks for). A policy with no backbone anywhere
    is accepted with ``dtype`` float32 (there is nothing to cast).
    """
    dt = _resolve_dtype(dtype)  # refuse a bad name before changing anything
    use_kernels(policy, default_kernels() if kernels is None else kernels)
    if dt != torch.float32 or _backbone_owner(policy) is not None:
        set_inference_dtype(policy, dt)
    return policy
