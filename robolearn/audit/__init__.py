"""Data-quality audit of an episode store: per-episode scores, filtering rules and episode weights.

Belkhale et al. ("Data Quality in Imitation Learning", 2023) name two properties of a demonstration dataset that
decide how well it trains a policy: *action divergence* (how far the demonstrator's action is from what a policy
trained on the data does in that state) and *transition diversity* (how much the next state varies for similar
states and actions). The audit scores each episode on both, and on plain signals (length, idle steps, action
jerk, success, intervention share), without reading where an episode came from.

- :mod:`~robolearn.audit.features`: the store read into memory as normalized state, action and next-state arrays;
- :mod:`~robolearn.audit.signals`: the plain signals and transition diversity (numpy, scipy's k-d tree);
- :mod:`~robolearn.audit.divergence`: action divergence, cross-fitted (small regressors trained on K folds of the
  episodes, each scoring the episodes it did not see) or against a trained checkpoint;
- :mod:`~robolearn.audit.rules`: ``action_divergence>q90``-style rules, thresholds (numbers, quantiles, ``auto``),
  and score files (what ``data filter`` and ``training.episode_weights`` read);
- :mod:`~robolearn.audit.report`: the JSON lines, the one-page PNG/HTML report and replayed videos.

``robolearn data audit`` (robolearn/cli/audit.py) runs them in that order.
"""
from robolearn.audit.rules import Rule, parse_rule, read_scores, select_episodes, episode_weights

__all__ = ["Rule", "parse_rule", "read_scores", "select_episodes", "episode_weights"]
