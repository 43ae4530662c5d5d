"""The training loop: AdamW with cosine warm-up, EMA weights, atomic checkpoints, exact resume, metrics and plots.

Exact resume: batches and the policy's own noise draws are seeded from ``(seed, rank, step)``, not from a
running generator, so training resumed from the checkpoint at step ``k`` takes the same steps ``k+1, ...`` that
an uninterrupted run takes. Metrics past the checkpoint step (written after it by the interrupted run) are
dropped on resume so the loss curve has no duplicates.

Run folder::

    config.yaml            resolved configuration
    metrics.jsonl          one JSON object per log step, validation and evaluation
    tb/                    TensorBoard events
    plots/loss.png, plots/success.png
    checkpoints/step_000500/   policy checkpoint (EMA weights) + train_state.pt (optimizer, raw weights, step)
    checkpoints/latest -> step_000500
    videos/                evaluation videos
    result.json

Checkpoints are written whole or not at all (:func:`robolearn.policies.checkpoint.save_policy`); only the newest
``keep_checkpoints`` are kept (never the one ``latest`` names), pruned after each save and when a run ends, a
resumed one included. A run killed mid-write is made whole again before it resumes or starts over
(:func:`recover_checkpoints`): the dead writer's hidden folders go, and ``latest`` is pointed at the newest
checkpoint when the kill came before it switched.

Distributed (``torchrun``): every rank trains on its own batches; gradients are averaged by DDP; rank 0 alone
keeps the EMA, writes checkpoints, metrics and runs evaluations.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from robolearn.training.ema import EMA
from robolearn.training.settings import TrainSettings, cosine_with_warmup

TRAIN_STATE = "train_state.pt"


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """A run's checkpoint folders, oldest first (each ``step_*`` folder was renamed into place whole)."""
    return sorted(p for p in Path(root).glob("step_*") if p.is_dir() and not p.is_symlink())


def switch_latest(root: Path, name: str) -> None:
    """Point ``root/latest`` at checkpoint folder ``name``, atomically (a temporary link renamed over it)."""
    link, tmp_link = root / "latest", root / ".latest.tmp"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    tmp_link.symlink_to(name)
    os.replace(tmp_link, link)  # atomic switch of "latest"


def prune_checkpoints(root: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoint folders of ``root``, never the one ``latest``
    names, as a checkpoint writer (so no cleaner runs meanwhile)."""
    from robolearn.policies.checkpoint import remove_checkpoint, writing_checkpoints

    root = Path(root)
    latest = root / "latest"
    current = latest.resolve() if latest.exists() else None
    with writing_checkpoints(root):
        steps = complete_checkpoints(root)
        for old in steps[: max(0, len(steps) - int(keep))]:
            if old.resolve() != current:
                remove_checkpoint(old)


def recover_checkpoints(root: str | os.PathLike) -> list[str]:
    """Make a run's ``checkpoints`` folder whole after a killed run, before it resumes or starts over: delete what
    dead checkpoint writers left (:func:`~robolearn.policies.checkpoint.clean_stale_writes`, which also puts back
    a checkpoint an overwrite had moved aside) and the temporary ``latest`` link; point a missing or dangling
    ``latest`` at the newest checkpoint that can be resumed. Returns what was done, one line each.

    Raises CheckpointError when another process is writing checkpoints there now (the run is still training).
    """
    from robolearn.policies.checkpoint import CheckpointError, clean_stale_writes, no_checkpoint_writers

    root = Path(root)
    if not root.is_dir():
        return []
    with no_checkpoint_writers(root) as free:
        if free is False:
            raise CheckpointError(f"checkpoints are being written in {root} by another process right now (is this "
                                  f"run still training?)")
        done: list[str] = []
        if free:  # nothing is cleaned where the file system cannot tell a live writer from a dead one
            done += clean_stale_writes(root, held=True) or []
            if (root / ".latest.tmp").is_symlink():
                (root / ".latest.tmp").unlink()
        latest = root / "latest"
        if not latest.exists():
            resumable = [p for p in complete_checkpoints(root) if (p / TRAIN_STATE).is_file()]
            if resumable:
                switch_latest(root, resumable[-1].name)
                done.append(f"pointed latest at {resumable[-1].name}, the newest checkpoint (the run was killed "
                            f"before it switched)")
    return done


class _Loss(nn.Module):
    """DDP synchronizes gradients for what runs through ``forward``: route ``compute_loss`` through it."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.policy.compute_loss(batch)


def parse_metrics_line(line: str) -> dict[str, Any] | None:
    """One metrics record; None for a blank line or one cut short by a killed write."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


class Trainer:
    def __init__(
        self,
        policy: nn.Module,
        dataset: Any,
        settings: TrainSettings,
        run_dir: str | os.PathLike,
        config: dict[str, Any],
        *,
        val_dataset: Any = None,
        evaluate: Callable[[nn.Module, int], dict[str, Any]] | None = None,
        device: str | torch.device = "cpu",
        logger: str = "tensorboard",
    ) -> None:
        """``logger``: where scalars go besides ``metrics.jsonl``: tensorboard | wandb | none
        (:mod:`robolearn.training.loggers`)."""
        from robolearn.training.loggers import LOGGERS

        if logger not in LOGGERS:
            raise ValueError(f"logger must be one of {', '.join(LOGGERS)}, got {logger!r}")
        self.logger_kind = logger
        self.s = settings
        self.run_dir = Path(run_dir)
        self.config = config
        self.device = torch.device(device)
        self.dataset, self.val_dataset = dataset, val_dataset
        self.evaluate_fn = evaluate
        self.distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if self.distributed else 0
        self.world = torch.distributed.get_world_size() if self.distributed else 1
        self.main = self.rank == 0
        self.policy = policy.to(self.device)
        loss_module: nn.Module = _Loss(self.policy)
        if self.distributed:
            loss_module = nn.parallel.DistributedDataParallel(loss_module)
        self.loss_module = loss_module
        decay, no_decay = [], []
        for name, p in self.policy.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 else decay).append(p)  # no weight decay on biases and norms
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=settings.lr, betas=settings.betas,
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: cosine_with_warmup(s, settings.warmup_steps, settings.steps)
        )
        self.ema = EMA(self.policy, power=settings.ema_power, max_decay=settings.ema_max_decay)
        self.step = 0
        self.tb = None

    # ------------------------------------------------------------------ checkpoints
    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Policy checkpoint (EMA weights) plus training state, written beside its name and renamed into it."""
        from robolearn.policies.checkpoint import save_policy, writing_checkpoints

        name = f"step_{self.step:07d}"
        final = self.ckpt_root / name
        train_state = {
            "step": self.step,
            "model": self.policy.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "ema_step": self.ema.step,
            "settings": asdict(self.s),
        }
        self.ckpt_root.mkdir(parents=True, exist_ok=True)
        with writing_checkpoints(self.ckpt_root):  # a live writer: nobody cleans up after it meanwhile
            # One atomic write: save_policy renames the folder into place only after train_state.pt is in it.
            save_policy(self.ema.model, final, config=self.config, extra={"step": self.step},
                        write_extra=lambda tmp: torch.save(train_state, tmp / TRAIN_STATE))
            switch_latest(self.ckpt_root, name)
            self.prune_checkpoints()
        return final

    def prune_checkpoints(self) -> None:
        """Keep the newest ``keep_checkpoints`` checkpoint folders, and always the one ``latest`` names."""
        prune_checkpoints(self.ckpt_root, self.s.keep_checkpoints)

    def load_checkpoint(self, folder: Path) -> None:
        from robolearn.policies.checkpoint import load_policy

        state_file = folder / TRAIN_STATE
        if not state_file.exists():
            raise FileNotFoundError(f"cannot resume: {state_file} is missing")
        state = torch.load(state_file, map_location=self.device, weights_only=True)
        self.policy.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        ema_policy = load_policy(folder)
        self.ema.model.load_state_dict(ema_policy.state_dict())
        self.ema.step = int(state["ema_step"])
        self.step = int(state["step"])

    # ------------------------------------------------------------------ metrics
    def _log(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def _truncate_metrics(self, step: int) -> None:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = [ln for ln in path.read_text().splitlines()
                if (rec := parse_metrics_line(ln)) and rec.get("step", 0) <= step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, path)

    def metrics(self) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [rec for ln in path.read_text().splitlines() if (rec := parse_metrics_line(ln))]

    # ------------------------------------------------------------------ the loop
    def _batch(self, dataset: Any, step: int, salt: int = 0) -> dict[str, Any]:
        rng = np.random.default_rng([self.s.seed, self.rank, step, salt])
        idx = rng.integers(0, len(dataset), self.s.batch_size)
        from robolearn.data.sequence import _to_torch

        return _to(_to_torch(dataset.get_batch(idx)), self.device)

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        if self.val_dataset is None or len(self.val_dataset) == 0:
            return None
        self.ema.model.train(False)
        losses = []
        for b in range(self.s.val_batches):
            torch.manual_seed(hash((self.s.seed, 7, b)) % 2**31)
            losses.append(float(self.ema.model.compute_loss(self._batch(self.val_dataset, b, salt=1))))
        return float(np.mean(losses))

    def fit(self, resume: bool = False) -> dict[str, Any]:
        from robolearn.progress import progress_bar

        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.main:
            recover_checkpoints(self.ckpt_root)
        self._barrier()
        latest = self.ckpt_root / "latest"
        if resume:
            if not latest.exists():
                raise FileNotFoundError(f"cannot resume: no checkpoint at {latest}")
            self.load_checkpoint(latest.resolve())
            if self.main:
                self._truncate_metrics(self.step)
        elif self.main and (self.run_dir / "metrics.jsonl").exists():
            (self.run_dir / "metrics.jsonl").unlink()
        if self.main:
            from robolearn.training.loggers import make_logger

            self.tb = make_logger(self.logger_kind, self.run_dir, purge_step=self.step + 1 if resume else None,
                                  config=self.config)
        bar = progress_bar(self.s.steps, desc="train", unit="it", initial=self.step,
                           disable=not (self.main and self.s.progress))
        self.policy.train()
        t_last, n_last = time.perf_counter(), self.step
        last_eval: dict[str, Any] | None = None
        stop = self.s.steps if self.s.stop_after is None else min(self.s.steps, self.s.stop_after)
        while self.step < stop:
            batch = self._batch(self.dataset, self.step)
            torch.manual_seed(hash((self.s.seed, self.rank, self.step)) % 2**31)
            loss = self.loss_module(batch)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.s.grad_clip))
            self.opt.step()
            self.sched.step()
            self.ema.update(self.policy)
            self.step += 1
            bar.update(1)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training loss became {loss_value} at step {self.step}")
            if self.step % self.s.log_every == 0 or self.step == stop:
                now = time.perf_counter()
                it_s = (self.step - n_last) / max(now - t_last, 1e-9)
                t_last, n_last = now, self.step
                lr = self.sched.get_last_lr()[0]
                self._log({"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                           "it_s": round(it_s, 2), "samples_s": round(it_s * self.s.batch_size * self.world, 1)})
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if self.main and self.s.val_every and self.step % self.s.val_every == 0:
                v = self.validation_loss()
                if v is not None:
                    self._log({"step": self.step, "val_loss": v})
            if self.main and self.s.ckpt_every and self.step % self.s.ckpt_every == 0:
                self.save_checkpoint()
            if self.main and self.evaluate_fn and self.s.eval_every and self.step % self.s.eval_every == 0 \
                    and self.step < self.s.steps:
                last_eval = self._evaluate()
            self._barrier()
        bar.close()
        finished = self.step >= self.s.steps
        ckpt = None
        if self.main:
            if self.s.val_every and self.step % self.s.val_every != 0:
                v = self.validation_loss()
                if v is not None:
                    self._log({"step": self.step, "val_loss": v})
            ckpt = self.ckpt_root / f"step_{self.step:07d}"
            if ckpt.exists():  # resumed at a step that has its checkpoint: keep_checkpoints still holds
                self.prune_checkpoints()
            else:
                self.save_checkpoint()
            if finished and self.evaluate_fn:
                last_eval = self._evaluate()
            self.plot()
            if self.tb is not None:
                self.tb.close()
        self._barrier()
        return {"step": self.step, "finished": finished, "checkpoint": str(ckpt) if ckpt else None,
                "eval": last_eval}

    def _evaluate(self) -> dict[str, Any]:
        assert self.evaluate_fn is not None
        result = self.evaluate_fn(self.ema.model, self.step)
        self._log({"step": self.step, **{k: v for k, v in result.items() if isinstance(v, (int, float))}})
        self.policy.train()
        return result

    def _barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def plot(self) -> list[str]:
        """PNG plots of the loss (and validation loss) and of the success rate in ``plots/``."""
        from robolearn.training.plots import plot_metrics

        return plot_metrics(self.metrics(), self.run_dir / "plots")
