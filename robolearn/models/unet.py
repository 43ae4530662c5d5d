"""1-D temporal U-Net with FiLM conditioning: the CNN denoiser of Diffusion Policy (Chi et al., RSS 2023).

The action chunk is a (B, T, A) sequence; the U-Net convolves over time with the action dimensions as
channels. Every residual block (Conv1d -> GroupNorm -> Mish, twice) is modulated by a per-channel scale and
bias (FiLM, Perez et al. 2018) predicted from ``[step embedding ; observation features]``, as in the paper.

The ``"dp"`` preset has the paper's sizes (down_dims 256/512/1024, kernel 5, 128-d step embedding, 8 groups):
about 64M parameters for Push-T-like observations. ``"small"`` and ``"tiny"`` are for CPU work and tests.

Where this differs from a literal port, it is for inference speed at batch 1 (a chunk costs several
denoiser calls, and the observation does not change between them):

- All blocks' FiLM projections live in two linear layers, one for the step embedding and one for the
  observation features (together exactly a linear map of their concatenation, which is what per-block
  ``Linear(cond_dim, 2 * channels)`` layers compute). :meth:`ConditionalUnet1D.prepare` evaluates the
  observation half once per chunk; each denoising step then costs one small matrix-vector product for all
  blocks' FiLM parameters instead of one per block.
- A horizon that is not a multiple of 2^(levels-1) is padded (edge-replicated) inside and cropped back,
  instead of failing on mismatched skip connections.
- Convolutions are computed as one matrix product each (:class:`GemmConv1d`, :class:`GemmUpsample1d`): same
  parameters and state_dict as ``nn.Conv1d``/``nn.ConvTranspose1d``, about 2x faster at these shapes.

These are plain modules (what training runs); :func:`robolearn.accel.use_kernels` can swap their kernels at
inference (oneDNN's inner product, or PyTorch's stock convolutions for comparisons) without touching weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robolearn.models.embeddings import TimestepMLP
from robolearn.models.presets import UNET_PRESETS as PRESETS

class GemmConv1d(nn.Conv1d):
    """``nn.Conv1d`` (same parameters, same state_dict) computed as unfold + one matrix product.

    For the short sequences of an action chunk (T = 16 down to 4) PyTorch's CPU convolution falls back to
    its im2col path, which measured about 2x slower here than unfolding ourselves and calling ``F.linear``
    on the (out, in * k) view of the weight (1024 -> 1024 channels, k=5, T=4: 6.9 ms vs 3.3 ms, one thread).
    Only zero padding, no dilation, no groups: what the U-Net uses.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, _ = x.shape
        k, s, p = self.kernel_size[0], self.stride[0], self.padding[0]
        if p:
            x = F.pad(x, (p, p))
        cols = x.unfold(2, k, s)  # (B, C, T_out, k): element [b, c, t, j] = x[b, c, t*s + j]
        T_out = cols.shape[2]
        cols = cols.permute(0, 2, 1, 3).reshape(B * T_out, C * k)
        y = F.linear(cols, self.weight.view(self.out_channels, C * k), self.bias)
        return y.view(B, T_out, self.out_channels).transpose(1, 2)


class GemmUpsample1d(nn.ConvTranspose1d):
    """``nn.ConvTranspose1d(c, c, 4, stride=2, padding=1)`` as one matrix product plus an overlap-add.

    Output position ``2 t + j - 1`` receives input step ``t`` through kernel tap ``j``; writing ``j = 2 a + r``
    the tap lands on pair ``s = t + a``, parity ``r``, so the result is two shifted sums of the product.
    Same parameters and state_dict as the torch module (whose CPU kernel took ~3 ms for 512 channels here).
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T = x.shape
        O = self.out_channels
        taps = torch.matmul(x.transpose(1, 2), self.weight.view(C, O * 4)).view(B, T, O, 2, 2)  # [a][r]
        zero = taps.new_zeros(B, 1, O, 2)
        pairs = torch.cat([taps[:, :, :, 0], zero], dim=1) + torch.cat([zero, taps[:, :, :, 1]], dim=1)
        y = pairs.permute(0, 2, 1, 3).reshape(B, O, 2 * T + 2)[:, :, 1 : 2 * T + 1]
        return y + self.bias[:, None]


class ConvNormMish(nn.Sequential):
    """Conv1d (same padding) -> GroupNorm -> Mish."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, n_groups: int) -> None:
        super().__init__(
            GemmConv1d(c_in, c_out, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, c_out),
            nn.Mish(),
        )


class FiLMResBlock(nn.Module):
    """Two conv blocks with FiLM between them, plus a (1x1-projected when widths differ) residual.

    ``scale``/``bias`` come from the U-Net's shared FiLM projection, shaped (B, C, 1).
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int, n_groups: int) -> None:
        super().__init__()
        self.conv1 = ConvNormMish(c_in, c_out, kernel_size, n_groups)
        self.conv2 = ConvNormMish(c_out, c_out, kernel_size, n_groups)
        self.residual = GemmConv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.channels = c_out

    def forward(self, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        h = torch.addcmul(bias, scale, h)
        return self.conv2(h) + self.residual(x)


@dataclass
class UNetCond:
    """Per-chunk precomputed conditioning: the observation half of every block's FiLM parameters."""

    obs_film: torch.Tensor  # (B, total FiLM width), includes the bias


class ConditionalUnet1D(nn.Module):
    """``forward(x: (B, T, A), t: (B,) float, cond: (B, C) | UNetCond) -> (B, T, A)``.

    Args:
        action_dim: channels of the denoised sequence.
        cond_dim: width of the global observation condition (0 for none).
        down_dims: channel widths per level; the sequence is halved between levels.
        kernel_size, n_groups: convolution kernel and GroupNorm groups.
        step_embed_dim: width of the learned timestep embedding.
    """

    def __init__(
        self,
        action_dim: int,
        cond_dim: int,
        down_dims: Sequence[int] = (256, 512, 1024),
        kernel_size: int = 5,
        n_groups: int = 8,
        step_embed_dim: int = 128,
    ) -> None:
        super().__init__()
        down_dims = [int(d) for d in down_dims]
        if not down_dims:
            raise ValueError("down_dims must not be empty")
        self.action_dim, self.cond_dim = action_dim, cond_dim
        self.config = dict(
            down_dims=list(down_dims), kernel_size=kernel_size, n_groups=n_groups, step_embed_dim=step_embed_dim
        )
        self.step_encoder = TimestepMLP(step_embed_dim)

        dims = [action_dim, *down_dims]
        levels = list(zip(dims[:-1], dims[1:]))
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(levels):
            self.down.append(
                nn.ModuleList([FiLMResBlock(c_in, c_out, kernel_size, n_groups),
                               FiLMResBlock(c_out, c_out, kernel_size, n_groups)])
            )
            last = i == len(levels) - 1
            self.downsample.append(nn.Identity() if last else GemmConv1d(c_out, c_out, 3, stride=2, padding=1))
        top = down_dims[-1]
        self.mid = nn.ModuleList(
            [FiLMResBlock(top, top, kernel_size, n_groups), FiLMResBlock(top, top, kernel_size, n_groups)]
        )
        # Up path: each level concatenates the skip of the matching down level (the finest level's skip is
        # not used, as in Diffusion Policy), so the sequence is downsampled len(levels)-1 times.
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for c_in, c_out in reversed(levels[1:]):
            self.up.append(
                nn.ModuleList([FiLMResBlock(2 * c_out, c_in, kernel_size, n_groups),
                               FiLMResBlock(c_in, c_in, kernel_size, n_groups)])
            )
            self.upsample.append(GemmUpsample1d(c_in))
        self.final = nn.Sequential(
            ConvNormMish(down_dims[0], down_dims[0], kernel_size, n_groups), GemmConv1d(down_dims[0], action_dim, 1)
        )
        self._factor = 2 ** (len(levels) - 1)

        blocks = [b for lvl in self.down for b in lvl] + list(self.mid) + [b for lvl in self.up for b in lvl]
        self._film_sizes = [s for b in blocks for s in (b.channels, b.channels)]
        total = sum(self._film_sizes)
        self.film_time = nn.Linear(step_embed_dim, total, bias=False)
        self.film_obs = nn.Linear(cond_dim, total) if cond_dim > 0 else None
        self.film_bias = None if cond_dim > 0 else nn.Parameter(torch.zeros(total))
        self.act = nn.Mish()

    @classmethod
    def from_preset(cls, preset: str, action_dim: int, cond_dim: int, **overrides: Any) -> "ConditionalUnet1D":
        if preset not in PRESETS:
            raise ValueError(f"unknown unet preset {preset!r}; choose one of {sorted(PRESETS)}")
        return cls(action_dim, cond_dim, **{**PRESETS[preset], **overrides})

    def prepare(self, cond: torch.Tensor | UNetCond | None) -> UNetCond:
        """Evaluate everything that depends only on the observation, once per chunk."""
        if isinstance(cond, UNetCond):
            return cond
        if self.film_obs is None:
            return UNetCond(self.film_bias[None])
        if cond is None or cond.ndim != 2 or cond.shape[1] != self.cond_dim:
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(f"unet expects a global condition of shape (B, {self.cond_dim}), got {got}")
        return UNetCond(self.film_obs(self.act(cond)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | UNetCond | None,
                step: Any = None) -> torch.Tensor:
        """``step``: where this call sits in a sampling run (the policies' denoising loop passes it; ignored)."""
        prepared = self.prepare(cond)
        # obs half (precomputed, bias included) + step half, for all blocks in one product
        film = prepared.obs_film + self.film_time(self.act(self.step_encoder(t)))
        params = iter(f.unsqueeze(-1) for f in torch.split(film, self._film_sizes, dim=1))

        T = x.shape[1]
        pad = (-T) % self._factor
        h = x.transpose(1, 2)
        if pad:
            h = F.pad(h, (0, pad), mode="replicate")
        skips = []
        for blocks, down in zip(self.down, self.downsample):
            for block in blocks:
                h = block(h, next(params), next(params))
            skips.append(h)
            h = down(h)
        for block in self.mid:
            h = block(h, next(params), next(params))
        for blocks, up in zip(self.up, self.upsample):
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, next(params), next(params))
            h = up(h)
        h = self.final(h)
        if pad:
            h = h[..., :T]
        return h.transpose(1, 2)
