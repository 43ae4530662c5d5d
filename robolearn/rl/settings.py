"""The fine-tuning methods' hyperparameters, one dataclass each (no torch import: the CLI's config schema extends
them): :class:`ResidualSettings` (residual PPO) and :class:`SteerSettings` (latent-noise steering).

ResidualSettings' defaults are ResiP's published values where the paper gives them (Ankile et al., "From Imitation to Refinement:
Residual RL for Precise Assembly"; see /work/shared/PAPERS.md): gamma 0.999, GAE lambda 0.95, clip 0.2, actor lr
3e-4, critic lr 5e-3, 2x256 MLPs, residual scale 0.1, last actor layer initialised at zero. The rest (rollout
length, epochs, minibatches, KL target, value clipping, initial log-std) are ordinary PPO choices, said where set.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from robolearn.policies.config import ConfigError


def _requirer(settings: object, prefix: str) -> Callable[[Sequence[str], Callable[[Any], bool], str], None]:
    """``require(names, ok, rule)``: a ``ConfigError`` naming the key (``finetune.gamma must be in [0, 1], got
    1.5``) for the first of ``names`` whose value fails ``ok``."""

    def require(names: Sequence[str], ok: Callable[[Any], bool], rule: str) -> None:
        for name in names:
            value = getattr(settings, name)
            if not ok(value):
                raise ConfigError(f"{prefix}{name} must be {rule}, got {value!r}")

    return require


def _positive(v: Any) -> bool:
    return v > 0


def _count(v: Any) -> bool:
    """An integer >= 1 (a whole float such as 6.0 too; not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() and v >= 1


def _unit(v: Any) -> bool:
    return 0.0 <= v <= 1.0


def _widths(v: Any) -> bool:
    return bool(v) and all(int(w) >= 1 for w in v)


#: residual learners: ResiP's PPO, an off-policy TD3, random search over a linear residual (ARS)
LEARNERS = ("ppo", "td3", "ars")


@dataclass
class ResidualSettings:
    # -- the residual policy (saved in its checkpoint; changing these changes the policy)
    action_scale: float = 0.1  # residual output x this, added to the base action in normalized action space
    actor_hidden: list[int] = field(default_factory=lambda: [256, 256])
    init_log_std: float = -1.0  # exploration noise of the residual's output (std 0.37 before action_scale)
    noise_corr: float = 0.0  # exploration noise correlation from one step to the next (AR(1), same marginal std); 0: white
    obs_norm: str = "running"  # "running": standardize the residual's inputs by the visited states' running mean/std; "base": the base's normalizer only
    # -- the critic
    critic_hidden: list[int] = field(default_factory=lambda: [256, 256])
    # -- PPO
    gamma: float = 0.999  # long horizon, sparse success reward
    gae_lambda: float = 0.95
    actor_gae_lambda: float | None = None  # GAE lambda of the actor's advantages (null: gae_lambda); the critic's targets keep gae_lambda
    clip_coef: float = 0.2  # ratio clipping
    value_clip: float | None = 0.2  # clip the value change per update to +-this (null: no value clipping)
    target_kl: float | None = 0.1  # stop the update before a minibatch step once approx. KL exceeds this (null: never)
    actor_lr: float = 3e-4
    critic_lr: float = 5e-3
    rollout_steps: int = 256  # control steps per environment between updates (batch = rollout_steps x num_envs)
    update_epochs: int = 10
    minibatches: int = 4
    bootstrap_truncated: bool = True  # a time-limit end is bootstrapped with V(last obs); false: treated as the end (value 0)
    norm_adv: bool = True  # normalize advantages per minibatch
    ent_coef: float = 0.0  # the residual should stay near the base: no entropy bonus by default
    vf_coef: float = 1.0  # actor and critic have their own optimizers and learning rates; this only scales the critic's
    max_grad_norm: float = 1.0
    # -- learner=td3: an off-policy learner instead of PPO (robolearn/rl/residual_td3.py); PPO ignores these
    learner: str = "ppo"  # ppo (ResiP) | td3: a deterministic tanh-bounded residual, twin LayerNorm critics, replay | ars (below)
    q_lr: float = 3e-4  # td3: the critics' learning rate (actor_lr is the actor's)
    batch_size: int = 256  # td3: replay minibatch
    buffer_size: int = 1_000_000  # td3: per-step transitions kept (oldest dropped)
    utd: float = 0.25  # td3: gradient steps per environment step (64 envs x 0.25 = 16 per vector step)
    tau: float = 0.005  # td3: target networks' Polyak rate
    n_step: int = 3  # td3: n-step returns (sparse rewards reach back n steps per backup)
    expl_std: float = 0.2  # td3: Gaussian exploration noise on the residual (before action_scale; it is in [-1, 1])
    target_noise: float = 0.2  # td3: target policy smoothing noise std ...
    target_noise_clip: float = 0.5  # ... clipped to +-this
    policy_delay: int = 2  # td3: critic steps per actor (and target) step
    learning_starts: int = 10_000  # td3: environment steps collected with the zero residual + noise before learning
    critic_warmup: int = 2000  # td3: the first gradient steps train the critics only (the actor waits for a critic
    #                            that has seen the data: a fresh critic's gradient would move it at random)
    actor_penalty: float = 0.1  # td3: + this x mean(residual^2) in the actor's loss, a pull towards the base where
    #                             the critic's gradient is weak (Adam moves a zero last layer fast in any direction)
    demos: str | None = None  # td3: an episode store of successful demonstrations of the task (e.g. the base's own
    #                           training data): replayed through the base, each step becomes a transition whose
    #                           residual is (demo action - base action) / action_scale, clipped (RLPD/ResFiT-style)
    demo_ratio: float = 0.5  # td3: share of every minibatch drawn from the demonstrations (when demos is set)
    # -- learner=ars: Augmented Random Search over a linear residual tanh(W x + b) (robolearn/rl/residual_ars.py;
    #    Mania et al. 2018); actor_hidden does not apply (ARS's policies are linear), nor do PPO's or TD3's keys
    ars_directions: int = 16  # ars: random directions in parameter space per iteration
    ars_top: int = 8  # ars: the best directions (by max of their two returns) that make the step
    ars_states: int = 16  # ars: initial states per iteration; every direction and sign runs one episode on each
    ars_noise: float = 0.01  # ars: perturbation size nu (theta +- nu * direction; inputs are standardized)
    ars_lr: float = 0.005  # ars: step size alpha (scaled by 1 / (ars_top * std of the top returns))
    #                        (the smallest of five on peg_insert; larger steps cost the base success: README)

    def check(self, prefix: str = "finetune.") -> None:
        """Refuse values that would crash late or silently do nothing; messages name the key (``finetune.gamma``)."""

        require = _requirer(self, prefix)
        require(("learner",), lambda v: v in LEARNERS,
                "'ppo' (ResiP), 'td3' (off-policy) or 'ars' (random search over a linear residual)")
        require(("ars_directions", "ars_top", "ars_states"), _count, "an integer >= 1")
        require(("ars_noise", "ars_lr"), _positive, "> 0")
        require(("q_lr", "utd", "batch_size", "buffer_size", "n_step", "policy_delay"), _positive, "> 0")
        require(("tau", "demo_ratio"), _unit, "in [0, 1]")
        if self.learner != "td3":
            require(("demos",), lambda v: not v, f"null with learner={self.learner} (demonstrations feed td3's "
                    "replay buffer; set finetune.learner=td3)")
        if self.learner == "ars":
            require(("ars_top",), lambda v: v <= self.ars_directions,
                    f"<= finetune.ars_directions ({self.ars_directions})")
        require(("expl_std", "target_noise", "target_noise_clip", "learning_starts", "critic_warmup", "actor_penalty"),
                lambda v: v >= 0, ">= 0")
        require(("obs_norm",), lambda v: v in ("base", "running"), "'running' or 'base'")
        require(("action_scale",), _positive, "> 0 (the residual's share of the action; 0 would never change the base)")
        require(("actor_lr", "critic_lr", "max_grad_norm", "clip_coef"), _positive, "> 0")
        require(("gamma", "gae_lambda"), _unit, "in [0, 1]")
        require(("actor_gae_lambda",), lambda v: v is None or _unit(v), "in [0, 1] or null (the same as gae_lambda)")
        require(("noise_corr",), lambda v: 0 <= v < 1, "in [0, 1) (0: white noise; 0.9: a step's noise keeps 90% of the last one's)")
        require(("rollout_steps", "update_epochs", "minibatches"), lambda v: v >= 1, ">= 1")
        require(("ent_coef", "vf_coef"), lambda v: v >= 0, ">= 0")
        require(("value_clip", "target_kl"), lambda v: v is None or v > 0, "> 0 or null (off)")
        require(("actor_hidden", "critic_hidden"), _widths, "a non-empty list of layer widths >= 1")

    def policy_config(self) -> dict[str, object]:
        """What the residual policy's checkpoint keeps of these (the rest only shapes training)."""
        hidden = [] if self.learner == "ars" else [int(w) for w in self.actor_hidden]  # ARS: linear
        return {"action_scale": float(self.action_scale), "hidden": hidden,
                "init_log_std": float(self.init_log_std), "obs_norm": str(self.obs_norm),
                "squash": self.learner in ("td3", "ars")}


STEER_VARIANTS = ("sac", "na")

#: The steering defaults until 2026-12-05: plain SAC on the noise (its critics diverged on peg_insert). A run
#: started before then resumes only with these given back as ``finetune.*`` keys.
PLAIN_SAC_STEER: dict[str, object] = {"variant": "sac", "act": "mean", "td_target": "actor", "utd": 2.0,
                                      "bootstrap_truncated": True, "reward_offset": 0.0, "target_entropy": None}


@dataclass
class SteerSettings:
    """Latent-noise steering (DSRL, Wagenmaker et al.): an actor picks the base's initial noise ``w``.

    Defaults: DSRL's published values where the paper gives them (lr 3e-4, batch 256, tau 0.005, LayerNorm MLP
    critics, noise bounded by tanh x 1.5, -1 per step until success as in its robomimic configs, evaluation by
    sampling the actor); the rest are the recipe that steered here (README, "Fine-tuning by steering", rounds
    4-6: a peg_insert diffusion base from 0.435 to 0.975 on new states): noise aliasing, Monte Carlo critic
    targets, a time-limit end valued as a failure, one gradient step per transition, target entropy 0. Until
    2026-12-05 the defaults were plain SAC (:data:`PLAIN_SAC_STEER`), whose critics diverged on peg_insert."""

    variant: str = "na"  # sac: SAC on the noise; na: noise aliasing (action critic by TD, noise critic distilled)
    # -- the steered policy (saved in its checkpoint)
    max_noise: float = 1.5  # w = max_noise * tanh(u): the base never sees noise far outside its training range
    actor_hidden: list[int] = field(default_factory=lambda: [256, 256])
    obs_norm: str = "running"  # as residual RL: standardize the actor's/critics' inputs by visited states' mean/std
    base_sampler: str | None = None  # steer the base under this sampler (null: its own); must be deterministic
    base_steps: int | None = None  # ... with this many steps (null: its own)
    action_steps: int | None = None  # actions of each chunk run before the actor picks the next noise (null: the
    #                                  base's n_action_steps); fewer: more decisions (transitions) per episode
    act: str = "sample"  # deployed and evaluated noise: mean (the actor's deterministic choice) | sample (a draw, as
    #                      DSRL evaluates; keeps a multimodal base's modes where the mean w = 0 averages them)
    rank: int = 1  # deployed and evaluated: run the base on the actor's noise and rank - 1 draws of N(0, I) per decision
    #                and execute the chunk the action critic values most (variant=na; 1: the actor's choice alone)
    # -- critics and SAC
    critic_hidden: list[int] = field(default_factory=lambda: [256, 256])
    gamma: float = 0.99  # per environment step: a chunk of k steps discounts its successor by gamma^k
    lr: float = 3e-4  # actor, critics and temperature
    batch_size: int = 256
    tau: float = 0.005  # target networks' Polyak rate
    utd: float = 1.0  # gradient steps per collected transition (one transition = one chunk of one environment)
    buffer_size: int = 300_000  # transitions kept (oldest dropped); 300k env steps make ~40k
    learning_starts: int = 1000  # transitions collected with w ~ N(0, I) (the base as trained) before learning
    init_temperature: float = 0.01  # entropy's weight; tuned towards target_entropy from here
    target_entropy: float | None = 0.0  # null: -0.5 x dim(w)
    backup_entropy: bool = False  # false: the critics' targets hold rewards only (entropy only regularizes the actor), so
    #                               Q stays on the reward's scale (a success probability for sparse tasks)
    bootstrap_truncated: bool = False  # true: a time-limit end is valued by the critic at the last observation;
    #                                    false: as a failure
    td_target: str = "mc"  # actor: bootstrap at the actor's noise for s' (SAC); behavior: at the noise/chunk the run
    #                        actually chose next (SARSA-like: no maximization inside the target); mc: no bootstrap
    #                        inside an episode -- the discounted return the run actually got to the episode's end
    reward_offset: float = 1.0  # subtracted from every step's reward (DSRL's robomimic configs: 1, i.e. -1 per step
    #                             until success: faster successes score higher, so chunks differ even when all succeed)
    alias_samples: int = 2  # na: extra chunks from w ~ N(0, I) per decision, for distilling the noise critic

    def check(self, prefix: str = "finetune.") -> None:
        require = _requirer(self, prefix)
        require(("variant",), lambda v: v in STEER_VARIANTS, "'sac' (SAC on the noise) or 'na' (noise aliasing)")
        require(("act",), lambda v: v in ("mean", "sample"), "'mean' or 'sample'")
        require(("obs_norm",), lambda v: v in ("base", "running"), "'running' or 'base'")
        require(("td_target",), lambda v: v in ("actor", "behavior", "mc"), "'actor', 'behavior' or 'mc'")
        require(("max_noise", "lr", "utd"), _positive, "> 0")
        require(("gamma", "tau"), _unit, "in [0, 1]")
        require(("batch_size", "buffer_size"), lambda v: v >= 1, ">= 1")
        require(("learning_starts", "alias_samples"), lambda v: v >= 0, ">= 0")
        if self.variant == "na":
            require(("alias_samples",), lambda v: v >= 1,
                    ">= 1 for variant=na (the noise critic is distilled from those chunks)")
        require(("init_temperature",), _positive, "> 0")
        require(("base_steps", "action_steps"), lambda v: v is None or _count(v), "an integer >= 1 or null")
        require(("actor_hidden", "critic_hidden"), _widths, "a non-empty list of layer widths >= 1")
        require(("rank",), _count, "an integer >= 1")
        if self.variant != "na":
            require(("rank",), lambda v: v == 1,
                    "1 for variant=sac (ranking scores chunks with the action critic that only variant=na trains)")

    def policy_config(self) -> dict[str, object]:
        """What the steered policy's checkpoint keeps of these."""
        return {"max_noise": float(self.max_noise), "hidden": [int(w) for w in self.actor_hidden],
                "obs_norm": str(self.obs_norm), "sampler": self.base_sampler,
                "steps": None if self.base_steps is None else int(self.base_steps), "act": str(self.act),
                "critic_hidden": [int(w) for w in self.critic_hidden] if self.variant == "na" else None,
                "rank": int(self.rank),
                "action_steps": None if self.action_steps is None else int(self.action_steps)}
