"""The ``robolearn`` command: the one place that wires the rooms together.

Two styles of argument, each where it fits:

- ``robolearn data ...`` and other file utilities take ordinary flags (``--json``, ``--episodes 3,5``);
- jobs with many settings (``collect``, ``bench env``, later ``train``/``eval``) take hydra overrides
  (``task=push_t episodes=50 expert.noise=0.1``), validated against dataclass-backed configs in ``robolearn/configs/``.

Every command that computes a result prints a one-line JSON summary as its last line of standard output.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from robolearn import __version__

EPILOG = """\
examples:
  robolearn quickstart
  robolearn collect task=push_t episodes=50 out=data/push_t.zarr
  robolearn train task=push_t policy=diffusion_unet
  robolearn train task=can policy=flow_unet --cfg job        # show the composed config, run nothing
  robolearn eval checkpoint=runs/train/<run>/checkpoints/latest episodes=50
  robolearn data info data/push_t.zarr
  robolearn data validate data/push_t.zarr
  robolearn data drop data/push_t.zarr --episodes 3,5
  robolearn data merge data/a.zarr data/b.zarr --out data/ab.zarr
  robolearn bench env task=push_t
  robolearn accel calibrate checkpoint=runs/train/<run>/checkpoints/latest
  robolearn bench latency checkpoint=runs/train/<run>/checkpoints/latest cache=bac
  robolearn teleop task=push_t device=keyboard out=data/push_t_teleop.zarr

Run 'robolearn COMMAND --help' for a command's options.
"""


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse, plus the nearest command when one is mistyped (``robolearn trian`` -> did you mean 'train'?)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        import difflib
        import re

        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = re.findall(r"'([^']*)'", m.group(2))
            close = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.6)
            message = (f"unknown command {m.group(1)!r}" + (f": did you mean {close[0]!r}?" if close else "")
                       + f" (commands: {', '.join(choices)})")
        return super().error(message)

    def format_help(self) -> str:
        # Help text that needs heavy imports (the policy keys need the models, hence torch) is built only when
        # --help is asked for, so `robolearn data info` does not pay for it.
        lazy = getattr(self, "lazy_epilog", None)
        if lazy is not None:
            self.epilog = (self.epilog or "") + lazy()
            self.lazy_epilog = None
        return super().format_help()


def print_json(summary: dict[str, Any]) -> None:
    """The last line of every command that computes something: one JSON object."""
    print(json.dumps(summary, default=_json_default), flush=True)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON-serializable")


# ---------------------------------------------------------------------------------------------- data
def _parse_episode_list(text: str) -> list[int]:
    """``"3,5,10-12"`` -> ``[3, 5, 10, 11, 12]``."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, "")
                if int(a) > int(b):
                    raise CLIError(f"--episodes: range {part!r} runs backwards (write {b}-{a})")
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise CLIError(f"--episodes: {part!r} is not an episode index or a range like 10-12") from None
    if not out:
        raise CLIError("--episodes: no episode given (example: --episodes 3,5,10-12)")
    return out


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def _print_leftovers(path: Path) -> list[str]:
    """What killed drops and merges left beside a store: stale copies are removed, backups described."""
    from robolearn.data.store import clean_leftovers

    notes = clean_leftovers(path)
    for note in notes:
        print(f"note: {note}")
    return notes


def cmd_data_info(args: argparse.Namespace) -> None:
    from robolearn.data import EpisodeStore, source_lines, store_sources

    _print_leftovers(args.path)
    store = EpisodeStore.open(args.path, validate=False)
    sources = store_sources(store)  # attributes only, no data read
    lengths = store.episode_lengths
    size = store.size_bytes()
    keys = {k: {"shape": list(s.shape), "dtype": s.dtype, "role": s.role} for k, s in store.schema.items()}
    summary = {
        "path": str(store.path),
        "zarr_format": store.zarr_format,
        "written_by": "robolearn" if store.is_robolearn else "other (schema inferred)",
        "episodes": store.n_episodes,
        "steps": store.n_steps,
        "episode_length": (
            {"min": int(lengths.min()), "mean": round(float(lengths.mean()), 2), "max": int(lengths.max())}
            if len(lengths) else None
        ),
        "fps": store.fps,
        "task": store.task,
        "size_bytes": size,
        "keys": keys,
        "env_config": store.env_config,
        "sources": sources,
    }
    print(f"store     {store.path}  (zarr format {store.zarr_format}, written by {summary['written_by']})")
    print(f"task      {store.task or 'unknown'}    fps {store.fps if store.fps is not None else 'unknown'}")
    el = summary["episode_length"]
    span = f"    length min/mean/max {el['min']}/{el['mean']}/{el['max']}" if el else ""
    print(f"episodes  {store.n_episodes:,}    steps {store.n_steps:,}{span}")
    print(f"size      {_human_bytes(size)} on disk")
    for line in source_lines(sources):
        print(line)
    print("keys")
    width = max([len(k) for k in keys] + [4])
    for k, s in store.schema.items():
        kind = "image" if s.is_image else ""
        print(f"  {k:<{width}}  {s.dtype:<8} {str(s.shape):<14} {s.role:<7} {kind}".rstrip())
    store.check_chunks()  # cheap (no data read): a missing chunk file must not pass for zeros
    if args.json:
        print_json(summary)


def cmd_data_validate(args: argparse.Namespace) -> None:
    from robolearn.data import EpisodeStore

    notes = _print_leftovers(args.path)
    store = EpisodeStore.open(args.path, validate=False)
    report = store.validate(check_values=True, read_all=True)  # every chunk decoded, not only looked for
    report["notes"] = notes
    extra = ""
    if report["uncommitted_rows"] or report["uncommitted_episode_ends"]:
        extra = (
            f" (plus rows of an unfinished episode, ignored by readers and trimmed on the next append: "
            f"{report['uncommitted_rows'] or report['uncommitted_episode_ends']})"
        )
    print(f"OK: {store.path} holds {report['episodes']:,} valid episodes, {report['steps']:,} steps{extra}")
    print_json(report)


def cmd_data_drop(args: argparse.Namespace) -> None:
    from robolearn.data import EpisodeStore

    episodes = _parse_episode_list(args.episodes)
    # Opened without the chunk check: dropping the episodes that lie in a missing chunk file is a repair (the
    # drop refuses to keep any episode that touches one; episode_ends must be intact to open at all).
    with EpisodeStore.open(args.path, mode="a", validate=False) as store:
        store.validate(check_values=False, check_chunks=False)
        before = store.n_episodes
        store.drop_episodes(episodes)
        after = store.n_episodes
    print(f"dropped {before - after} episode(s) from {args.path}: {before} -> {after}")
    print_json({"path": str(args.path), "dropped": sorted(set(episodes)), "episodes": after})


def cmd_data_merge(args: argparse.Namespace) -> None:
    from robolearn.data import merge_stores

    if (args.out.exists() or args.out.is_symlink()) and not args.overwrite:
        raise CLIError(f"{args.out} already exists: pass --overwrite to replace it, or give another --out")
    with merge_stores(args.sources, args.out, overwrite=args.overwrite) as out:
        print(f"merged {len(args.sources)} stores into {out.path}: {out.n_episodes} episodes, {out.n_steps} steps")
        filled = out.attrs.get("filled_flags") or {}
        for src, keys in filled.items():
            print(f"  {src} has no {', '.join(keys)}: written as false for its episodes")
        print_json({"out": str(out.path), "episodes": out.n_episodes, "steps": out.n_steps, "filled_flags": filled})


# -------------------------------------------------------------------------------------------- hydra jobs
def _hydra_job(name: str) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        from robolearn.cli.config import compose

        cfg = compose(name, args.overrides)
        module_name, _, func = _JOBS[name].partition(":")
        module = importlib.import_module(module_name)
        if getattr(args, "cfg", None):  # as hydra's --cfg job: show the composed config, run nothing
            from omegaconf import OmegaConf

            if hasattr(module, "check_config"):  # what can be checked without the data
                module.check_config(cfg)
            print(OmegaConf.to_yaml(cfg), end="")
            return
        _settle_common(name, cfg)
        getattr(module, func)(cfg)

    return run


# Keys that name a checkpoint folder, per command (collect's and teleop's policy= is a checkpoint; run's may be ws://).
_CHECKPOINT_KEYS = ("checkpoint", "policy")


def _settle_common(name: str, cfg: Any) -> None:
    """What every job shares: torch's thread count (``threads=``) and a run folder given where a checkpoint is
    expected (``runs/train/<run>`` means its ``checkpoints/latest``)."""
    from omegaconf import OmegaConf

    from robolearn.policies.folders import checkpoint_folder

    for key in _CHECKPOINT_KEYS:
        value = cfg.get(key)
        if isinstance(value, str) and "://" not in value:
            folder = checkpoint_folder(value)
            if str(folder) != str(Path(value)):
                print(f"{key}: {value} is a run folder; using its latest checkpoint, {folder}", file=sys.stderr)
                OmegaConf.update(cfg, key, str(folder), merge=False)
    if "threads" in cfg:
        from robolearn.cli.threads import apply_threads

        apply_threads(name, cfg.threads)


# config name -> "module:function(cfg)"
_JOBS = {
    "collect": "robolearn.cli.collect:run",
    "bench_env": "robolearn.cli.bench_env:run",
    "quickstart": "robolearn.cli.quickstart:run",
    "train": "robolearn.cli.train:run",
    "eval": "robolearn.cli.eval:run",
    "run": "robolearn.cli.runtime:run",
    "serve": "robolearn.cli.runtime:serve",
    "teleop": "robolearn.cli.teleop:run",
    "finetune": "robolearn.cli.finetune:run",
    "accel_calibrate": "robolearn.cli.accel:calibrate_cmd",
    "bench_latency": "robolearn.cli.accel:latency_cmd",
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="robolearn",
        description="Learn robot manipulation chunk policies from demonstrations, in MuJoCo.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"robolearn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    data = sub.add_parser("data", help="inspect, validate, edit and merge episode stores")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data.set_defaults(func=lambda a: data.print_help())
    p = dsub.add_parser("info", help="episodes, steps, keys, fps, task, size on disk")
    p.add_argument("path", type=Path, help="episode store (a zarr folder)")
    p.add_argument("--json", action="store_true", help="also print the summary as JSON on the last line")
    p.set_defaults(func=cmd_data_info)
    p = dsub.add_parser("validate", help="check structure, lengths, schema and NaN/inf in actions")
    p.add_argument("path", type=Path)
    p.set_defaults(func=cmd_data_validate)
    p = dsub.add_parser("drop", help="remove episodes (the store is rewritten beside itself, then swapped in)")
    p.add_argument("path", type=Path)
    p.add_argument("--episodes", required=True, help="indices and ranges, e.g. 3,5,10-12")
    p.set_defaults(func=cmd_data_drop)
    p = dsub.add_parser("merge", help="concatenate stores with the same schema into a new store (flag keys such as "
                                      "intervention that only some have are filled with false)")
    p.add_argument("sources", type=Path, nargs="+", help="two or more stores")
    p.add_argument("--out", type=Path, required=True, help="the new store (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_data_merge)
    from robolearn.cli.data_io import add_parsers as add_data_io_parsers

    add_data_io_parsers(dsub)  # data import FORMAT / data export FORMAT (robolearn/cli/data_io.py)
    from robolearn.cli.audit import add_parsers as add_audit_parsers

    add_audit_parsers(dsub)  # data audit / data filter (robolearn/cli/audit.py)

    for name, (help_, description, examples) in _HYDRA_COMMANDS.items():
        _add_hydra_job(sub, name, name, help_, description, examples)

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", metavar="WHAT")
    bench.set_defaults(func=lambda a: bench.print_help())
    _add_hydra_job(bsub, "env", "bench_env", "environment steps per second, written as JSON",
                   "Step a task with random actions and report steps per second (robosuite tasks: also raw "
                   "robosuite, same run).", ["robolearn bench env task=push_t steps=20000"])
    _add_hydra_job(bsub, "latency", "bench_latency",
                   "batch-1 chunk latency, block-cached against uncached in the same run",
                   "Time predict_action at batch 1 with and without block caching (alternating call by call) and\n"
                   "compare their chunks on the same observations and noise. A base checkpoint is cached per\n"
                   "cache= (bac calibrates on its training data first); a cached checkpoint runs against its base.",
                   ["robolearn bench latency checkpoint=runs/train/<run>/checkpoints/latest",
                    "robolearn bench latency checkpoint=... cache=uniform updates=25",
                    "robolearn bench latency checkpoint=... sampler=ddim steps=10 updates=5",
                    "robolearn bench latency checkpoint=runs/train/<run>/checkpoints/latest-bac-ddpm-100-k25"])
    accel = sub.add_parser("accel", help="faster inference of a trained policy (block-wise adaptive caching)")
    asub = accel.add_subparsers(dest="accel_command", metavar="WHAT")
    accel.set_defaults(func=lambda a: accel.print_help())
    _add_hydra_job(asub, "calibrate", "accel_calibrate",
                   "block-caching schedule of a transformer policy, saved as a 'cached' checkpoint",
                   "Block-wise adaptive caching (BAC, Ji et al.): run the transformer policy on observations from\n"
                   "its training data, record every sub-block's output (self-attention, cross-attention, feed-\n"
                   "forward) at every denoising step, pick each block's update steps by dynamic programming over\n"
                   "their step x step similarity, and let the worst-cached blocks update with the feed-forward\n"
                   "block after them (Bubbling Union). The result is a 'cached' checkpoint naming its base, used\n"
                   "by eval, run and serve like any checkpoint; schedule.png shows the schedule. method=uniform\n"
                   "(every n-th step) is the baseline. method=shared runs the same dynamic program on the blocks'\n"
                   "mean similarity: one set of update steps for every block, which runs faster than bac's\n"
                   "staggered steps at equal compute. method=searched (few-step samplers) tries every set of\n"
                   "`updates` steps shared by all blocks and keeps the one whose chunks stay closest to the\n"
                   "uncached policy's: at DDIM-10 on lift it beat both (README). warm_steps=W schedules only the\n"
                   "last W steps, the ones a warm start (run blend=warmstart) runs; on the lift bases measured,\n"
                   "bac's schedules of every step updated each block at the last step and saved nothing over\n"
                   "the runner's default 2-step warm start.",
                   ["robolearn accel calibrate checkpoint=runs/train/<run>/checkpoints/latest",
                    "robolearn accel calibrate checkpoint=... updates=20 bubble=6 metric=l1",
                    "robolearn accel calibrate checkpoint=... sampler=ddim steps=10 updates=5",
                    "robolearn accel calibrate checkpoint=... sampler=ddim steps=10 method=searched updates=4",
                    "robolearn accel calibrate checkpoint=... warm_steps=2 updates=1 bubble=0",
                    "robolearn eval checkpoint=runs/train/<run>/checkpoints/latest-bac-ddpm-100-k25 episodes=50",
                    "robolearn run checkpoint=runs/train/<run>/checkpoints/latest-bac-ddim-10-k1-w2 blend=warmstart"])
    return parser


def _teleop_controls() -> str:
    from robolearn.teleop.controls import controls_help  # plain data: keeps 'robolearn --help' fast

    return controls_help()


# command -> (one-line help, description, examples); each takes hydra overrides, documented by its YAML.
_HYDRA_COMMANDS: dict[str, tuple[str, str, list[str]]] = {
    "collect": (
        "record scripted-expert demonstrations into an episode store",
        "Roll out a task's scripted expert and append the episodes to an episode store (resumable; only\n"
        "successes are kept unless keep_failures=true; killing it loses only the episodes in flight).",
        ["robolearn collect task=push_t episodes=50 out=data/push_t.zarr",
         "robolearn collect task=lift episodes=200 workers=2 expert.noise=0.3"],
    ),
    "train": (
        "train a chunk policy (diffusion or flow matching) from an episode store",
        "Train a chunk policy from an episode store, with evaluation rollouts in MuJoCo.\n"
        "task= picks a file of robolearn/configs/task/ (push_t, peg_insert, lift, can, square: the simulation task, its\n"
        "dataset, observation keys, env overrides, evaluation length); a new task is one YAML file there.\n"
        "policy= picks one of robolearn/configs/policy/: diffusion_unet, diffusion_transformer, flow_unet,\n"
        "flow_transformer; any policy.* key can be overridden (defaults: robolearn/policies/config.py).\n"
        "--cfg job prints the composed config without running.",
        ["robolearn train task=can policy=flow_unet",
         "robolearn train task=lift policy=diffusion_unet dataset=data/lift.zarr training.steps=5000",
         "robolearn train task=push_t policy=flow_unet --cfg job     # the composed config, nothing runs",
         "robolearn train task=push_t policy=flow_unet policy.backbone.preset=dp device=cuda",
         "robolearn train ... run_dir=runs/a resume=true          # continue an interrupted run",
         "torchrun --standalone --nproc_per_node=2 -m robolearn.cli train ...   # data-parallel"],
    ),
    "eval": (
        "success rate of a checkpoint in its task's MuJoCo environment",
        "Roll out a checkpoint in vectorized MuJoCo environments of the task it was trained on;\n"
        "per-episode results and videos land in the run folder.",
        ["robolearn eval checkpoint=runs/train/<run>/checkpoints/latest episodes=50 sampler.steps=4 video=true"],
    ),
    "run": (
        "run a chunk policy at a fixed control rate (async inference) in real-time MuJoCo",
        "Execute a checkpoint (or a remote policy server) at rate_hz on a monotonic clock.\n"
        "mode=async computes the next chunk while the current one executes; stale actions are dropped.\n"
        "Writes report.json in the run folder; its summary is the last line.",
        ["robolearn run checkpoint=runs/train/<run>/checkpoints/latest rate_hz=10 mode=async episodes=5",
         "robolearn run policy=ws://127.0.0.1:8000 task=push_t mode=sync duration_s=30",
         "robolearn run checkpoint=... realtime=false latency_s=0.25     # virtual clock, for testing"],
    ),
    "serve": (
        "serve a checkpoint's predict_action over WebSockets (openpi-compatible)",
        "A policy server speaking openpi's protocol: msgpack-numpy over WebSockets.\n"
        "Binds to loopback unless host= says otherwise; token= requires 'Authorization: Api-Key <token>'.",
        ["robolearn serve checkpoint=runs/train/<run>/checkpoints/latest port=8000 token=secret"],
    ),
    "teleop": (
        "record demonstrations by hand (keyboard, SpaceMouse, gamepad) in MuJoCo's viewer",
        "Open MuJoCo's viewer on a task and drive it with a device at the task's control rate; each saved\n"
        "episode is appended atomically to the episode store (scripted collection's schema, plus a per-step\n"
        "'intervention' flag and the device and time per episode). policy=CHECKPOINT: the policy drives through\n"
        "the real-time runner and the operator takes over and hands back. device=replay:FILE replays a log\n"
        "written with record_events=FILE through the same code path, headless by default.\n\n"
        + _teleop_controls(),
        ["robolearn teleop task=push_t device=keyboard out=data/push_t_teleop.zarr",
         "robolearn teleop task=lift device=spacemouse record_events=runs/lift_events.jsonl",
         "robolearn teleop policy=runs/train/<run>/checkpoints/latest out=data/push_t_dagger.zarr",
         "robolearn teleop device=replay:runs/lift_events.jsonl out=/tmp/replayed.zarr",
         "xvfb-run -a robolearn teleop task=push_t        # no display: a virtual one"],
    ),
    "finetune": (
        "reinforcement-learning fine-tuning of a frozen chunk policy (method=residual: ResiP | steer: DSRL)",
        "Fine-tune a checkpoint in its task's MuJoCo environments without retraining it.\n"
        "  method=residual (robolearn/configs/finetune/residual.yaml): PPO trains a small per-step residual MLP over the\n"
        "    frozen base, which runs as deployed (chunks queued, batched inference for all environments);\n"
        "    finetune.learner=td3 trains it off-policy, finetune.learner=ars by random search over a linear residual.\n"
        "  method=steer (robolearn/configs/finetune/steer.yaml): noise aliasing (finetune.variant=na, the default) or SAC\n"
        "    (=sac) trains an actor that picks the base's initial noise; the base must sample deterministically (ddim,\n"
        "    euler, midpoint; finetune.base_sampler=ddim steers a DDPM-trained diffusion policy). The defaults are the\n"
        "    recipe that steered here (sparse reward: env.reward_type=sparse where the task's default is dense).\n"
        "The result is evaluated on held-out seeds before, during and after; it is a 'residual' or 'steered'\n"
        "checkpoint naming its base, usable by eval, run, serve, teleop and collect policy=: checkpoints/latest,\n"
        "and checkpoints/best at the best in-run evaluation (chosen on those seeds: evaluate it on others).\n"
        "finetune.* keys are the method's settings; --cfg job prints the composed config.",
        ["robolearn finetune method=residual checkpoint=runs/train/<run>/checkpoints/latest env_steps=500000",
         "robolearn finetune method=residual checkpoint=... num_envs=16 workers=4 finetune.gamma=0.99",
         "robolearn finetune method=residual checkpoint=... finetune.learner=ars num_envs=64 workers=1",
         "robolearn finetune method=steer checkpoint=... env_steps=300000 num_envs=16 workers=0",
         "robolearn finetune method=steer checkpoint=<push_t base> env.reward_type=sparse finetune.variant=sac",
         "robolearn finetune method=steer checkpoint=... finetune.base_sampler=ddim finetune.base_steps=10",
         "robolearn finetune method=residual checkpoint=... --cfg job     # the composed config, nothing runs",
         "robolearn finetune method=residual resume=true run_dir=runs/finetune/<run>   # continue a run",
         "robolearn collect task=push_t policy=runs/finetune/<run>/checkpoints/latest episodes=200 "
         "out=data/push_t_rl.zarr"],
    ),
    "quickstart": (
        "the main job on the built-in default: what 'make demo' runs",
        "Collect scripted demonstrations of the default task, train a policy, evaluate it, and print\n"
        "the success rate with the paths of the video and the plots.",
        ["robolearn quickstart", "robolearn quickstart task=peg_insert episodes=100"],
    ),
}


def _add_hydra_job(sub: Any, command: str, config: str, help_: str, description: str, examples: list[str]) -> None:
    """A sub-command taking hydra overrides; its --help shows the config file with every setting."""
    from robolearn.cli.config import config_dir

    path = config_dir() / f"{config}.yaml"
    settings = path.read_text() if path.exists() else ""
    settings = "\n".join(ln for ln in settings.splitlines() if not ln.startswith(("defaults:", "  - ")))
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples)
    epilog += f"\n\nsettings (key=value; defaults from {path}):\n{settings}"
    lazy = None
    if config == "train":  # the keys that live in dataclasses, not in the YAML (built when --help is asked for)
        def lazy() -> str:
            from robolearn.cli.config import policy_keys_help, training_keys_help

            return "\n\n" + policy_keys_help() + "\n\n" + training_keys_help()
    p = sub.add_parser(command, help=help_, description=description, epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.lazy_epilog = lazy
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings, e.g. task=push_t")
    p.add_argument("--cfg", choices=["job"], default=None,
                   help="print the composed config (defaults, groups and overrides) and exit without running")
    p.set_defaults(func=_hydra_job(config))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from robolearn.data.schema import StoreError
    from robolearn.extras import MissingExtra
    from robolearn.policies.folders import CheckpointError
    from robolearn.policies.config import ConfigError

    try:
        args.func(args)
        sys.stdout.flush()  # inside the try: a reader that went away (`| head`) is a BrokenPipeError here
    except BrokenPipeError:
        # As the Python docs say: point stdout at devnull so the flush at exit cannot fail again; no message.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (CLIError, StoreError, ConfigError, CheckpointError, MissingExtra) as e:
        print(f"robolearn: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # any other file-system or network refusal: one line naming the file and the errno
        print(f"robolearn: error: {_file_system_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("robolearn: interrupted", file=sys.stderr)
        return 130
    return 0


# What the file system can refuse any command (a full disk, a read-only mount), with what to do about it; any other
# OSError is printed as one line too, with its errno's name.
_FILE_SYSTEM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def _file_system_error(e: OSError) -> str:
    where = (f" writing {e.filename}" if e.errno in _FILE_SYSTEM_ERRNOS else f" ({e.filename})") if e.filename else ""
    if e.errno not in _FILE_SYSTEM_ERRNOS and e.errno in errno.errorcode:
        where += f" [{errno.errorcode[e.errno]}]"
    todo = {errno.ENOSPC: "free some space and run it again", errno.EDQUOT: "free some space and run it again",
            errno.EROFS: "write to a writable place", errno.EACCES: "check the permissions",
            errno.EPERM: "check the permissions"}.get(e.errno or 0, "")
    return f"{(e.strerror or str(e)).lower()}{where}" + (f": {todo}" if todo else "")


if __name__ == "__main__":
    sys.exit(main())
