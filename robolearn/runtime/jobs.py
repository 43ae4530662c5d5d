"""Entry points for the CLI's ``robolearn run`` and ``robolearn serve``: the CLI loads the checkpoint and makes
the environment factory; these do the rest (status line, report JSON in the run folder, final JSON line)."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from robolearn.policies.executor import ChunkPredictor
from robolearn.runtime.runner import Runner, summary_line
from robolearn.runtime.server import PolicyServer


def resolve_policy(policy: ChunkPredictor | str, token: str | None = None) -> ChunkPredictor:
    """A policy object as is; ``"ws://host:port"`` as a :class:`RemotePolicy`. Checkpoint folders are loaded by
    the caller (the CLI's ``load_checkpoint``: ``load_policy`` plus the inference kernels), so there is one
    loader."""
    if not isinstance(policy, (str, os.PathLike)):
        return policy
    text = str(policy)
    if text.startswith(("ws://", "wss://")):
        from robolearn.runtime.client import RemotePolicy

        return RemotePolicy(text, token=token)
    raise TypeError(f"policy {text!r} is neither a policy object nor a ws:// URL; load a checkpoint folder with "
                    f"robolearn.cli.runtime.load_checkpoint (or robolearn.policies.load_policy) first")


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def run_job(policy: ChunkPredictor | str, env_factory: Callable[[], Any], *, run_dir: str | Path | None = None,
            episodes: int | None = 1, duration_s: float | None = None, seed: int = 0, token: str | None = None,
            print_summary: bool = True, print_error: bool = True,
            after_run: Callable[[Runner, dict[str, Any]], None] | None = None, **settings: Any) -> dict[str, Any]:
    """Run the policy on a fresh environment; write ``run_dir/report.json``; print the summary JSON last.

    ``settings`` go to :class:`Runner` (rate_hz, mode, blend, realtime, latency_s, max_nonfinite_chunks, ...); they
    and ``episodes``/``duration_s`` are checked (ValueError naming the key) before the environment is made. Always
    returns the report, also after Ctrl-C or a policy error (then ``report["error"]`` / ``report["interrupted"]``
    say so; ``print_error`` also prints the error on stderr). ``after_run(runner, report)`` runs after the
    environment is closed and before the report is written, so what it adds to the report is saved (``robolearn
    run video=true`` replays the recorded actions into videos there: the runtime room renders nothing itself)."""
    from robolearn.runtime.runner import check_settings

    check_settings(episodes=episodes, duration_s=duration_s)
    pol = resolve_policy(policy, token)
    env = env_factory()
    try:
        runner = Runner(pol, env, **settings)
        report = runner.run(episodes=episodes, duration_s=duration_s, seed=seed)
    finally:
        close = getattr(env, "close", None)
        if callable(close):
            close()
        if pol is not policy and hasattr(pol, "close"):
            pol.close()
    if after_run is not None:
        after_run(runner, report)
    if run_dir is not None:
        path = Path(run_dir) / "report.json"
        write_json_atomic(path, report)
        report["report_path"] = str(path)
    if report.get("error") and print_error:
        print(f"runner stopped: {report['error']}", file=sys.stderr)
    if print_summary:
        print(json.dumps(summary_line(report), default=str), flush=True)
    return report


def serve_job(policy: ChunkPredictor | str, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
              key_map: Mapping[str, str] | None = None, **server_settings: Any) -> None:
    """Serve until Ctrl-C; prints where it listens (stderr) and, at the end, a one-line JSON summary (stdout).
    The server's warnings (serving without a token beyond loopback, policy errors, non-finite chunks) go to stderr
    unless logging was configured already."""
    import logging

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                            format="robolearn serve: %(levelname)s: %(message)s")
    pol = resolve_policy(policy)
    server = PolicyServer(pol, host=host, port=port, token=token, key_map=key_map, **server_settings)

    def ready(s: PolicyServer) -> None:
        print(f"serving {type(pol).__name__} on {s.url} (token {'required' if s.token else 'not required'}); "
              f"obs keys {s.client_keys}; Ctrl-C stops", file=sys.stderr, flush=True)

    server.serve_forever(on_ready=ready)
    found = server.oversubscription
    print(json.dumps({"served": server.requests_served, "errors": server.errors_sent,
                      "nonfinite_chunks": server.nonfinite_chunks, "dropped": server.requests_dropped,
                      "url": server.url, "oversubscription": found.as_dict() if found is not None else None}),
          flush=True)
