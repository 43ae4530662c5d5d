"""Every kind of policy registers a type name: the two base families and any wrapper (a residual over a base, a
steered base, a cached base). A checkpoint folder names its kind (``version.json``: ``policy_type`` and the
``module`` that registers it), and :func:`robolearn.policies.load_policy` loads every kind the same way.

A registered class provides:

- ``policy_type`` (set by :func:`register_policy`);
- ``checkpoint_config() -> dict``: the plain config saved as ``config.yaml``'s ``policy`` section;
- ``checkpoint_state() -> dict[str, Tensor]``: the weights it owns (a wrapper leaves out its base's);
- ``from_checkpoint(config, *, normalizer, base) -> policy`` (classmethod): an untrained instance that the
  checkpoint's weights are then loaded into; ``base`` is the loaded base policy of a wrapper, else None;
- ``wraps_base: bool``: a wrapper's checkpoint names its base checkpoint; a base family's carries a normalizer.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, TypeVar

T = TypeVar("T")
_KINDS: dict[str, type] = {}


def register_policy(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make ``cls`` loadable as policy type ``name`` (and set ``cls.policy_type``)."""
    if not isinstance(name, str) or not name.replace("_", "").isalnum():
        raise ValueError(f"a policy type name is letters, digits and '_', got {name!r}")

    def deco(cls: type[T]) -> type[T]:
        old = _KINDS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"policy type {name!r} is already registered by {old.__module__}.{old.__qualname__}")
        cls.policy_type = name  # type: ignore[attr-defined]
        _KINDS[name] = cls
        return cls

    return deco


def registered_types() -> list[str]:
    _import_builtins()
    return sorted(_KINDS)


def policy_class(name: str, module: str | None = None) -> type:
    """The class registered as ``name``, importing ``module`` first when it is not registered yet (a checkpoint
    of a kind defined outside robolearn names the module that registers it)."""
    _import_builtins()
    if name not in _KINDS and module:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise KeyError(f"policy type {name!r} is registered by module {module!r}, which cannot be imported "
                           f"({e}); registered types: {sorted(_KINDS)}") from None
    if name not in _KINDS:
        raise KeyError(f"unknown policy type {name!r}; registered types: {sorted(_KINDS)}")
    return _KINDS[name]


def _import_builtins() -> None:
    """The base families register themselves on import."""
    import robolearn.policies.diffusion  # noqa: F401
    import robolearn.policies.flow  # noqa: F401
