"""``robolearn collect``, ``bench env`` and ``quickstart`` through the real command: real MuJoCo, real stores."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from robolearn.cli import main
from robolearn.data import EpisodeStore

EXE = str(Path(sys.executable).with_name("robolearn"))


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_collect_writes_a_valid_store_and_resumes(tmp_path, capsys):
    out = tmp_path / "peg.zarr"
    assert main(["collect", "task=peg_insert", "episodes=3", f"out={out}", "progress=false"]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["episodes"] == 3 and summary["out"] == str(out) and 0 < summary["success_rate"] <= 1
    store = EpisodeStore.open(out)
    assert store.n_episodes == 3 and store.task == "peg_insert" and store.fps == 10
    assert store.env_config["clearance"] > 0  # the environment's full config, so it can be recreated
    assert store.schema["action"].role == "action" and store.schema["hole_pos"].role == "obs"
    assert store.schema["reward"].shape == ()
    assert store.get_episode(0)["reward"][-1] == 1.0  # kept episodes are successes: sparse reward at the end
    assert main(["data", "validate", str(out)]) == 0
    capsys.readouterr()
    # Resume: appends, continuing after the last seed used (so the new episodes differ from the old ones).
    assert main(["collect", "task=peg_insert", "episodes=2", f"out={out}", "progress=false"]) == 0
    again = EpisodeStore.open(out)
    assert again.n_episodes == 5 and again.attrs["collect"]["next_seed"] >= 5
    first = {again.get_episode(i)["hole_pos"][0].tobytes() for i in range(5)}
    assert len(first) == 5


def test_collect_with_worker_processes_keeps_failures(tmp_path, capsys):
    out = tmp_path / "w.zarr"
    argv = ["collect", "task=peg_insert", "episodes=4", f"out={out}", "workers=2", "keep_failures=true",
            "expert.noise=0.5", "progress=false"]
    assert main(argv) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["episodes"] == 4 and summary["attempts"] == 4
    assert EpisodeStore.open(out).n_episodes == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["task=pusht"], "unknown task 'pusht'. Did you mean 'push_t'?"),
        (["task=peg_insert", "env.clearence=0.001"], "unknown override 'clearence'"),
        (["task=peg_insert", "epsiodes=3"], "unknown config key 'epsiodes' for collect (did you mean 'episodes'?)"),
        (["task=peg_insert", "episodes=many"], "episodes takes a whole number, got 'many'"),
        (["task=peg_insert", "episodes=0"], "episodes must be >= 1"),
        (["task=push_t", "expert.bias=1"], "['bias']"),  # only peg_insert's expert has a bias
        (["task=peg_insert", "policy=runs/x", "expert.bias=1"], "expert.bias applies to the scripted expert"),
        (["task=peg_insert", "expert.bias=-1"], "noise and bias must be >= 0"),
    ],
)
def test_collect_bad_input(tmp_path, capsys, argv, message):
    assert main(["collect", *argv, f"out={tmp_path / 'x.zarr'}", "progress=false"]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x.zarr").exists()  # refused before anything was written


def test_collect_into_store_of_another_schema_is_refused(tmp_path, capsys):
    out = tmp_path / "s.zarr"
    assert main(["collect", "task=peg_insert", "episodes=1", f"out={out}", "progress=false"]) == 0
    assert main(["collect", "task=push_t", "episodes=1", f"out={out}", "progress=false"]) == 1
    assert "schema differs" in capsys.readouterr().err
    assert EpisodeStore.open(out).n_episodes == 1


def test_collect_refuses_to_mix_settings_in_one_store_unless_allowed(tmp_path, capsys):
    out = tmp_path / "peg.zarr"
    base = ["collect", "task=peg_insert", "episodes=1", f"out={out}", "progress=false"]
    assert main(base) == 0
    capsys.readouterr()
    for extra, says in ((["expert.noise=0.3"], "expert.noise is 0.0 in the store but 0.3 in this run"),
                        (["expert.bias=2"], "expert.bias is 0.0 in the store but 2.0 in this run"),
                        (["env.clearance=0.002"], "env.clearance is 0.001 in the store but 0.002 in this run")):
        assert main([*base, *extra]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"robolearn: error: cannot append to {out.resolve()}: its 1 episode was recorded "
                              f"with other settings (")
        assert says in err and "pass append_mismatch=allow" in err and "Traceback" not in err
    assert EpisodeStore.open(out).n_episodes == 1  # refused before any rollout
    assert main([*base, "append_mismatch=maybe"]) == 1
    assert "append_mismatch must be refuse or allow, got 'maybe'" in capsys.readouterr().err
    # Allowed on purpose: each episode says how it was made, and the store no longer claims one setting.
    assert main([*base, "expert.noise=0.3", "append_mismatch=allow"]) == 0
    store = EpisodeStore.open(out)
    a0, a1 = store.all_episode_attrs()
    assert (a0["source"], a0["noise"], a0["expert"], a0["success"]) == ("scripted", 0.0, "PegInsertExpert", True)
    assert (a1["source"], a1["noise"], a1["seed"]) == ("scripted", 0.3, a0["seed"] + 1)
    assert store.attrs["source"]["kind"] == "mixed"
    assert [s["noise"] for s in store.attrs["source"]["sources"]] == [0.0, 0.3]
    assert main([*base, "expert.bias=2", "append_mismatch=allow"]) == 0  # the peg expert's systematic flaw
    a2 = EpisodeStore.open(out).all_episode_attrs()[2]
    assert (a2["source"], a2["noise"], a2["bias"]) == ("scripted", 0.0, 2.0) and "bias" not in a0


def test_killed_collector_leaves_a_valid_store(tmp_path):
    out = tmp_path / "killed.zarr"
    proc = subprocess.Popen(
        [EXE, "collect", "task=peg_insert", "episodes=500", f"out={out}", "progress=false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        n = 0
        while time.monotonic() < deadline and n < 4:
            time.sleep(0.2)
            try:
                n = EpisodeStore.open(out, validate=False).n_episodes
            except Exception:
                n = 0
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    store = EpisodeStore.open(out)  # validates
    assert store.n_episodes >= 4
    kept = store.n_episodes
    # The store takes the next collection (the dead collector's lock is gone).
    r = subprocess.run([EXE, "collect", "task=peg_insert", "episodes=1", f"out={out}", "progress=false"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert EpisodeStore.open(out).n_episodes == kept + 1


def test_bench_env_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "env", "task=peg_insert", "steps=300", f"out={out}"]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["steps_per_s"] > 0 and summary["task"] == "peg_insert"
    assert json.loads(out.read_text())["steps_per_s"] == summary["steps_per_s"]


def test_quickstart_runs_the_whole_main_job(tmp_path, capsys):
    argv = ["quickstart", "task=peg_insert", "episodes=3", "workers=1", f"out_dir={tmp_path / 'data'}",
            f"run_dir={tmp_path / 'run'}", "train_steps=4", "eval_episodes=2", "progress=false",
            "train=['policy.backbone.preset=tiny','training.batch_size=8','eval.num_envs=2','training.eval_every=0',"
            "'eval.workers=0','task.eval.max_steps=40']"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    summary = last_json(out)
    assert summary["demonstrations"] == 3 and summary["train_steps"] == 4 and summary["eval_episodes"] == 2
    assert 0.0 <= summary["success_rate"] <= 1.0
    assert Path(summary["video"]).stat().st_size > 0 and any(p.endswith("loss.png") for p in summary["plots"])
    assert "success rate:" in out and "video:" in out
    assert EpisodeStore.open(tmp_path / "data" / "peg_insert.zarr").n_episodes == 3
    # Run again: the demonstrations are reused, training starts afresh.
    assert main(argv) == 0
    assert last_json(capsys.readouterr().out)["expert_success_rate"] is None
    assert EpisodeStore.open(tmp_path / "data" / "peg_insert.zarr").n_episodes == 3


@pytest.mark.parametrize("task", ["push_t", "lift", "can", "square"])
def test_collect_every_task_gives_a_valid_store(tmp_path, capsys, task):
    out = tmp_path / f"{task}.zarr"
    assert main(["collect", f"task={task}", "episodes=1", f"out={out}", "progress=false"]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["episodes"] == 1 and summary["success_rate"] > 0
    store = EpisodeStore.open(out)
    assert store.task == task and store.fps in (10, 20) and store.n_episodes == 1
    action = store.get_episode(0)["action"]
    assert action.shape[1] == store.schema["action"].shape[0] and abs(action).max() > 0
    assert main(["data", "validate", str(out)]) == 0
