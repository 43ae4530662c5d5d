"""What the runner and the server need from a policy: a structural type, so any object with these members works
(a trained :mod:`robolearn.policies` policy, a remote one, a test double), and the runner never imports a model.

Convention (Diffusion Policy's): the chunk's step ``n_obs_steps - 1`` is the time of the newest observation, so
the part to execute is ``chunk[:, n_obs_steps-1 : n_obs_steps-1+n_action_steps]``; action ``i`` of that part is
meant for ``t_obs + i * period``.
"""
from __future__ import annotations

from typing import Mapping, Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class ChunkPredictor(Protocol):
    """Maps an observation history ``{key: (B, n_obs_steps, ...)}`` to an action chunk ``(B, horizon, A)`` in raw
    action units. Optional extras the runtime reads when present: ``obs_shapes`` (``{key: shape}``, used for the
    server's metadata and request checks) and :meth:`WarmStartPredictor.predict_action_warm`."""

    horizon: int
    n_obs_steps: int
    n_action_steps: int
    action_dim: int
    obs_keys: Sequence[str]

    def predict_action(self, obs_history: Mapping[str, torch.Tensor],
                       noise: torch.Tensor | None = None) -> torch.Tensor: ...

    def reset(self) -> None: ...


@runtime_checkable
class WarmStartPredictor(ChunkPredictor, Protocol):
    """A policy that can start sampling from its previous chunk instead of pure noise (RTI-DP, Duan et al. 2025):

    ``prev_chunk`` (B, horizon, A) raw units is the chunk predicted ``shift`` control steps ago; the policy shifts
    it left by ``shift`` (padding the tail, e.g. by repeating the last action), noises it to the level of its
    last ``steps`` denoising steps, and runs only those. Returns (B, horizon, A) raw units like predict_action.
    """

    def predict_action_warm(self, obs_history: Mapping[str, torch.Tensor], prev_chunk: torch.Tensor,
                            shift: int, steps: int) -> torch.Tensor: ...


def executable_start(policy: ChunkPredictor) -> int:
    """Index in the chunk of the action for the newest observation's time."""
    return int(policy.n_obs_steps) - 1


def check_policy(policy: object) -> None:
    """Fail early, naming what is missing, rather than deep inside the loop."""
    missing = [m for m in ("horizon", "n_obs_steps", "n_action_steps", "action_dim", "obs_keys",
                           "predict_action", "reset") if not hasattr(policy, m)]
    if missing:
        raise TypeError(f"{type(policy).__name__} is not a ChunkPredictor: missing {missing}")
    h, o, a = int(policy.horizon), int(policy.n_obs_steps), int(policy.n_action_steps)  # type: ignore[attr-defined]
    if not (1 <= o <= h and 1 <= a <= h - o + 1):
        raise ValueError(f"{type(policy).__name__}: need 1 <= n_obs_steps <= horizon and "
                         f"1 <= n_action_steps <= horizon - n_obs_steps + 1; got horizon={h}, n_obs_steps={o}, "
                         f"n_action_steps={a}")
