"""Observation encoders: an observation history dict -> a global condition (U-Net) or tokens (transformer).

Inputs are already normalized by the policy's :class:`~robolearn.data.Normalizer`: low-dim keys as
(B, n_obs_steps, *shape) floats, images as (B, n_obs_steps, H, W, C) floats in [-1, 1] (the store keeps
uint8 HWC frames; the normalizer's ``image`` mode maps them to [-1, 1] channels-last, and the encoder moves
channels first itself).

The image trunk follows Diffusion Policy's vision choices (Chi et al. 2023, Sec. 3.2 / Table 5): a
ResNet-style CNN with GroupNorm instead of BatchNorm (BatchNorm's running statistics interact badly with the
EMA of weights), a spatial-softmax keypoint head instead of global average pooling (Levine et al. 2016,
"End-to-end training of deep visuomotor policies"), one trunk per camera, and random-crop augmentation
(~90% crops) during training with a center crop at evaluation. It is much smaller than their ResNet-18 so
that it trains on a CPU; widths are configurable.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _groups(channels: int, wanted: int = 8) -> int:
    g = min(wanted, channels)
    while channels % g:
        g -= 1
    return g


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016) with GroupNorm: two 3x3 convs and a (projected) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.GroupNorm(_groups(c_out), c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


class SpatialSoftmax(nn.Module):
    """Per-channel softmax over the image, returning each channel's expected (x, y) in [-1, 1].

    A 1x1 conv first maps the trunk's channels to ``num_keypoints`` maps; the output is (N, 2 * K).
    Keypoints keep *where* things are, which average pooling throws away and manipulation needs.
    """

    def __init__(self, channels: int, num_keypoints: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, num_keypoints, 1)
        self.num_keypoints = num_keypoints

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.proj(x)
        N, K, H, W = maps.shape
        attn = maps.flatten(2).softmax(dim=-1).view(N, K, H, W)
        ys = torch.linspace(-1.0, 1.0, H, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1.0, 1.0, W, device=x.device, dtype=x.dtype)
        ex = (attn.sum(dim=2) * xs).sum(dim=-1)
        ey = (attn.sum(dim=3) * ys).sum(dim=-1)
        return torch.stack([ex, ey], dim=-1).flatten(1)


class ImageTrunk(nn.Module):
    """Small ResNet: strided stem, one basic block per width (stride 2 after the first), keypoints, linear."""

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = (32, 64, 128),
        num_keypoints: int = 32,
        feature_dim: int = 64,
    ) -> None:
        super().__init__()
        widths = list(widths)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stride=2, padding=1, bias=False),
            nn.GroupNorm(_groups(widths[0]), widths[0]),
            nn.ReLU(),
        )
        blocks = []
        c = widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(c, w, stride=1 if i == 0 else 2))
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.keypoints = SpatialSoftmax(c, num_keypoints)
        self.out = nn.Linear(2 * num_keypoints, feature_dim)
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, feature_dim)."""
        return self.out(self.keypoints(self.blocks(self.stem(x))))


def crop_images(x: torch.Tensor, size: tuple[int, int], random: bool, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Crop (N, C, H, W) to ``size``: an independent random window per image, or the center window.

    Random windows are gathered with one advanced-indexing call rather than a Python loop over images.
    """
    N, C, H, W = x.shape
    ch, cw = size
    if (ch, cw) == (H, W):
        return x
    if ch > H or cw > W:
        raise ValueError(f"crop {size} is larger than the image ({H}, {W})")
    if not random:
        top, left = (H - ch) // 2, (W - cw) // 2
        return x[:, :, top : top + ch, left : left + cw]
    top = torch.randint(0, H - ch + 1, (N,), generator=generator).to(x.device)
    left = torch.randint(0, W - cw + 1, (N,), generator=generator).to(x.device)
    rows = (top[:, None] + torch.arange(ch, device=x.device))[:, :, None]  # (N, ch, 1)
    cols = (left[:, None] + torch.arange(cw, device=x.device))[:, None, :]  # (N, 1, cw)
    n = torch.arange(N, device=x.device)[:, None, None]
    return x.permute(0, 2, 3, 1)[n, rows, cols].permute(0, 3, 1, 2)  # gather on (N, H, W, C)


class ObsEncoder(nn.Module):
    """Encode ``{key: (B, n_obs_steps, ...)}`` into a flat condition or a token sequence.

    Args:
        obs_shapes: per-step shape of every observation key, in the order features are concatenated.
        n_obs_steps: length of the observation history.
        image_keys: keys that are HWC images (default: every key with a 3-d shape).
        output: ``"flat"`` -> (B, n_obs_steps * per-step features) for the U-Net's FiLM condition;
            ``"tokens"`` -> (B, n_obs_steps * (1 + n_cameras), token_dim) for cross-attention: per history
            step one token for all low-dim keys and one per camera, plus a learned embedding of (step, source).
        low_dim: ``"identity"`` concatenates low-dim keys as they are (Diffusion Policy's choice for state
            inputs); ``"mlp"`` passes them through a 2-layer MLP of width ``low_dim_features``.
        shared_trunk: one image trunk for all cameras instead of one each.
        crop_ratio: crop side as a fraction of the image side (None or 1.0: no cropping). Random windows in
            training mode, the center window in eval mode.
        image_widths, num_keypoints, image_features: image trunk sizes.
    """

    def __init__(
        self,
        obs_shapes: Mapping[str, Sequence[int]],
        n_obs_steps: int,
        *,
        image_keys: Sequence[str] | None = None,
        output: str = "flat",
        token_dim: int = 256,
        low_dim: str = "identity",
        low_dim_features: int = 64,
        shared_trunk: bool = False,
        crop_ratio: float | None = 0.9,
        image_widths: Sequence[int] = (32, 64, 128),
        num_keypoints: int = 32,
        image_features: int = 64,
    ) -> None:
        super().__init__()
        if output not in ("flat", "tokens"):
            raise ValueError(f"output must be 'flat' or 'tokens', got {output!r}")
        if low_dim not in ("identity", "mlp"):
            raise ValueError(f"low_dim must be 'identity' or 'mlp', got {low_dim!r}")
        self.obs_shapes = {k: tuple(int(s) for s in v) for k, v in obs_shapes.items()}
        if image_keys is None:
            image_keys = [k for k, s in self.obs_shapes.items() if len(s) == 3]
        for k in image_keys:
            if k not in self.obs_shapes or len(self.obs_shapes[k]) != 3:
                raise ValueError(f"image key {k!r} needs an (H, W, C) shape in obs_shapes, got "
                                 f"{self.obs_shapes.get(k)}")
        self.image_keys = list(image_keys)
        self.low_dim_keys = [k for k in self.obs_shapes if k not in self.image_keys]
        if not self.obs_shapes:
            raise ValueError("obs_shapes is empty: a policy needs at least one observation key")
        self.n_obs_steps, self.output = n_obs_steps, output
        self.crop_ratio = crop_ratio

        self.low_dim_size = sum(_numel(self.obs_shapes[k]) for k in self.low_dim_keys)
        self.low_dim_mlp: nn.Module | None = None
        low_out = self.low_dim_size
        if self.low_dim_keys and low_dim == "mlp":
            self.low_dim_mlp = nn.Sequential(
                nn.Linear(self.low_dim_size, low_dim_features), nn.Mish(),
                nn.Linear(low_dim_features, low_dim_features),
            )
            low_out = low_dim_features

        self.trunks = nn.ModuleDict()
        self.crop_sizes: dict[str, tuple[int, int]] = {}
        for i, k in enumerate(self.image_keys):
            H, W, C = self.obs_shapes[k]
            r = 1.0 if crop_ratio is None else float(crop_ratio)
            self.crop_sizes[k] = (max(1, round(H * r)), max(1, round(W * r)))
            if shared_trunk and i > 0:
                continue
            name = "shared" if shared_trunk else k
            self.trunks[name] = ImageTrunk(C, image_widths, num_keypoints, image_features)
        self.shared_trunk = shared_trunk
        self.image_features = image_features if self.image_keys else 0
        per_step = low_out + self.image_features * len(self.image_keys)

        if output == "flat":
            self.out_dim = n_obs_steps * per_step
            self.n_tokens = 0
        else:
            self.low_token = nn.Linear(low_out, token_dim) if self.low_dim_keys else None
            self.image_token = nn.ModuleDict({k: nn.Linear(image_features, token_dim) for k in self.image_keys})
            per_step_tokens = int(bool(self.low_dim_keys)) + len(self.image_keys)
            self.n_tokens = n_obs_steps * per_step_tokens
            self.token_pos = nn.Parameter(torch.randn(n_obs_steps, per_step_tokens, token_dim) * 0.02)
            self.out_dim = token_dim

    def trunk(self, key: str) -> ImageTrunk:
        return self.trunks["shared" if self.shared_trunk else key]

    def _image_features(self, key: str, x: torch.Tensor) -> torch.Tensor:
        B, n = x.shape[:2]
        img = x.reshape(B * n, *x.shape[2:]).permute(0, 3, 1, 2)  # HWC -> CHW
        img = crop_images(img, self.crop_sizes[key], random=self.training)
        return self.trunk(key)(img.contiguous()).view(B, n, -1)

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        missing = [k for k in self.obs_shapes if k not in obs]
        if missing:
            raise KeyError(f"observation is missing keys {missing}; the encoder needs {list(self.obs_shapes)}")
        first = obs[next(iter(self.obs_shapes))]
        B, n = first.shape[:2]
        if n != self.n_obs_steps:
            raise ValueError(f"expected an observation history of {self.n_obs_steps} steps, got {n}")
        parts: list[torch.Tensor] = []
        low = None
        if self.low_dim_keys:
            low = torch.cat([obs[k].reshape(B, n, -1).float() for k in self.low_dim_keys], dim=-1)
            if self.low_dim_mlp is not None:
                low = self.low_dim_mlp(low)
        images = [self._image_features(k, obs[k]) for k in self.image_keys]
        if self.output == "flat":
            parts = ([low] if low is not None else []) + images
            return torch.cat(parts, dim=-1).reshape(B, -1)
        tokens = []
        if low is not None:
            tokens.append(self.low_token(low))
        tokens += [self.image_token[k](f) for k, f in zip(self.image_keys, images)]
        seq = torch.stack(tokens, dim=2) + self.token_pos  # (B, n, per_step, D)
        return seq.reshape(B, self.n_tokens, -1)


def _numel(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out

