"""The denoiser call captured as a CUDA graph: the GPU path of batch-1 sampling.

At batch 1 a GPU spends most of a denoiser call launching kernels (hundreds per call for the U-Net and the
transformer), not computing them. :class:`GraphedDenoiser` records one call of the backbone into a
``torch.cuda.CUDAGraph`` per input signature (shapes and dtypes of the noisy chunk, the timestep and the per-chunk
condition) and afterwards only copies the inputs into the graph's static buffers and replays it. It plugs into
the one denoising loop as ``denoiser=`` (:meth:`robolearn.policies.ChunkPolicy.predict_action`), so every sampler
and the warm start use it unchanged; the sampler's own arithmetic between calls stays eager.

    from robolearn.accel import graphed
    policy = graphed(load_policy(path, map_location="cuda"), dtype="bf16")   # a GraphedPolicy
    chunk = policy.predict_action(obs, noise)

Status: per-call graphs ran on an NVIDIA H100 (2026-12-05, ``tools/gpu/run_all.sh``; JSON in
``tools/bench/results/gpu_graph_latency_h100.json``), matching the same weights on the CPU to 7e-7 (float32, TF32
off) and 7e-3 to 9e-3 (bfloat16): the 64M U-Net's DDIM-10 chunk at batch 1 took 36.5 ms eager, 10.9 ms graphed in
float32 and 8.7 ms in bfloat16; the 9M transformer's 33.3 / 7.7 / 6.7 ms. ``whole=True`` (one graph for the
whole chunk, :class:`GraphedPolicy`) is written for the next lent GPU and has not run on one.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from robolearn.accel.cache import DenoiserRoute


class GraphError(RuntimeError):
    """CUDA graphs cannot be used here (no CUDA device, or a policy not on one)."""


def flatten_tensors(obj: Any) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], Any]]:
    """The tensors inside ``obj`` (a tensor, list/tuple, or dataclass of them; None passes through) in a fixed
    order, and a function that rebuilds an ``obj`` of the same structure from such a list."""
    if obj is None:
        return [], lambda flat: None
    if torch.is_tensor(obj):
        return [obj], lambda flat: flat[0]
    if isinstance(obj, (list, tuple)):
        parts = [flatten_tensors(o) for o in obj]
        sizes = [len(p[0]) for p in parts]
        kind = type(obj)

        def rebuild_seq(flat: list[torch.Tensor]) -> Any:
            out, i = [], 0
            for (_, fn), n in zip(parts, sizes):
                out.append(fn(flat[i:i + n]))
                i += n
            return kind(out) if kind in (list, tuple) else kind(*out)

        return [t for p in parts for t in p[0]], rebuild_seq
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = [f.name for f in dataclasses.fields(obj)]
        parts = [flatten_tensors(getattr(obj, n)) for n in names]
        sizes = [len(p[0]) for p in parts]
        cls = type(obj)

        def rebuild_dc(flat: list[torch.Tensor]) -> Any:
            vals, i = {}, 0
            for name, (_, fn), n in zip(names, parts, sizes):
                vals[name] = fn(flat[i:i + n])
                i += n
            return cls(**vals)

        return [t for p in parts for t in p[0]], rebuild_dc
    raise TypeError(f"cannot capture a denoiser input of type {type(obj).__name__} (tensors, lists, tuples and "
                    f"dataclasses of them only)")


class WeightsWatch:
    """What a captured graph depends on besides its inputs: where a module's first and last weights live and their
    dtype (``.to()`` and ``set_inference_dtype`` give every weight new storage; the Parameter objects stay), and
    the module's class. A graph captured under another :meth:`key` reads memory the module no longer uses, so it
    is captured again: :meth:`changed` says so once per change. Under a microsecond: it runs before every replay."""

    def __init__(self, module: torch.nn.Module) -> None:
        params = list(module.parameters())
        self.module = module
        self.ends = [params[0], params[-1]] if params else []
        self._seen = self.key()

    def key(self) -> tuple:
        return type(self.module), tuple((p.data_ptr(), p.dtype) for p in self.ends)

    def changed(self) -> bool:
        """Whether the weights moved, were cast or switched since the last call (or since the watch began)."""
        now = self.key()
        if now == self._seen:
            return False
        self._seen = now
        return True


class GraphedDenoiser:
    """Calls ``backbone`` through one CUDA graph per input signature (see the module docstring).

    ``warmup``: eager calls on a side stream before capturing (cuBLAS/cuDNN pick their kernels there).
    Graphs are kept per signature: a new batch size or dtype captures a new one (a few hundred ms).
    """

    def __init__(self, backbone: torch.nn.Module, warmup: int = 3) -> None:
        dev = next(backbone.parameters()).device
        if dev.type != "cuda":
            raise GraphError(f"CUDA graphs need the policy on a CUDA device; its backbone is on {dev} "
                             f"(load it with map_location='cuda', or leave graph capture off on a CPU)")
        if not torch.cuda.is_available():  # pragma: no cover - a cuda tensor implies it
            raise GraphError("CUDA is not available")
        self.backbone, self.warmup = backbone, int(warmup)
        self._graphs: dict[tuple, tuple] = {}
        self.captures = 0
        self._watch = WeightsWatch(backbone)

    def prepare(self, cond: Any) -> Any:
        return self.backbone.prepare(cond)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any, step: Any = None) -> torch.Tensor:
        if self._watch.changed():  # moved, cast or switched since capture: the graphs read the old weights
            self._graphs.clear()
        flat, rebuild = flatten_tensors(cond)
        key = (tuple(x.shape), x.dtype, tuple(t.shape), t.dtype,
               tuple((tuple(f.shape), f.dtype) for f in flat))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(x, t, flat, rebuild)
        graph, sx, st, sflat, out = entry
        sx.copy_(x)
        st.copy_(t)
        for s, f in zip(sflat, flat):
            s.copy_(f)
        graph.replay()
        return out.clone()

    def _capture(self, x: torch.Tensor, t: torch.Tensor, flat: list[torch.Tensor],
                 rebuild: Callable[[list[torch.Tensor]], Any]) -> tuple:
        sx, st = x.clone(), t.clone()
        sflat = [f.clone() for f in flat]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.backbone(sx, st, rebuild(sflat))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.backbone(sx, st, rebuild(sflat))
        self.captures += 1
        return graph, sx, st, sflat, out


class GraphedPolicy(DenoiserRoute):
    """A chunk policy sampled through CUDA graphs; otherwise the policy itself (attributes pass through).
    ``dtype``: cast the backbone first (``"bf16"``: robolearn.accel.set_inference_dtype).

    ``whole=True`` (off by default: written, and not yet run on a GPU): a deterministic sampler (DDIM, Euler,
    midpoint) runs the whole chunk --
    observation encoding, every denoiser call and the sampler's arithmetic between them -- as one graph per
    (sampler, observation and noise shapes), so a chunk is one replay and no per-step launches from Python. A
    stochastic sampler (DDPM, whose per-step noise comes from the caller's generators) and the warm start replay
    one graph per denoiser call instead (``whole=False``, the default, does that always: measured on an H100,
    ``tools/bench/results/gpu_graph_latency_h100.json``). If a whole-loop capture fails, the policy falls back
    to per-call graphs for that signature and keeps the reason in ``whole_loop_errors``.
    """

    def __init__(self, policy: Any, dtype: str = "float32", warmup: int = 3, whole: bool = False) -> None:
        from robolearn.accel.kernels import _backbone_owner, set_inference_dtype

        owner = _backbone_owner(policy)
        if owner is None:
            raise GraphError(f"{type(policy).__name__} has no denoiser backbone to capture")
        if owner is not policy:
            raise GraphError(f"graph capture wraps a base chunk policy, not a {type(policy).__name__} wrapper")
        self.denoiser = GraphedDenoiser(policy.backbone, warmup)  # refuses a policy off the GPU before any cast
        set_inference_dtype(policy, dtype)
        self.policy = policy
        self.whole, self.warmup = bool(whole), int(warmup)
        self._watch = WeightsWatch(policy.backbone)
        self._loops: dict[tuple, Any] = {}
        self.loop_captures = 0
        self.whole_loop_errors: dict[str, str] = {}

    def predict_action(self, obs_history: Any, noise: torch.Tensor | None = None, *, sampler: str | None = None,
                       steps: int | None = None, generator: torch.Generator | None = None,
                       **kwargs: Any) -> torch.Tensor:
        pol = self.policy
        kind = pol.cfg.sampler.kind if sampler is None else sampler
        n = pol.cfg.sampler.steps if steps is None else int(steps)
        if not self.whole or kwargs or kind in pol.stochastic_samplers:
            return pol.predict_action(obs_history, noise, sampler=kind, steps=n, generator=generator,
                                      denoiser=self.denoiser, **kwargs)
        pol.cfg.check_sampler(kind, n)
        missing = [k for k in pol.obs_keys if k not in obs_history]
        if missing:
            raise KeyError(f"observation is missing keys {missing}; the policy needs {pol.obs_keys}")
        obs = {k: pol._to_device(obs_history[k]) for k in pol.obs_keys}
        if self._watch.changed():  # moved, cast or switched since capture
            self._loops.clear()
        noise, _ = pol._check_noise(noise, int(next(iter(obs.values())).shape[0]), generator)
        key = (kind, n, tuple((k, tuple(v.shape), v.dtype) for k, v in obs.items()))
        entry = self._loops.get(key)
        if entry is None:
            with torch.inference_mode():
                pol.normalize_obs(obs)  # a wrong shape is the caller's error, raised, not recorded as a capture failure
            entry = self._loops[key] = self._capture_loop(kind, n, obs, noise)
        if entry is False:  # capture failed for this signature: per-call graphs
            return pol.predict_action(obs, noise, sampler=kind, steps=n, denoiser=self.denoiser)
        graph, s_obs, s_noise, out = entry
        for k, v in obs.items():
            s_obs[k].copy_(v)
        s_noise.copy_(noise)
        graph.replay()
        return out.clone()

    def _capture_loop(self, kind: str, n: int, obs: dict[str, torch.Tensor], noise: torch.Tensor) -> Any:
        pol = self.policy
        with torch.inference_mode(False):  # normal tensors: later calls may copy into them outside inference mode
            s_obs = {k: v.clone() for k, v in obs.items()}
            s_noise = noise.clone()
        caller = torch.cuda.current_stream()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(caller)
            with torch.cuda.stream(side):
                for _ in range(max(1, self.warmup)):
                    pol.predict_action(s_obs, s_noise, sampler=kind, steps=n)
            caller.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = pol.predict_action(s_obs, s_noise, sampler=kind, steps=n)
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to per-call graphs
            torch.cuda.set_stream(caller)  # a failed capture can leave its capture stream current
            torch.cuda.synchronize()
            self.whole_loop_errors[f"{kind}-{n}"] = f"{type(e).__name__}: {e}"
            return False
        self.loop_captures += 1
        return graph, s_obs, s_noise, out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["policy"], name)

    @property
    def sampling_policy(self) -> Any:
        return self.policy


def graphed(policy: Any, dtype: str = "float32", warmup: int = 3, whole: bool = False) -> GraphedPolicy:
    """``policy`` (on a CUDA device) sampled through CUDA graphs: each denoiser call, or with ``whole=True`` the
    whole chunk as one graph for a deterministic sampler; see :class:`GraphedPolicy`."""
    return GraphedPolicy(policy, dtype=dtype, warmup=warmup, whole=whole)
