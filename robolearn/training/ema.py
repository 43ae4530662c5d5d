"""Exponential moving average of a policy's weights, the weights a trained policy acts with.

The decay warms up as ``1 - (1 + step / inv_gamma) ** -power`` (clipped to ``[min_decay, max_decay]``), so
early weights, still far from good, are forgotten quickly. Diffusion Policy (Chi et al.) uses power 0.75 and
a maximum of 0.9999; those are the defaults here.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(
        self, model: nn.Module, power: float = 0.75, inv_gamma: float = 1.0, min_decay: float = 0.0,
        max_decay: float = 0.9999,
    ) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.power, self.inv_gamma, self.min_decay, self.max_decay = power, inv_gamma, min_decay, max_decay
        self.step = 0

    def decay(self) -> float:
        value = 1.0 - (1.0 + self.step / self.inv_gamma) ** -self.power
        return float(min(max(value, self.min_decay), self.max_decay))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.decay()
        ema_params = dict(self.model.named_parameters())
        for name, p in model.named_parameters():
            e = ema_params[name]
            if p.requires_grad:
                e.mul_(d).add_(p.detach(), alpha=1.0 - d)
            else:
                e.copy_(p.detach())
        ema_buffers = dict(self.model.named_buffers())
        for name, b in model.named_buffers():
            ema_buffers[name].copy_(b)  # normalizer statistics and the like are not averaged
        self.step += 1
