"""The project's own MuJoCo tasks (``push_t``, ``peg_insert``); made through ``sim.make``, imported lazily.

``MUJOCO_GL`` is set here, before any task module imports mujoco: mujoco picks its OpenGL backend at import,
and EGL renders headless with no extra packages.
"""
import os

os.environ.setdefault("MUJOCO_GL", "egl")
