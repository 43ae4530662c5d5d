"""Checkpoint writes killed with SIGKILL at their worst moments, and what the next run makes of the folder.

The killed process is a real ``robolearn train`` (or a real ``save_policy``) whose write is held at one point (after
the weights are in the temporary folder, after the old checkpoint was moved aside, just before or after ``latest``
switches): it prints ``PAUSED``, the test checks what is on disk and kills it with SIGKILL, as the kernel would.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from robolearn.cli import main
from robolearn.policies import checkpoint_digest, load_policy, save_policy

TINY = ["policy.backbone.preset=tiny", "training.batch_size=8", "training.warmup_steps=2", "training.progress=false",
        "training.val_every=0", "training.log_every=1", "eval.episodes=0"]

# Runs `robolearn ARGS` (or `save SRC DST`: save_policy(load_policy(SRC), DST)) and holds it at PAUSE_AT.
DRIVER = r"""
import os, sys, time
from pathlib import Path

PAUSE, LINK = os.environ["PAUSE_AT"], os.environ.get("PAUSE_LINK")

def hold():
    sys.stdout.write("PAUSED\n")
    sys.stdout.flush()
    time.sleep(600)

if PAUSE == "weights":  # inside a checkpoint write: the weights are in the temporary folder
    import robolearn.policies.checkpoint as ck
    _save_file = ck.save_file
    def save_file(*a, **k):
        _save_file(*a, **k)
        hold()
    ck.save_file = save_file
else:
    _replace = os.replace
    def replace(src, dst, *a, **k):
        name = Path(dst).name
        if PAUSE == "before_latest" and name == "latest":
            hold()
        _replace(src, dst, *a, **k)
        if PAUSE == "moved_aside" and ".old-" in name:
            hold()
        if PAUSE == "after_latest" and name == "latest" and os.readlink(dst) == LINK:
            hold()
    os.replace = replace

if sys.argv[1] == "save":
    from robolearn.policies import load_policy, save_policy
    save_policy(load_policy(sys.argv[2]), sys.argv[3])
else:
    from robolearn.cli import main
    sys.exit(main(sys.argv[1:]))
"""


def start_paused(args: list[str], pause: str, link: str | None = None) -> subprocess.Popen:
    """Start the driver and return once it holds at ``pause`` (still alive)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PAUSE_AT": pause, "PAUSE_LINK": link or ""}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.strip() == "PAUSED":
                return proc
    finally:
        watchdog.cancel()
    proc.wait()
    pytest.fail(f"the driver ended (status {proc.returncode}) before {pause}: {proc.stderr.read()[-3000:]}")


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stdout.close()  # type: ignore[union-attr]
    proc.stderr.close()  # type: ignore[union-attr]
    assert proc.returncode == -signal.SIGKILL


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def steps_of(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def peg_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "peg.zarr"
    assert main(["collect", "task=peg_insert", "episodes=2", f"out={out}", "progress=false"]) == 0
    return out


def train_args(data: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "task=peg_insert", f"dataset={data}", f"run_dir={run}", "device=cpu", *TINY, *extra]


@pytest.fixture(scope="module")
def checkpoint(peg_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ck") / "run"
    assert main(train_args(peg_data, run, "training.steps=1")) == 0
    return run / "checkpoints" / "step_0000001"


@pytest.mark.parametrize("resume", [False, True])
def test_run_killed_in_its_first_checkpoint_write_starts_again(peg_data, tmp_path, capsys, resume):
    run = tmp_path / "run"
    args = train_args(peg_data, run, "training.steps=4", "training.ckpt_every=2")
    kill(start_paused(args, "weights"))
    root = run / "checkpoints"
    assert [n.split(".tmp-")[0] for n in hidden(root)] == [".step_0000002"]  # the killed write's full copy
    assert not (root / "latest").exists() and steps_of(root) == []

    assert main(args + (["resume=true"] if resume else [])) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    if resume:
        assert f"resume=true: {run} has no complete checkpoint" in err and "starts from step 0" in err
    assert "removed the unfinished checkpoint write .step_0000002.tmp-" in err
    summary = last_json(out)
    assert summary["step"] == 4 and summary["finished"]
    assert hidden(root) == [] and steps_of(root) == ["step_0000002", "step_0000004"]
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]


def test_run_killed_before_latest_switched_resumes_from_its_checkpoint(peg_data, tmp_path, capsys):
    run = tmp_path / "run"
    args = train_args(peg_data, run, "training.steps=4", "training.ckpt_every=2")
    kill(start_paused(args, "before_latest"))
    root = run / "checkpoints"
    assert steps_of(root) == ["step_0000002"] and not (root / "latest").exists()
    # A complete checkpoint is never overwritten by a fresh start...
    assert main(args) == 1
    assert "already holds checkpoints; pass resume=true" in capsys.readouterr().err
    # ... and resume continues from it: the killed run's metrics up to step 2 are kept (a restart would drop them).
    lines = (run / "metrics.jsonl").read_text().splitlines()
    first = {**json.loads(lines[0]), "mark": "killed run"}
    (run / "metrics.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    assert main(args + ["resume=true"]) == 0
    out, err = capsys.readouterr()
    assert "from step 0" not in err and last_json(out)["step"] == 4
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and metrics[0].get("mark") == "killed run"
    assert os.readlink(root / "latest") == "step_0000004" and hidden(root) == []


def test_keep_checkpoints_holds_after_a_resume_at_the_final_step(peg_data, tmp_path, capsys):
    run = tmp_path / "run"
    args = train_args(peg_data, run, "training.steps=6", "training.ckpt_every=2", "training.keep_checkpoints=2")
    kill(start_paused(args, "after_latest", link="step_0000006"))  # the final checkpoint is in, not yet pruned
    root = run / "checkpoints"
    assert steps_of(root) == ["step_0000002", "step_0000004", "step_0000006"]
    assert main(args + ["resume=true"]) == 0
    assert last_json(capsys.readouterr().out)["step"] == 6
    assert steps_of(root) == ["step_0000004", "step_0000006"]
    # a finished run resumed with fewer checkpoints to keep
    assert main(args + ["resume=true", "training.keep_checkpoints=1"]) == 0
    assert steps_of(root) == ["step_0000006"] and os.readlink(root / "latest") == "step_0000006"


def test_killed_overwrite_keeps_the_complete_checkpoint(checkpoint, tmp_path):
    folder = save_policy(load_policy(checkpoint), tmp_path / "ck")
    digest = checkpoint_digest(folder)
    kill(start_paused(["save", str(checkpoint), str(folder)], "moved_aside"))
    # the complete checkpoint's only copy is aside; the new one is still under its temporary name
    assert not folder.exists() and [n.split("-")[0] for n in hidden(tmp_path)] == [".ck.old", ".ck.tmp"]
    # The next write in the folder finds the killed one and puts the complete checkpoint back.
    save_policy(load_policy(checkpoint), tmp_path / "other")
    assert folder.is_dir() and checkpoint_digest(folder) == digest
    assert hidden(tmp_path) == []
    load_policy(folder)


def test_loading_after_a_killed_overwrite_puts_the_checkpoint_back(checkpoint, tmp_path):
    """A reader (robolearn eval, run, serve) finding only the moved-aside copy restores it and loads it."""
    folder = save_policy(load_policy(checkpoint), tmp_path / "ck")
    digest = checkpoint_digest(folder)
    kill(start_paused(["save", str(checkpoint), str(folder)], "moved_aside"))
    assert not folder.exists()
    with pytest.warns(UserWarning, match="ck"):
        load_policy(folder)
    assert folder.is_dir() and checkpoint_digest(folder) == digest
    assert [n.split("-")[0] for n in hidden(tmp_path)] == [".ck.tmp"]  # a reader restores, only writers clean


def test_a_live_writer_keeps_its_temporary_folder(checkpoint, tmp_path):
    from robolearn.policies.checkpoint import clean_stale_writes

    writer = start_paused(["save", str(checkpoint), str(tmp_path / "ck")], "weights")
    try:
        assert [n.split(".tmp-")[0] for n in hidden(tmp_path)] == [".ck"]
        assert clean_stale_writes(tmp_path) is None  # a writer is alive in the folder: nothing is touched
        save_policy(load_policy(checkpoint), tmp_path / "other")  # another write beside it is fine
        assert [n.split(".tmp-")[0] for n in hidden(tmp_path)] == [".ck"]
    finally:
        kill(writer)
    done = clean_stale_writes(tmp_path)
    assert done and "removed the unfinished checkpoint write .ck.tmp-" in done[0]
    assert hidden(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_non_finite_weights_are_never_saved_and_a_second_trainer_is_refused(checkpoint, tmp_path):
    import torch

    from robolearn.policies import CheckpointError
    from robolearn.cli.train import _lock_run
    from robolearn.cli import CLIError

    policy = load_policy(checkpoint)
    with torch.no_grad():
        next(policy.parameters())[0] = float("nan")
    with pytest.raises(CheckpointError, match="holds NaN or inf"):
        save_policy(policy, tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and hidden(tmp_path) == []
    fd = _lock_run(tmp_path / "run")
    try:
        with pytest.raises(CLIError, match="is being trained by pid"):
            _lock_run(tmp_path / "run")
    finally:
        os.close(fd)
    os.close(_lock_run(tmp_path / "run"))  # free again once the first trainer is gone
