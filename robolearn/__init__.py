"""robolearn: chunk policies (diffusion, flow matching) learned from demonstrations and evaluated in MuJoCo.

Built: the episode store, MuJoCo tasks and scripted experts, diffusion and flow policies with one denoising loop,
the chunk executor and policy registry, repeatable evaluation, the real-time runner and policy server, teleop,
fast CPU inference kernels, residual RL fine-tuning (a wrapper kind). Coming, as wrappers on the registry: noise
steering, block caching.
See docs/ARCHITECTURE.md.
"""
__version__ = "0.2.0"
