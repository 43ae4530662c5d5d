"""Transformer denoiser built from explicit, separately callable residual branches.

Each :class:`DenoiserBlock` is three residual branches applied in order — self-attention over the action
tokens, cross-attention from action tokens to observation tokens, and a feed-forward MLP::

    x = x + block.self_attn_branch(x, mod)
    x = x + block.cross_attn_branch(x, mod, memory, kv)
    x = x + block.ff_branch(x, mod)

and ``block.forward`` is exactly that. Block-wise adaptive caching (BAC, Ji et al. 2025) wraps these
branches: it can call any branch alone, cache its output and reuse it at the next denoising step. To make
that easy the blocks are ``model.blocks`` (an ``nn.ModuleList``), the branch names are
:data:`BRANCH_NAMES` (``block.branch(name, x, ctx)`` dispatches by name), and :meth:`TransformerDenoiser.begin`
returns everything a step needs (``StepContext``) so a wrapper can drive the blocks itself.

Timestep conditioning: adaLN-Zero as in DiT (Peebles & Xie 2023) — every branch's input LayerNorm gets a
shift and scale and its output a gate, all from the timestep — in the "adaLN-single" form of PixArt-alpha
(Chen et al. 2023): one shared projection computes the 9 modulation vectors from the timestep embedding and
each block adds its own learned table. That keeps the 8 x 256 preset at ~9M parameters (per-block adaLN
projections would add 0.6M per block) and makes the time-dependent part of every block one tensor computed
once per step. Observations enter only through cross-attention; their keys/values are projected once per
chunk (:meth:`TransformerDenoiser.prepare`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robolearn.models.embeddings import SinusoidalEmbedding
from robolearn.models.presets import TRANSFORMER_PRESETS as PRESETS

BRANCH_NAMES: tuple[str, ...] = ("self_attn", "cross_attn", "ff")

def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift[:, None], x, 1.0 + scale[:, None])


class DenoiserBlock(nn.Module):
    """One transformer layer as three residual branches; ``mod`` is this block's (B, 9, D) modulation."""

    branch_names = BRANCH_NAMES

    def __init__(self, d_model: int, n_heads: int, ff_mult: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_heads, self.dropout = d_model, n_heads, dropout
        self.norm_sa = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.sa_out = nn.Linear(d_model, d_model)
        self.norm_ca = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.ca_q = nn.Linear(d_model, d_model)
        self.ca_kv = nn.Linear(d_model, 2 * d_model)
        self.ca_out = nn.Linear(d_model, d_model)
        self.norm_ff = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.ff = nn.Sequential(
            nn.Linear(d_model, ff_mult * d_model), nn.GELU(approximate="tanh"), nn.Linear(ff_mult * d_model, d_model)
        )
        # adaLN-single table: added to the shared time modulation (shift, scale, gate) x 3 branches.
        self.mod_table = nn.Parameter(torch.randn(9, d_model) / d_model**0.5)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        return x.view(B, N, self.n_heads, -1).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        B, _, N, _ = x.shape
        return x.transpose(1, 2).reshape(B, N, self.d_model)

    def modulation(self, time_mod: torch.Tensor) -> torch.Tensor:
        """(B, 9, D) shared time modulation -> this block's."""
        return time_mod + self.mod_table

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the observation tokens, (B, heads, N, d_head) each: constant over a chunk."""
        k, v = self.ca_kv(memory).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def self_attn_branch(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        h = _modulate(self.norm_sa(x), mod[:, 0], mod[:, 1])
        q, k, v = (self._heads(t) for t in self.qkv(h).chunk(3, dim=-1))
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return mod[:, 2, None] * self.sa_out(self._merge(a))

    def cross_attn_branch(
        self,
        x: torch.Tensor,
        mod: torch.Tensor,
        memory: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attend from action tokens to observation tokens ``memory`` (B, N, D), or to precomputed ``kv``."""
        if kv is None:
            if memory is None:
                raise ValueError("cross_attn_branch needs memory tokens or their precomputed kv")
            kv = self.memory_kv(memory)
        h = _modulate(self.norm_ca(x), mod[:, 3], mod[:, 4])
        q = self._heads(self.ca_q(h))
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, kv[0], kv[1], dropout_p=p)
        return mod[:, 5, None] * self.ca_out(self._merge(a))

    def ff_branch(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        h = _modulate(self.norm_ff(x), mod[:, 6], mod[:, 7])
        return mod[:, 8, None] * self.ff(h)

    def branch(self, name: str, x: torch.Tensor, ctx: "BlockContext") -> torch.Tensor:
        """Uniform entry point: the output of branch ``name`` (to be added to the residual stream)."""
        if name == "self_attn":
            return self.self_attn_branch(x, ctx.mod)
        if name == "cross_attn":
            return self.cross_attn_branch(x, ctx.mod, ctx.memory, ctx.kv)
        if name == "ff":
            return self.ff_branch(x, ctx.mod)
        raise KeyError(f"unknown branch {name!r}; branches are {BRANCH_NAMES}")

    def forward(
        self,
        x: torch.Tensor,
        mod: torch.Tensor,
        memory: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn_branch(x, mod)
        x = x + self.cross_attn_branch(x, mod, memory, kv)
        return x + self.ff_branch(x, mod)


@dataclass
class TransformerCond:
    """Per-chunk precomputed conditioning: projected observation tokens and every block's keys/values."""

    memory: torch.Tensor  # (B, N, D)
    kv: list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class BlockContext:
    """What block ``i`` needs at one denoising step, besides the residual stream."""

    mod: torch.Tensor
    memory: torch.Tensor
    kv: tuple[torch.Tensor, torch.Tensor] | None


@dataclass
class TimeCond:
    """The timestep's part of a step: each block's (B, 9, D) modulation and the head's (B, 2, D)."""

    block_mods: list[torch.Tensor]
    final_mod: torch.Tensor


@dataclass
class StepContext:
    """Everything one denoising step needs: ``blocks[i]`` gets ``block_ctx[i]``; ``final_mod`` feeds the head."""

    x: torch.Tensor  # embedded action tokens (B, T, D), the residual stream entering block 0
    block_ctx: list[BlockContext]
    final_mod: torch.Tensor  # (B, 2, D)
    T: int


class TransformerDenoiser(nn.Module):
    """``forward(x: (B, T, A), t: (B,) float, cond: (B, N, C) tokens | (B, C) | TransformerCond) -> (B, T, A)``.

    A (B, C) global condition is treated as a single observation token.
    """

    def __init__(
        self,
        action_dim: int,
        cond_dim: int,
        horizon: int,
        d_model: int = 256,
        n_layers: int = 8,
        n_heads: int = 4,
        ff_mult: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.action_dim, self.cond_dim, self.horizon, self.d_model = action_dim, cond_dim, horizon, d_model
        self.config = dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads, ff_mult=ff_mult, dropout=dropout)
        self.in_proj = nn.Linear(action_dim, d_model)
        self.pos = nn.Parameter(torch.randn(horizon, d_model) * 0.02)
        self.mem_proj = nn.Linear(cond_dim, d_model)
        self.time_sinusoid = SinusoidalEmbedding(d_model)
        self.time_mlp = nn.Sequential(nn.Linear(d_model, d_model), nn.SiLU(), nn.Linear(d_model, d_model))
        self.time_mod = nn.Linear(d_model, 9 * d_model)  # shared adaLN-single projection
        self.blocks = nn.ModuleList([DenoiserBlock(d_model, n_heads, ff_mult, dropout) for _ in range(n_layers)])
        self.final_norm = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.final_mod = nn.Linear(d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, action_dim)
        # adaLN-Zero: the time modulation and the head start at zero, so at initialization every branch's
        # gate is its table's (small, random) value and the output is zero.
        for layer in (self.time_mod, self.final_mod, self.out_proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    branch_names = BRANCH_NAMES

    @classmethod
    def from_preset(cls, preset: str, action_dim: int, cond_dim: int, horizon: int, **overrides: Any
                    ) -> "TransformerDenoiser":
        if preset not in PRESETS:
            raise ValueError(f"unknown transformer preset {preset!r}; choose one of {sorted(PRESETS)}")
        return cls(action_dim, cond_dim, horizon, **{**PRESETS[preset], **overrides})

    def prepare(self, cond: torch.Tensor | TransformerCond) -> TransformerCond:
        """Project observation tokens and every block's cross-attention keys/values, once per chunk."""
        if isinstance(cond, TransformerCond):
            return cond
        if cond.ndim == 2:
            cond = cond[:, None]
        if cond.ndim != 3 or cond.shape[-1] != self.cond_dim:
            raise ValueError(f"transformer expects condition tokens (B, N, {self.cond_dim}), got {tuple(cond.shape)}")
        memory = self.mem_proj(cond)
        return TransformerCond(memory, [blk.memory_kv(memory) for blk in self.blocks])

    def time_conditioning(self, t: torch.Tensor) -> TimeCond:
        """Everything that depends on the timestep alone: every block's modulation and the head's. A function
        of ``t`` only, so an inference wrapper may keep it per timestep across chunks."""
        temb = F.silu(self.time_mlp(self.time_sinusoid(t).to(self.in_proj.weight.dtype)))
        time_mod = self.time_mod(temb).view(-1, 9, self.d_model)
        return TimeCond([blk.modulation(time_mod) for blk in self.blocks], self.final_mod(temb).view(-1, 2, self.d_model))

    def begin(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | TransformerCond,
              time_cond: TimeCond | None = None) -> StepContext:
        """Embed the noisy chunk and the timestep: the inputs of block 0 and every block's context.
        ``time_cond``: :meth:`time_conditioning` of ``t``, when the caller already has it."""
        T = x.shape[1]
        if T > self.horizon:
            raise ValueError(f"sequence of {T} steps is longer than the horizon {self.horizon} the model was built for")
        prepared = self.prepare(cond)
        tc = self.time_conditioning(t) if time_cond is None else time_cond
        ctxs = [BlockContext(tc.block_mods[i], prepared.memory, prepared.kv[i]) for i in range(len(self.blocks))]
        h = self.in_proj(x) + self.pos[:T]
        return StepContext(h, ctxs, tc.final_mod, T)

    def head(self, h: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Final adaLN LayerNorm and projection back to action space."""
        return self.out_proj(_modulate(self.final_norm(h), ctx.final_mod[:, 0], ctx.final_mod[:, 1]))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | TransformerCond,
                step: Any = None) -> torch.Tensor:
        """``step``: where this call sits in a sampling run (the policies' denoising loop passes it; plain
        forward ignores it, a block-caching wrapper decides from it which branches to recompute)."""
        ctx = self.begin(x, t, cond)
        h = ctx.x
        for blk, bc in zip(self.blocks, ctx.block_ctx):
            h = blk(h, bc.mod, bc.memory, bc.kv)
        return self.head(h, ctx)
