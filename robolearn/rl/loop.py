"""The run both fine-tuning methods share: settings checked, evaluations, metrics, checkpoints, resume.

A method (:class:`~robolearn.rl.residual.ResidualPPO`; the replay-buffer ones, :class:`~robolearn.rl.steer.SteeringSAC`
and :class:`~robolearn.rl.residual_td3.ResidualTD3`, through :class:`OffPolicyRun`) subclasses :class:`FinetuneRun` and supplies its own learning: :meth:`~FinetuneRun.start_episodes`,
:meth:`~FinetuneRun.advance` (one unit of training -- a PPO update, or one environment step and the gradient steps
it owes -- returning a metrics record or None), and its resumable state (:meth:`~FinetuneRun.rl_state`,
:meth:`~FinetuneRun.restore`, optionally :meth:`~FinetuneRun.write_state` for files beside ``rl_state.pt``).

What :meth:`FinetuneRun.fit` does around it: evaluate ``baseline_policy()`` before the first step (the
``success_rate_before``), every ``eval_every`` environment steps and at the end (``evaluate(policy, env_steps)``,
a callback returning at least ``success_rate``); log every record to ``metrics.jsonl`` and TensorBoard; save a
checkpoint every ``ckpt_every`` steps and at the end (the policy kind's own checkpoint holding ``rl_state.pt``,
``latest`` switched atomically, the newest ``keep_checkpoints`` kept, all under the checkpoint-writer lock, as the
trainer does); draw ``plots/success.png``. ``env_steps_s`` counts the time of :meth:`advance` only (collection and
learning; evaluations and checkpoints excluded).

In-run evaluations swing (steering's push_t curves moved by 0.1-0.3 between evaluations 50k steps apart), so the
run also keeps ``checkpoints/best``: the trained policy at its best evaluation so far (highest ``success_rate``,
ties to the higher ``mean_return``, then to the earlier; the evaluation before training is not a candidate, so a
run that only got worse has a best below ``success_rate_before``), written when an evaluation beats it, never
pruned, without the resumable state (resume continues from ``latest``). The folder is its own record: its
``extra.json`` holds the score, and a resumed run reads it back, so a kill between writing ``best`` and the next
checkpoint loses nothing (a ``best`` whose score cannot be read, or was scored on other evaluation seeds, is
renamed ``best.unreadable`` / ``best.other-eval``, not overwritten).
Select on these held-out seeds, then report on others.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import torch

from robolearn.evaluation.rollout import step_info

RL_STATE = "rl_state.pt"
BEST = "best"  # checkpoints/best: the policy at the run's best evaluation
Evaluate = Callable[[Any, int], Mapping[str, Any]]


def final_obs(infos: Mapping[str, Any], i: int) -> dict[str, np.ndarray]:
    """Environment ``i``'s last observation of the episode that ended in this step (same-step autoreset): an
    object array of dicts (``sim.vector``, gymnasium's ``SyncVectorEnv``) or a dict of batched arrays."""
    final = infos["final_obs"]
    if isinstance(final, Mapping):
        return {k: np.asarray(v[i]) for k, v in final.items()}
    return {k: np.asarray(v) for k, v in final[i].items()}


def final_info(infos: Mapping[str, Any], key: str, i: int) -> Any:
    """``key`` of environment ``i``'s info at the end of its episode in same-step autoreset (None when it did not
    end or lacks it): :func:`~robolearn.evaluation.rollout.step_info` of a finished step."""
    return step_info(infos, key, i, finished_here=True)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` names, or (a kill between a save and the switch) the newest complete one."""
    link = Path(root) / "latest"
    if link.is_symlink() and link.resolve().is_dir():
        return link.resolve()
    from robolearn.training.trainer import complete_checkpoints

    done = complete_checkpoints(root)
    return done[-1] if done else None


class FinetuneRun:
    """A fine-tuning run of ``policy`` in ``envs`` (a gymnasium-contract vector env in same-step autoreset mode).

    ``total_env_steps``: stop once this many environment steps were taken (rounded up to the method's unit).
    ``seed``: the method's randomness and the environments' resets. ``evaluate(policy, env_steps)``: see the module
    docstring. ``eval_every`` / ``ckpt_every``: in environment steps (0: only before/after, only at the end).
    ``run_config``: saved as each checkpoint's ``run`` section (task, env_config, settings: provenance).
    """

    method: ClassVar[str] = "fine-tuning"  # in messages: "<method> needs a vector env ..."
    plot_title: ClassVar[str] = "fine-tuning"
    train_label: ClassVar[str] = "training episodes"
    eval_label: ClassVar[str] = "evaluation (held-out seeds)"
    #: the vector env's autoreset mode the method steps in ("Disabled": it resets environments itself, seeded)
    autoreset_mode: ClassVar[str] = "SameStep"

    def __init__(self, policy: Any, envs: Any, settings: Any, *, total_env_steps: int, run_dir: str | os.PathLike,
                 seed: int = 0, evaluate: Evaluate | None = None, eval_every: int = 0, ckpt_every: int = 0,
                 keep_checkpoints: int = 2, run_config: Mapping[str, Any] | None = None, progress: bool = True) -> None:
        settings.check()
        mode = (getattr(envs, "metadata", None) or {}).get("autoreset_mode")
        mode = getattr(mode, "value", mode)  # a gymnasium AutoresetMode or its string
        if mode not in (None, self.autoreset_mode):
            raise ValueError(f"{self.method} needs a vector env in autoreset mode {self.autoreset_mode!r}, got {mode!r}")
        self.policy, self.envs, self.s = policy, envs, settings
        self.num_envs = int(envs.num_envs)
        self.total_env_steps, self.seed = int(total_env_steps), int(seed)
        self.evaluate_fn, self.eval_every, self.ckpt_every = evaluate, int(eval_every), int(ckpt_every)
        self.keep_checkpoints = max(1, int(keep_checkpoints))
        self.run_dir = Path(run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.run_config = dict(run_config or {})
        self.progress = progress
        self.device = torch.device(policy.device)
        self.env_steps = 0
        self.next_episode = 0  # the chunk-noise rule's episode number of the next episode to start
        self.success_before: float | None = None
        self.last_eval: dict[str, Any] | None = None
        self.best: dict[str, Any] | None = None  # the best evaluation so far: success_rate, mean_return, env_steps
        self._best_known = True  # False on a resumed run until its first evaluation reads back checkpoints/best

    # ------------------------------------------------------------------ what a method supplies
    def start_episodes(self) -> None:
        raise NotImplementedError

    def advance(self) -> dict[str, Any] | None:
        """One unit of training (it moves ``env_steps``); a metrics record to log, or None."""
        raise NotImplementedError

    def baseline_policy(self) -> Any:
        """What ``success_rate_before`` evaluates (default: the policy itself, e.g. a zero residual)."""
        return self.policy

    def counters(self) -> dict[str, int]:
        """The method's progress counters (in the result and each checkpoint's ``extra.json``)."""
        return {}

    def postfix(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """What the progress bar shows of a record (the latest evaluation is added)."""
        return {"train_success": record.get("train_success_rate")}

    def rl_state(self) -> dict[str, Any]:
        """Everything beyond the policy's weights a resumed run needs (tensors and plain values)."""
        raise NotImplementedError

    def restore(self, state: Mapping[str, Any], folder: Path) -> None:
        """Load :meth:`rl_state`'s state (and files :meth:`write_state` wrote into ``folder``)."""
        raise NotImplementedError

    def write_state(self, tmp: Path, state: Mapping[str, Any]) -> None:
        """Write the resumable state into the checkpoint folder being built."""
        torch.save(dict(state), tmp / RL_STATE)

    # ------------------------------------------------------------------ the loop
    def _due(self, every: int, before: int) -> bool:
        return bool(every) and self.env_steps // every > before // every

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train until ``total_env_steps``; returns ``{env_steps, <counters>, checkpoint, success_rate_before,
        success_rate_after, best_checkpoint, best_success_rate, best_env_steps, eval, wall_s, env_steps_s,
        inference_s, plots}``. ``resume``: continue after :meth:`load_state`."""
        from robolearn.progress import progress_bar
        from robolearn.rl.log import RunLog, plot_success

        # resumed: compare against the best its folder holds, read (and, if not comparable, set aside) only when an
        # evaluation is about to replace it, so a resume that never evaluates leaves the folder as it was
        self.best, self._best_known = None, not resume
        log = RunLog(self.run_dir, resume_at=self.env_steps if resume else None)
        self.policy.eval()  # the heads' mode matters to nothing here; the base stays in eval mode regardless
        t_start = time.perf_counter()
        train_s = 0.0
        started_at = self.env_steps
        bar = progress_bar(self.total_env_steps, desc="finetune", unit="step", initial=self.env_steps,
                           disable=not self.progress)
        ckpt: Path | None = None
        try:
            if not resume and self.evaluate_fn is not None:
                self._evaluate(log, self.baseline_policy())
                self.success_before = self.last_eval["success_rate"] if self.last_eval else None
            elif self.evaluate_fn is not None and self.env_steps >= self.total_env_steps:
                self._evaluate(log)  # resumed a finished run: nothing to train, but say where it stands
            self.start_episodes()
            while self.env_steps < self.total_env_steps:
                before = self.env_steps
                t0 = time.perf_counter()
                record = self.advance()
                train_s += time.perf_counter() - t0
                bar.update(self.env_steps - before)
                if record is not None:
                    log.log(record)
                    bar.set_postfix(**self.postfix(record),
                                    eval=self.last_eval["success_rate"] if self.last_eval else None)
                last = self.env_steps >= self.total_env_steps
                if self.evaluate_fn is not None and (last or self._due(self.eval_every, before)):
                    self._evaluate(log)
                if last or self._due(self.ckpt_every, before):
                    ckpt = self.save()
        finally:
            bar.close()
            log.close()
        if not self._best_known:  # resumed, no evaluation since: report the best on disk, touching nothing
            self.best = self._best_on_disk()[0]
        if ckpt is None:  # resumed a run that had already finished: its newest checkpoint is the result
            ckpt = (self.ckpt_root / "latest").resolve()
        plot = plot_success(log.records(), self.run_dir / "plots" / "success.png", title=self.plot_title,
                            train_label=self.train_label, eval_label=self.eval_label)
        steps_done = self.env_steps - started_at
        return {"env_steps": self.env_steps, **self.counters(), "checkpoint": str(ckpt),
                "success_rate_before": self.success_before,
                "success_rate_after": self.last_eval["success_rate"] if self.last_eval else None,
                # a best is only ever set once its folder is written (or read back from it)
                "best_checkpoint": str(self.ckpt_root / BEST) if self.best else None,
                "best_success_rate": self.best["success_rate"] if self.best else None,
                "best_env_steps": self.best["env_steps"] if self.best else None,
                "eval": self.last_eval, "wall_s": round(time.perf_counter() - t_start, 2),
                "env_steps_s": round(steps_done / train_s, 1) if train_s > 0 else None,
                "inference_s": round(self.executor.inference_s, 2), "plots": [plot] if plot else []}

    def _evaluate(self, log: Any, policy: Any = None) -> None:
        assert self.evaluate_fn is not None
        result = dict(self.evaluate_fn(self.policy if policy is None else policy, self.env_steps))
        self.last_eval = result
        log.log({"env_steps": self.env_steps, "eval_success_rate": result.get("success_rate"),
                 **{k if k.startswith("eval_") else f"eval_{k}": v for k, v in result.items()
                    if k not in ("step", "success_rate") and isinstance(v, (int, float)) and not isinstance(v, bool)}})
        if policy is None and result.get("success_rate") is not None:  # the trained policy, not the baseline
            self._keep_if_best(result)

    # ------------------------------------------------------------------ checkpoints
    def _keep_if_best(self, result: Mapping[str, Any]) -> None:
        """Write ``checkpoints/best`` when this evaluation beats the best so far (success, then mean return)."""
        score = (float(result["success_rate"]), float(result.get("mean_return") or 0.0))
        if not self._best_known:
            self.best, self._best_known = self._read_best(), True
        if self.best is not None and score <= (self.best["success_rate"], self.best["mean_return"]):
            return
        self._save_policy(self.ckpt_root / BEST, {"success_rate": score[0], "mean_return": score[1], "best": True,
                                                  **self._eval_key()})
        self.best = {"success_rate": score[0], "mean_return": score[1], "env_steps": self.env_steps}

    def _eval_key(self) -> dict[str, int]:
        """What makes two evaluations' scores comparable: their seeds (``eval.seed``, ``eval.episodes`` of the run
        config; empty when the run config does not say)."""
        ev = self.run_config.get("eval")
        if not isinstance(ev, Mapping):
            return {}
        return {f"eval_{k}": int(ev[k]) for k in ("seed", "episodes") if k in ev}

    def _read_best(self) -> dict[str, Any] | None:
        """The score of ``checkpoints/best`` for an evaluation about to replace it, or None when there is none to beat.

        A ``best`` a killed replacement left moved aside is put back first. A ``best`` is never overwritten by a
        score it cannot be compared with: one whose score cannot be read is renamed ``best.unreadable``, one scored
        on other evaluation seeds (``eval.seed``/``eval.episodes`` changed on resume) ``best.other-eval`` (then
        ``.1``, ``.2``, ...), each with a message, and the evaluation writes a new ``best`` beside it."""
        from robolearn.policies.checkpoint import clean_stale_writes

        clean_stale_writes(self.ckpt_root)  # e.g. a .best.old-<hex> from a kill between save_policy's renames
        best, fault = self._best_on_disk()
        if fault is not None:
            self._set_best_aside(*fault)
        return best

    def _best_on_disk(self) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
        """``(score, None)`` for a ``checkpoints/best`` this run can compare against, ``(None, None)`` when there is
        none, ``(None, (why, message))`` when the one there cannot be compared; reads only."""
        from robolearn.policies.folders import EXTRA

        folder = self.ckpt_root / BEST
        if not folder.is_dir():
            return None, None
        try:
            extra = json.loads((folder / EXTRA).read_text())
            best = {"success_rate": float(extra["success_rate"]), "mean_return": float(extra["mean_return"]),
                    "env_steps": int(extra["env_steps"])}
        except (OSError, ValueError, KeyError, TypeError) as err:
            return None, ("unreadable", f"cannot read the score of {folder / EXTRA} ({type(err).__name__}: {err})")
        now = self._eval_key()
        then = {k: extra[k] for k in now if k in extra}  # a best from before these keys were kept: comparable
        if then != {k: now[k] for k in then}:
            return None, ("other-eval", f"{folder} was chosen on evaluations with "
                                        f"{', '.join(f'{k}={v}' for k, v in then.items())}, this run evaluates with "
                                        f"{', '.join(f'{k}={now[k]}' for k in then)}")
        return best, None

    def _set_best_aside(self, why: str, message: str) -> None:
        """Rename ``checkpoints/best`` to the first free ``best.<why>[.N]`` (as a checkpoint writer) and say so."""
        from robolearn.policies.checkpoint import writing_checkpoints

        with writing_checkpoints(self.ckpt_root):  # no cleaner runs meanwhile
            aside, n = self.ckpt_root / f"{BEST}.{why}", 0
            while os.path.lexists(aside):
                n += 1
                aside = self.ckpt_root / f"{BEST}.{why}.{n}"
            os.rename(self.ckpt_root / BEST, aside)
        print(f"finetune: {message}; kept that folder as {aside}, and this evaluation writes a new "
              f"{self.ckpt_root / BEST}", file=sys.stderr, flush=True)

    def _save_policy(self, folder: Path, extra: Mapping[str, Any], **kw: Any) -> Path:
        """The trained policy as a checkpoint folder (atomically, by ``save_policy``): the run's config with its
        settings, and ``extra`` after the progress counters (``step``, ``env_steps``, the method's counters)."""
        from robolearn.policies.checkpoint import save_policy

        return save_policy(self.policy, folder, config={**self.run_config, "settings": dataclasses.asdict(self.s)},
                           extra={"step": self.env_steps, "env_steps": self.env_steps, **self.counters(), **extra},
                           **kw)

    def save(self) -> Path:
        """The policy's checkpoint (``step_<env steps>``) holding the resumable state too; ``latest`` switched to
        it atomically; only the newest ``keep_checkpoints`` kept."""
        from robolearn.policies.checkpoint import writing_checkpoints
        from robolearn.training.trainer import prune_checkpoints, switch_latest

        state = {**self.rl_state(), "env_steps": self.env_steps, "next_episode": self.next_episode,
                 "success_before": -1.0 if self.success_before is None else float(self.success_before)}
        folder = self.ckpt_root / f"step_{self.env_steps:010d}"
        self.ckpt_root.mkdir(parents=True, exist_ok=True)
        with writing_checkpoints(self.ckpt_root):  # as the trainer: a live writer, nobody cleans meanwhile
            self._save_policy(folder, {"success_rate": self.last_eval.get("success_rate") if self.last_eval else None},
                              write_extra=lambda tmp: self.write_state(tmp, state))
            switch_latest(self.ckpt_root, folder.name)
            prune_checkpoints(self.ckpt_root, self.keep_checkpoints)
        return folder

    def load_state(self, folder: str | os.PathLike) -> None:
        """Continue from a checkpoint this class saved. The policy's weights are the checkpoint's: load it with
        :func:`robolearn.policies.load_policy` (which checks its base) and build this object around it."""
        path = Path(folder) / RL_STATE
        if not path.is_file():
            raise FileNotFoundError(f"cannot resume: {path} is missing (not a checkpoint of a {self.method} run?)")
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.restore(state, Path(folder))
        self.env_steps, self.next_episode = int(state["env_steps"]), int(state["next_episode"])
        before = float(state["success_before"])
        self.success_before = None if before < 0 else before


def soft_update(net: torch.nn.Module, target: torch.nn.Module, tau: float) -> None:
    """Polyak averaging: every parameter of ``target`` moves ``tau`` of the way to ``net``'s."""
    with torch.no_grad():
        for p, tp in zip(net.parameters(), target.parameters()):
            tp.lerp_(p, tau)


class OffPolicyRun(FinetuneRun):
    """The loop of the replay-buffer methods (steering's SAC, the residual's TD3): each :meth:`advance` is one step of
    every environment (:meth:`step`, returning finished episodes' ``returns``/``lengths``/``successes``) and then the
    gradient steps the new transitions owe (``self._owed``, one :meth:`update` each); every ``log_every``
    environment steps (and at the end) one record: the window's episodes, the mean of each update statistic, the
    seconds spent acting and learning. :meth:`finish_record` lets a method adjust the record."""

    _owed: float

    def step(self) -> dict[str, list[Any]]:
        raise NotImplementedError

    def update(self) -> dict[str, float]:
        raise NotImplementedError

    def finish_record(self, rec: dict[str, Any]) -> None:
        """Adjust a record before it is logged (default: nothing)."""

    def fit(self, resume: bool = False, log_every: int | None = None) -> dict[str, Any]:
        """:meth:`FinetuneRun.fit`; ``log_every``: environment steps per metrics record (default: about 200
        records a run)."""
        self.log_every = int(log_every or max(self.num_envs, self.total_env_steps // 200))
        self._next_log = (self.env_steps // self.log_every + 1) * self.log_every
        self._window: dict[str, list[Any]] = {"returns": [], "lengths": [], "successes": []}
        self._window_start = self.env_steps
        self._stats: list[dict[str, float]] = []
        self._act_s = self._learn_s = 0.0
        return super().fit(resume)

    def advance(self) -> dict[str, Any] | None:
        t0 = time.perf_counter()
        for k, v in self.step().items():
            self._window[k] += v
        t1 = time.perf_counter()
        while self._owed >= 1.0:
            self._stats.append(self.update())
            self._owed -= 1.0
        self._act_s += t1 - t0
        self._learn_s += time.perf_counter() - t1
        if self.env_steps < self._next_log and self.env_steps < self.total_env_steps:
            return None
        self._next_log += self.log_every
        window, stats = self._window, self._stats
        rec: dict[str, Any] = {"env_steps": self.env_steps, **self.counters(), "episodes": len(window["returns"])}
        if window["returns"]:
            rec.update(train_success_rate=round(float(np.mean(window["successes"])), 4),
                       train_return=round(float(np.mean(window["returns"])), 4),
                       train_length=round(float(np.mean(window["lengths"])), 2))
        for k in dict.fromkeys(k for st in stats for k in st):  # some statistics only on some steps (TD3's actor)
            rec[k] = round(float(np.mean([st[k] for st in stats if k in st])), 6)
        rec.update(act_s=round(self._act_s, 3), learn_s=round(self._learn_s, 3),
                   env_steps_s=round((self.env_steps - self._window_start) / max(self._act_s + self._learn_s, 1e-9), 1))
        self.finish_record(rec)
        self._window = {k: [] for k in window}
        self._window_start = self.env_steps
        self._stats, self._act_s, self._learn_s = [], 0.0, 0.0
        return rec
