"""``robolearn accel calibrate`` (a block-caching schedule as a ``cached`` checkpoint) and ``robolearn bench
latency`` (batch-1 ``predict_action`` time, cached against uncached in the same run); and ``cache=`` for the
commands that run a checkpoint (:func:`apply_cache`)."""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from omegaconf import DictConfig

from robolearn.cli import CLIError, print_json

CACHES = ("bac", "shared", "searched", "uniform", "none")
#: the methods that can schedule a warm start's steps alone (``warm_steps=``)
WINDOWED = ("bac", "shared", "uniform")


# ---------------------------------------------------------------------------------------------- helpers
def calibration_observations(policy: Any, ckpt: Path, n: int, batch: int, *, seed: int = 0,
                             dataset: str | None = None) -> list[dict[str, Any]]:
    """``n`` observation histories drawn from the checkpoint's training data (raw units), in batches."""
    import torch

    from robolearn.cli.runtime import checkpoint_run_config
    from robolearn.data.schema import StoreError
    from robolearn.data.sequence import SequenceDataset
    from robolearn.data.storeset import store_paths

    path = dataset or checkpoint_run_config(ckpt).get("dataset")  # a run on several stores names a list
    if not path:
        raise CLIError(f"{ckpt / 'config.yaml'} does not name the dataset it was trained on; give dataset=PATH")
    missing = next((p for p in store_paths(path) if not p.exists()), None)
    if missing is not None:
        raise CLIError(f"calibration dataset {missing} does not exist (the checkpoint's training data; give "
                       f"dataset=PATH to use another store of the same task)")
    try:
        ds = SequenceDataset(path, horizon=policy.horizon, n_obs_steps=policy.n_obs_steps,
                             n_action_steps=policy.n_action_steps, obs_keys=policy.obs_keys, split="all")
    except (StoreError, ValueError, KeyError) as e:
        raise CLIError(f"calibration dataset {path}: {e}") from None
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(ds), size=min(int(n), len(ds)), replace=False)
    out = []
    for s in range(0, len(idx), batch):
        obs = ds.get_batch(np.sort(idx[s:s + batch]))["obs"]
        out.append({k: torch.as_tensor(np.asarray(obs[k])) for k in policy.obs_keys})
    return out


def make_cached(policy: Any, ckpt: Path, method: str, *, updates: int | None = None, bubble: int = 4,
                metric: str = "cosine", observations: int = 256, batch: int = 32, seed: int = 0,
                dataset: str | None = None, progress: bool = True, step_weights: bool = False,
                warm_steps: int | None = None) -> tuple[Any, Any]:
    """A :class:`~robolearn.accel.cache.CachedPolicy` over ``policy`` with a ``method`` schedule for its current
    sampler (``bac`` and ``shared`` calibrate on the training data, ``searched`` tries every shared set of
    ``updates`` steps on it); returns it and the calibration (None unless bac or shared). ``step_weights``: bac
    and shared weigh each step's lost similarity by how much that step moves the chunk (``step_sensitivity``).
    ``warm_steps=W``: bac, shared and uniform schedule only the sampler's last ``W`` steps (a warm start's), with
    ``updates`` counted within them; every earlier step recomputes everything."""
    from robolearn.accel.cache import (CacheError, CachedPolicy, all_steps, backbone_calls, branch_keys, calibrate,
                                       default_updates, schedule_from_calibration, search_candidates,
                                       searched_schedule, uniform_schedule, warm_calls, warm_window)

    if method not in CACHES:
        raise CLIError(f"cache={method!r} is not one of {list(CACHES)}")
    if step_weights and method not in ("bac", "shared"):
        raise CLIError(f"step_weights=true weighs the calibrated schedulers (method=bac or shared), not "
                       f"method={method}")
    try:
        keys = branch_keys(getattr(policy, "backbone", None))
    except CacheError as e:
        raise CLIError(str(e)) from None
    sc = policy.sampler_config
    sampler, steps = str(sc["kind"]), int(sc["steps"])
    name = f"{sampler}-{steps}"
    total = backbone_calls(policy, sampler, steps)
    span = total
    if warm_steps is not None:
        if method not in WINDOWED:
            raise CLIError(f"warm_steps={warm_steps} schedules a warm start's steps with method=bac, shared or "
                           f"uniform, not method={method}")
        try:
            span = warm_calls(name, total, warm_steps)
        except CacheError as e:
            raise CLIError(str(e)) from None
        if getattr(policy, "policy_type", None) == "diffusion" and sampler != "ddim":
            raise CLIError(f"warm_steps={warm_steps}: a diffusion policy's warm start runs DDIM steps (ddim-{steps}), "
                           f"but this one samples with {name}; make the cache for it with robolearn accel calibrate "
                           f"checkpoint=<base> sampler=ddim steps={steps} warm_steps={warm_steps}")
    k = default_updates(span) if updates is None else int(updates)
    if not 1 <= k <= span:
        within = f"the {total} denoiser calls of {name}" if warm_steps is None else \
            f"the warm start's {span} denoiser calls (warm_steps={warm_steps})"
        raise CLIError(f"updates={k} must be between 1 and {within}")
    cal = None
    if method in ("bac", "shared"):
        obs = calibration_observations(policy, ckpt, observations, batch, seed=seed, dataset=dataset)
        bar = _bar(sum(int(next(iter(b.values())).shape[0]) for b in obs), f"calibrating {name}", progress)
        try:
            cal = calibrate(policy, obs, metric=metric, seed=seed, progress=bar.update, step_weights=step_weights)
        except CacheError as e:
            raise CLIError(str(e)) from None
        finally:
            bar.close()
        try:
            schedule = schedule_from_calibration(cal, method, k, bubble=bubble, warm_steps=warm_steps)
        except CacheError as e:
            raise CLIError(str(e)) from None
    elif method == "searched":
        try:
            n_sets = search_candidates(total, k, name)  # refuse a search too large before reading any data
        except CacheError as e:
            raise CLIError(str(e)) from None
        obs = calibration_observations(policy, ckpt, observations, batch, seed=seed, dataset=dataset)
        bar = _bar(n_sets, f"searching {n_sets} step sets of {name}", progress)
        try:
            schedule = searched_schedule(policy, obs, k, seed=seed, progress=bar.update)
        except CacheError as e:
            raise CLIError(str(e)) from None
        finally:
            bar.close()
    elif method == "uniform":
        schedule = uniform_schedule(keys, name, span, k)
        if warm_steps is not None:
            schedule = warm_window(schedule, total, warm_steps=int(warm_steps))
    else:
        schedule = all_steps(keys, name, total)
    try:
        return CachedPolicy(policy, schedule), cal
    except CacheError as e:
        raise CLIError(str(e)) from None


def _set_sampler(policy: Any, cfg: DictConfig) -> None:
    """``sampler=``/``steps=`` of the command, when given, as the policy's sampler."""
    if cfg.sampler is not None or cfg.steps is not None:
        try:
            policy.set_sampler(cfg.sampler, cfg.steps)
        except ValueError as e:
            raise CLIError(f"sampler: {e}") from None


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from robolearn.progress import progress_bar

    return progress_bar(total, desc=desc, unit="obs", disable=not enabled, leave=False)


def apply_cache(policy: Any, ckpt: Path, cache: str | None, updates: int | None = None,
                warm_steps: int | None = None) -> Any:
    """``cache=`` of eval/run/serve on a loaded checkpoint: None leaves it as it is; ``bac`` calibrates on the
    checkpoint's training data (a few seconds to a minute) and ``shared`` likewise, ``searched`` tries step sets
    on it, ``uniform`` and ``none`` need nothing. ``warm_steps`` (``run blend=warmstart``): bac, shared and uniform
    schedule the warm start's last ``warm_steps`` steps only (a schedule of all the steps would, at the default
    2 warm steps, update every branch at the last step and save nothing)."""
    if cache is None:
        return policy
    if getattr(policy, "policy_type", None) == "cached":
        raise CLIError(f"{ckpt} is already a cached checkpoint ({policy.schedule.method}); cache= applies to a "
                       f"base checkpoint")
    warm = warm_steps if str(cache) in WINDOWED else None
    cached, _ = make_cached(policy, ckpt, str(cache), updates=updates, progress=False, warm_steps=warm)
    sched = cached.schedule
    share = f"{sched.compute_fraction:.0%} of the branch computations" if warm is None else \
        f"{sched.info['warm_compute_fraction']:.0%} of the branch computations of the {warm}-step warm start"
    print(f"cache={cache}: {sched.method} schedule for {sched.sampler}, {share}")
    return cached


# ---------------------------------------------------------------------------------------------- calibrate
def calibrate_cmd(cfg: DictConfig) -> dict[str, Any]:
    from robolearn.cli.runtime import load_checkpoint
    from robolearn.policies import save_policy

    if not cfg.checkpoint:
        raise CLIError("checkpoint= is required (a transformer policy's checkpoint folder)")
    ckpt = Path(cfg.checkpoint)
    _check_counts(cfg)
    if cfg.method not in CACHES:
        raise CLIError(f"method={cfg.method!r} is not one of {list(CACHES)}")
    if cfg.metric not in ("cosine", "l1"):
        raise CLIError(f"metric={cfg.metric!r} is not one of ['cosine', 'l1']")
    policy = load_checkpoint(ckpt)
    if getattr(policy, "wraps_base", False):
        raise CLIError(f"{ckpt} is a {policy.policy_type!r} checkpoint; calibrate its base (a diffusion or flow "
                       f"transformer checkpoint)")
    _set_sampler(policy, cfg)
    t0 = time.perf_counter()
    cached, cal = make_cached(policy, ckpt, str(cfg.method), updates=cfg.updates, bubble=int(cfg.bubble),
                              metric=str(cfg.metric), observations=int(cfg.observations), batch=int(cfg.batch),
                              seed=int(cfg.seed), dataset=cfg.dataset, progress=bool(cfg.progress),
                              step_weights=bool(cfg.step_weights), warm_steps=cfg.warm_steps)
    sched = cached.schedule
    warm = sched.info.get("warm_steps")
    out = Path(cfg.out) if cfg.out else ckpt.parent / (f"{ckpt.name}-{sched.method}-{sched.sampler}-k{_k(sched)}"
                                                       + (f"-w{warm}" if warm else ""))

    def extra(tmp: Path) -> None:
        if cal is not None:
            np.savez_compressed(tmp / "similarity.npz", **{k: v.astype(np.float32) for k, v in cal.similarity.items()})
        if cfg.plot:
            plot_schedule(sched, cal, tmp / "schedule.png")

    save_policy(cached, out, config={"calibrated_from": str(ckpt), "method": sched.method}, write_extra=extra)
    errors = sched.info.get("error") or {}
    summary = {
        "checkpoint": str(out), "base": str(ckpt), "method": sched.method, "sampler": sched.sampler,
        "steps": sched.total, "updates": _k(sched), "compute_fraction": round(sched.compute_fraction, 4),
        "warm_steps": warm, "warm_compute_fraction": sched.info.get("warm_compute_fraction"),
        "bubbled": sched.info.get("bubbled", []), "metric": cfg.metric if cal is not None else None,
        "step_weights": sched.info.get("step_weights"),
        "observations": cal.observations if cal is not None else int(sched.info.get("observations", 0)),
        "mean_caching_error": round(float(np.mean(list(errors.values()))), 6) if errors else None,
        "action_rel_error": sched.info.get("action_rel_error"),  # searched: its chunks' error on the observations
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    share = f"{summary['compute_fraction']:.0%} of the branch computations" if not warm else \
        f"{summary['warm_compute_fraction']:.0%} of a {warm}-step warm start's branch computations"
    print(f"{sched.method} schedule for {sched.sampler}: {share} -> {out}"
          + (f" (plot: {out / 'schedule.png'})" if cfg.plot else ""))
    print_json(summary)
    return summary


def _k(sched: Any) -> int:
    return int(sched.info.get("updates", min(len(v) for v in sched.updates.values())))


def _check_counts(cfg: DictConfig) -> None:
    for key in ("observations", "batch"):
        if int(cfg[key]) < 1:
            raise CLIError(f"{key} must be >= 1, got {cfg[key]}")
    if int(cfg.bubble) < 0:
        raise CLIError(f"bubble must be >= 0, got {cfg.bubble}")
    if cfg.updates is not None and int(cfg.updates) < 1:
        raise CLIError(f"updates must be >= 1, got {cfg.updates}")


def plot_schedule(sched: Any, cal: Any, path: Path) -> None:
    """Update steps of every branch (one row each); with a calibration, each branch's similarity to the step
    before it and, beside it, the similarity matrices of the three branches with the largest caching error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(sched.updates)
    mask = sched.update_mask(keys)
    ncols = 4 if cal is not None else 1
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols + 2, max(3.5, 0.22 * len(keys) + 1.5)),
                             squeeze=False)
    ax = axes[0, 0]
    ax.imshow(mask, aspect="auto", cmap="Greys", interpolation="nearest")
    ax.set_yticks(range(len(keys)), keys, fontsize=6)
    ax.set_xlabel(f"denoising step ({sched.sampler})")
    ax.set_title(f"{sched.method}: update steps (black), {sched.compute_fraction:.0%} computed", fontsize=9)
    if cal is not None:
        errors = sched.info.get("error") or {}
        worst = sorted(errors, key=lambda k: -errors[k])[:3]
        for a, k in zip(axes[0, 1:], worst):
            im = a.imshow(cal.similarity[k], cmap="viridis", interpolation="nearest")
            ups = sched.updates[k]
            a.scatter(ups, ups, s=6, c="red", marker="s")
            a.set_title(f"{k}: {cal.metric} similarity\n(red: update steps; error {errors[k]:.4f})", fontsize=9)
            a.set_xlabel("step j (stood in for)")
            a.set_ylabel("step i (cached)")
            fig.colorbar(im, ax=a, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- bench latency
def latency_cmd(cfg: DictConfig) -> dict[str, Any]:
    import torch

    from robolearn.cli.runtime import load_checkpoint

    if not cfg.checkpoint:
        raise CLIError("checkpoint= is required (a checkpoint folder: a base or a cached one)")
    for key in ("repeats", "observations"):
        if int(cfg[key]) < 1:
            raise CLIError(f"{key} must be >= 1, got {cfg[key]}")
    if int(cfg.warmup) < 0:
        raise CLIError(f"warmup must be >= 0, got {cfg.warmup}")
    if cfg.threads is not None:
        if int(cfg.threads) < 1:
            raise CLIError(f"threads must be >= 1, got {cfg.threads}")
        torch.set_num_threads(int(cfg.threads))
    ckpt = Path(cfg.checkpoint)
    from robolearn.cli.runtime import apply_inference, check_inference_options

    check_inference_options(cfg.dtype)
    loaded = load_checkpoint(ckpt)
    if getattr(loaded, "policy_type", None) == "cached":
        if cfg.cache is not None:
            raise CLIError(f"{ckpt} is already a cached checkpoint; cache= applies to a base checkpoint")
        _set_sampler(loaded, cfg)
        cached, base = loaded, loaded.base
    else:
        base = loaded
        if getattr(base, "wraps_base", False):
            raise CLIError(f"{ckpt} is a {base.policy_type!r} checkpoint; bench latency times a base or a cached one")
        _set_sampler(base, cfg)
        method = str(cfg.cache or "bac")  # with warm_steps=, bac/shared/uniform are scheduled for the warm start
        cached, _ = make_cached(base, ckpt, method, updates=cfg.updates, progress=bool(cfg.progress),
                                warm_steps=cfg.warm_steps if method in WINDOWED else None)
    apply_inference(base, ckpt, str(cfg.dtype))  # both share the base's backbone
    obs = calibration_observations(base, ckpt, int(cfg.observations), 1, seed=int(cfg.seed) + 1,
                                   dataset=cfg.dataset)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    noises = [torch.randn(base.noise_shape(1), generator=gen) for _ in obs]
    warm = cfg.warm_steps
    if warm is not None:
        if not callable(getattr(base, "predict_action_warm", None)):
            raise CLIError(f"{type(base).__name__} has no warm start (predict_action_warm)")
        from robolearn.runtime.runner import warm_start_steps

        try:
            warm = warm_start_steps(base, warm)
        except ValueError as e:
            raise CLIError(str(e)) from None
        # RTI-DP as the runner does it: the previous chunk (here: a chunk for another noise), shifted by the
        # executed actions, noised to the level of the last ``warm`` steps of the configured DDIM schedule
        prev = [base.predict_action(o, torch.randn(base.noise_shape(1), generator=gen)) for o in obs]

    def sample(pol: Any, i: int) -> Any:
        if warm is None:
            return pol.predict_action(obs[i], noises[i])
        return pol.predict_action_warm(obs[i], prev[i], int(base.n_action_steps), int(warm), noises[i])

    from robolearn.accel.cache import CachedPolicy, CacheError, all_steps, branch_keys, relative_error

    errs = []  # accuracy: the same observations and initial noise through both
    try:
        for i in range(len(obs)):
            a, c = sample(base, i), sample(cached, i)
            errs.append(float(relative_error(c, a).mean()))
    except CacheError as e:
        raise CLIError(str(e)) from None
    memo = CachedPolicy(base, all_steps(branch_keys(base.backbone), cached.schedule.sampler, cached.schedule.total))
    cached.denoiser.reset_counts()
    times = time_alternately({name: (lambda p=pol: sample(p, 0)) for name, pol in
                              (("uncached", base), ("cached", cached), ("memo_only", memo))},
                             int(cfg.repeats), int(cfg.warmup))
    unc, cac = statistics.median(times["uncached"]), statistics.median(times["cached"])
    mem = statistics.median(times["memo_only"])
    sched = cached.schedule
    summary = {
        "checkpoint": str(ckpt), "cache": sched.method, "sampler": sched.sampler, "steps": sched.total,
        "warm_steps": None if warm is None else int(warm), "dtype": str(cfg.dtype),
        "compute_fraction": round(sched.compute_fraction, 4),
        "measured_compute_fraction": round(cached.denoiser.computed / max(1, cached.denoiser.calls), 4),
        "latency_ms_uncached": round(unc, 3), "latency_ms_cached": round(cac, 3),
        "latency_ms_memo_only": round(mem, 3), "speedup_memo_only": round(unc / mem, 3) if mem > 0 else math.inf,
        "speedup": round(unc / cac, 3) if cac > 0 else math.inf,
        "action_rel_error": round(statistics.mean(errs), 6), "action_rel_error_max": round(max(errs), 6),
        "repeats": int(cfg.repeats), "threads": torch.get_num_threads(), "observations": len(obs),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"{'':<10} {'chunk (median)':>15}")
    print(f"{'uncached':<10} {unc:>12.2f} ms")
    print(f"{'memo only':<10} {mem:>12.2f} ms   (every step computed; only the timestep conditioning kept)")
    print(f"{'cached':<10} {cac:>12.2f} ms   ({sched.method}, {sched.sampler}, "
          f"{sched.compute_fraction:.0%} of branch computations)")
    print(f"speedup {summary['speedup']:.2f}x, relative action error {summary['action_rel_error']:.2e} "
          f"(mean over {len(obs)} observations)")
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=1))
    print_json(summary)
    return summary


def time_alternately(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds per call of each of ``fns``, alternating call by call (so a change in the machine's load falls
    on all of them), after ``warmup`` untimed rounds. What ``bench latency`` and the latency benchmarks under
    ``tools/bench/`` time with."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[name].append((time.perf_counter() - t0) * 1000)
    return out
