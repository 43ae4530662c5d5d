"""Acceleration of trained policies at inference: kernel choice and backbone dtype.

This room may import ``robolearn.models`` and ``robolearn.policies``; what it provides wraps or switches a
trained policy and never edits its weights (only the lossy dtype cast a caller asks for). The models keep plain
modules -- what training runs -- and the choice of faster inference kernels lives here, behind public switches::

    from robolearn.accel import prepare_for_inference, use_kernels, set_inference_dtype

    policy = prepare_for_inference(load_policy(path))   # oneDNN kernels (ROBOLEARN_FAST_LINEAR=0: plain GEMM)
    use_kernels(policy, "stock")                        # PyTorch's own Conv1d/ConvTranspose1d/Linear
    set_inference_dtype(policy, "bf16")                 # bfloat16 backbone (lossy; for deployment)

See :mod:`robolearn.accel.kernels` for what each kernel set is and the measurements behind the defaults.
"""
from robolearn.accel.kernels import (
    KERNELS,
    default_kernels,
    kernels_in_use,
    onednn_available,
    onednn_linear,
    prepare_for_inference,
    set_inference_dtype,
    use_kernels,
)

__all__ = [
    "KERNELS",
    "default_kernels",
    "kernels_in_use",
    "onednn_available",
    "onednn_linear",
    "prepare_for_inference",
    "set_inference_dtype",
    "use_kernels",
]
