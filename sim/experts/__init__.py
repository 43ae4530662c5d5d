"""Scripted experts: ``Expert(noise=..., seed=...)``, ``expert.reset(env)``, ``expert.act(obs) -> action``.

Made through ``sim.make_expert(task, ...)``; nothing heavy is imported here so that listing experts stays cheap.
"""
