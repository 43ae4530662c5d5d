"""Action divergence: how far each demonstrated action is from what a policy trained on the data does there.

Two ways to get that policy:

- **Cross-fitting** (no checkpoint needed; the default): the episodes are split into K folds at random; for each
  fold a small regressor (an MLP from the standardized state to the standardized action, 2 x 256 units, AdamW) is
  trained on the other folds' steps and scores the fold's steps. No episode is scored by a model that saw it, so
  an episode cannot lower its own score by being memorized. The regressor learns the conditional mean action: zero-
  mean noise, hesitations and shuffled actions all land far from it, consistent demonstrations close to it. The
  score is the mean over the episode's steps of the squared error averaged over action dimensions, in units of the
  store's action variance (1.0 = as far as an action is from the store's mean action).
- **Against a checkpoint** (``checkpoint=``): the trained chunk policy samples a chunk (fixed noise per query) at
  up to ``max_queries`` sampled steps, and the score is the squared difference between the actions it would
  execute there (``n_action_steps`` of them) and the demonstrated ones, in the policy's normalized action units.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from robolearn.audit.features import AuditData, fold_of_episodes
from robolearn.audit.signals import per_episode_mean, sample_rows


def _mlp(d_in: int, d_out: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, d_out))


def cross_fit(data: AuditData, *, folds: int = 5, steps: int = 1500, batch_size: int = 512, hidden: int = 256,
              lr: float = 2e-3, seed: int = 0, tick: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Per-episode cross-fitted action divergence. ``tick(n)`` after every ``n`` training steps."""
    E = data.n_episodes
    if E < 2:
        raise ValueError(f"cross-fitting needs at least 2 episodes; {data.path} holds {E} (pass checkpoint=)")
    folds = max(2, min(int(folds), E))
    fold = fold_of_episodes(E, folds, seed)
    row_fold = fold[data.episode]
    x = torch.from_numpy(data.state)
    y = torch.from_numpy(data.action)
    err = np.empty(data.n_steps, np.float64)
    train_loss = []
    gen = torch.Generator().manual_seed(seed)
    for k in range(folds):
        held = np.flatnonzero(row_fold == k)
        train_rows = np.flatnonzero(row_fold != k)
        # every episode weighs the same, however long: long wandering episodes must not set the conditional mean
        p = 1.0 / data.lengths[data.episode[train_rows]]
        probs = torch.from_numpy(p / p.sum())
        train_rows = torch.from_numpy(train_rows)
        torch.manual_seed(seed * 1000 + k)
        model = _mlp(x.shape[1], y.shape[1], hidden)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
        last = []
        for s in range(steps):
            pick = train_rows[torch.multinomial(probs, batch_size, replacement=True, generator=gen)]
            loss = ((model(x[pick]) - y[pick]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if s >= steps - 50:
                last.append(float(loss.detach()))
            if tick and (s + 1) % 50 == 0:
                tick(50)
        if tick and steps % 50:
            tick(steps % 50)
        train_loss.append(float(np.mean(last)) if last else float("nan"))
        with torch.inference_mode():
            for lo in range(0, len(held), 65536):
                r = torch.from_numpy(held[lo:lo + 65536])
                err[held[lo:lo + 65536]] = ((model(x[r]) - y[r]) ** 2).mean(dim=1).double().numpy()
    return {"per_episode": per_episode_mean(err, data.episode, E), "folds": folds,
            "fit_steps": steps, "train_loss": train_loss, "method": "cross_fit"}


def against_checkpoint(data: AuditData, store: Any, policy: Any, *, max_queries: int = 20_000, batch_size: int = 256,
                       seed: int = 0, tick: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Per-episode action divergence against a trained chunk policy (see the module docstring)."""
    from robolearn.data.schema import StoreError
    from robolearn.data.sequence import SequenceDataset

    missing = [k for k in [*policy.obs_keys, policy.action_key] if k not in store.schema]
    if missing:
        raise StoreError(f"the checkpoint {getattr(policy, 'checkpoint_path', '')} reads key {missing[0]!r}, which "
                         f"store {store.path} does not have (keys: {', '.join(store.schema)})")
    ds = SequenceDataset(store, horizon=policy.horizon, n_obs_steps=policy.n_obs_steps,
                         n_action_steps=policy.n_action_steps, obs_keys=policy.obs_keys, action_key=policy.action_key,
                         split="all")
    idx = ds.index
    current = idx.ep_start + idx.t0 + policy.n_obs_steps - 1   # the row each window acts at
    inside = (idx.t0 + policy.n_obs_steps - 1 >= 0) & (idx.t0 + policy.n_obs_steps - 1 < idx.ep_len)
    window_of_row = np.full(data.n_steps, -1, np.int64)
    window_of_row[current[inside]] = np.flatnonzero(inside)
    rows = sample_rows(data, max_queries, np.random.default_rng(seed))
    rows = rows[window_of_row[rows] >= 0]
    windows = window_of_row[rows]
    lo_t, hi_t = policy.n_obs_steps - 1, policy.n_obs_steps - 1 + policy.n_action_steps
    err = np.full(len(rows), np.nan)
    gen = torch.Generator().manual_seed(seed)
    for lo in range(0, len(windows), batch_size):
        w = windows[lo:lo + batch_size]
        batch = ds.get_batch(w)
        obs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch["obs"].items()}
        noise = torch.randn(policy.noise_shape(len(w)), generator=gen)
        chunk = policy.predict_action(obs, noise=noise)
        demo = torch.from_numpy(np.ascontiguousarray(batch["action"])).float()
        norm = policy.normalizer.normalize
        diff = norm(policy.action_key, chunk.float()) - norm(policy.action_key, demo)
        err[lo:lo + len(w)] = (diff[:, lo_t:hi_t] ** 2).mean(dim=(1, 2)).double().numpy()
        if tick:
            tick(len(w))
    return {"per_episode": per_episode_mean(err, data.episode[rows], data.n_episodes), "queries": int(len(rows)),
            "method": "checkpoint", "checkpoint": getattr(policy, "checkpoint_path", None)}
