"""``threads=``: how many threads torch may use, on every command that runs torch.

torch starts as many intra-op threads as there are cores. That is right for one big job on a quiet machine and
badly wrong beside anything else: each of torch's threads spins waiting for the others, so two processes (or a
process and its own environment workers) that both ask for every core slow each other down many times over. On
this project's 2-core machine a DDIM-10 chunk took 1,617 ms with 2 threads under load against 163 ms with one
(issue 15). The defaults below were measured (README, "Threads"): commands that infer while MuJoCo environments or
a control loop share the machine take one thread; training takes torch's own choice (it is the only job), and
``threads=N`` overrides either.
"""
from __future__ import annotations

import os
from typing import Any

__all__ = ["DEFAULT_THREADS", "apply_threads"]

# command -> default torch threads when threads= is not given; None keeps torch's own default (one per core).
DEFAULT_THREADS: dict[str, int | None] = {
    "train": None,
    "quickstart": None,
    "eval": 1,
    "run": 1,
    "serve": 1,
    "teleop": 1,
    "finetune": 1,
    "collect": 1,
    "accel_calibrate": None,
    "bench_latency": None,
}


def apply_threads(command: str, threads: Any) -> int:
    """Set torch's intra-op threads for ``command`` (``threads`` from its config; None: the command's default).
    Returns the number in use. A bad value is a :class:`~robolearn.cli.CLIError` naming it."""
    from robolearn.cli import CLIError

    if threads is None:
        threads = DEFAULT_THREADS.get(command)
        if threads is None:
            import torch

            return torch.get_num_threads()
    try:
        n = int(threads)
    except (TypeError, ValueError):
        raise CLIError(f"threads must be a whole number >= 1, got {threads!r}") from None
    if n < 1:
        raise CLIError(f"threads must be >= 1, got {n}")
    import torch

    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    # Worker processes started later (environment workers, DataLoader-free helpers) inherit this too.
    os.environ["OMP_NUM_THREADS"] = str(n)
    return n
