"""The transformer denoiser's inference path: fewer, fused operations per step at batch 1, same function.

A batch-1 DDIM-10 chunk of the 9.4M ``default`` transformer on the models' own code makes ~550 matrix products
and ~2,500 small calls (LayerNorms, modulations, head reshapes, attention, residual adds), each on a (16, 256)
residual stream: of ~200 ms on the 2-core development machine, ~130 ms were products, the rest small calls.
:class:`FastTransformerDenoiser` and :class:`FastDenoiserBlock` compute the same function (to float rounding)
with fewer, cheaper calls:

* **Each timestep's conditioning is kept** (a function of the timestep alone, as :mod:`robolearn.accel.cache`
  also uses): the time MLP, the shared adaLN projection and every block's table add are computed once per
  timestep value, not once per step of every chunk, and kept as the 9 per-branch vectors a step needs.
* **Modulated LayerNorm in one call**: ``shift + LN(x) * (1 + scale)`` is ``F.layer_norm`` with weight
  ``1 + scale`` and bias ``shift``. Valid when every row of the batch has the same timestep -- which is how a
  sampler calls the backbone (``t.expand(B)``); a batch of mixed timesteps (training) takes the models' path.
* **oneDNN inner products on prepacked weights** (``torch.ops.mkldnn._reorder_linear_weight``, the layout
  inductor uses for frozen CPU linears), with the feed-forward GELU fused into its first product. Packed
  copies live beside the module (a weak-keyed table, never in its ``state_dict``) and are repacked when a weight
  changes (its tensor version), so loading new weights into a switched model is safe.
* **The cross-attention's query and output projections are absorbed** into the chunk's keys and values
  (:func:`absorb_cross_attention`, once per chunk): with a few observation tokens the branch becomes two thin
  products instead of two D x D projections and an attention call.
* The residual stream stays 2-D (rows = batch x tokens) from the input projection to the head.

Measured (``tools/bench/transformer_vs_dp.py``, 2 threads, 2-core development machine, 2026-12-02): a DDIM-10
chunk in 125.6 / 127.2 ms against 217.6 / 204.6 ms for the models' own code, 0.59 / 0.57x the time of Diffusion
Policy's ``TransformerForDiffusion`` in the same two runs.

Only without autograd, in eval mode, on CPU and in float32; anything else -- training, a GPU, a bfloat16
backbone, mixed timesteps -- runs the models' own code unchanged, so a switched model still trains and runs
anywhere. The residual updates are ``x + gate * branch`` as in the models (not a fused multiply-add), so the
fast denoiser and a block cache driving the same blocks branch by branch stay equal bit for bit.

Switched on by :func:`robolearn.accel.use_kernels` (``"onednn"``, the inference default); ``"gemm"`` and
``"stock"`` restore the models' classes. Only the classes change: parameters, buffers, names and ``state_dict``
are untouched.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robolearn.models.transformer import (
    BlockContext,
    DenoiserBlock,
    StepContext,
    TimeCond,
    TransformerCond,
    TransformerDenoiser,
)

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")

# nn.Linear -> (weight version key, packed weight). Weak keys: a packed copy goes with its layer.
_PACKED: "weakref.WeakKeyDictionary[nn.Linear, tuple[tuple[int, int], torch.Tensor]]" = weakref.WeakKeyDictionary()


def _packed_weight(lin: nn.Linear, rows: int) -> torch.Tensor:
    w = lin.weight
    key = (w.data_ptr(), w._version)
    hit = _PACKED.get(lin)
    if hit is not None and hit[0] == key:
        return hit[1]
    packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows)
    _PACKED[lin] = (key, packed)
    return packed


def linear2d(lin: nn.Linear, x: torch.Tensor, gelu_tanh: bool = False) -> torch.Tensor:
    """``lin(x)`` (then tanh-GELU if asked) for a 2-D float32 CPU ``x``, on oneDNN with a packed weight."""
    if _ONEDNN:
        return torch.ops.mkldnn._linear_pointwise(x, _packed_weight(lin, x.shape[0]), lin.bias,
                                                  "gelu" if gelu_tanh else "none", [], "tanh" if gelu_tanh else "")
    y = F.linear(x, lin.weight, lin.bias)
    return F.gelu(y, approximate="tanh") if gelu_tanh else y


@dataclass
class FastTimeCond(TimeCond):
    """:class:`TimeCond` plus, for a batch whose rows share one timestep, the vectors the fused path uses:
    per block ``(shift, 1 + scale, gate)`` x (self-attention, cross-attention, feed-forward), and the head's
    ``(shift, 1 + scale)``; each (D,)."""

    block_vecs: list[tuple[torch.Tensor, ...]] | None = None
    final_vecs: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class FastTransformerCond(TransformerCond):
    """:class:`TransformerCond` plus each block's cross-attention with its two projections absorbed into the
    chunk's keys and values (see :func:`absorb_cross_attention`); ``None`` where not used."""

    absorbed: list[tuple[torch.Tensor, ...]] | None = None


@dataclass
class FastBlockContext(BlockContext):
    vecs: tuple[torch.Tensor, ...] | None = None
    absorbed: tuple[torch.Tensor, ...] | None = None


@dataclass
class FastStepContext(StepContext):
    final_vecs: tuple[torch.Tensor, torch.Tensor] | None = None


def absorb_cross_attention(blk: DenoiserBlock, kv: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Fold a block's query and output projections into its (constant over the chunk) keys and values.

    With ``N`` observation tokens and ``H`` heads, head ``h``'s score for token ``n`` is
    ``(W_q h_t + b_q)_h . k_hn / sqrt(d)``, linear in the normalized stream ``h_t``; and the branch's output,
    ``W_o concat_h(sum_n p_hn v_hn) + b_o``, is ``sum_hn p_hn (W_o[:, h] v_hn) + b_o``. So per chunk
    ``Kq = W_q^T k / sqrt(d)`` (D x HN), ``c = b_q . k / sqrt(d)`` and ``U = W_o v`` (HN x D) turn the branch into
    two (T x D)(D x HN) and (T x HN)(HN x D) products in place of two D x D projections and an attention call:
    the same function (to float rounding), far less work while ``HN`` is small against ``D``.
    Returns ``(Kq (B, D, HN), c (B, 1, HN), U (B, HN, D), N)``.
    """
    k, v = kv  # (B, H, N, dh)
    B, H, N, dh = k.shape
    D = blk.d_model
    scale = dh ** -0.5
    wq = blk.ca_q.weight.view(H, dh, D)
    kq = torch.einsum("hdi,bhnd->bihn", wq, k).reshape(B, D, H * N).mul_(scale)
    c = torch.einsum("hd,bhnd->bhn", blk.ca_q.bias.view(H, dh), k).reshape(B, 1, H * N).mul_(scale)
    u = torch.einsum("ohd,bhnd->bhno", blk.ca_out.weight.view(D, H, dh), v).reshape(B, H * N, D)
    return kq.contiguous(), c.contiguous(), u.contiguous(), N


def _vectors(mod: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Row 0 of a (B, 9, D) block modulation as the 9 fused-path vectors (scales as ``1 + scale``)."""
    m = mod[0]
    return tuple((1.0 + m[i]).contiguous() if i in (1, 4, 7) else m[i].contiguous() for i in range(9))


def _fused(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module`` may take the fused path for ``x``: no autograd, eval mode, CPU, float32."""
    return (not torch.is_grad_enabled() and not module.training and x.device.type == "cpu"
            and x.dtype == torch.float32)


def _uniform_t(t: torch.Tensor) -> bool:
    """Whether every row of ``t`` has the same timestep, without a data-dependent check where the layout says
    so (the samplers' ``t.expand(B)``)."""
    return t.numel() <= 1 or (t.dim() == 1 and t.stride(0) == 0) or bool((t == t.reshape(-1)[0]).all())


class FastDenoiserBlock(DenoiserBlock):
    """:class:`DenoiserBlock` with the fused inference path (see the module docstring)."""

    _accel_kernels = "onednn"
    _accel_base = DenoiserBlock

    # The fused branches: x2 is the (rows, D) residual stream, T tokens per sample; each returns gate * branch.
    def _sa(self, x2: torch.Tensor, v: tuple[torch.Tensor, ...], T: int) -> torch.Tensor:
        D, H = self.d_model, self.n_heads
        h = F.layer_norm(x2, (D,), v[1], v[0], 1e-6)
        qkv = linear2d(self.qkv, h).view(-1, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return v[2] * linear2d(self.sa_out, a.transpose(1, 2).reshape(-1, D))

    def _ca(self, x2: torch.Tensor, v: tuple[torch.Tensor, ...], T: int,
            kv: tuple[torch.Tensor, torch.Tensor], absorbed: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        D, H = self.d_model, self.n_heads
        h = F.layer_norm(x2, (D,), v[4], v[3], 1e-6)
        if absorbed is not None:
            kq, c, u, N = absorbed
            B = kq.shape[0]
            p = torch.baddbmm(c, h.view(B, T, D), kq)  # (B, T, H*N) scores
            p = p.view(B, T, H, N).softmax(-1).view(B, T, H * N)
            return v[5] * torch.baddbmm(self.ca_out.bias, p, u).view(B * T, D)
        q = linear2d(self.ca_q, h).view(-1, T, H, D // H).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, kv[0], kv[1])
        return v[5] * linear2d(self.ca_out, a.transpose(1, 2).reshape(-1, D))

    def _ff(self, x2: torch.Tensor, v: tuple[torch.Tensor, ...]) -> torch.Tensor:
        h = F.layer_norm(x2, (self.d_model,), v[7], v[6], 1e-6)
        act = self.ff[1]
        if isinstance(act, nn.GELU) and act.approximate == "tanh":
            return v[8] * linear2d(self.ff[2], linear2d(self.ff[0], h, gelu_tanh=True))
        return v[8] * linear2d(self.ff[2], act(linear2d(self.ff[0], h)))

    def fast_forward(self, x2: torch.Tensor, v: tuple[torch.Tensor, ...], T: int,
                     kv: tuple[torch.Tensor, torch.Tensor], absorbed: tuple[torch.Tensor, ...] | None = None
                     ) -> torch.Tensor:
        """The block on a (rows, D) stream with this step's vectors ``v`` and the chunk's keys/values ``kv``
        (or their absorbed form)."""
        x2 = x2 + self._sa(x2, v, T)
        x2 = x2 + self._ca(x2, v, T, kv, absorbed)
        return x2 + self._ff(x2, v)

    def branch(self, name: str, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        vecs = getattr(ctx, "vecs", None)
        if vecs is None or ctx.kv is None or not _fused(self, x):
            return super().branch(name, x, ctx)
        B, T, D = x.shape
        return self.fused_branch(name, x.reshape(B * T, D), vecs, T, ctx.kv, getattr(ctx, "absorbed", None)
                                 ).view(B, T, D)

    def fused_branch(self, name: str, x2: torch.Tensor, v: tuple[torch.Tensor, ...], T: int,
                     kv: tuple[torch.Tensor, torch.Tensor], absorbed: tuple[torch.Tensor, ...] | None
                     ) -> torch.Tensor:
        """Branch ``name`` (gate included) on the (rows, D) stream ``x2``: what :meth:`fast_forward` adds."""
        if name == "self_attn":
            return self._sa(x2, v, T)
        if name == "cross_attn":
            return self._ca(x2, v, T, kv, absorbed)
        if name == "ff":
            return self._ff(x2, v)
        raise KeyError(f"unknown branch {name!r}; branches are {self.branch_names}")


class FastTransformerDenoiser(TransformerDenoiser):
    """:class:`TransformerDenoiser` with the fused inference path (see the module docstring)."""

    _accel_kernels = "onednn"
    _accel_base = TransformerDenoiser

    #: timestep values whose vectors are kept (a DDPM-1000 sampler visits 1000; each costs 9 x 8 x D floats)
    MEMO_ENTRIES = 1024

    def _time_key(self) -> tuple:
        """Changes whenever a weight the timestep conditioning reads is replaced or edited in place."""
        ps = [self.time_mlp[0].weight, self.time_mlp[2].weight, self.time_mod.weight, self.time_mod.bias,
              self.final_mod.weight, self.final_mod.bias] + [b.mod_table for b in self.blocks]
        return tuple((p.data_ptr(), p._version) for p in ps)

    def _vecs(self, t: torch.Tensor) -> tuple[list[tuple[torch.Tensor, ...]], tuple[torch.Tensor, torch.Tensor]]:
        """The fused path's vectors for timestep ``t[0]``, computed once per timestep value."""
        weights = self._time_key()
        memo = self.__dict__.get("_fast_time_memo")
        if memo is None or memo[0] != weights:  # new weights: nothing kept is valid any more
            memo = self.__dict__["_fast_time_memo"] = (weights, {})
        memo = memo[1]
        key = float(t.reshape(-1)[0])
        hit = memo.get(key)
        if hit is None:
            tc = TransformerDenoiser.time_conditioning(self, t.reshape(-1)[:1])
            f = tc.final_mod[0]
            hit = ([_vectors(m) for m in tc.block_mods], (f[0].contiguous(), (1.0 + f[1]).contiguous()))
            if len(memo) >= self.MEMO_ENTRIES:
                memo.clear()
            memo[key] = hit
        return hit

    def _fast(self, x: torch.Tensor) -> bool:
        """:func:`_fused` for ``x``, and float32 weights (a bfloat16 backbone takes the models' path)."""
        return _fused(self, x) and self.in_proj.weight.dtype == torch.float32

    def _absorbed(self, prepared: TransformerCond) -> list:
        """Each block's absorbed cross-attention from :meth:`prepare`, or ``None`` per block."""
        return getattr(prepared, "absorbed", None) or [None] * len(self.blocks)

    #: absorb the cross-attention projections while heads x observation tokens <= d_model / ABSORB_RATIO
    ABSORB_RATIO = 4

    def prepare(self, cond: Any) -> TransformerCond:
        prepared = super().prepare(cond)
        if isinstance(prepared, FastTransformerCond) or not self._fast(prepared.memory):
            return prepared
        N = prepared.memory.shape[1]
        absorbed = None
        if self.blocks and self.blocks[0].n_heads * N * self.ABSORB_RATIO <= self.d_model:
            absorbed = [absorb_cross_attention(blk, kv) for blk, kv in zip(self.blocks, prepared.kv)]
        return FastTransformerCond(prepared.memory, prepared.kv, absorbed)

    def time_conditioning(self, t: torch.Tensor) -> TimeCond:
        tc = super().time_conditioning(t)
        if not (self._fast(self.in_proj.weight) and t.device.type == "cpu" and _uniform_t(t)):
            return tc
        block_vecs, final_vecs = self._vecs(t)
        return FastTimeCond(tc.block_mods, tc.final_mod, block_vecs, final_vecs)

    def begin(self, x: torch.Tensor, t: torch.Tensor, cond: Any, time_cond: TimeCond | None = None) -> StepContext:
        """The models' :meth:`~TransformerDenoiser.begin`, with each block's fused-path vectors attached when
        the timestep conditioning has them (so a block cache driving the blocks takes the fused branches)."""
        tc = self.time_conditioning(t) if time_cond is None else time_cond
        prepared = self.prepare(cond)
        ctx = super().begin(x, t, prepared, tc)
        if not isinstance(tc, FastTimeCond) or tc.block_vecs is None or not self._fast(x):
            return ctx
        block_ctx = [FastBlockContext(bc.mod, bc.memory, bc.kv, vecs, ab)
                     for bc, vecs, ab in zip(ctx.block_ctx, tc.block_vecs, self._absorbed(prepared))]
        return FastStepContext(ctx.x, block_ctx, ctx.final_mod, ctx.T, tc.final_vecs)

    def head(self, h: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        final_vecs = getattr(ctx, "final_vecs", None)
        if final_vecs is None or not self._fast(h):
            return super().head(h, ctx)
        shift, scale1 = final_vecs
        return F.linear(F.layer_norm(h, (self.d_model,), scale1, shift, 1e-6), self.out_proj.weight,
                        self.out_proj.bias)

    def fused_step(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> "FusedStep | None":
        """One step's inputs on the fused path -- the embedded (rows, D) stream, each block's vectors, keys and
        values (or their absorbed form), the head's vectors -- or ``None`` where the fused path does not apply
        (autograd, training, another device or dtype, mixed timesteps). What :meth:`forward` runs on, and what a
        block cache driving the fused branches itself (:class:`robolearn.accel.cache.CachedDenoiser`) starts from."""
        if not (self._fast(x) and _uniform_t(t)):
            return None
        B, T, A = x.shape
        if T > self.horizon:
            raise ValueError(f"sequence of {T} steps is longer than the horizon {self.horizon} the model was built for")
        block_vecs, final_vecs = self._vecs(t)
        prepared = self.prepare(cond)
        h = F.linear(x, self.in_proj.weight, self.in_proj.bias) + self.pos[:T]
        return FusedStep(h.reshape(B * T, self.d_model), block_vecs, prepared.kv, self._absorbed(prepared),
                         final_vecs, B, T)

    def fused_head(self, h: torch.Tensor, fs: "FusedStep") -> torch.Tensor:
        """The head on the (rows, D) stream of :meth:`fused_step`: the (B, T, action_dim) output."""
        shift, scale1 = fs.final_vecs
        h = F.layer_norm(h, (self.d_model,), scale1, shift, 1e-6)
        return F.linear(h, self.out_proj.weight, self.out_proj.bias).view(fs.B, fs.T, -1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any, step: Any = None) -> torch.Tensor:
        fs = self.fused_step(x, t, cond)
        if fs is None:
            return super().forward(x, t, cond, step)
        h = fs.h
        for blk, v, kv, ab in zip(self.blocks, fs.block_vecs, fs.kv, fs.absorbed):
            h = FastDenoiserBlock.fast_forward(blk, h, v, fs.T, kv, ab)
        return self.fused_head(h, fs)


@dataclass
class FusedStep:
    """:meth:`FastTransformerDenoiser.fused_step`'s result."""

    h: torch.Tensor  # (B * T, D) residual stream entering block 0
    block_vecs: list[tuple[torch.Tensor, ...]]
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    absorbed: list
    final_vecs: tuple[torch.Tensor, torch.Tensor]
    B: int
    T: int
