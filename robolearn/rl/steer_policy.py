"""The steered policy of DSRL as a registered policy kind: a frozen chunk policy whose initial noise an actor picks.

DSRL (Wagenmaker et al., "Steering Your Diffusion Policy with Latent Space Reinforcement Learning") leaves the
base's weights alone. A chunk policy maps (observation, initial noise ``w``) to an action chunk, and for DDIM
(eta 0) or a flow ODE that map is deterministic and smooth in ``w``; so choosing ``w`` per observation is an
action space of its own, and RL there changes what the base does without touching it. The base is used through
``predict_action(obs_history, noise)`` only, so diffusion and flow policies are steered by the same code.

:class:`NoiseActor`: a tanh-squashed Gaussian over ``w`` (flattened, ``horizon x action_dim`` numbers), bounded
by ``max_noise`` (DSRL: tanh x ~1.5, so the base never sees noise far outside the N(0, I) it was trained on). It
reads the newest low-dimensional observation, normalized (:mod:`robolearn.rl.features`). Deployment and
evaluation use its deterministic choice ``max_noise * tanh(mean)`` (``act="mean"``) or a draw on the caller's
chunk noise (``act="sample"``); training samples.

:class:`SteeredPolicy` (``"steered"``): ``predict_action(obs_history, noise)`` runs the base on the actor's ``w``
(``noise`` is ignored with ``act="mean"``, the draw's reparameterization noise with ``act="sample"``). Everything built on the executor (``robolearn eval``, ``run``, ``serve``, ``teleop
policy=``, ``collect policy=``) takes it like any chunk policy. It has no warm start (a warm start skips the
initial noise, which is what it steers). Checkpoints hold the actor and the observation statistics; the config
names the base by relative path and content hash.

Deploy ranking (``rank`` > 1; V-GPS-style, Nakamoto et al., "Steering Your Generalists", 2024): at every
decision the base runs on ``rank`` noises in one batch -- the actor's choice and ``rank - 1`` draws of N(0, I), the
base's own rule, seeded by the caller's chunk noise -- and the chunk that the run's action critic Q(s, a) values
most is executed. It needs that critic, which a ``variant=na`` run trains; the policy holds it (``q_a``), so its
checkpoint carries it. It costs ``rank`` times the base's inference per decision.

Refused: a base whose sampler is stochastic given its initial noise (DDPM draws fresh noise at every step, so
the chunk is not a function of ``w``): steer it with ``sampler="ddim"`` (``finetune.base_sampler=ddim``).
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.distributions import Normal

from robolearn.policies.config import check_geometry
from robolearn.policies.executor import executable
from robolearn.policies.registry import register_policy
from robolearn.policies.wrapper import PolicyWrapper
from robolearn.rl.features import ObsFeatures

LOG_STD_RANGE = (-5.0, 2.0)


def check_deterministic(base: Any) -> None:
    """Refuse a base whose chunk is not a function of its initial noise, naming the sampler to use instead."""
    kind = (getattr(base, "sampler_config", None) or {}).get("kind")
    stochastic = tuple(getattr(base, "stochastic_samplers", ()))
    if kind in stochastic:
        samplers = [s for s in getattr(getattr(base, "cfg", None), "samplers", ()) if s not in stochastic]
        use = samplers[0] if samplers else "a deterministic sampler"
        raise ValueError(f"the base samples with {kind!r}, which draws fresh noise at every denoising step, so its "
                         f"chunk is not a function of the initial noise and cannot be steered: use sampler {use!r} "
                         f"(finetune.base_sampler={use})")


def layer_norm_mlp(in_dim: int, hidden: Sequence[int], out_dim: int, out_gain: float = 1.0) -> nn.Sequential:
    """Linear -> LayerNorm -> ReLU blocks, then a linear head (DSRL's critics; also the noise actor's trunk)."""
    layers: list[nn.Module] = []
    width = in_dim
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.LayerNorm(int(h)), nn.ReLU()]
        width = int(h)
    head = nn.Linear(width, out_dim)
    nn.init.orthogonal_(head.weight, out_gain)
    nn.init.zeros_(head.bias)
    return nn.Sequential(*layers, head)


class QEnsemble(nn.Module):
    """``n`` LayerNorm MLP critics Q(x, y) side by side; ``forward`` returns ``(n, batch)``. ``out_gain``: the
    heads' initial scale (small: every Q starts near 0)."""

    def __init__(self, x_dim: int, y_dim: int, hidden: list[int], n: int = 2, out_gain: float = 1.0) -> None:
        super().__init__()
        self.nets = nn.ModuleList(layer_norm_mlp(x_dim + y_dim, hidden, 1, out_gain) for _ in range(n))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xy = torch.cat([x, y], dim=-1)
        return torch.stack([net(xy).squeeze(-1) for net in self.nets])


class NoiseActor(nn.Module):
    """A tanh-squashed diagonal Gaussian over the initial noise: ``w = max_noise * tanh(u)``, ``u ~ N(mean,
    std)``; mean and log-std from one MLP. The head starts small, so an untrained actor picks ``w`` near 0."""

    def __init__(self, in_dim: int, noise_dim: int, hidden: Sequence[int], max_noise: float) -> None:
        super().__init__()
        self.noise_dim, self.max_noise = int(noise_dim), float(max_noise)
        self.net = layer_norm_mlp(in_dim, hidden, 2 * self.noise_dim, out_gain=0.01)

    def params(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        return mean, log_std.clamp(*LOG_STD_RANGE)

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        return self.max_noise * torch.tanh(self.params(obs)[0])

    def sample(self, obs: torch.Tensor, eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w, log-probability of w)``; ``eps`` (standard normal, the reparameterization's noise): drawn when
        None. Differentiable in the actor's parameters."""
        mean, log_std = self.params(obs)
        std = log_std.exp()
        if eps is None:
            eps = torch.randn_like(mean)
        u = mean + std * eps
        squashed = torch.tanh(u)
        logp = Normal(mean, std).log_prob(u).sum(-1)
        # change of variables w = max_noise * tanh(u): log|dw/du| = log(max_noise) + log(1 - tanh(u)^2)
        logp = logp - (math.log(self.max_noise) + torch.log1p(-squashed.pow(2) + 1e-6)).sum(-1)
        return self.max_noise * squashed, logp


@register_policy("steered")
class SteeredPolicy(ObsFeatures, PolicyWrapper):
    """A frozen chunk policy run on the initial noise a :class:`NoiseActor` picks (see the module docstring).

    ``max_noise``: the bound on ``|w|``. ``hidden``: the actor's widths. ``obs_keys``: observation keys the actor
    reads (default: the base's one-dimensional ones). ``obs_norm``: see :mod:`robolearn.rl.features`.
    ``sampler``/``steps``: run the base under this sampler (None: its own); it must be deterministic.
    ``action_steps``: execute this many actions of each chunk before the actor picks the next noise (None: the
    base's ``n_action_steps``); kept in the checkpoint, so deployment re-plans as the run did.
    ``act``: ``"mean"`` deploys the actor's deterministic ``w = max_noise * tanh(mean)``; ``"sample"`` a draw from
    the actor whose reparameterization noise is the caller's chunk noise (reproducible from the noise seed, as every
    policy's evaluation is). DSRL evaluates by sampling; it matters where the base is multimodal: an untrained actor's
    mean is ``w = 0``, the average of the modes (push_t: 0.29 against the base's 0.56), its sample the base's own
    N(0, I)-like noise.
    """

    def __init__(self, base: Any, max_noise: float = 1.5, hidden: Sequence[int] = (256, 256),
                 obs_keys: Sequence[str] | None = None, obs_norm: str = "running", sampler: str | None = None,
                 steps: int | None = None, act: str = "mean", critic_hidden: Sequence[int] | None = None,
                 rank: int = 1, action_steps: int | None = None) -> None:
        super().__init__(base)
        self.action_steps = None
        if action_steps is not None:
            if isinstance(action_steps, bool) or not float(action_steps).is_integer():
                raise ValueError(f"action_steps must be an integer or None, got {action_steps!r}")
            try:
                check_geometry(base.horizon, base.n_obs_steps, int(action_steps), where="")
            except ValueError as e:
                raise ValueError(f"action_steps={int(action_steps)} does not fit the base's chunks: {e}") from None
            self.action_steps = int(action_steps)
        if act not in ("mean", "sample"):
            raise ValueError(f"act must be 'mean' or 'sample', got {act!r}")
        self.act = act
        if not float(max_noise) > 0:
            raise ValueError(f"max_noise must be > 0, got {max_noise}")
        if sampler is not None or steps is not None:
            base.set_sampler(sampler, steps)
        check_deterministic(base)
        self.max_noise = float(max_noise)
        self.hidden = [int(h) for h in hidden]
        self.sampler, self.steps = sampler, steps
        self.init_features(base, obs_keys, obs_norm, "the noise actor")
        self.noise_dims = tuple(int(d) for d in base.noise_shape(1)[1:])
        self.noise_dim = int(np.prod(self.noise_dims))
        self.actor = NoiseActor(self.obs_dim, self.noise_dim, self.hidden, self.max_noise)
        self.critic_hidden = None if critic_hidden is None else [int(h) for h in critic_hidden]
        act_dim = int(self.n_action_steps) * int(self.action_dim)
        self.q_a = None if self.critic_hidden is None else QEnsemble(self.obs_dim, act_dim, self.critic_hidden)
        self.rank = 1
        self.set_rank(rank)
        self.to(base.device)

    def train(self, mode: bool = True) -> "SteeredPolicy":
        """Only the actor has a training mode: the base stays in eval mode (its chunk must depend on ``w`` only)."""
        super().train(mode)
        self.base.eval()
        return self

    @property
    def n_action_steps(self) -> int:
        """Actions executed per chunk: ``action_steps`` where given (the actor then picks a noise every that many
        steps), else the base's own."""
        return int(self.base.n_action_steps) if self.action_steps is None else self.action_steps

    def wrapper_config(self) -> dict[str, Any]:
        return {"max_noise": self.max_noise, "hidden": list(self.hidden), "obs_keys": list(self.feature_keys),
                "obs_norm": self.obs_norm, "sampler": self.sampler, "steps": self.steps, "act": self.act,
                "critic_hidden": self.critic_hidden, "rank": self.rank, "action_steps": self.action_steps}

    def set_rank(self, rank: int) -> None:
        """Deploy ranking: at every decision run the base on ``rank`` noises -- the actor's choice and ``rank - 1``
        draws of N(0, I), the base's own rule -- and execute the chunk the action critic values most (1: the
        actor's choice alone). Needs the action critic that a ``variant=na`` run trains and saves."""
        if isinstance(rank, bool) or not float(rank).is_integer() or int(rank) < 1:
            raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
        if int(rank) > 1 and self.q_a is None:
            raise ValueError(f"rank={int(rank)} ranks noise draws by the steering run's action critic, and this "
                             f"steered policy holds none: train it with finetune.variant=na (variant=sac has only a "
                             f"noise critic; checkpoints from before ranking existed kept the critic outside the "
                             f"policy)")
        self.rank = int(rank)

    def steer(self, obs_history: Mapping[str, Any], w: torch.Tensor) -> torch.Tensor:
        """The base's chunk ``(n, horizon, action_dim)`` (raw units) for flattened noise ``w`` ``(n, noise_dim)``."""
        noise = w.reshape(w.shape[0], *self.noise_dims).to(self.device, torch.float32)
        return self.base.predict_action(obs_history, noise)

    def critic_action(self, chunk: torch.Tensor) -> torch.Tensor:
        """What an action critic reads of ``chunk`` ``(n, horizon, action_dim)``: its executable part, normalized
        by the base's normalizer, flattened to ``(n, n_action_steps * action_dim)``."""
        part = executable(torch.as_tensor(chunk), self.n_obs_steps, self.n_action_steps).float().to(self.device)
        return self.normalizer.normalize(self.action_key, part).reshape(part.shape[0], -1)

    @torch.no_grad()
    def choose_noise(self, obs_history: Mapping[str, Any], noise: torch.Tensor | None = None) -> torch.Tensor:
        """The actor's ``w`` ``(n, noise_dim)`` for each row's newest observation: its deterministic choice, or
        with ``act="sample"`` its draw on reparameterization noise ``noise`` (drawn here when None)."""
        feats = self.obs_features(self.newest_frame(obs_history))
        if self.act == "sample":
            eps = None if noise is None else noise.reshape(noise.shape[0], -1).to(self.device, torch.float32)
            return self.actor.sample(feats, eps)[0]
        return self.actor.deterministic(feats)

    def predict_action(self, obs_history: Mapping[str, Any], noise: torch.Tensor | None = None,
                       **kwargs: Any) -> torch.Tensor:
        """The base's chunk on the actor's noise (``noise``: the reparameterization noise of ``act="sample"``;
        ignored by ``act="mean"``)."""
        with torch.no_grad():
            w = self.choose_noise(obs_history, noise)
            if self.rank == 1:
                return self.steer(obs_history, w)
            return self.ranked(obs_history, w, noise)[0]

    @torch.no_grad()
    def ranked(self, obs_history: Mapping[str, Any], w: torch.Tensor, noise: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(chunk, scores, pick, candidates)`` of deploy ranking (:meth:`set_rank`) for the actor's ``w``
        ``(n, noise_dim)``: ``candidates`` ``(rank, n, noise_dim)`` (candidate 0: ``w``), ``scores`` ``(rank, n)``
        the critic's value of each one's chunk, ``pick`` the one executed per row. Each row's extra draws are
        seeded by that row's caller ``noise`` (reproducible as every policy's evaluation is, whatever the batch;
        fresh draws when None); all candidates go through the base in one batch."""
        assert self.q_a is not None
        n, k = w.shape[0], self.rank
        extra = torch.empty(k - 1, n, self.noise_dim)
        for i in range(n):  # each row's draws from its own noise: the same episode gets the same draws in any batch
            gen = torch.Generator()
            gen.manual_seed(_noise_seed(noise[i]) if noise is not None else int(torch.randint(2**62, ())))
            extra[:, i] = torch.randn(k - 1, self.noise_dim, generator=gen)
        cand = torch.cat([w, extra.reshape(-1, self.noise_dim).to(w)])  # candidate c of row i: row c * n + i
        chunks = self.steer(_repeat_rows(obs_history, k), cand)
        feats = self.obs_features(self.newest_frame(obs_history)).repeat(k, 1)
        scores = self.q_a(feats, self.critic_action(chunks)).min(0).values.reshape(k, n)
        pick = scores.argmax(0)
        return chunks.reshape(k, n, *chunks.shape[1:])[pick, torch.arange(n)], scores, pick, cand.reshape(k, n, -1)


def _noise_seed(noise: torch.Tensor) -> int:
    """A 63-bit seed from the bytes of ``noise``: the same caller noise, the same extra draws."""
    digest = hashlib.blake2b(noise.detach().cpu().float().contiguous().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _repeat_rows(obs_history: Mapping[str, Any], k: int) -> dict[str, Any]:
    """Each observation array stacked ``k`` times along the batch axis (row ``c * n + i`` is row ``i``)."""
    out: dict[str, Any] = {}
    for key, v in obs_history.items():
        if isinstance(v, torch.Tensor):
            out[key] = torch.cat([v] * k)
        else:
            a = np.asarray(v)
            out[key] = np.concatenate([a] * k)
    return out
