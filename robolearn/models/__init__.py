"""Denoiser backbones and observation encoders (torch only).

Every backbone has the same call: ``backbone(x: (B, T, A), t: (B,) float, cond, step=None) -> (B, T, A)``
(``step`` tells a call where it sits in a sampling run, see :class:`robolearn.policies.base.DenoiseStep`; plain
backbones ignore it), plus
``backbone.prepare(cond)`` that precomputes the observation-dependent part once per action chunk (pass its
result as ``cond`` at each denoising step).
"""
from robolearn.models.encoders import ImageTrunk, ObsEncoder, SpatialSoftmax, crop_images
from robolearn.models.transformer import BRANCH_NAMES, DenoiserBlock, TransformerDenoiser
from robolearn.models.unet import ConditionalUnet1D

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
