"""Denoiser backbones and observation encoders (torch only).

Every backbone has the same call: ``backbone(x: (B, T, A), t: (B,) float, cond, step=None) -> (B, T, A)``
(``step`` tells a call where it sits in a sampling run, see :class:`robolearn.policies.base.DenoiseStep`; plain
backbones ignore it), plus
``backbone.prepare(cond)`` that precomputes the observation-dependent part once per action chunk (pass its
result as ``cond`` at each denoising step).
"""
import importlib
from typing import Any

# Names load on first use (PEP 562): robolearn.models.presets (plain data) imports without torch.
_WHERE = {"ImageTrunk": "encoders", "ObsEncoder": "encoders", "SpatialSoftmax": "encoders", "crop_images": "encoders",
          "BRANCH_NAMES": "transformer", "DenoiserBlock": "transformer", "TransformerDenoiser": "transformer",
          "ConditionalUnet1D": "unet"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"robolearn.models.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'robolearn.models' has no attribute {name!r}")


__all__ = [
    "BRANCH_NAMES",
    "ConditionalUnet1D",
    "DenoiserBlock",
    "ImageTrunk",
    "ObsEncoder",
    "SpatialSoftmax",
    "TransformerDenoiser",
    "crop_images",
]
