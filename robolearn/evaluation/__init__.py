"""Evaluation of any chunk policy in any environment factory: success, returns, per-episode results, videos.

``evaluate(policy, envs, seeds)`` is what ``robolearn train`` and ``robolearn eval`` both call; the project's one
video writer lives here too. This room never imports ``sim``: callers hand it environments.
"""
from robolearn.evaluation.rollout import PolicyActor, as_vector_env, evaluate, record_video, step_info, summarize
from robolearn.evaluation.video import VideoWriter, record_episode, write_video

__all__ = ["PolicyActor", "VideoWriter", "as_vector_env", "evaluate", "record_episode", "record_video", "step_info",
           "summarize", "write_video"]
