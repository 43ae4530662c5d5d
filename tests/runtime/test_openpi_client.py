"""The real ``openpi-client`` (PyPI) talks to PolicyServer unchanged.

openpi-client needs numpy<2 and imports typing_extensions without declaring it, so it lives in its own venv:
``$ROBOLEARN_OPENPI_VENV`` or ``<repo>/.venv-openpi``, created here on first use (needs PyPI; skipped without it).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from rt_policies import TickPolicy

from robolearn.runtime import PolicyServer

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("ROBOLEARN_OPENPI_VENV", REPO / ".venv-openpi"))
PY = VENV / "bin" / "python"

SCRIPT = r"""
import json, sys
import numpy as np
from openpi_client import websocket_client_policy as wcp

port, key = int(sys.argv[1]), sys.argv[2]
client = wcp.WebsocketClientPolicy(host="127.0.0.1", port=port, api_key=key)
meta = client.get_server_metadata()
out = {"numpy": np.__version__, "meta": {k: meta[k] for k in ("obs_keys", "horizon", "n_action_steps", "action_dim")},
       "actions": []}
for t in (1.0, 2.0, 3.0):
    r = client.infer({"observation/step": np.array([t], dtype=np.float32), "prompt": "push the T"})
    out["actions"].append(np.asarray(r["actions"]).tolist())
try:
    client.infer({"wrong": np.zeros(1)})
    out["error"] = None
except Exception as exc:  # openpi's client raises on a text (error) reply
    out["error"] = str(exc)
out["after_error"] = np.asarray(client.infer({"observation/step": np.array([4.0], np.float32)})["actions"]).tolist()
print(json.dumps(out))
"""


def _ensure_venv() -> None:
    if PY.exists() and subprocess.run([str(PY), "-c", "import openpi_client.websocket_client_policy"],
                                      capture_output=True).returncode == 0:
        return
    try:
        subprocess.run(["python3", "-m", "venv", str(VENV)],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "openpi-client", "numpy<2", "typing_extensions"],
                       check=True, capture_output=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"cannot create the openpi-client venv at {VENV} (no network / PyPI?): {exc} "
                    f"{detail[-300:].decode(errors='replace') if isinstance(detail, bytes) else detail}")


def test_openpi_websocket_client_policy_gets_the_in_process_actions() -> None:
    _ensure_venv()
    policy = TickPolicy(horizon=8, n_obs_steps=2, n_action_steps=4)
    with PolicyServer(policy, token="k3y", key_map={"observation/step": "t"}) as srv:
        proc = subprocess.run([str(PY), "-c", SCRIPT, str(srv.port), "k3y"], capture_output=True, text=True,
                              timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["numpy"].startswith("1.")  # really the separate numpy<2 environment
    assert out["meta"] == {"obs_keys": ["observation/step"], "horizon": 8, "n_action_steps": 4, "action_dim": 3}
    # the server stacks single frames into its per-connection history: (1,1), (1,2), (2,3)
    frames = [(1.0, 1.0), (1.0, 2.0), (2.0, 3.0)]
    for got, (a, b) in zip(out["actions"], frames):
        local = policy.predict_action({"t": torch.tensor([[[a], [b]]])})[0, policy.n_obs_steps - 1:].numpy()
        np.testing.assert_array_equal(np.array(got, dtype=np.float32), local)
    assert "missing observation key" in out["error"]
    assert out["after_error"][0][0] == 4.0
