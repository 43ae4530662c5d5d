"""The project's one mp4 writer: H.264 in yuv420p, so that browsers and slide decks play it.

yuv420p needs even sizes and H.264 encoders prefer multiples of 16; imageio would rescale (and warn) otherwise.
Frames are padded at the bottom/right with their edge pixels instead, so nothing is resampled.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import numpy as np

_BLOCK = 16


def _pad(frame: np.ndarray) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frame.dtype}")
    if frame.ndim == 2:
        frame = np.repeat(frame[:, :, None], 3, axis=2)
    if frame.ndim != 3 or frame.shape[2] not in (3, 4):
        raise ValueError(f"frames must be HxWx3 (or HxWx4 / HxW), got shape {frame.shape}")
    frame = frame[:, :, :3]
    h, w = frame.shape[:2]
    ph, pw = (-h) % _BLOCK, (-w) % _BLOCK
    if ph or pw:
        frame = np.pad(frame, ((0, ph), (0, pw), (0, 0)), mode="edge")
    return np.ascontiguousarray(frame)


def overlay(frame: np.ndarray, text: str, highlight: bool = False) -> np.ndarray:
    """``frame`` with ``text`` in a dark band along its top (green when ``highlight``: the task reports success).

    PIL's built-in bitmap font, so nothing is installed for it; frames narrower than 96 pixels (an 84x84 camera
    image) are returned as they are: the text would cover the scene."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[1] < 96:
        return frame
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(np.ascontiguousarray(frame[:, :, :3]))
    draw = ImageDraw.Draw(img, "RGBA")
    font = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((4, 3), text, font=font)
    draw.rectangle((0, 0, min(img.width, right + 4), bottom + 3), fill=(0, 0, 0, 150))
    draw.text((4, 3), text, fill=(90, 230, 90) if highlight else (255, 255, 255), font=font)
    return np.asarray(img)


def step_caption(step: int, reward: float | None, success: bool) -> str:
    """What the evaluation videos print on each frame."""
    text = f"step {step}" + (f"  reward {reward:.3f}" if reward is not None else "")
    return text + ("  SUCCESS" if success else "")


class VideoWriter:
    """``append(frame)`` RGB uint8 frames, then ``close()``; parent folders are created."""

    def __init__(self, path: str | os.PathLike, fps: float) -> None:
        import imageio.v2 as imageio

        path = os.fspath(path)
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self.count = 0
        self._w = imageio.get_writer(
            path, fps=float(fps), codec="libx264", pixelformat="yuv420p", macro_block_size=1, quality=8,
            ffmpeg_log_level="error",
        )

    def append(self, frame: np.ndarray) -> None:
        self._w.append_data(_pad(frame))
        self.count += 1

    def close(self) -> None:
        self._w.close()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_video(frames: Iterable[np.ndarray], path: str | os.PathLike, fps: float = 20) -> str:
    """Write RGB uint8 frames to an mp4 at ``path`` (parents created); returns the path."""
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise ValueError("write_video got no frames")
    with VideoWriter(path, fps) as writer:
        writer.append(first)
        for f in it:
            writer.append(f)
    return writer.path


def record_episode(
    env: Any,
    actor: Callable[[Any], np.ndarray] | Any,
    path: str | os.PathLike,
    seed: int | None = None,
    max_steps: int | None = None,
    fps: float | None = None,
    captions: bool = True,
) -> dict[str, Any]:
    """Roll out one episode from ``env.reset(seed=seed)``, render every state, write an mp4.

    ``actor`` is ``obs -> action``, or an object with ``reset(env)`` and ``act(obs)`` (a scripted expert, or
    :class:`robolearn.evaluation.rollout.PolicyActor`), reset after the environment. The video has ``steps + 1``
    frames (the initial state and one per step). ``fps`` defaults to ``env.unwrapped.fps`` (real time).
    ``captions``: each frame shows the step, the step's reward and whether the task reports success.
    Returns ``{"success", "steps", "path", "frames", "return"}``.
    """
    if hasattr(actor, "act") and hasattr(actor, "reset"):
        stateful, act = actor, actor.act
    else:
        stateful, act = None, actor
    base = getattr(env, "unwrapped", env)
    fps = fps or getattr(base, "fps", 20)
    limit = max_steps if max_steps is not None else getattr(base, "max_episode_steps", None)
    obs, info = env.reset(seed=seed)
    if stateful is not None:
        stateful.reset(env)
    success, steps, ret = bool(info.get("success", False)), 0, 0.0
    def frame(reward: float | None) -> np.ndarray:
        img = env.render()
        return overlay(img, step_caption(steps, reward, success), success) if captions else img

    with VideoWriter(path, fps) as writer:
        writer.append(frame(None))
        while limit is None or steps < limit:
            obs, reward, terminated, truncated, info = env.step(act(obs))
            steps += 1
            ret += float(reward)
            success = success or bool(info.get("success", False))
            writer.append(frame(float(reward)))
            if terminated or truncated:
                break
    return {"success": success, "steps": steps, "path": writer.path, "frames": writer.count, "return": round(ret, 4)}
