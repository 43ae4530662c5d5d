"""Batch-1 DDIM-10 chunk latency of robolearn's transformer diffusion policy against Diffusion Policy's own
transformer code (``TransformerForDiffusion``, Chi et al.), same shapes, same process, alternating call by call.

Diffusion Policy's code is not part of robolearn: this script imports it from a checkout of
https://github.com/real-stanford/diffusion_policy (``--dp-repo``; a bare git mirror works too: the three files
the model needs are read out of it with ``git show``). Its model is built as in DP's
``train_diffusion_transformer_lowdim_workspace.yaml`` (8 layers, 4 heads, 256 wide, causal attention, time and
observations as condition tokens, MLP condition encoder) with robolearn's shapes (Push-T-like: 20-d state, 2
observation steps, 2-d actions, horizon 16), and sampled the way DP's ``conditional_sample`` does: diffusers'
``DDIMScheduler``, the model called once per step. robolearn's side is ``predict_action`` of the ``default``
transformer preset (9.4M) after ``robolearn.accel.prepare_for_inference`` (observation normalization and encoding
included), for each ``--rows`` entry ``KERNELS:DTYPE``: by default the inference path (``onednn``: the fused path of
``robolearn/accel/fast_transformer.py``) in float32, the models' own code (``stock``) in float32, and a bfloat16
backbone. Both run on random weights: speed does not
depend on them.

    python tools/bench/transformer_vs_dp.py --dp-repo /work/.mirror/real-stanford+diffusion_policy/repo \\
        --threads 2 --out tools/bench/results/transformer_vs_dp.json

Prints a table; last line JSON with ``ratio_float32`` (robolearn's ``onednn`` float32 median / DP's median, same
run) and every row.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

DP_FILES = ("diffusion_policy/model/diffusion/transformer_for_diffusion.py",
            "diffusion_policy/model/diffusion/positional_embedding.py",
            "diffusion_policy/model/common/module_attr_mixin.py")


def import_dp(repo: Path) -> Any:
    """DP's ``TransformerForDiffusion`` class from a checkout, or from a bare mirror via ``git show``."""
    if (repo / DP_FILES[0]).is_file():
        root = repo
    else:
        root = Path(tempfile.mkdtemp(prefix="dp_src_"))
        for f in DP_FILES:
            text = subprocess.run(["git", f"--git-dir={repo}", "show", f"HEAD:{f}"], check=True,
                                  capture_output=True, text=True).stdout
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            (root / f).write_text(text)
        for d in {Path(f).parent for f in DP_FILES} | {Path("diffusion_policy"), Path("diffusion_policy/model")}:
            (root / d / "__init__.py").touch()
    sys.path.insert(0, str(root))
    mod = importlib.import_module("diffusion_policy.model.diffusion.transformer_for_diffusion")
    return mod.TransformerForDiffusion


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dp-repo", type=Path, required=True, help="diffusion_policy checkout or bare git mirror")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="DDIM steps")
    p.add_argument("--rows", nargs="*", default=["onednn:float32", "stock:float32", "onednn:bfloat16"],
                   help="robolearn variants to time, KERNELS:DTYPE (robolearn.accel.use_kernels: onednn is the "
                        "inference default, stock the models' own code; set_inference_dtype); DP stays float32")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import DDIMScheduler

    from robolearn.accel import prepare_for_inference, set_inference_dtype, use_kernels
    from robolearn.cli.accel import time_alternately
    from robolearn.policies import make_policy

    TFD = import_dp(args.dp_repo)
    obs_dim, act_dim, horizon, n_obs = 20, 2, 16, 2
    torch.manual_seed(0)
    dp = TFD(input_dim=act_dim, output_dim=act_dim, horizon=horizon, n_obs_steps=n_obs, cond_dim=obs_dim,
             n_layer=8, n_head=4, n_emb=256, p_drop_emb=0.0, p_drop_attn=0.3, causal_attn=True,
             time_as_cond=True, obs_as_cond=True, n_cond_layers=0).eval()
    sched = DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                          set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon")
    sched.set_timesteps(args.steps)
    cond = torch.randn(1, n_obs, obs_dim)
    noise = torch.randn(1, horizon, act_dim)

    def dp_sample() -> torch.Tensor:
        with torch.inference_mode():
            x = noise.clone()
            for t in sched.timesteps:
                out = dp(x, t, cond)
                x = sched.step(out, t, x).prev_sample
            return x

    def s(d: int) -> dict[str, np.ndarray]:
        return {"min": -np.ones(d), "max": np.ones(d), "mean": np.zeros(d), "std": np.ones(d), "count": np.array(1.)}

    ours = make_policy({"type": "diffusion", "backbone": {"name": "transformer", "preset": "default"},
                        "horizon": horizon, "n_obs_steps": n_obs, "n_action_steps": 8, "obs": {"state": [obs_dim]},
                        "action_dim": act_dim, "sampler": {"kind": "ddim", "steps": args.steps}},
                       {"state": s(obs_dim), "action": s(act_dim)}).eval()
    prepare_for_inference(ours)
    obs = {"state": cond}
    rows = []
    for spec in args.rows:
        kernels, _, dtype = spec.partition(":")
        dtype = dtype or "float32"
        use_kernels(ours, kernels)
        set_inference_dtype(ours, dtype)
        times = time_alternately({"diffusion_policy": dp_sample,
                                  "robolearn": lambda: ours.predict_action(obs, noise)}, args.repeats, args.warmup)
        dp_ms, our_ms = statistics.median(times["diffusion_policy"]), statistics.median(times["robolearn"])
        rows.append({"robolearn_kernels": kernels, "robolearn_dtype": dtype, "robolearn_ms": round(our_ms, 2),
                     "diffusion_policy_ms": round(dp_ms, 2),
                     "ratio": round(our_ms / dp_ms, 3), "robolearn_min_ms": round(min(times["robolearn"]), 2),
                     "diffusion_policy_min_ms": round(min(times["diffusion_policy"]), 2)})
    n_dp = sum(p.numel() for p in dp.parameters()) / 1e6
    n_ours = sum(p.numel() for p in ours.parameters()) / 1e6
    result = {
        "bench": "transformer DDIM chunk latency, robolearn vs Diffusion Policy's TransformerForDiffusion",
        "steps": args.steps, "batch": 1,
        "params_m": {"robolearn": round(n_ours, 2), "diffusion_policy": round(n_dp, 2)},
        "rows": rows, "threads": torch.get_num_threads(), "repeats": args.repeats,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"DDIM-{args.steps}, batch 1, {torch.get_num_threads()} threads; parameters robolearn {n_ours:.2f}M, "
          f"Diffusion Policy {n_dp:.2f}M")
    print(f"{'robolearn kernels:dtype':<24} {'robolearn ms':>13} {'DP ms (fp32)':>13} {'ratio':>6}")
    for r in rows:
        print(f"{r['robolearn_kernels'] + ':' + r['robolearn_dtype']:<24} {r['robolearn_ms']:>13.1f} "
              f"{r['diffusion_policy_ms']:>13.1f} {r['ratio']:>6.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({"ratio_float32": next((r["ratio"] for r in rows if r["robolearn_dtype"] == "float32"
                                             and r["robolearn_kernels"] == "onednn"), None),
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
