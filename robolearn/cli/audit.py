"""``robolearn data audit`` and ``robolearn data filter``: score a store's episodes, and act on the scores."""
from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path
from typing import Any, Sequence

AUDIT_KEYS = {
    "checkpoint": (str, None, "score action divergence against this trained policy instead of cross-fitting"),
    "out": (str, None, "output folder (default runs/audit/<store name>)"),
    "folds": (int, 5, "cross-fitting folds: each fold's episodes are scored by a model trained on the others"),
    "fit_steps": (int, 1500, "training steps of each fold's regressor (batch 512)"),
    "max_queries": (int, 40000, "sampled steps for transition diversity (half that for checkpoint= divergence)"),
    "worst": (int, 10, "episodes listed in the report"),
    "videos": (int, 3, "worst episodes replayed into videos (0: none; tasks robolearn can simulate only)"),
    "seed": (int, 0, "folds, sampling and noise"),
    "threads": (int, None, "torch threads (default: torch's)"),
    "progress": (bool, True, "progress bars"),
}

AUDIT_HELP = """Score every episode of an episode store for data quality, without reading where it came from:

  action_divergence     how far each demonstrated action is from what a policy trained on the data does in that
                        state (cross-fitted: small regressors trained on K folds of the episodes score the
                        episodes they did not see; or against checkpoint=)
  transition_diversity  how far each step's next-state change lies from what similar states and actions lead to in
                        other episodes (nearest neighbours)
  plain signals         length, idle_steps/idle_share, action_jerk, success, intervention_share
  overall               the largest robust z-score of the four above (worst_score names it)

Writes OUT/scores.jsonl (a line per episode; its last line the summary), OUT/summary.json, OUT/report.png and
OUT/report.html (a histogram per score, the worst episodes with their seeds) and OUT/videos/ep<N>.mp4 (the worst
episodes replayed from their seeds and recorded actions). The last printed line is the summary as JSON.

options (key=value):
""" + "\n".join(f"  {k:<12} {h}" + (f" (default {d})" if d is not None else "")
                for k, (_, d, h) in AUDIT_KEYS.items()) + """

examples:
  robolearn data audit data/push_t.zarr
  robolearn data audit data/peg.zarr out=runs/audit/peg folds=5 videos=0
  robolearn data audit data/lift.zarr checkpoint=runs/train/<run>
  robolearn data filter data/peg.zarr --out data/peg_clean.zarr --drop "action_divergence>auto"
  robolearn train task=peg_insert dataset=data/peg.zarr training.episode_weights=runs/audit/peg/scores.jsonl
"""

FILTER_HELP = """Write a new store with the episodes an audit's scores do not rule out (the source is not touched).

A rule is SCORE OP VALUE: SCORE one of action_divergence, transition_diversity, overall, length, idle_steps,
idle_share, action_jerk, success, intervention_share; OP one of > >= < <= == !=; VALUE a number, true/false, a
percentile over the store (q90, q97.5) or auto (the split that best separates the scores into two groups, used only
when the groups really are apart). An episode is dropped when any --drop rule matches it or any --keep rule does
not. The rules, their thresholds and the dropped episodes are written to the new store's "filter" attribute.

examples:
  robolearn data filter data/peg.zarr --out data/peg_f.zarr --drop "action_divergence>q90"
  robolearn data filter data/peg.zarr --out data/peg_f.zarr --drop "action_divergence>auto" --drop "idle_share>0.3"
  robolearn data filter data/teleop.zarr --out data/ok.zarr --keep "success==true" --dry-run
"""


def default_out(store: Path) -> Path:
    name = store.name[:-5] if store.name.endswith(".zarr") else store.name
    return Path("runs") / "audit" / name


def parse_options(tokens: list[str]) -> dict[str, Any]:
    from robolearn.cli import CLIError

    opts = {k: d for k, (_, d, _h) in AUDIT_KEYS.items()}
    for tok in tokens:
        key, eq, raw = tok.partition("=")
        key = key.lstrip("-")
        if not eq:
            raise CLIError(f"data audit: {tok!r} is not key=value (options: {', '.join(AUDIT_KEYS)})")
        if key not in AUDIT_KEYS:
            near = difflib.get_close_matches(key, AUDIT_KEYS, n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise CLIError(f"data audit: unknown option {key!r}{hint} (options: {', '.join(AUDIT_KEYS)})")
        kind = AUDIT_KEYS[key][0]
        if raw.lower() in ("null", "none", "") and AUDIT_KEYS[key][1] is None:
            opts[key] = None
        elif kind is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise CLIError(f"data audit: {key} takes true or false, got {raw!r}")
            opts[key] = raw.lower() in ("true", "1", "yes")
        elif kind is int:
            try:
                opts[key] = int(raw)
            except ValueError:
                raise CLIError(f"data audit: {key} takes a whole number, got {raw!r}") from None
            if opts[key] < (0 if key in ("videos", "worst", "seed") else 1):
                raise CLIError(f"data audit: {key} must be >= {0 if key in ('videos', 'worst', 'seed') else 1}, "
                               f"got {raw}")
        else:
            opts[key] = raw
    return opts


def _bar_factory(enabled: bool) -> Any:
    from robolearn.progress import progress_bar

    def make(desc: str, total: int | None) -> Any:
        return progress_bar(total=total, desc=desc, disable=not enabled, unit="it")

    return make


def cmd_audit(args: argparse.Namespace) -> None:
    from robolearn.cli import print_json
    from robolearn.data import EpisodeStore

    opts = parse_options(args.options)
    if opts["threads"]:
        import torch

        torch.set_num_threads(int(opts["threads"]))
    out = Path(opts["out"]) if opts["out"] else default_out(args.path)
    policy = None
    if opts["checkpoint"]:
        from robolearn.policies.checkpoint import load_policy
        from robolearn.policies.folders import checkpoint_folder

        policy = load_policy(checkpoint_folder(opts["checkpoint"]))
        if getattr(policy, "wraps_base", False):
            print(f"data audit: {opts['checkpoint']} wraps a base policy; scoring against its base "
                  f"{policy.base.checkpoint_path}", file=sys.stderr)
            policy = policy.base
    from robolearn.audit import report
    from robolearn.audit.run import audit_store

    with EpisodeStore.open(args.path) as store:
        out.mkdir(parents=True, exist_ok=True)
        for old in (out / "videos").glob("ep*.mp4"):  # an earlier audit's: the report must not link them
            old.unlink()
        rows, summary, data = audit_store(store, policy=policy, folds=opts["folds"], fit_steps=opts["fit_steps"],
                                          seed=opts["seed"], max_queries=opts["max_queries"],
                                          progress=_bar_factory(opts["progress"]))
        summary["options"] = {k: v for k, v in opts.items() if k not in ("progress", "threads")}
        worst = report.worst(rows, max(opts["worst"], opts["videos"]))
        videos, why = replay_videos(out, store, [r["episode"] for r in worst[: opts["videos"]]], data)
    summary["worst"] = [{"episode": r["episode"], "seed": r["seed"], "overall": r["overall"],
                         "worst_score": r["worst_score"], **({"video": videos[r["episode"]]}
                                                              if r["episode"] in videos else {})}
                        for r in worst[: opts["worst"]]]
    if why:
        summary["videos_note"] = why
    summary["out"] = str(out)
    report.write_scores(out, rows, summary)
    summary["report"] = str(report.plot(out, rows, summary, opts["worst"]))
    report.write_html(out, rows, summary, opts["worst"], videos)
    lines = [f"audited {summary['episodes']:,} episodes ({summary['steps']:,} steps) of {args.path} in "
             f"{sum(summary['timings_s'].values()):.1f} s; scores: {out / 'scores.jsonl'}, report: {out / 'report.html'}"]
    lines.append("worst episodes (overall = largest robust z-score): " + ", ".join(
        f"{r['episode']} ({r['worst_score'].replace('_', ' ')}, z {r['overall']:.1f})" for r in worst[:5]
        if r["overall"] is not None))
    if why:
        lines.append(f"no videos: {why}")
    print("\n".join(lines), file=sys.stderr)
    print_json(summary)


def cmd_filter(args: argparse.Namespace) -> None:
    from robolearn.audit.rules import RuleError, read_scores, select_episodes
    from robolearn.cli import CLIError, print_json
    from robolearn.data import EpisodeStore, merge_stores

    scores_path = args.scores or default_out(args.path) / "scores.jsonl"
    if not Path(scores_path).exists():
        raise CLIError(f"no audit scores for {args.path} at {scores_path}: run robolearn data audit {args.path} "
                       f"first, or pass --scores FILE")
    with EpisodeStore.open(args.path) as store:
        n, lengths = store.n_episodes, store.episode_lengths
    try:
        rows = read_scores(scores_path, n_episodes=n, lengths=lengths, store=str(args.path))
        picked = select_episodes(rows, drop=args.drop or (), keep=args.keep or ())
    except (RuleError, ValueError, OSError) as e:
        raise CLIError(str(e)) from None
    for r in picked["rules"]:
        t = r["threshold"]
        msg = (f"{r['kind']} {r['rule']}: threshold {t:.6g}, matches {r['matched']} episode(s)" if t is not None
               else f"{r['kind']} {r['rule']}: {r.get('why', 'no threshold')}")
        print(msg + (f" ({r['unknown']} without this score)" if r["unknown"] else ""), file=sys.stderr)
    result = {"source": str(args.path), "scores": str(scores_path), "rules": picked["rules"],
              "dropped": picked["dropped"], "kept": len(picked["kept"]), "episodes": n}
    if args.dry_run:
        print(f"would keep {len(picked['kept'])} of {n} episodes (dry run: nothing written)", file=sys.stderr)
        print_json({**result, "dry_run": True})
        return
    if not picked["kept"]:
        raise CLIError(f"the rules drop every episode of {args.path}: nothing to write (try --dry-run)")
    if (args.out.exists() or args.out.is_symlink()) and not args.overwrite:
        raise CLIError(f"{args.out} already exists: pass --overwrite to replace it, or give another --out")
    attrs = {"filter": {k: v for k, v in result.items() if k != "episodes"}}
    with merge_stores([args.path], args.out, overwrite=args.overwrite, episodes=[picked["kept"]],
                      attrs=attrs) as out:
        print(f"kept {out.n_episodes} of {n} episodes ({out.n_steps:,} steps) in {out.path}; dropped "
              f"{len(picked['dropped'])}", file=sys.stderr)
        result["out"] = str(out.path)
        result["steps"] = out.n_steps
    print_json(result)


def replay_videos(out: Path, store: Any, episodes: Sequence[int], data: Any) -> tuple[dict[int, str], str | None]:
    """Replay ``episodes`` from their seeds with their recorded actions and write ``out/videos/ep<N>.mp4``. Returns the videos
    written and why there are none (a store from elsewhere, no seeds, a task that cannot render), if so."""
    import numpy as np

    if not episodes:
        return {}, None
    task = store.task
    if not task:
        return {}, "the store names no task: nothing to replay"
    try:
        import sim
        from robolearn.evaluation import record_episode
    except Exception as e:  # noqa: BLE001 - the audit stands without videos
        return {}, f"cannot import the simulation ({type(e).__name__}: {e})"
    if task not in sim.registry.available_tasks() and not task.startswith("robosuite/"):
        return {}, f"the store's task {task!r} is not a robolearn simulation task: nothing to replay"
    written: dict[int, str] = {}
    why = None
    env_config = dict(store.env_config or {})
    env_config.pop("render_mode", None)
    envs: dict[str, Any] = {}
    try:
        for e in episodes:
            a = data.attrs[e] if e < len(data.attrs) else {}
            if a.get("seed") is None:
                why = why or f"episode {e} has no recorded seed: it cannot be replayed"
                continue
            cfg = {**env_config, **dict(a.get("env_config_changes") or {})}
            key = json.dumps(cfg, sort_keys=True, default=str)
            if key not in envs:
                envs[key] = sim.make(task, **{**cfg, "render_mode": "rgb_array"})
            n = int(data.lengths[e])
            it = iter(np.asarray(store.get_episode(e, [data.action_key])[data.action_key]))
            res = record_episode(envs[key], lambda obs, it=it: next(it), out / "videos" / f"ep{e}.mp4",
                                 seed=int(a["seed"]), max_steps=n)
            written[e] = res["path"]
    except Exception as e:  # noqa: BLE001 - the scores are written; say why the videos are not
        why = f"replaying task {task!r} failed ({type(e).__name__}: {e})"
        print(f"robolearn data audit: warning: {why}", file=sys.stderr, flush=True)
    finally:
        for env in envs.values():
            env.close()
    return written, why


def add_parsers(dsub: Any) -> None:
    p = dsub.add_parser("audit", help="score every episode's quality (action divergence, transition diversity, ...)",
                        description=AUDIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="episode store (a zarr folder)")
    p.add_argument("options", nargs="*", metavar="key=value", help="see below")
    p.set_defaults(func=cmd_audit)
    p = dsub.add_parser("filter", help="a new store without the episodes an audit's scores rule out",
                        description=FILTER_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="the audited store (left as it is)")
    p.add_argument("--out", type=Path, required=True, help="the new store")
    p.add_argument("--drop", action="append", metavar="RULE", help="drop episodes that match (repeatable)")
    p.add_argument("--keep", action="append", metavar="RULE", help="drop episodes that do not match (repeatable)")
    p.add_argument("--scores", type=Path, help="score file (default runs/audit/<store name>/scores.jsonl)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--dry-run", action="store_true", help="say what would be kept; write nothing")
    p.set_defaults(func=cmd_filter)
