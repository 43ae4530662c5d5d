"""MuJoCo tasks, the robosuite adapter, scripted experts and vectorized environments.

``robolearn`` never imports this package: the CLI hands learning code an environment factory.
"""
from sim.registry import available_tasks, make, make_expert, register

__all__ = ["available_tasks", "make", "make_expert", "register"]
