"""Acceleration of trained policies at inference: kernel choice, backbone dtype, block-wise adaptive caching (BAC)
and CUDA-graph sampling.

This room may import ``robolearn.models`` and ``robolearn.policies``; what it provides wraps or switches a
trained policy and never edits its weights (only the lossy dtype cast a caller asks for). The models keep plain
modules -- what training runs -- and the choice of faster inference kernels lives here, behind public switches::

    from robolearn.accel import prepare_for_inference, use_kernels, set_inference_dtype

    policy = prepare_for_inference(load_policy(path))   # oneDNN kernels (ROBOLEARN_FAST_LINEAR=0: plain GEMM)
    use_kernels(policy, "stock")                        # PyTorch's own Conv1d/ConvTranspose1d/Linear
    set_inference_dtype(policy, "bf16")                 # bfloat16 backbone (lossy; for deployment)

    cached = CachedPolicy(policy, schedule)             # block caching (robolearn/accel/cache.py)
    fast = graphed(policy_on_cuda, dtype="bf16")        # denoiser calls replayed as CUDA graphs (graph.py)

See :mod:`robolearn.accel.kernels` for what each kernel set is and the measurements behind the defaults, and
:mod:`robolearn.accel.cache` for BAC (``robolearn accel calibrate``).
"""
from robolearn.accel.cache import (
    CacheError,
    CacheSchedule,
    CachedPolicy,
    calibrate,
    schedule_from_calibration,
    warm_window,
)
from robolearn.accel.graph import GraphError, GraphedPolicy, graphed
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
    "CacheError",
    "CacheSchedule",
    "CachedPolicy",
    "GraphError",
    "GraphedPolicy",
    "calibrate",
    "graphed",
    "schedule_from_calibration",
    "warm_window",
    "KERNELS",
    "default_kernels",
    "kernels_in_use",
    "onednn_available",
    "onednn_linear",
    "prepare_for_inference",
    "set_inference_dtype",
    "use_kernels",
]
